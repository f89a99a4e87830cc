#!/usr/bin/env python3
"""The benches' mixed tree (layer.sh, fullsync.sh): ~520 MB in 30,012 files.

30,000 small files (~5 KiB average) of config/code-like text with a quarter random bytes, and
12 large files of 30 MiB, half random (incompressible), half log-like text.

    python3 integration/bench/mixed_tree.py DIR
"""
import os, random, sys
root = sys.argv[1]
rng = random.Random(42)
words = [("w%d" % i).encode() for i in range(5000)]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(16)) + b"\n"
    return bytes(out[:n])
# 30,000 small files (~5 KiB average): config/code-like text and a share of random bytes.
for i in range(30000):
    d = os.path.join(root, "small", "d%03d" % (i % 300))
    os.makedirs(d, exist_ok=True)
    n = rng.randint(512, 9728)
    data = os.urandom(n) if i % 4 == 0 else text(n)
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(data)
# 12 large files of 30 MiB: half random (incompressible), half log-like text.
os.makedirs(os.path.join(root, "large"), exist_ok=True)
chunk = text(1 << 20)
for i in range(12):
    with open(os.path.join(root, "large", "big%02d" % i), "wb") as f:
        for _ in range(30):
            f.write(os.urandom(1 << 20) if i % 2 == 0 else chunk)
