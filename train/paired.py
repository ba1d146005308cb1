"""Two predictors scored item by item on the same prompts, and whether their difference is one at all.

Accuracies of 62% and 59% on 100 items say little by themselves: what decides is how many items only one of
the two gets right, and how unevenly those split (McNemar's exact test, a sign test on the discordant items).
"""

import math

import numpy as np


def sign_test(only_a: int, only_b: int) -> float:
    """Two-sided exact p of the discordant items (McNemar's exact test): how often a fair coin splits
    only_a + only_b items at least this unevenly."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def compare(a, b) -> dict:
    """Counts of two per-item correctness lists over the same items, with the sign test's p."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"per-item results over different items: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return {"n": len(a), "ffv": int(a.sum()), "icl": int(b.sum()), "only_ffv": only_a, "only_icl": only_b, "p": sign_test(only_a, only_b)}
