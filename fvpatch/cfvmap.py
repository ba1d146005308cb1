"""The composite function vector's map: scores of a bank's vectors on a source pair -> weights over the bank.

w = softmax(W (s - mean s) + b), learned (train/cfv.py fits it), or softmax(s / T) unlearned; the CFV is
sum_i w_i v_i. A bank file carries the map in its metadata as JSON arrays.
"""

import json
from dataclasses import dataclass, field

import numpy as np

from fvpatch.bank import Bank
from fvpatch.errors import FvpatchError

MAP_KEYS = ("fvpatch.cfv.weight", "fvpatch.cfv.bias", "fvpatch.cfv.temperature")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _masked_softmax(logits: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    return softmax(logits if keep is None else np.where(keep, logits, -np.inf))


@dataclass
class CFVMap:
    weight: np.ndarray  # (k, k), acting on scores centred over the bank
    bias: np.ndarray  # (k,)
    temperature: float  # of the unlearned softmax(s / T)
    meta: dict[str, str] = field(default_factory=dict)  # how it was fit

    def learned(self, scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Weights over the bank; `keep` (bool, like scores) gives the relations left out a weight of 0."""
        s = np.asarray(scores, np.float64)
        return _masked_softmax((s - s.mean(-1, keepdims=True)) @ self.weight.T + self.bias, keep)

    def unlearned(self, scores: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        return _masked_softmax(np.asarray(scores, np.float64) / self.temperature, keep)

    def to_meta(self) -> dict[str, str]:
        return {
            "fvpatch.cfv.weight": json.dumps(np.round(self.weight, 6).tolist()),
            "fvpatch.cfv.bias": json.dumps(np.round(self.bias, 6).tolist()),
            "fvpatch.cfv.temperature": repr(float(self.temperature)),
        } | self.meta

    @classmethod
    def from_bank(cls, bank: Bank) -> "CFVMap":
        """The map a bank file carries: each key a JSON array of finite numbers of the bank's shape (a temperature
        above 0), or one line naming the file and the key."""
        where = bank.source or "the bank"
        if not all(k in bank.meta for k in MAP_KEYS):
            raise FvpatchError(f"{where} carries no learned analogy map; fit one with `fvpatch train cfv`")
        k = len(bank)
        w, b, t = (_numbers(bank.meta[key], shape, f"{where}: {key}") for key, shape in zip(MAP_KEYS, [(k, k), (k,), ()]))
        if not t > 0:
            raise FvpatchError(f"{where}: {MAP_KEYS[2]} must be above 0, got {float(t)}")
        rest = {k: v for k, v in bank.meta.items() if k.startswith("fvpatch.cfv.") and k not in MAP_KEYS}
        return cls(w, b, float(t), rest)


def _numbers(text: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Finite numbers in nested JSON lists of `shape`: no NaN, no strings or booleans taken for numbers."""

    def numeric(v) -> bool:
        return all(map(numeric, v)) if type(v) is list else type(v) in (int, float)

    def no_constant(name):
        raise ValueError(f"{name} is not a number")

    try:
        value = json.loads(text, parse_constant=no_constant)
        arr = np.array(value, np.float64) if numeric(value) else None
    except (ValueError, OverflowError, RecursionError):  # not JSON, NaN/Infinity, ragged lists, an int beyond float
        arr = None
    if arr is None or arr.shape != shape or not np.isfinite(arr).all():
        want = "a finite number" if not shape else f"finite numbers of shape {list(shape)}"
        raise FvpatchError(f"{what} must be {want}, got {text[:60]!r}")
    return arr


def compose(bank: Bank, weights: np.ndarray) -> np.ndarray:
    """The composite vector(s): weights (k,) or (n, k) over the bank's rows."""
    return (np.asarray(weights, np.float64) @ bank.vectors.astype(np.float64)).astype(np.float32)
