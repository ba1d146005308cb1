"""train.apply.patched: a vector file applied to a transformers model does what `fvpatch patch` does in llama.cpp."""

import numpy as np
import pytest
import torch

from fvpatch import vectorfile
from fvpatch.errors import FvpatchError
from fvpatch.session import Patch, Save, Session
from train.apply import patched

TEXT = "one two three four five six seven"


@pytest.fixture(scope="module")
def exact_session(tiny_gguf):
    with Session(tiny_gguf, n_ctx=512, exact=True) as session:
        yield session


def _close(got, ref, tol=1e-5):
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol


def _generate(lm, tokens, n):
    ids = torch.tensor([tokens])
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(tokens):].tolist()


def test_a_vector_saved_in_llama_cpp_patches_torch_as_it_patches_llama_cpp(tiny_lm, exact_session, tmp_path):
    s = exact_session
    src = s.run("nine eight seven six", saves=[Save("l_out-1", (1, 3))])
    path = vectorfile.save(vectorfile.VectorFile("l_out-1", src.saved["l_out-1"], src.saved_positions["l_out-1"], s.fingerprint()), tmp_path / "v.safetensors")
    tokens = s.tokenize(TEXT)
    ref = s.run(tokens, patches=[Patch("l_out-1", vectorfile.load(path).row(3), token=2, mode="replace")], all_logits=True).prompt_logits
    with torch.no_grad(), patched(tiny_lm.model, path, token=2, row=3):
        logits = tiny_lm.model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(ref - s.run(tokens, all_logits=True).prompt_logits).max() > 0.1
    _close(logits, ref)


@pytest.mark.parametrize("how", [dict(every_token=False), dict(every_token=True), dict(all_tokens=True)])
def test_generation_matches_llama_cpp(tiny_lm, exact_session, how):
    s = exact_session
    v = np.random.default_rng(1).normal(0, 2, s.n_embd).astype(np.float32)
    vf = vectorfile.VectorFile("l_out-2", v, [-1], s.fingerprint(), mode="add", scale=0.7)
    tokens = s.tokenize(TEXT)
    ref = s.run(tokens, patches=[Patch("l_out-2", v, -1, "add", 0.7, how.get("every_token", False), how.get("all_tokens", False))], max_tokens=6)
    with torch.no_grad(), patched(tiny_lm.model, vf, **how):
        got = _generate(tiny_lm, tokens, 6)
    assert got == ref.generated
    assert got != s.run(tokens, max_tokens=6).generated  # the vector changes the answer


def test_the_file_says_every_token(tiny_lm, exact_session):
    s = exact_session
    v = np.random.default_rng(2).normal(0, 2, s.n_embd).astype(np.float32)
    vf = vectorfile.VectorFile("l_out-1", v, [-1], s.fingerprint(), mode="add", meta={"fvpatch.apply_at": "all"})
    tokens = s.tokenize(TEXT)
    ref = s.run(tokens, patches=[Patch("l_out-1", v, mode="add", all_tokens=True)], all_logits=True).prompt_logits
    with torch.no_grad(), patched(tiny_lm.model, vf):
        _close(tiny_lm.model(input_ids=torch.tensor([tokens])).logits[0].numpy(), ref)


def test_refuses_another_model(tiny_lm, exact_session):
    fp = exact_session.fingerprint() | {"n_embd": "640"}
    with pytest.raises(FvpatchError, match="n_embd=640"), patched(tiny_lm.model, vectorfile.VectorFile("l_out-1", np.ones(640), [-1], fp, mode="add")):
        pass
    fp = exact_session.fingerprint() | {"arch": "gemma3"}
    vf = vectorfile.VectorFile("l_out-1", np.ones(exact_session.n_embd), [-1], fp, mode="add")
    with pytest.raises(FvpatchError, match="pass force=True"), patched(tiny_lm.model, vf):
        pass
    with patched(tiny_lm.model, vf, force=True):
        pass


@pytest.mark.parametrize("how, error", [
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(scale="2"), "scale must be a finite number, got '2'"),
    (dict(mode="ad"), r"mode must be one of \('replace', 'add'\), got 'ad'"),
    (dict(mode="replace", all_tokens=True), "a vector patched at every token is added"),
])
def test_bad_arguments_are_refused_before_any_forward(tiny_lm, exact_session, how, error):
    """A NaN scale used to give NaN logits, and a misspelt mode to fail only at the first forward."""
    vf = vectorfile.VectorFile("l_out-1", np.ones(exact_session.n_embd), [-1], exact_session.fingerprint(), mode="add")
    with pytest.raises(FvpatchError, match=error), patched(tiny_lm.model, vf, **how):
        pytest.fail("the block was entered")
    block = tiny_lm.model.model.layers[1]
    assert not block._forward_hooks  # nothing left registered


def test_a_shipped_name_is_the_copy_made_for_the_loaded_model(gemma_lm):
    from fvpatch.shipped import VECTORS_DIR

    own = vectorfile.load(VECTORS_DIR / "gemma-3-270m" / "antonym.ffv.safetensors")
    with patched(gemma_lm, "antonym.ffv") as vf:
        assert vf.model == own.model and np.array_equal(vf.rows, own.rows)
    with patched(gemma_lm, "gemma-3-270m/analogy.bank#antonym") as vf:  # one relation of a bank, as `fvpatch patch` takes it
        assert vf.model["name"] == own.model["name"] and vf.tensor == "l_out-4"
    # a bare transformers model has no GGUF fingerprint to choose by: the folder-qualified name is needed
    with pytest.raises(FvpatchError, match="'antonym.ffv' matches several shipped vectors"), patched(gemma_lm.model, "antonym.ffv"):
        pass
    with patched(gemma_lm.model, "gemma-3-270m/antonym.ffv") as vf:
        assert np.array_equal(vf.rows, own.rows)
