"""Logit lens and vector decoding, against the model's own logits through the real llama.cpp."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch import Save, VectorFile, save
from fvpatch.cli import main
from fvpatch.lens import decode_vector, logit_lens
from fvpatch.unembed import load_unembed
from tests.tiny_model import N_LAYER

PROMPT = "the cat sat on the mat, and the dog sat on the log."
CAPITALS = {" Tallinn", " Paris", " Cairo", " Oslo", " London", " Riga", " Helsinki", " Berlin", " Madrid", " Moscow", " Stockholm", " Vilnius", " Washington"}


@pytest.fixture(scope="module")
def tiny_unembed(tiny_gguf, tmp_path_factory):
    return load_unembed(tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))


def test_last_layer_lens_is_the_models_own_prediction(tiny_session, tiny_unembed):
    lens = logit_lens(tiny_session, PROMPT, layers=[N_LAYER - 1], top=5, unembed=tiny_unembed)
    own = tiny_session.run(PROMPT, all_logits=True).prompt_logits
    # tokens with equal logits may come in either order: the ids must be distinct and be a top 5 of the model's
    # own logits, in order, and the lens's logits must be the model's
    assert all(len(set(row)) == 5 for row in lens.ids[0].tolist())
    np.testing.assert_allclose(np.take_along_axis(own, lens.ids[0], axis=1), -np.sort(-own, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lens.logits[0], np.take_along_axis(own, lens.ids[0], axis=1), rtol=1e-4, atol=1e-4)
    p = np.exp(own - own.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(lens.probs[0], np.take_along_axis(p, lens.ids[0], axis=1), atol=1e-5)


def test_lens_covers_the_chosen_layers_and_positions(tiny_session, tiny_unembed):
    lens = logit_lens(tiny_session, PROMPT, layers=[0, 2], positions=[1, -1], top=3, unembed=tiny_unembed)
    n = len(tiny_session.tokenize(PROMPT))
    assert lens.positions == [1, n - 1] and lens.layers == [0, 2] and lens.ids.shape == (2, 2, 3)
    row = tiny_session.run(PROMPT, saves=[Save("l_out-2", (-1,))]).saved["l_out-2"]
    np.testing.assert_array_equal(lens.ids[1, 1], tiny_unembed.top(row, 3)[0][0])


def test_cached_unembedding_is_the_same(tiny_gguf, tmp_path, tiny_unembed):
    from fvpatch.unembed import _load

    load_unembed(tiny_gguf, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("unembed-*.gguf"))) == 1
    _load.cache_clear()  # the next load reads the cache file, not the model
    again = load_unembed(tiny_gguf, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.output, tiny_unembed.output)
    np.testing.assert_array_equal(again.norm, tiny_unembed.norm)
    assert again.eps == pytest.approx(tiny_unembed.eps)


def test_decode_a_token_direction(tiny_unembed):
    u = tiny_unembed
    t, other = 300, 77
    direction = lambda tok: u.output[tok] / u.norm  # what the final norm turns back into the token's output row
    ids, _ = decode_vector(u, direction(t), top=5)
    assert ids[0] == t
    ids, diff = decode_vector(u, direction(t), top=u.output.shape[0], against=direction(other))
    assert ids[0] == t and ids[-1] == other
    assert diff[0] > 0 > diff[-1]


def test_decode_a_huge_vector_as_its_direction(tiny_unembed):
    """The final norm takes any finite size: rows of 1e38 decode as their directions do, with no overflow (float32
    squares overflow past 1.8e19)."""
    u = tiny_unembed
    direction = np.random.default_rng(0).standard_normal(u.n_embd).astype(np.float32)
    for row, huge in ((np.ones(u.n_embd, np.float32), np.full(u.n_embd, 1e38, np.float32)),
                      (direction, direction * np.float32(1e38 / np.abs(direction).max()))):
        with np.errstate(all="raise"):
            ids, logits = decode_vector(u, huge, top=5)
        want_ids, want_logits = decode_vector(u, row, top=5)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-4)


def test_attention_head_space_is_refused_with_the_projected_name(tiny_session, tiny_unembed):
    with pytest.raises(ValueError, match="attn_out"):
        logit_lens(tiny_session, PROMPT, tensor="kqv_out", unembed=tiny_unembed)
    with pytest.raises(ValueError, match="wide, not the residual width"):
        logit_lens(tiny_session, PROMPT, tensor="ffn_up", unembed=tiny_unembed)


def test_kqv_out_on_a_graph_that_names_no_projection(tmp_path):
    """qwen2's graph has no named attention output: the next tensor, ffn_inp, is not named as the projection."""
    from fvpatch.session import Session
    from tests.arch_models import write_tiny_model

    path = write_tiny_model("qwen2", tmp_path / "tiny-qwen2.gguf")
    with Session(path, n_ctx=512) as s, pytest.raises(ValueError) as e:
        logit_lens(s, PROMPT, tensor="kqv_out", unembed=load_unembed(path))
    assert "names no tensor for its projection, and 'ffn_inp' is the residual stream with the attention added" in str(e.value)
    assert "projection into the residual stream is" not in str(e.value)


