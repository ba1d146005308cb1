"""The vector file: safetensors holding one matrix of rows and string metadata.

A file written by `fvpatch save` or by `train/` has exactly one tensor, named after the graph tensor it
was read from or is meant for (e.g. `l_out-9`), of shape (rows, width): one row per source token.
Metadata keys (all strings, as safetensors requires) are listed in README. Only safetensors is read:
nothing is ever unpickled.

Reading trusts nothing in the file: the header length is bounded and the JSON header is checked (one
tensor, its dtype F32, F16 or BF16, its shape and byte range exactly the data that follows, every
metadata key fvpatch reads typed) before a byte of tensor data is read. F16 and BF16 rows become float32
exactly and `VectorFile.dtype` says what was stored; any other dtype, and any NaN or inf, is refused.
"""

import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save as _st_save

from fvpatch import __version__
from fvpatch.atomic import check_outputs, input_file, write_bytes
from fvpatch.errors import FvpatchError
from fvpatch.names import layer_of

FORMAT_VERSION = "1"
MODES = ("replace", "add")
ACCURACY_KEYS = ("fvpatch.test_top1", "fvpatch.test_zero_shot_top1", "fvpatch.test_icl_top1")  # held-out: with the vector, without, 10-shot
APPLY_AT = ("last", "all")  # fvpatch.apply_at: the last prompt token (and generated ones), or every token like a control vector
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # BF16: the high half of an f32
MAX_HEADER_BYTES = 16 << 20  # headers take KBs (a bank's, 14 KB; a saved prompt adds its text): a longer one is not read
MAX_POSITION = 2**31 - 1  # llama.cpp positions are int32
CORE_KEYS = ("fvpatch.format", "fvpatch.creator", "fvpatch.tensor", "fvpatch.layer", "fvpatch.positions", "fvpatch.mode", "fvpatch.scale")

_INT = re.compile(r"0|-?[1-9][0-9]{0,17}")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # what repr(float) writes, less nan/inf


class VectorFileError(FvpatchError):
    pass


@dataclass(eq=False)  # rows is an array: a generated __eq__ would fail on it; two VectorFiles are equal only when they are one
class VectorFile:
    tensor: str  # graph tensor name, e.g. "l_out-9"
    rows: np.ndarray  # float32, (n_rows, width)
    positions: list[int]  # source token position of each row; -1 means "the last token"
    model: dict[str, str]  # fingerprint of the model it was made on (see fvpatch.model.fingerprint)
    mode: str = "replace"  # how `patch` applies it unless told otherwise
    scale: float = 1.0
    meta: dict[str, str] = field(default_factory=dict)  # prompt, template, task, heads, ...
    dtype: str = "F32"  # how the rows were stored; load converts F16 and BF16 to float32 exactly, save writes F32

    def __post_init__(self):
        if type(self.tensor) is not str or self.tensor == "__metadata__":  # safetensors keeps its metadata under that key
            raise VectorFileError(f"tensor must be a graph tensor name such as 'l_out-9', got {_shown(self.tensor)}")
        self.rows = float32_array(self.rows, "vector rows")
        if self.rows.ndim == 1:
            self.rows = self.rows[None, :]
        if self.rows.ndim != 2 or 0 in self.rows.shape:
            raise VectorFileError(f"vector rows must be a non-empty 1-D or 2-D array, got shape {self.rows.shape}")
        if not isinstance(self.positions, (list, tuple)) or not all(_is_position(p) for p in self.positions):
            raise VectorFileError(f"positions must be a list of token positions (integers, -1 or 0..{MAX_POSITION}), got {_shown(self.positions)}")
        self.positions = [int(p) for p in self.positions]
        if len(self.positions) != len(self.rows):
            raise VectorFileError(f"{len(self.rows)} rows but {len(self.positions)} positions")
        if self.model is None:  # a model loaded from a Hugging Face folder has no GGUF fingerprint: applying it needs --force
            self.model = {}
        if not isinstance(self.model, dict) or not all(type(k) is str for k in self.model):
            raise VectorFileError(f"model must be a fingerprint (a dict with string keys, as Session.fingerprint() returns), got {_shown(self.model)}")
        self.mode = check_mode(self.mode)
        self.scale = check_scale(self.scale)
        if self.dtype not in DTYPES:
            raise VectorFileError(f"dtype must be one of {list(DTYPES)}, got {_shown(self.dtype)}")
        bad = ~np.isfinite(self.rows)
        if bad.any():
            i = int(bad.any(axis=1).argmax())
            raise VectorFileError(f"{int(bad.sum())} values are NaN or inf (first in row {i}, token {self.positions[i]}); a vector must be finite")

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    @property
    def layer(self) -> int | None:
        return layer_of(self.tensor)

    def row(self, position: int | None, option: str = "--from-token-idx", asked: int | None = None) -> np.ndarray:
        """The row saved at `position` (None: the only row). A refusal names the index as it was `asked` for with
        `option`, before a negative one was resolved against the prompt."""
        picked = [i for i, p in enumerate(self.positions) if position in (None, p)]
        if len(picked) == 1:
            return self.rows[picked[0]]
        if not picked:
            raise VectorFileError(f"the file holds no row for {option} {position if asked is None else asked}; it has tokens {self.positions}")
        if len({self.positions[i] for i in picked}) == 1:  # a bank: one row per relation, all at the last token
            raise VectorFileError(f"the file holds {len(picked)} rows for token {self.positions[picked[0]]}; pick one relation with FILE#RELATION")
        raise VectorFileError(f"the file holds rows for tokens {self.positions}; choose one with {option}")

    def metadata(self) -> dict[str, str]:
        check_meta(self.meta, "VectorFile")  # here, not at construction: callers fill meta in after (report_ffv stamps test results)
        out = {
            "fvpatch.format": FORMAT_VERSION,
            "fvpatch.creator": f"fvpatch {__version__}",
            "fvpatch.tensor": self.tensor,
            "fvpatch.layer": "" if self.layer is None else str(self.layer),
            "fvpatch.positions": json.dumps(self.positions),
            "fvpatch.mode": self.mode,
            "fvpatch.scale": repr(float(self.scale)),
        }
        out.update({f"fvpatch.model.{k}": str(v) for k, v in self.model.items()})
        out.update({k: str(v) for k, v in self.meta.items()})
        return out


