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


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion, k successes in n (95% for the default z)."""
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return mid - half, mid + half


def difference_interval(both: int, only_a: int, only_b: int, neither: int) -> tuple[float, float]:
    """95% interval of accuracy(a) - accuracy(b) over the same items: Newcombe's hybrid score interval for paired
    proportions (his method 10, Stat Med 1998), Wilson intervals of the two accuracies joined through the
    correlation of the paired outcomes. It stays inside [-1, 1] and keeps its coverage when few items disagree."""
    n = both + only_a + only_b + neither
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson(both + only_a, n), wilson(both + only_b, n)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)  # Newcombe's continuity correction of the correlation
    phi = cross / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return lower, upper


def compare(a, b) -> dict:
    """A vector's and ICL's per-item correctness over the same items: their counts (keyed `ffv` and `icl`, as the
    reports store them), the items only one gets, the sign test's p and the 95% interval of the difference."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"per-item results over different items: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return {"n": len(a), "ffv": int(a.sum()), "icl": int(b.sum()), "only_ffv": only_a, "only_icl": only_b, "p": sign_test(only_a, only_b),
            "ci": list(difference_interval(int((a & b).sum()), only_a, only_b, int((~a & ~b).sum())))}
