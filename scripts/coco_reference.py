#!/usr/bin/env python3
"""COCO evaluation reference cases for tests/tests/detection_metrics.rs, computed by pycocotools' COCOeval.

Writes tests/data/coco_reference.json: seeded random scenes (ground-truth boxes of three classes at small,
medium and large sizes; detections that are jittered copies of them, duplicates and false positives; scores in
steps of 0.05, so many ties), each with the 12 numbers of COCOeval.stats for iouType "bbox".

    pip install pycocotools numpy
    python3 scripts/coco_reference.py
"""
import contextlib
import io
import json
import os
import random

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def case(seed, images=8, classes=3):
    rng = random.Random(seed)
    gts, dets = [], []
    for img in range(images):
        for _ in range(rng.randint(0 if img == images - 1 else 1, 6)):
            c = rng.randrange(classes)
            w, h = rng.choice([(rng.randint(4, 30), rng.randint(4, 30)), (rng.randint(33, 90), rng.randint(33, 90)), (rng.randint(97, 200), rng.randint(97, 200))])
            x, y = rng.randint(0, 300), rng.randint(0, 300)
            gts.append([img, c, x, y, x + w, y + h])
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                j = lambda v, s: v + rng.randint(-s, s)
                s = max(1, min(w, h) // 4)
                x1, y1 = j(x, s), j(y, s)
                dets.append([img, c if rng.random() < 0.9 else rng.randrange(classes), rng.randrange(1, 21) * 0.05, x1, y1, max(x1 + 1, j(x + w, s)), max(y1 + 1, j(y + h, s))])
        for _ in range(rng.randint(0, 3)):
            x, y, w, h = rng.randint(0, 300), rng.randint(0, 300), rng.randint(4, 120), rng.randint(4, 120)
            dets.append([img, rng.randrange(classes), rng.randrange(1, 21) * 0.05, x, y, x + w, y + h])
    gt_json = {
        "images": [{"id": i + 1} for i in range(images)],
        "categories": [{"id": c + 1} for c in range(classes)],
        "annotations": [
            {"id": k + 1, "image_id": g[0] + 1, "category_id": g[1] + 1, "bbox": [g[2], g[3], g[4] - g[2], g[5] - g[3]], "area": (g[4] - g[2]) * (g[5] - g[3]), "iscrowd": 0}
            for k, g in enumerate(gts)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        res = coco.loadRes([{"image_id": d[0] + 1, "category_id": d[1] + 1, "score": d[2], "bbox": [d[3], d[4], d[5] - d[3], d[6] - d[4]]} for d in dets])
        ev = COCOeval(coco, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"seed": seed, "truths": gts, "detections": dets, "stats": [float(v) for v in ev.stats]}


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "coco_reference.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/coco_reference.py (pycocotools COCOeval, iouType bbox)", "cases": [case(s) for s in range(6)]}, f)
    print("wrote", out)
