"""What a run saves and patches (`Save`, `Patch`), checked when made, and what it returns (`Result`)."""

import numbers
from dataclasses import dataclass, field

import numpy as np

from fvpatch.errors import FvpatchError
from fvpatch.vectorfile import MODES, check_scale, finite_real


@dataclass(frozen=True)
class Save:
    tensor: str
    tokens: tuple[int, ...] = (-1,)  # one index may be given as an int

    def __post_init__(self):
        if not isinstance(self.tensor, str):
            raise FvpatchError(f"a save's tensor is a graph tensor name such as 'l_out-9', got {self.tensor!r}")
        tokens = (self.tokens,) if isinstance(self.tokens, numbers.Integral) else tuple(self.tokens)
        if not tokens or not all(is_index(t) for t in tokens):
            raise FvpatchError(f"a save needs one or more token indices, got {self.tokens!r}")
        object.__setattr__(self, "tokens", tuple(int(t) for t in tokens))


def is_index(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True, eq=False)  # frozen: the checks below hold for the patch's whole life
class Patch:
    tensor: str
    vector: np.ndarray
    token: int = -1
    mode: str = "replace"
    scale: float = 1.0
    generated: bool = False  # also at every generated token, as function vectors are applied
    all_tokens: bool = False  # at every prompt and generated token, as llama.cpp applies a control vector

    def __post_init__(self):
        if not isinstance(self.tensor, str):
            raise FvpatchError(f"a patch's tensor is a graph tensor name such as 'l_out-9', got {self.tensor!r}")
        if self.mode not in MODES:
            raise FvpatchError(f"patch mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "replace" and self.all_tokens:
            raise FvpatchError("a replacing patch at every token would overwrite the whole residual; add instead (mode='add')")
        if not is_index(self.token):
            raise FvpatchError(f"a patch's token is a token index (an int), got {self.token!r}")
        scale = check_scale(self.scale)
        try:
            vector = np.array(self.vector, dtype=np.float32).reshape(-1)  # a copy: frozen below, not the caller's
        except (TypeError, ValueError):
            raise FvpatchError(f"a patch's vector must be numbers, got {type(self.vector).__name__}") from None
        if not vector.size or not np.isfinite(vector).all():
            raise FvpatchError("a patch's vector is empty or holds NaN or inf")
        with np.errstate(over="ignore"):  # a finite vector times a finite scale can still overflow float32
            if abs(scale) > 3.4e38 or not np.isfinite(vector * np.float32(scale)).all():
                raise FvpatchError(f"the vector times its scale ({scale:g}) overflows float32; give a smaller scale")
        vector.flags.writeable = False
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "vector", vector)


@dataclass
class Result:
    prompt_tokens: list[int]
    generated: list[int]
    text: str  # the generated continuation
    logits: np.ndarray  # (n_vocab,) predicting the first generated token
    saved: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> (rows, width), one row per position
    saved_positions: dict[str, list[int]] = field(default_factory=dict)  # tensor -> absolute positions
    prompt_logits: np.ndarray | None = None  # (n_prompt, n_vocab) when run(all_logits=True)


def check_generation(max_tokens, temperature, top_p=1.0, least: int = 0):
    """What generation takes, checked once for `Session.run` and `Slots.submit`: at least `least` new tokens, a
    temperature (0: greedy) and a nucleus."""
    if not (is_index(max_tokens) and max_tokens >= least):
        raise FvpatchError(f"max_tokens must be a whole number of {least} or more, got {max_tokens!r}")
    if (t := finite_real(temperature)) is None or t < 0:
        raise FvpatchError(f"temperature must be a finite number of 0 or more, got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise FvpatchError(f"top_p must be above 0 and at most 1, got {top_p!r}")


def check_overlaps(placed: list[tuple[Patch, int | str]]):
    """Refuse two patches on one row of one tensor where either replaces it: the later would undo the earlier, silently.
    Added patches on one row sum, as llama.cpp sums control vectors."""
    seen: dict[tuple[str, int | str], Patch] = {}
    for p, pos in placed:
        other = seen.setdefault((p.tensor, pos), p)
        if other is not p and "replace" in (p.mode, other.mode):
            raise FvpatchError(f"two patches write {p.tensor} at {'position ' + str(pos) if isinstance(pos, int) else pos}, and one replaces "
                               f"the row, which undoes the other; give one of them, or add both (mode add)")