def float32_array(value, what: str) -> np.ndarray:
    """`value` as a float32 array: real numbers only (numpy would cast strings, and drop the imaginary part of
    complex ones); a torch tensor of any float dtype goes through float32, as numpy has no bfloat16."""
    torch = sys.modules.get("torch")  # not imported here: a tensor can only come from a caller that imported it
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy cannot hold
        raise VectorFileError(f"{what} must be an array of numbers ({_shown(str(e))})") from None
    if array.dtype.kind not in "iuf":
        raise VectorFileError(f"{what} must be real numbers, got an array of {array.dtype}")
    return array.astype(np.float32)


def check_mode(mode) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise VectorFileError(f"mode must be one of {MODES}, got {_shown(mode)}")
    return mode


def finite_real(x) -> float | None:
    """`x` as a float when it is a finite real number, else None; a bool or a string is not one (float() would take
    True and '1e3'), nor an int beyond float's range."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        try:
            if math.isfinite(float(x)):
                return float(x)
        except OverflowError:
            pass
    return None


def check_scale(scale) -> float:
    if (value := finite_real(scale)) is None:
        raise VectorFileError(f"scale must be a finite number, got {_shown(scale)}")
    return value


def check_meta(meta, owner: str, owned: tuple[str, ...] = ()) -> None:
    """Extra metadata: string keys, none of them one that save writes from `owner`'s own fields (the CORE_KEYS,
    fvpatch.model.*, and `owned`), which meta would otherwise silently overwrite."""
    if not isinstance(meta, dict) or not all(type(k) is str for k in meta):
        raise VectorFileError(f"{owner}.meta must be a dict with string keys, got {_shown(meta)}")
    clash = sorted(k for k in meta if k in CORE_KEYS or k in owned or k.startswith("fvpatch.model."))
    if clash:
        raise VectorFileError(f"{owner}.meta may not set {', '.join(map(repr, clash))}: save writes those keys itself, from the {owner}'s own fields")


def save(vf: VectorFile, path: str | Path, overwrite: bool = False) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated file, and nothing is replaced unless asked.
    The metadata is checked as load checks it, so that nothing is written that load would refuse."""
    try:
        vf = replace(vf)  # its fields checked again: they may have been changed since it was made
        meta = vf.metadata()
        _checked_metadata(vf.tensor, meta)
    except VectorFileError as e:
        raise VectorFileError(f"cannot save {path}: {e}") from None
    (path,) = check_outputs([path], force=overwrite)
    return write_bytes(path, _st_save({vf.tensor: vf.rows}, metadata=meta))


