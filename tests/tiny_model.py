"""The tiny llama GGUF (f32, random weights) of the default test fixtures: tests.arch_models' llama.

Small enough that llama.cpp loads and runs it in milliseconds; real enough that the whole graph
(attention with GQA, RoPE, SwiGLU, RMS norms, SPM tokenizer with byte fallback) is exercised.
"""

from pathlib import Path

from tests.arch_models import N_EMBD, N_LAYER, write_tiny_model

__all__ = ["N_EMBD", "N_LAYER", "write_tiny_llama"]


def write_tiny_llama(path: str | Path, seed: int = 0, n_layer: int = N_LAYER) -> Path:
    return write_tiny_model("llama", path, seed, n_layer)
