from pathlib import Path

import pytest

from tests.tiny_model import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf")


@pytest.fixture(scope="session")
def tiny_session(tiny_gguf):
    from fvpatch import Session

    with Session(tiny_gguf, n_ctx=512, n_ubatch=512) as s:
        yield s


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from fvpatch.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    from fvpatch import Session

    with Session(gemma_path) as s:
        yield s


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch), a known model fetched on first use (98 MB)."""
    from fvpatch.models import known_model_path

    return known_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder 1.5B Instruct Q4_K_M (qwen2 arch), fetched on first use (1.1 GB): tests marked `big` only."""
    from fvpatch.models import known_model_path

    return known_model_path("qwen2.5-coder-1.5b")


@pytest.fixture(scope="session")
def tiny_lm(tiny_gguf, tmp_path_factory):
    """The tiny GGUF in PyTorch (train.model), its converted copy cached in a temporary models dir."""
    from train.model import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FVPATCH_MODELS", str(tmp_path_factory.mktemp("models")))
        return load_model(tiny_gguf)


@pytest.fixture(scope="session")
def gemma_lm(gemma_path):
    """The default model in PyTorch (train.model): converted on first use (~1 min), then loaded from models/hf-cache."""
    from train.model import load_model

    return load_model(gemma_path)
