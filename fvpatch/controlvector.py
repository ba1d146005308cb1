"""llama.cpp control vectors: GGUF files of one direction per block, added to the residual at every token.

The format, as llama.cpp's loader reads it: `general.architecture = "controlvector"`,
`controlvector.model_hint` (the model's architecture), `controlvector.layer_count`, and one 1-D F32 tensor
`direction.N` per block N >= 1 (never block 0), added to the output of block N (the graph's `l_out-N`)
at every token, prompt and generated. `--control-vector-scaled FILE:S` scales it; several files
are summed.

Writers agree on where a direction is applied but not on where it was measured: repeng measures at the
output of block N and writes `direction.N` there (and `layer_count` as uint32); llama.cpp's
cvector-generator measures at block N-1 and writes it as `direction.N` (`layer_count` as int32). Import
keeps the file's behaviour, `direction.N` -> `l_out-N`, and records which writer it looks like.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import check_outputs, input_file, write_gguf
from fvpatch.bank import NAMES_KEY
from fvpatch.errors import FvpatchError
from fvpatch.names import layer_of

ARCH = "controlvector"
FVPATCH_KEY = "fvpatch.vectors"  # what an fvpatch export was made of, so that import restores it
MODEL_PREFIX = "fvpatch.model."


@dataclass(eq=False)  # directions holds arrays: a generated __eq__ would fail on them
class ControlVector:
    directions: dict[int, np.ndarray]  # block N >= 1 -> (n_embd,) float32, added to l_out-N
    model_hint: str  # the model's architecture, e.g. "qwen2"
    model: dict[str, str] = field(default_factory=dict)  # an fvpatch fingerprint, when fvpatch wrote the file
    sources: list[dict] = field(default_factory=list)  # the vectors it was made of, when fvpatch wrote the file
    writer: str = "fvpatch"  # fvpatch, repeng or llama.cpp cvector-generator: how to read where it was measured

    def __post_init__(self):
        if not isinstance(self.directions, dict) or not self.directions:
            raise FvpatchError("a control vector needs at least one direction: a dict of block number -> vector")
        for n in self.directions:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise FvpatchError(f"a control vector's directions are keyed by block number (an integer >= 1), got {n!r}")
            if n < 1:
                raise FvpatchError(f"a control vector has no direction for block 0 (llama.cpp never applies one there); got block {n}")
        self.directions = {int(n): vectorfile.float32_array(v, f"direction.{n}") for n, v in self.directions.items()}
        for n, v in self.directions.items():
            if v.ndim != 1 or len(v) == 0:
                raise FvpatchError(f"direction.{n} must be a non-empty 1-D vector (one value per embedding dimension), got shape {v.shape}")
            if not np.isfinite(v).all():
                raise FvpatchError(f"direction.{n} holds NaN or inf values")
        widths = {len(v) for v in self.directions.values()}
        if len(widths) != 1:
            raise FvpatchError(f"a control vector's directions must share one width, got {sorted(widths)}")

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    def dense(self, n_layer: int) -> np.ndarray:
        """(n_layer - 1, n_embd) float32 from block 1 on, zeros where there is no direction: the buffer
        `llama_set_adapter_cvec` takes."""
        top = max(self.directions)
        if top >= n_layer:
            raise FvpatchError(f"the control vector has a direction for block {top}; the model has blocks 0..{n_layer - 1}")
        out = np.zeros((n_layer - 1, self.n_embd), np.float32)
        for n, v in self.directions.items():
            out[n - 1] = v
        return out


def from_vectors(items: list[tuple[vectorfile.VectorFile, float, str]]) -> ControlVector:
    """Sum (vector file, scale, where it came from) items per layer into one control vector. Only an
    added residual vector at a block N >= 1 is one: llama.cpp adds directions to l_out-N, nothing else."""
    if not items:
        raise FvpatchError("give at least one vector to export")
    directions: dict[int, np.ndarray] = {}
    first = items[0][0]
    sources = []
    for vf, scale, origin in items:
        layer = layer_of(vf.tensor)
        if not vf.tensor.startswith("l_out-") or layer is None:
            raise FvpatchError(f"{origin}: a control vector adds to block outputs (l_out-N); this vector is for {vf.tensor}")
        if layer == 0:
            raise FvpatchError(f"{origin}: llama.cpp applies no control vector to block 0 (l_out-0); export a vector of another layer")
        if vf.mode != "add":
            raise FvpatchError(f"{origin}: a control vector is added to the residual; this one replaces it (mode replace)")
        if len(vf.rows) != 1:
            bank = "; export one relation of a bank as BANK#RELATION" if NAMES_KEY in vf.meta else ""
            raise FvpatchError(f"{origin}: a control vector is one row per layer; this file holds {len(vf.rows)} rows (tokens {vf.positions}){bank}")
        if vf.width != first.width or vf.model.get("arch") != first.model.get("arch"):
            raise FvpatchError(f"{origin}: made on a {vf.model.get('arch')} model of width {vf.width}, "
                               f"unlike the first vector ({first.model.get('arch')}, width {first.width})")
        with np.errstate(over="ignore"):  # a finite vector times a finite scale can overflow float32: refused below in one line
            summed = directions.get(layer, 0) + vf.rows[0] * np.float32(scale)
        if not np.isfinite(summed).all():
            raise FvpatchError(f"{origin}: the vector times its scale ({scale:g}){', added to the others at layer ' + str(layer) if layer in directions else ''} "
                               "overflows float32; give a smaller --scale")
        directions[layer] = summed
        sources.append({"vector": origin, "tensor": vf.tensor, "scale": repr(float(scale)), "task": vf.meta.get("fvpatch.task", ""),
                        "method": vf.meta.get("fvpatch.method", ""), "positions": vf.meta.get("fvpatch.apply_at", "last")})
    return ControlVector({n: np.asarray(v, np.float32) for n, v in sorted(directions.items())},
                         first.model.get("arch", ""), dict(first.model), sources)


def exportable(vf: vectorfile.VectorFile) -> bool:
    """Whether this vector file exports as a control vector as it is (a bank's relations export one at a
    time, as BANK#RELATION)."""
    try:
        from_vectors([(vf, vf.scale, vf.tensor)])
    except FvpatchError:
        return False
    return NAMES_KEY not in vf.meta


def save(cv: ControlVector, path: str | Path, overwrite: bool = False) -> Path:
    """Write a control-vector GGUF that llama.cpp loads, atomically."""
    check_outputs([path], overwrite)

    def fill(w):
        w.add_string(f"{ARCH}.model_hint", cv.model_hint)
        w.add_int32(f"{ARCH}.layer_count", len(cv.directions))  # llama.cpp's own writer's type
        for k, v in cv.model.items():
            w.add_string(MODEL_PREFIX + k, v)
        if cv.sources:
            w.add_string(FVPATCH_KEY, json.dumps(cv.sources, ensure_ascii=False))
        for n, v in sorted(cv.directions.items()):
            w.add_tensor(f"direction.{n}", np.ascontiguousarray(v, np.float32))

    return write_gguf(path, ARCH, fill)


def load(path: str | Path) -> ControlVector:
    """Read a control-vector GGUF written by fvpatch, repeng or llama.cpp's cvector-generator."""
    import gguf

    path = input_file(path, "control-vector file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:  # gguf-py's own errors for a file that is not GGUF
        raise FvpatchError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _string(reader, "general.architecture")
    if arch != ARCH:
        raise FvpatchError(f"{path}: not a control vector (general.architecture is {arch!r}, expected {ARCH!r})")
    directions = {}
    for t in reader.tensors:
        prefix, dot, n = t.name.partition(".")
        if prefix != "direction" or not dot or not n.isdigit():
            raise FvpatchError(f"{path}: unexpected tensor {t.name!r} (a control vector holds only direction.N)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise FvpatchError(f"{path}: {t.name} must be a 1-D F32 tensor, got {t.tensor_type.name} of shape {[int(d) for d in t.shape]}")
        directions[int(n)] = np.array(t.data, dtype=np.float32).reshape(-1)
    try:
        cv = ControlVector(directions, _string(reader, f"{ARCH}.model_hint") or "", writer=_writer(reader))
    except FvpatchError as e:
        raise FvpatchError(f"{path}: {e}") from None
    cv.model = {f.name.removeprefix(MODEL_PREFIX): _string(reader, f.name) for f in reader.fields.values() if f.name.startswith(MODEL_PREFIX)}
    if FVPATCH_KEY in reader.fields:
        cv.sources = vectorfile.strict_json(_string(reader, FVPATCH_KEY), FVPATCH_KEY)
    return cv


def to_vector_files(cv: ControlVector, origin: str) -> dict[int, vectorfile.VectorFile]:
    """One add-mode vector file per direction, applied at every token as llama.cpp applies the file."""
    meta = {
        "fvpatch.method": "control vector",
        "fvpatch.apply_at": "all",
        "fvpatch.source": origin,
        "fvpatch.controlvector.writer": cv.writer,
        "fvpatch.controlvector.model_hint": cv.model_hint,
        "fvpatch.controlvector.measured_at": MEASURED_AT[cv.writer],
    }
    if cv.sources:
        meta[FVPATCH_KEY] = json.dumps(cv.sources, ensure_ascii=False)
    return {n: vectorfile.VectorFile(f"l_out-{n}", v, [-1], dict(cv.model), mode="add", meta=dict(meta)) for n, v in cv.directions.items()}


MEASURED_AT = {
    "fvpatch": "see fvpatch.vectors",
    "repeng": "l_out-N, where it is applied",
    "llama.cpp cvector-generator": "l_out-(N-1), one block before where it is applied",
}


def _writer(reader) -> str:
    if FVPATCH_KEY in reader.fields or any(k.startswith(MODEL_PREFIX) for k in reader.fields):
        return "fvpatch"
    f = reader.fields.get(f"{ARCH}.layer_count")
    import gguf

    if f is not None and f.types == [gguf.GGUFValueType.INT32]:
        return "llama.cpp cvector-generator"
    return "repeng"


def _string(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    import gguf

    if f.types != [gguf.GGUFValueType.STRING]:
        raise FvpatchError(f"{key} must be a string")
    return bytes(f.parts[-1]).decode("utf-8", "replace")
