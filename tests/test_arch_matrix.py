"""The architecture matrix: each architecture as a tiny random-weight f32 GGUF (tests/arch_models.py), in both engines.

For every architecture the training side loads (train.model.ARCHITECTURES): llama.cpp's block outputs,
heads and logits equal PyTorch's; save/patch round-trips in llama.cpp; an FFV trains and, exported
as a vector file, moves llama.cpp's logits as the PyTorch patched forward predicts. For one that only
llama.cpp runs (Gemma 1): one clear error from the training side, and save/patch still work.

llama.cpp runs with K/V in f32 and flash attention off (Session(exact=True)). Errors are the largest
absolute difference over the largest absolute value of the reference. The SiLU models (llama, qwen2,
qwen3, phi3) match to float rounding: held to 1e-5, measured <= 1e-6. The GELU models (gemma2, gemma3,
starcoder2) cannot: ggml's CPU GELU looks its result up in a float16 table (measured on gemma2:
llama.cpp's GELU output is within 4e-8 of that table and 7e-4 from the exact function), which leaves
~5e-4 everywhere downstream; they are held to 1e-3.
"""

import json
import os

import numpy as np
import pytest
import torch

from fvpatch import Patch, Save, Session, vectorfile
from fvpatch.models import check_fingerprint
from fvpatch.prompts import template
from fvpatch.tasks import Task
from fvpatch.vectorfile import VectorFile
from tests.arch_models import ARCHS, write_tiny_model
from train.ffv import Config, Data, encode, train_ffv
from train.hooks import patch_residual, record_heads, record_residual
from train.model import ARCHITECTURES, load_model

TRAINABLE = [arch for arch in ARCHS if arch in ARCHITECTURES]
RUNTIME_ONLY = [arch for arch in ARCHS if arch not in ARCHITECTURES]
# the PyTorch side's device: bench/gpu.sh runs the matrix with FVPATCH_TEST_DEVICE=cuda
DEVICE = os.environ.get("FVPATCH_TEST_DEVICE", "cpu")
GELU_ARCHS = {"gemma", "gemma2", "gemma3", "starcoder2"}
# longer than the gemmas' 8-token sliding window, so their local layers really mask
TEXT = "Hello world -> 123, x y z!\nabc -> def; the cat sat on the mat."
OTHER = "Q: what is 7 + 5?\nA: twelve, and the dog sat on the log. ok"
QA = template("qa")
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]


def tolerance(session: Session) -> float:
    return 1e-3 if session.arch in GELU_ARCHS else 1e-5


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both engines on one thread: tiny models gain nothing from more, and on a busy machine the threads'
    spin-waits cost seconds a test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf_path(request, tmp_path_factory):
    return write_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf")


