"""The runtime's GGUF model in PyTorch, tokenized exactly as llama.cpp tokenizes it.

transformers dequantizes the GGUF once (about a minute on CPU) and the result is cached as safetensors
under models/hf-cache/<file key>-<dtype>/, so later loads take seconds. Only the dtype asked for is
written; a float32 cache, when there is one, also serves the other dtypes (rounded on load exactly as a
conversion to them would round). Token ids come from llama.cpp's own tokenizer (a vocab-only load of the
same file), so a prompt has the same tokens and positions in both engines and a vector made here lands on
the same token there.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fvpatch.errors import FvpatchError
from fvpatch.models import file_key, models_dir, resolve_model
from fvpatch.modelfile import ModelFile
from fvpatch.threads import configured_threads, default_threads
from train.hooks import decoder_layers, head_shape, record_residual

# GGUF architectures that transformers' GGUF loader reads and that agree with llama.cpp layer by layer, train an
# FFV and patch it back (tests/test_arch_matrix.py); the runtime alone takes any GGUF that llama.cpp runs
ARCHITECTURES = ("gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3", "starcoder2")


class _HFTokenizer:
    """A Hugging Face model directory's own tokenizer, behind ModelFile's tokenize/detokenize."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(directory)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok(text, add_special_tokens=add_bos)["input_ids"]

    def detokenize(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens)


@dataclass(eq=False)
class LoadedModel:
    model: nn.Module
    device: torch.device
    dtype: torch.dtype  # of the weights and activations; vectors are trained and stored in float32
    n_layer: int
    n_embd: int
    n_head: int
    head_dim: int
    fingerprint: dict[str, str] | None  # Session.fingerprint() of the GGUF; None for a Hugging Face directory
    tokenizer: ModelFile | _HFTokenizer

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, last_index), right-padded so every token keeps its llama.cpp position."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("batch() needs at least one prompt and no empty prompt")
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # the pad id is never seen by a real token
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        last = torch.tensor([len(p) - 1 for p in prompts])
        return ids.to(self.device), mask.to(self.device), last.to(self.device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise FvpatchError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def torch_device(device: str | torch.device | None) -> torch.device:
    """`auto` (or None): CUDA if there is one, else Apple's MPS, else the CPU; a named device must exist."""
    name = str(device or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise FvpatchError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FvpatchError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; install a CUDA build of torch (README: Training on bigger models)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise FvpatchError(f"--device mps: this torch ({torch.__version__}) has no Apple MPS backend here (it needs macOS on Apple silicon)")
    return torch.device(name)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _converted(gguf: Path, dtype: torch.dtype) -> tuple[Path, torch.dtype]:
    """The Hugging Face directory transformers makes of `gguf` and the dtype it holds, converted on first use."""
    root = models_dir() / "hf-cache"
    key = file_key(gguf)
    for held in dict.fromkeys([dtype, torch.float32]):
        if (root / f"{key}-{_dtype_name(held)}" / "config.json").exists():
            return root / f"{key}-{_dtype_name(held)}", held
    from transformers import AutoModelForCausalLM, GgufConfig

    # dequantize: a plain dense model, which save_pretrained can write (weights kept in GGUF blocks cannot be).
    # transformers dequantizes each tensor in float32 and casts it right away, so a bfloat16 conversion holds
    # the model in bfloat16 (plus one tensor's float32 temporaries) and rounds exactly as a cast of float32 would.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
    cache = root / f"{key}-{_dtype_name(dtype)}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{cache.name}-"))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, cache)  # fails harmlessly if another process finished first
    except OSError:
        if not (cache / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache, dtype


def load_model(source: str | Path | None = None, device: str | torch.device | None = "auto", dtype: str | torch.dtype = torch.float32,
               threads: int | None = None) -> LoadedModel:
    """A GGUF file (default: the default model) or a Hugging Face model directory, in eval mode with no grads,
    its weights in `dtype` on `device` (see torch_device). PyTorch's CPU threads are set to `threads`, else to
    $FVPATCH_THREADS or $OMP_NUM_THREADS, else half the cores (fvpatch.threads)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads or configured_threads() or default_threads())
    dtype, device = torch_dtype(dtype), torch_device(device)
    if source is not None and Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise FvpatchError(f"{source} is a folder but not a Hugging Face model (no config.json); give a GGUF file, a known model name "
                               "(`fvpatch models`) or a model folder")
        directory, tokenizer, fingerprint = Path(source), _HFTokenizer(Path(source)), None
    else:
        source = resolve_model(source)  # a GGUF path, a known model's short name, or None for the default model
        tokenizer = ModelFile(source, vocab_only=True)
        if tokenizer.arch not in ARCHITECTURES:
            raise FvpatchError(f"{source.name}: the training side cannot load architecture {tokenizer.arch!r}; it loads {', '.join(ARCHITECTURES)} "
                             "(fvpatch save/patch still run it in llama.cpp)")
        directory, fingerprint = _converted(source, dtype)[0], tokenizer.fingerprint()

    # straight onto the device: no copy of the whole model in CPU memory first
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device).eval()
    model.requires_grad_(False)
    n_head, head_dim = head_shape(model)
    lm = LoadedModel(
        model=model,
        device=device,
        dtype=dtype,
        n_layer=len(decoder_layers(model)),
        n_embd=model.config.hidden_size,
        n_head=n_head,
        head_dim=head_dim,
        fingerprint=fingerprint,
        tokenizer=tokenizer,
    )
    if dtype == torch.float16:
        _check_float16_range(lm)
    return lm


def _check_float16_range(lm: LoadedModel):
    """float16 tops out at 65504, and some residual streams go beyond it (Gemma 3 270M's from block 7 on):
    every later value is then NaN, and predictions silently garbage. One short forward finds out."""
    tokens = lm.tokenize("The capital of France is Paris. Egypt -> Cairo, Norway -> Oslo\n1, 2, 3")
    with torch.no_grad(), record_residual(lm.model, range(lm.n_layer)) as out:
        lm.model.model(input_ids=torch.tensor([tokens], device=lm.device))
    bad = next((L for L in range(lm.n_layer) if not torch.isfinite(out[L]).all()), None)
    if bad is not None:
        raise FvpatchError(f"this model overflows float16 (block {bad}'s output exceeds ±65504 and turns to inf/NaN); "
                         "use --dtype bfloat16 (float32's range in half the memory) or float32")
