"""A bank of function vectors: one vector per relation, all added at the same layer, held as one object.

It loads from a folder of single-vector files (the shipped `<task>.ffv.safetensors`) or from one bank
file, a vector file whose rows are the relations (their names in the metadata). A bank file also carries
any extra `fvpatch.` metadata given to it, e.g. the learned map that composes the vectors for analogies.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fvpatch import vectorfile
from fvpatch.errors import FvpatchError, NotFound
from fvpatch.names import layer_of

BANK_NAME = "analogy.bank.safetensors"  # a model's shipped FFVs as one bank, with the learned analogy map
NAMES_KEY = "fvpatch.bank.names"
PAIRS_KEY = "fvpatch.bank.pairs"


@dataclass(eq=False)  # vectors is an array: a generated __eq__ would fail on it
class Bank:
    names: list[str]  # one relation per row
    vectors: np.ndarray  # (k, d) float32, added at the last token of a zero-shot prompt
    tensor: str  # l_out-L
    model: dict[str, str]  # fingerprint of the model the vectors were made on
    trained_on: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # relation -> pairs its vector was fit on
    meta: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file or folder it was loaded from, which errors name

    def __post_init__(self):
        where = f"{self.source}: " if self.source else ""
        try:
            self.vectors = vectorfile.float32_array(self.vectors, "bank vectors")
        except FvpatchError as e:
            raise FvpatchError(f"{where}{e}") from None
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.names):
            raise FvpatchError(f"{where}a bank needs one vector per name: {len(self.names)} names, vectors of shape {self.vectors.shape}")
        if len(set(self.names)) != len(self.names):
            raise FvpatchError(f"{where}bank relation names repeat: {self.names}")
        if layer_of(self.tensor) is None:
            raise FvpatchError(f"{where}bank vectors must name a layered tensor such as l_out-6, got {self.tensor!r}")

    @property
    def layer(self) -> int:
        return layer_of(self.tensor)

    def __len__(self) -> int:
        return len(self.names)


def _from_dir(folder: Path) -> Bank:
    files = sorted(folder.glob("*.ffv.safetensors"))
    if not files:
        raise NotFound(f"{folder} holds no *.ffv.safetensors vectors to make a bank of")
    names, rows, trained_on = [], [], {}
    first = None
    for path in files:
        vf = vectorfile.load(path)
        if len(vf.rows) != 1 or vf.positions != [-1] or vf.mode != "add":
            raise FvpatchError(f"{path}: a bank vector is one row added at the last token (positions [-1], mode add); got {len(vf.rows)} rows at {vf.positions}, mode {vf.mode}")
        first = first or vf
        if vf.tensor != first.tensor or vf.model != first.model:
            raise FvpatchError(f"{path}: {vf.tensor} on {vf.model.get('file')} differs from {first.tensor} on {first.model.get('file')}; a bank's vectors share one layer and one model")
        name = vf.meta.get("fvpatch.task") or path.name.removesuffix(".ffv.safetensors")
        names.append(name)
        rows.append(vf.rows[0] * np.float32(vf.scale))
        if "fvpatch.pairs" in vf.meta:
            trained_on[name] = [tuple(p) for p in _json_meta(path, vf.meta, "fvpatch.pairs", _is_pairs, "a JSON list of [input, output] pairs")]
    return Bank(names, np.stack(rows), first.tensor, first.model, trained_on, source=str(folder))


def _from_file(path: Path) -> Bank:
    vf = vectorfile.load(path)
    if NAMES_KEY not in vf.meta:
        raise FvpatchError(f"{path}: not a bank file (no {NAMES_KEY} metadata; `fvpatch train cfv` writes bank files)")
    names = relation_names(vf, path)
    pairs = _json_meta(path, vf.meta, PAIRS_KEY, lambda v: type(v) is dict and all(map(_is_pairs, v.values())), "a JSON object of relation -> pairs")
    trained_on = {k: [tuple(p) for p in v] for k, v in (pairs or {}).items()}
    meta = {k: v for k, v in vf.meta.items() if k not in (NAMES_KEY, PAIRS_KEY)}
    return Bank(names, vf.rows * np.float32(vf.scale), vf.tensor, vf.model, trained_on, meta, str(path))


def relation_names(vf: vectorfile.VectorFile, path: str | Path) -> list[str] | None:
    """The relations of a bank file's rows, in order; None for a vector file that is not a bank."""
    return _json_meta(Path(path), vf.meta, NAMES_KEY, lambda v: type(v) is list and all(type(x) is str for x in v), "a JSON list of relation names")


def _is_pairs(value) -> bool:
    return type(value) is list and all(type(p) is list and len(p) == 2 and all(type(x) is str for x in p) for p in value)


def _json_meta(path: Path, meta: dict[str, str], key: str, fits, what: str):
    """A JSON metadata value of the shape `fits` accepts (None when absent); anything else is refused, naming the file."""
    if key not in meta:
        return None
    try:
        value = vectorfile.strict_json(meta[key], key)
    except vectorfile.VectorFileError as e:
        raise vectorfile.VectorFileError(f"{path}: {e}") from None
    if not fits(value):
        raise vectorfile.VectorFileError(f"{path}: {key} must be {what}")
    return value


def load_bank(path: str | Path) -> Bank:
    """A folder of `<task>.ffv.safetensors` (one row each, mode add, same layer and model) or one bank file."""
    path = Path(path)
    if path.is_dir():
        return _from_dir(path)
    if path.is_file():
        return _from_file(path)
    raise NotFound(f"no bank at {path}: give a folder of .ffv.safetensors vectors or a bank file")


def save_bank(bank: Bank, path: str | Path, overwrite: bool = False) -> Path:
    """One vector file: a row per relation (positions all -1, the last token), names and extra metadata kept."""
    try:
        vectorfile.check_meta(bank.meta, "Bank", owned=(NAMES_KEY, PAIRS_KEY))
    except FvpatchError as e:
        raise type(e)(f"cannot save {path}: {e}") from None
    meta = {"fvpatch.method": "bank of function vectors", **bank.meta, NAMES_KEY: json.dumps(bank.names, ensure_ascii=False),
            PAIRS_KEY: json.dumps(bank.trained_on, ensure_ascii=False)}
    vf = vectorfile.VectorFile(bank.tensor, bank.vectors, [-1] * len(bank), bank.model, mode="add", meta=meta)
    return vectorfile.save(vf, path, overwrite)
