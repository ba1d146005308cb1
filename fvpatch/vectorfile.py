"""The vector file: safetensors holding one matrix of rows and string metadata.

A file written by `fvpatch save` or by `train/` has exactly one tensor, named after the graph tensor it
was read from or is meant for (e.g. `l_out-9`), of shape (rows, width): one row per source token.
Metadata keys (all strings, as safetensors requires) are listed in README. Only safetensors is read:
nothing is ever unpickled.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fvpatch import __version__
from fvpatch.atomic import write_bytes
from fvpatch.names import layer_of

FORMAT_VERSION = "1"
MODES = ("replace", "add")


class VectorFileError(ValueError):
    pass


@dataclass
class VectorFile:
    tensor: str  # graph tensor name, e.g. "l_out-9"
    rows: np.ndarray  # float32, (n_rows, width)
    positions: list[int]  # source token position of each row; -1 means "the last token"
    model: dict[str, str]  # fingerprint of the model it was made on (see fvpatch.model.fingerprint)
    mode: str = "replace"  # how `patch` applies it unless told otherwise
    scale: float = 1.0
    meta: dict[str, str] = field(default_factory=dict)  # prompt, template, task, heads, ...

    def __post_init__(self):
        self.rows = np.asarray(self.rows, dtype=np.float32)
        if self.rows.ndim == 1:
            self.rows = self.rows[None, :]
        if self.rows.ndim != 2:
            raise VectorFileError(f"vector rows must be 1-D or 2-D, got shape {self.rows.shape}")
        if len(self.positions) != len(self.rows):
            raise VectorFileError(f"{len(self.rows)} rows but {len(self.positions)} positions")
        if self.mode not in MODES:
            raise VectorFileError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    @property
    def layer(self) -> int | None:
        return layer_of(self.tensor)

    def row(self, position: int | None) -> np.ndarray:
        """The row saved at `position` (None: the only row)."""
        if position is None:
            if len(self.rows) != 1:
                raise VectorFileError(f"the file holds rows for tokens {self.positions}; choose one with --from-token-idx")
            return self.rows[0]
        if position not in self.positions:
            raise VectorFileError(f"the file holds no row for token {position}; it has tokens {self.positions}")
        return self.rows[self.positions.index(position)]

    def metadata(self) -> dict[str, str]:
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


def save(vf: VectorFile, path: str | Path, overwrite: bool = False) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated file, and nothing is replaced unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    return write_bytes(path, _st_save({vf.tensor: vf.rows}, metadata=vf.metadata()))


def load(path: str | Path) -> VectorFile:
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"{path}: no such vector file")
    data = path.read_bytes()
    try:
        tensors = _st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise VectorFileError(f"{path}: not a valid safetensors vector file ({e})") from None
    if meta.get("fvpatch.format") != FORMAT_VERSION:
        raise VectorFileError(f"{path}: not an fvpatch vector file (format {meta.get('fvpatch.format')!r}, expected {FORMAT_VERSION!r})")
    name = meta.get("fvpatch.tensor", "")
    if name not in tensors:
        raise VectorFileError(f"{path}: metadata names tensor {name!r} but the file holds {sorted(tensors)}")
    try:
        positions = [int(p) for p in json.loads(meta["fvpatch.positions"])]
        scale = float(meta["fvpatch.scale"])
    except (KeyError, ValueError, TypeError) as e:
        raise VectorFileError(f"{path}: bad fvpatch metadata ({e})") from None
    model = {k.removeprefix("fvpatch.model."): v for k, v in meta.items() if k.startswith("fvpatch.model.")}
    known = {"fvpatch.format", "fvpatch.creator", "fvpatch.tensor", "fvpatch.layer", "fvpatch.positions", "fvpatch.mode", "fvpatch.scale"}
    extra = {k: v for k, v in meta.items() if k not in known and not k.startswith("fvpatch.model.")}
    try:
        return VectorFile(name, tensors[name], positions, model, meta.get("fvpatch.mode", "replace"), scale, extra)
    except VectorFileError as e:
        raise VectorFileError(f"{path}: {e}") from None
