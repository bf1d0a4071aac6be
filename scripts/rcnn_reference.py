#!/usr/bin/env python3
"""Reference cases for tests/tests/rcnn.rs from torchvision's detection internals: AnchorGenerator's anchors,
Matcher's matches (with and without low-quality matches, on integer boxes so that IoU ties happen), BoxCoder's
encoding and decoding, and roi_align of masks as project_masks_on_boxes does it.

    pip install torch torchvision
    python3 scripts/rcnn_reference.py
"""
import json
import os
import random

import torch
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou


def anchors(sizes, ratios, stride, h, w):
    gen = AnchorGenerator(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
    images = ImageList(torch.zeros(1, 3, h * stride, w * stride), [(h * stride, w * stride)])
    return gen(images, [torch.zeros(1, 1, h, w)])[0].tolist()


def matcher_case(seed):
    rng = random.Random(seed)
    def box():
        x, y = rng.randint(0, 40), rng.randint(0, 40)
        return [x, y, x + rng.randint(2, 24), y + rng.randint(2, 24)]
    truths = [box() for _ in range(rng.randint(1, 5))]
    boxes = [box() for _ in range(60)] + [list(t) for t in truths[:1]]
    q = box_iou(torch.tensor(truths, dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32))
    out = {"truths": truths, "boxes": boxes}
    for name, (hi, lo, low_quality) in {"rpn": (0.7, 0.3, True), "roi": (0.5, 0.5, False)}.items():
        out[name] = Matcher(hi, lo, allow_low_quality_matches=low_quality)(q).tolist()
    return out


def coder_case(seed):
    rng = random.Random(seed)
    def box():
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        return [x, y, x + rng.uniform(1, 30), y + rng.uniform(1, 30)]
    refs, props = [box() for _ in range(20)], [box() for _ in range(20)]
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    enc = coder.encode_single(torch.tensor(refs, dtype=torch.float64), torch.tensor(props, dtype=torch.float64))
    deltas = [[rng.uniform(-3, 3) for _ in range(2)] + [rng.uniform(-3, 8) for _ in range(2)] for _ in range(20)]
    dec = coder.decode_single(torch.tensor(deltas, dtype=torch.float64), torch.tensor(props, dtype=torch.float64))
    return {"references": refs, "proposals": props, "encoded": enc.tolist(), "deltas": deltas, "decoded": dec.tolist()}


def main():
    out = {
        "anchors": {"sizes": [16, 32, 64], "ratios": [0.5, 1.0, 2.0], "stride": 4, "height": 2, "width": 3, "boxes": anchors([16, 32, 64], [0.5, 1.0, 2.0], 4, 2, 3)},
        "anchors_small": {"sizes": [12, 20, 32], "ratios": [0.5, 1.0, 2.0], "stride": 4, "height": 3, "width": 2, "boxes": anchors([12, 20, 32], [0.5, 1.0, 2.0], 4, 3, 2)},
        "matcher": [matcher_case(s) for s in range(6)],
        "coder": coder_case(7),
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "rcnn_reference.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print("wrote", path)


if __name__ == "__main__":
    main()