@pytest.fixture(scope="module")
def session(gguf_path):
    with Session(gguf_path, n_ctx=512, exact=True, n_threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def lm(gguf_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FVPATCH_MODELS", str(tmp_path_factory.mktemp("models")))
        return load_model(gguf_path, device=DEVICE)


def test_the_matrix_covers_every_trainable_architecture():
    assert sorted(TRAINABLE) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("gguf_path", TRAINABLE, indirect=True)
def test_engines_agree_at_every_layer(gguf_path, session, lm):
    tokens = session.tokenize(TEXT)
    layers = list(range(session.n_layer))
    every = tuple(range(len(tokens)))
    ref = session.run(tokens, saves=[Save(f"{t}-{L}", every) for L in layers for t in ("l_out", "kqv_out")], all_logits=True)
    ids, mask, _ = lm.batch([tokens])
    with torch.no_grad(), record_residual(lm.model, layers) as res, record_heads(lm.model, layers) as heads:
        logits = lm.model(input_ids=ids, attention_mask=mask).logits[0].cpu().numpy()
    tol = tolerance(session)
    for L in layers:
        assert rel_err(res[L][0].cpu(), ref.saved[f"l_out-{L}"]) < tol, f"l_out-{L}"
        assert rel_err(heads[L][0].flatten(-2).cpu(), ref.saved[f"kqv_out-{L}"]) < tol, f"kqv_out-{L}"
    assert rel_err(logits, ref.prompt_logits) < tol


@pytest.mark.parametrize("gguf_path", TRAINABLE, indirect=True)
def test_transformers_reads_the_same_tokenizer(gguf_path, session):
    """train.model tokenizes with llama.cpp; a Hugging Face directory made from the GGUF brings transformers' own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in (TEXT, OTHER):
        assert tok(text)["input_ids"] == session.tokenize(text)


@pytest.mark.parametrize("gguf_path", TRAINABLE + RUNTIME_ONLY, indirect=True)
def test_save_then_patch_round_trips(gguf_path, session, tmp_path):
    n = min(len(session.tokenize(TEXT)), len(session.tokenize(OTHER)))
    source, target = session.tokenize(TEXT)[:n], session.tokenize(OTHER)[:n]
    source_run = session.run(source, all_logits=True)

    # every row of a middle layer, through a vector file: the target then computes the source's logits
    tensor = f"l_out-{session.n_layer // 2}"
    saved = session.run(source, saves=[Save(tensor, tuple(range(n)))])
    path = vectorfile.save(VectorFile(tensor, saved.saved[tensor], list(range(n)), session.fingerprint()), tmp_path / "rows.safetensors")
    loaded = vectorfile.load(path)
    check_fingerprint(loaded.model, session.fingerprint())
    np.testing.assert_array_equal(loaded.rows, saved.saved[tensor])
    patched = session.run(target, patches=[Patch(tensor, loaded.row(i), i) for i in range(n)], all_logits=True)
    np.testing.assert_allclose(patched.prompt_logits, source_run.prompt_logits, rtol=0, atol=1e-6 * np.abs(source_run.prompt_logits).max())

    # the last block's row at the last token alone decides the next token's logits
    last = f"l_out-{session.n_layer - 1}"
    row = session.run(source, saves=[Save(last, (-1,))]).saved[last][0]
    one = session.run(target, patches=[Patch(last, row, -1)])
    np.testing.assert_allclose(one.logits, source_run.logits, rtol=0, atol=1e-6 * np.abs(source_run.logits).max())
    assert np.abs(session.run(target).logits - source_run.logits).max() > 0.1  # the prompts do differ


@pytest.mark.parametrize("gguf_path", TRAINABLE, indirect=True)
def test_ffv_trains_and_patches_in_llama_cpp(gguf_path, session, lm, tmp_path):
    pairs = [(w, w.upper()) for w in WORDS]
    task = Task("upper", pairs, pairs, [])
    train = encode(lm, QA, pairs)
    # random weights cannot generalize, so the train pairs stand in for the valid ones
    vf, hist = train_ffv(lm, Data(task, train, train), QA, Config(layer=1, init="zeros", lr=0.5, steps=8, eval_every=4), progress=False)
    assert hist.train_loss[-1] < 0.9 * hist.train_loss[0]
    assert json.loads(vf.meta["fvpatch.pairs"]) == [list(p) for p in pairs]

    loaded = vectorfile.load(vectorfile.save(vf, tmp_path / "upper.ffv.safetensors"))
    assert (loaded.tensor, loaded.mode) == ("l_out-1", "add")
    check_fingerprint(loaded.model, session.fingerprint())
    vector = loaded.row(None)

    tokens = session.tokenize(QA.query("qr"))
    plain = session.run(tokens).logits
    patched = session.run(tokens, patches=[Patch(loaded.tensor, vector, -1, "add")]).logits
    with torch.no_grad(), patch_residual(lm.model, 1, len(tokens) - 1, torch.from_numpy(vector).to(lm.device)):
        predicted = lm.model(input_ids=torch.tensor([tokens], device=lm.device)).logits[0, -1].cpu().numpy()
    assert np.abs(patched - plain).max() > 0.1 * np.abs(plain).max()  # the vector matters ...
    assert rel_err(patched, predicted) < tolerance(session)  # ... exactly as PyTorch says


@pytest.mark.parametrize("gguf_path", RUNTIME_ONLY, indirect=True)
def test_the_training_side_refuses_in_one_line(gguf_path, session, tmp_path, monkeypatch):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    with pytest.raises(ValueError) as err:
        load_model(gguf_path, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert f"architecture {session.arch!r}" in message and all(a in message for a in ARCHITECTURES)
    assert not any(tmp_path.iterdir())  # nothing converted or cached