def test_a_position_named_twice_is_refused(tiny_session, tiny_unembed):
    n = len(tiny_session.tokenize(PROMPT))
    with pytest.raises(ValueError, match=f"token indices -1 and {n - 1} both name position {n - 1}; give each position once"):
        logit_lens(tiny_session, PROMPT, positions=[-1, n - 1], unembed=tiny_unembed)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_lens_and_decode(tiny_gguf, tiny_session, tmp_path, monkeypatch):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))  # where the unembedding cache goes
    r = invoke("lens", "-m", tiny_gguf, "-p", PROMPT, "--layer", f"1,{N_LAYER - 1}", "--top", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    n = len(tiny_session.tokenize(PROMPT))
    assert out["layers"] == [1, N_LAYER - 1] and len(out["top"][1]) == n and len(out["top"][1][0]) == 2
    own = tiny_session.run(PROMPT).logits
    assert out["top"][1][-1][0]["id"] == int(own.argmax())

    row = tiny_session.run(PROMPT, saves=[Save(f"l_out-{N_LAYER - 1}", (-1,))]).saved[f"l_out-{N_LAYER - 1}"]
    fp = tiny_session.fingerprint()
    save(VectorFile(f"l_out-{N_LAYER - 1}", row, [-1], fp), tmp_path / "v.safetensors")
    r = invoke("decode", "-m", tiny_gguf, tmp_path / "v.safetensors", "--top", "3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["top"][0]["id"] == int(own.argmax())

    save(VectorFile("l_out-1", row, [-1], {**fp, "name": "another model", "file": "other.gguf"}), tmp_path / "w.safetensors")
    r = invoke("decode", "-m", tiny_gguf, tmp_path / "w.safetensors")
    assert r.exit_code != 0 and "--force" in r.output
    assert invoke("decode", "-m", tiny_gguf, tmp_path / "w.safetensors", "--force").exit_code == 0


@pytest.mark.slow
def test_gemma_last_layer_lens_matches_its_logits(gemma):
    prompt = "1 2 3 to 3 2 1, 5 6 7 to 7 "
    lens = logit_lens(gemma, prompt, layers=[gemma.n_layer - 1], top=3)
    own = gemma.run(prompt, all_logits=True).prompt_logits
    np.testing.assert_array_equal(lens.ids[0, :, 0], own.argmax(axis=1))
    # llama.cpp quantizes activations to 8 bits for the Q8_0 output matmul; numpy does not
    np.testing.assert_allclose(lens.logits[0, :, 0], own.max(axis=1), atol=0.5)


@pytest.mark.slow
def test_country_capital_vector_decodes_to_capitals(gemma):
    prompt = "Egypt -> Cairo, Norway -> Oslo, Estonia ->"
    u = load_unembed(gemma.path)
    r = gemma.run(prompt, saves=[Save(f"l_out-{L}", (-1,)) for L in (11, 12)])
    tops = {L: {gemma.piece(int(t)).decode() for t in decode_vector(u, r.saved[f"l_out-{L}"][0], top=20)[0]} for L in (11, 12)}
    assert tops[11] & CAPITALS  # capitals first show at layer 11 ...
    assert " Tallinn" in tops[12]  # ... and the answer itself from layer 12


def test_the_unembedding_cache_is_announced_once(tiny_gguf, tmp_path, capsys):
    from fvpatch import unembed

    unembed._load.cache_clear()
    load_unembed(tiny_gguf, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("unembed-*.gguf")
    assert f"note: cached the unembedding of {tiny_gguf.name} as {cached}" in capsys.readouterr().err
    unembed._load.cache_clear()
    load_unembed(tiny_gguf, cache_dir=tmp_path)  # read from the cache: nothing to say
    assert capsys.readouterr().err == ""
