"""Vectors shipped in vectors/<model>/ folders, found by name (the file name without .safetensors)."""

from pathlib import Path

from fvpatch.errors import FvpatchError, NotFound
from fvpatch.models import _ROOT, check_fingerprint

# An installed wheel holds them in the package (pyproject.toml maps vectors/ to fvpatch/vectors); a checkout,
# editable install included, keeps them at its top level.
_INSTALLED = Path(__file__).resolve().parent / "vectors"
VECTORS_DIR = _INSTALLED if _INSTALLED.is_dir() else _ROOT / "vectors"


def shipped_vectors() -> list[Path]:
    return sorted(VECTORS_DIR.rglob("*.safetensors"))


def _fits(path: Path, model: dict[str, str]) -> bool:
    from fvpatch import vectorfile

    try:
        check_fingerprint(vectorfile.load(path).model, model)
        return True
    except ValueError:
        return False


def find_vector(name: str, model: dict[str, str] | None = None) -> Path:
    """The shipped vector called `name`: its file name, its path inside its model's folder (`google/analogy.bank`)
    or inside vectors/, without .safetensors. Where several models ship one, the one made for `model` (a
    fingerprint); where a model's folder and a subfolder of it both hold the name, the folder's own."""

    def inside(p: Path) -> str:  # the path inside the model's folder (a file outside any folder is its own)
        parts = p.relative_to(VECTORS_DIR).parts
        return Path(*parts[1:] or parts).with_suffix("").as_posix()

    matches = [p for p in shipped_vectors() if name in (p.stem, inside(p), p.relative_to(VECTORS_DIR).with_suffix("").as_posix())]
    if len(matches) > 1 and model is not None:
        matches = [p for p in matches if _fits(p, model)] or matches
    if len(matches) > 1:
        matches = [p for p in matches if inside(p) == name] or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"{name!r} is neither a file nor a shipped vector (`fvpatch vectors list` shows them)")
    raise FvpatchError(f"{name!r} matches several shipped vectors: {', '.join(str(m.relative_to(VECTORS_DIR)) for m in matches)}")


def model_folder(model: dict[str, str]) -> Path:
    """The vectors/ folder whose vectors were made for `model` (any quantization of it)."""
    for folder in sorted(p for p in VECTORS_DIR.iterdir() if p.is_dir()):
        first = next(iter(sorted(folder.glob("*.safetensors"))), None)
        if first is not None and _fits(first, model):
            return folder
    raise NotFound(f"no vectors are shipped for {model.get('name') or model.get('file')} (`fvpatch vectors list` shows what is)")


def vector_path(name_or_path: str, model: dict | None = None) -> Path:
    """A vector file path, or the name of a vector shipped in vectors/ (the one made for `model`, a fingerprint, first)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    return find_vector(name_or_path, model)
