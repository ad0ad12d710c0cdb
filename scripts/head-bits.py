#!/usr/bin/env python3
"""How many rows an exact top-k re-scoring would read with an 8-bit and with a 4-bit output head.

The 8-bit head (cpu/src/table/q8.rs) bounds each approximate logit by its weight residual
(min(max|r_v| * |x|_1, |r_v|_2 * |x|_2)) and re-scores in full precision every row whose bound
reaches the k-th largest lower bound. This script draws a head of the 2B-4T shape (128256 x 2560,
Gaussian rows) and an activation row with a few large channels, quantizes each row symmetrically to
8 bits (codes -127..127) and to 4 bits (codes -7..7) with one scale per row, and counts those
candidate rows for k = 1 and k = 40. It ignores the input's own rounding (two int8 levels make it
small), so the counts are lower bounds.

Needs numpy (`pip install numpy`); about a minute and 3 GB of memory: `python3 scripts/head-bits.py`.
"""
import numpy as np

rng = np.random.default_rng(1)
VOCAB, COLS = 128256, 2560
x = rng.standard_normal(COLS).astype(np.float32)
x[rng.choice(COLS, 25, replace=False)] *= 10
x1, x2 = np.abs(x).sum(), np.sqrt((x.astype(np.float64) ** 2).sum())
parts = {8: [], 4: []}
exact = []
for v0 in range(0, VOCAB, 8192):
    w = rng.standard_normal((min(8192, VOCAB - v0), COLS)).astype(np.float32)
    exact.append(w @ x)
    for bits, qmax in ((8, 127), (4, 7)):
        d = np.abs(w).max(1, keepdims=True) / qmax
        q = np.rint(w / d)
        r = w - d * q
        l2 = np.sqrt((r.astype(np.float64) ** 2).sum(1))
        bound = np.minimum(np.abs(r).max(1) * x1, l2 * x2)
        parts[bits].append((d[:, 0] * (q @ x), bound))
exact = np.concatenate(exact)
print(f"logits: standard deviation {exact.std():.1f}, largest {exact.max():.1f}")
for bits in (8, 4):
    approx = np.concatenate([a for a, _ in parts[bits]])
    bound = np.concatenate([b for _, b in parts[bits]])
    print(f"{bits}-bit head: mean bound {bound.mean():.1f} ({bound.mean() / exact.std():.2f} standard deviations)")
    for k in (1, 40):
        threshold = np.sort(approx - bound)[-k]
        print(f"  top-{k}: {(approx + bound >= threshold).sum()} of {VOCAB} rows re-scored")