def load(path: str | Path) -> VectorFile:
    path = input_file(path, "vector file")
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, data_len = _read_header(f, size)
            meta = header.get("__metadata__")
            if meta is None:
                raise VectorFileError("not an fvpatch vector file (no __metadata__)")
            name, dtype, shape = _tensor_entry(header, data_len)
            positions, scale = _checked_metadata(name, meta)
            data = f.read(data_len)
        if len(data) != data_len:
            raise VectorFileError("not a valid safetensors vector file (it changed while it was read)")
        model = {k.removeprefix("fvpatch.model."): v for k, v in meta.items() if k.startswith("fvpatch.model.")}
        extra = {k: v for k, v in meta.items() if k not in CORE_KEYS and not k.startswith("fvpatch.model.")}
        return VectorFile(name, _float32_rows(data, dtype, shape), positions, model, meta["fvpatch.mode"], scale, extra, dtype)
    except OSError as e:
        raise VectorFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    except VectorFileError as e:
        raise VectorFileError(f"{path}: {e}") from None


def strict_json(text: str, what: str):
    """JSON as the file's writers produce it: no NaN or Infinity, no repeated keys, and no floats (a header
    and the metadata fvpatch reads hold only integers), so that nothing is rounded or coerced on the way in."""

    def no_float(s):
        raise VectorFileError(f"{what} holds the number {_shown(s)} where only integers belong")

    def no_constant(s):
        raise VectorFileError(f"{what} holds {s}, which is not JSON")

    def unique(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            raise VectorFileError(f"{what} repeats a key")
        return out

    try:
        value = json.loads(text, parse_float=no_float, parse_constant=no_constant, object_pairs_hook=unique)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except VectorFileError:
        raise
    except RecursionError:
        raise VectorFileError(f"{what} is nested too deeply") from None
    except UnicodeEncodeError:
        raise VectorFileError(f"{what} holds a lone surrogate escape (such as \\ud800), which is not text") from None
    except ValueError as e:  # JSONDecodeError, and int() of over 4300 digits
        raise VectorFileError(f"{what} is not valid JSON ({_shown(str(e))})") from None
    return value


def _read_header(f, size: int) -> tuple[dict, int]:
    """The JSON header, read only after its length fits the file and the bound, and the length of the data after it."""
    if size < 8:
        raise VectorFileError(f"not a valid safetensors vector file ({size} bytes, shorter than the 8-byte header length)")
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
        raise VectorFileError(f"not a valid safetensors vector file (header length {n} in a file of {size} bytes)")
    try:
        text = f.read(n).decode("utf-8")
    except UnicodeDecodeError:
        raise VectorFileError("not a valid safetensors vector file (the header is not UTF-8)") from None
    try:
        header = strict_json(text, "the header")
    except VectorFileError as e:
        raise VectorFileError(f"not a valid safetensors vector file ({e})") from None
    if type(header) is not dict:
        raise VectorFileError(f"not a valid safetensors vector file (the header is a JSON {type(header).__name__}, not an object)")
    return header, size - 8 - n


def _tensor_entry(header: dict, data_len: int) -> tuple[str, str, list[int]]:
    """The one tensor's name, dtype and shape; its bytes must be exactly the rest of the file."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise VectorFileError(f"a vector file holds exactly one tensor; this one holds {len(tensors)}: {_shown(sorted(tensors))}")
    (name, entry), = tensors.items()
    if type(entry) is not dict or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise VectorFileError(f"not a valid safetensors vector file (tensor {_shown(name)} must have exactly dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        raise VectorFileError(f"tensor {_shown(name)} has dtype {_shown(dtype)}; only {', '.join(DTYPES)} are read (nothing is cast silently)")
    if type(shape) is not list or len(shape) != 2 or not all(type(d) is int and d >= 1 for d in shape):
        raise VectorFileError(f"tensor {_shown(name)} has shape {_shown(shape)}; a vector file holds [rows, width], both at least 1")
    n_bytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets != [0, n_bytes] or any(type(o) is not int for o in offsets):
        raise VectorFileError(f"not a valid safetensors vector file (data_offsets {_shown(offsets)} for {shape} {dtype}, expected [0, {n_bytes}])")
    if n_bytes != data_len:
        raise VectorFileError(f"not a valid safetensors vector file (the header promises {n_bytes} bytes of data, the file holds {data_len})")
    return name, dtype, shape


def _float32_rows(data: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    raw = np.frombuffer(data, DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)  # a copy: frombuffer's array is read-only


def _checked_metadata(name: str, meta) -> tuple[object, float]:
    """The file's positions (checked further by VectorFile) and scale. Load checks a file's metadata with it and
    save checks what it writes, so save never writes a file that load refuses. Every key whose meaning fvpatch
    depends on is required and typed; a missing mode is not taken to be replace."""
    if type(meta) is not dict or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise VectorFileError("not a valid safetensors vector file (__metadata__ must map strings to strings)")
    if meta.get("fvpatch.format") != FORMAT_VERSION:
        raise VectorFileError(f"not an fvpatch vector file (format {_shown(meta.get('fvpatch.format'))}, expected {FORMAT_VERSION!r})")
    for key in ("fvpatch.tensor", "fvpatch.positions", "fvpatch.mode", "fvpatch.scale"):
        if key not in meta:
            raise VectorFileError(f"bad fvpatch metadata: {key} is missing")
    if meta["fvpatch.tensor"] != name:
        raise VectorFileError(f"metadata names tensor {_shown(meta['fvpatch.tensor'])} but the file holds {_shown(name)}")
    layer = "" if layer_of(name) is None else str(layer_of(name))
    if meta.get("fvpatch.layer", layer) != layer:
        raise VectorFileError(f"bad fvpatch metadata: fvpatch.layer {_shown(meta['fvpatch.layer'])} does not match tensor {_shown(name)}")
    positions = strict_json(meta["fvpatch.positions"], "fvpatch.positions")
    scale = _number(meta, "fvpatch.scale")
    for key, lo in (("fvpatch.test_n", 0), ("fvpatch.model.n_layer", 1), ("fvpatch.model.n_embd", 1)):
        _integer(meta, key, lo)
    for key in ACCURACY_KEYS:
        if key in meta and not 0 <= _number(meta, key) <= 1:
            raise VectorFileError(f"bad fvpatch metadata: {key} must be an accuracy in [0, 1], got {_shown(meta[key])}")
    if meta.get("fvpatch.apply_at", "last") not in APPLY_AT:
        raise VectorFileError(f"bad fvpatch metadata: fvpatch.apply_at must be one of {APPLY_AT}, got {_shown(meta['fvpatch.apply_at'])}")
    positions_top1(meta)
    n_prompt = _integer(meta, "fvpatch.n_prompt", 1)  # what a negative --from-token-idx counts from
    if n_prompt is not None and type(positions) is list and any(type(p) is int and p >= n_prompt for p in positions):
        raise VectorFileError(f"bad fvpatch metadata: positions {_shown(positions)} reach past the {n_prompt}-token prompt they were saved from")
    return positions, scale


def positions_top1(meta: dict[str, str]) -> dict[str, int] | None:
    """fvpatch.positions_top1: test items answered right with the vector at the last token and at every token
    (train.report_positions), or None when not measured."""
    key = "fvpatch.positions_top1"
    if key not in meta:
        return None
    value = strict_json(meta[key], key)
    if not (type(value) is dict and set(value) == {"n", "last", "all"} and all(type(v) is int for v in value.values())
            and value["n"] >= 1 and 0 <= value["last"] <= value["n"] and 0 <= value["all"] <= value["n"]):
        raise VectorFileError(f"bad fvpatch metadata: {key} must be {{\"n\": N, \"last\": K, \"all\": K}} counts with 0 <= K <= N >= 1, got {_shown(meta[key])}")
    return value


def _integer(meta: dict[str, str], key: str, lo: int) -> int | None:
    """A decimal integer >= lo, or None when the key is absent (int() would also take ' 7', '7_0' and '+7')."""
    if key not in meta:
        return None
    if not _INT.fullmatch(meta[key]) or int(meta[key]) < lo:
        raise VectorFileError(f"bad fvpatch metadata: {key} must be an integer >= {lo}, got {_shown(meta[key])}")
    return int(meta[key])


def _number(meta: dict[str, str], key: str) -> float:
    """A finite decimal number (float() would also take 'nan', 'inf' and '1e400')."""
    s = meta[key]
    if not _DECIMAL.fullmatch(s) or not math.isfinite(float(s)):
        raise VectorFileError(f"bad fvpatch metadata: {key} must be a finite number, got {_shown(s)}")
    return float(s)


def _is_position(p) -> bool:
    return isinstance(p, (int, np.integer)) and not isinstance(p, bool) and (p == -1 or 0 <= p <= MAX_POSITION)


def _shown(value, limit: int = 80) -> str:
    """A value from the file, quoted on one line and cut short: error messages stay one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
