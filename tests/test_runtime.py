"""Exact checks of save/patch on the tiny synthetic llama GGUF, run through the real llama.cpp."""

import pickle

import numpy as np
import pytest

from fvpatch import Patch, Save, Session, VectorFile, load, save
from fvpatch.vectorfile import VectorFileError
from tests.tiny_model import N_EMBD, N_LAYER

PROMPT = "the cat sat on the mat, and the dog sat on the log."


def test_replace_with_itself_changes_nothing(tiny_session):
    base = tiny_session.run(PROMPT, saves=[Save("l_out-1", (5,))], all_logits=True)
    again = tiny_session.run(PROMPT, patches=[Patch("l_out-1", base.saved["l_out-1"][0], 5)], all_logits=True)
    np.testing.assert_array_equal(again.prompt_logits, base.prompt_logits)


@pytest.mark.parametrize("mode,vector", [("replace", np.zeros(N_EMBD)), ("add", np.full(N_EMBD, 0.5))])
def test_patch_changes_logits_at_and_after_the_token_only(tiny_session, mode, vector):
    t = 7
    base = tiny_session.run(PROMPT, all_logits=True)
    patched = tiny_session.run(PROMPT, patches=[Patch("l_out-2", vector, t, mode)], all_logits=True)
    np.testing.assert_array_equal(patched.prompt_logits[:t], base.prompt_logits[:t])
    changed = np.abs(patched.prompt_logits - base.prompt_logits).max(axis=1) > 1e-4
    assert changed[t:].all()


def test_scale_multiplies_the_added_vector(tiny_session):
    v = np.random.default_rng(0).standard_normal(N_EMBD).astype(np.float32)
    a = tiny_session.run(PROMPT, patches=[Patch("l_out-1", v, 4, "add", scale=2.0)], saves=[Save("l_out-1", (4,))])
    b = tiny_session.run(PROMPT, patches=[Patch("l_out-1", 2 * v, 4, "add")], saves=[Save("l_out-1", (4,))])
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)


def test_save_reads_rows_before_patching_the_same_tensor(tiny_session):
    base = tiny_session.run(PROMPT, saves=[Save("l_out-1", (3,))])
    both = tiny_session.run(PROMPT, saves=[Save("l_out-1", (3,))], patches=[Patch("l_out-1", np.zeros(N_EMBD), 3)])
    np.testing.assert_array_equal(both.saved["l_out-1"], base.saved["l_out-1"])


def test_two_added_patches_on_one_row_sum(tiny_session):
    v = np.linspace(-1, 1, N_EMBD, dtype=np.float32)
    twice = tiny_session.run(PROMPT, patches=[Patch("l_out-1", v, 3, "add"), Patch("l_out-1", v, 3, "add")], all_logits=True)
    double = tiny_session.run(PROMPT, patches=[Patch("l_out-1", v, 3, "add", scale=2.0)], all_logits=True)
    np.testing.assert_allclose(twice.prompt_logits, double.prompt_logits, atol=1e-4)


def test_absolute_positions_hold_across_ubatches(tiny_gguf, tiny_session):
    positions = (0, 3, 8, 9, 17, 30, -1)
    v = np.linspace(-1, 1, N_EMBD, dtype=np.float32)
    patches = [Patch("l_out-0", v, 9, "add"), Patch("l_out-1", v, 26, "replace")]
    whole = tiny_session.run(PROMPT, saves=[Save("l_out-2", positions)], patches=patches, all_logits=True)
    with Session(tiny_gguf, n_ctx=512, n_ubatch=8) as chunked:
        split = chunked.run(PROMPT, saves=[Save("l_out-2", positions)], patches=patches, all_logits=True)
    assert len(whole.prompt_tokens) > 3 * 8  # the prompt really spans several ubatches
    np.testing.assert_allclose(split.saved["l_out-2"], whole.saved["l_out-2"], atol=1e-4)
    np.testing.assert_allclose(split.prompt_logits, whole.prompt_logits, atol=1e-4)


def test_last_layer_rows_at_any_token(tiny_session):
    """llama.cpp keeps only output rows after the last block; fvpatch asks for the rows it needs."""
    last = f"l_out-{N_LAYER - 1}"
    few = tiny_session.run(PROMPT, saves=[Save(last, (2, 5, -1))])
    every = tiny_session.run(PROMPT, saves=[Save(last, (2, 5, -1))], all_logits=True)
    np.testing.assert_allclose(few.saved[last], every.saved[last], atol=1e-5)


def test_patch_every_generated_token(tiny_session):
    v = np.full(N_EMBD, 3.0, np.float32)
    once = tiny_session.run(PROMPT, patches=[Patch("l_out-1", v, -1, "add")], max_tokens=6)
    every = tiny_session.run(PROMPT, patches=[Patch("l_out-1", v, -1, "add", generated=True)], max_tokens=6)
    assert once.generated[0] == every.generated[0]  # same prompt pass
    assert once.generated != every.generated


def test_generation_is_greedy_and_reproducible(tiny_session):
    a = tiny_session.run(PROMPT, max_tokens=5)
    b = tiny_session.run(PROMPT, max_tokens=5)
    assert a.generated == b.generated and a.generated[0] == int(np.argmax(a.logits))


def test_save_many_tensors_in_one_run(tiny_session):
    r = tiny_session.run(PROMPT, saves=[Save("l_out-0", (1, 2)), Save("attn_norm-1", (-1,)), Save("ffn_out-3", (4,))])
    assert r.saved["l_out-0"].shape == (2, N_EMBD) and r.saved_positions["l_out-0"] == [1, 2]
    assert r.saved["attn_norm-1"].shape == (1, N_EMBD) and r.saved["ffn_out-3"].shape == (1, N_EMBD)


# ---- bad input: one clear error, nothing silently ignored ----------------------------------------


def test_layer_beyond_the_model(tiny_session):
    with pytest.raises(ValueError, match=f"beyond this model's {N_LAYER} layers"):
        tiny_session.run(PROMPT, saves=[Save(f"l_out-{N_LAYER}")])


def test_token_outside_the_prompt(tiny_session):
    n = len(tiny_session.tokenize(PROMPT))
    for idx in (n, -n - 1):
        with pytest.raises(IndexError, match="outside the prompt"):
            tiny_session.run(PROMPT, patches=[Patch("l_out-0", np.zeros(N_EMBD), idx)])


def test_tensor_that_never_fires(tiny_session):
    with pytest.raises(ValueError, match="never appeared"):
        tiny_session.run(PROMPT, saves=[Save("l_outt-1")])
    with pytest.raises(ValueError, match="never appeared"):
        tiny_session.run(PROMPT, patches=[Patch("l_out-1 (view)", np.zeros(N_EMBD))])


def test_width_mismatch_surfaces_from_the_callback(tiny_session):
    with pytest.raises(ValueError, match="width 65 does not fit tensor 'l_out-1' of width 64"):
        tiny_session.run(PROMPT, patches=[Patch("l_out-1", np.zeros(N_EMBD + 1))])
    # the session is still usable and unpatched afterwards
    assert np.isfinite(tiny_session.run(PROMPT).logits).all()


def test_non_row_tensor_is_refused(tiny_session):
    with pytest.raises(ValueError, match="only 2-D tensors"):
        tiny_session.run(PROMPT, saves=[Save("cache_k_l0 (view) (permuted)")])


def test_graph_tensors_in_a_context_whose_batch_is_smaller_than_the_prompt(tiny_gguf, tiny_session):
    """Below 512 tokens llama.cpp shrinks the batch to the context; the listing used to split its prompt over several
    decodes and then called every tensor unusable. A batch of 1 cannot tell a one-head view from a row: refused."""
    with Session(tiny_gguf, n_ctx=2) as s:
        assert s.n_ubatch == 2 and s.graph_tensors() == tiny_session.graph_tensors()
    with Session(tiny_gguf, n_ctx=1) as s, pytest.raises(ValueError, match="needs a batch of 2 or more tokens"):
        s.graph_tensors()


def test_graph_tensors_lists_what_save_takes_with_its_width(tiny_session):
    widths = tiny_session.graph_tensors()
    assert widths["l_out-1"] == N_EMBD and widths["Qcur-0"] is None  # Qcur-0: before and after RoPE
    usable = [n for n, w in widths.items() if w is not None and n != "result_output"]
    saved = tiny_session.run(PROMPT, saves=[Save(n) for n in usable]).saved
    assert {n: saved[n].shape[1] for n in usable} == {n: widths[n] for n in usable}
    for name in [n for n, w in widths.items() if w is None]:
        with pytest.raises(ValueError, match="only 2-D tensors|appears more than once|rows in a ubatch"):
            tiny_session.run(PROMPT, saves=[Save(name)])


def test_ambiguous_name_is_refused(tiny_session):
    # Qcur-0 names the query before and after RoPE: patching "it" would be a guess
    with pytest.raises(ValueError, match="appears more than once"):
        tiny_session.run(PROMPT, saves=[Save("Qcur-0")])


def test_vector_file_round_trip_and_atomic_no_overwrite(tmp_path, tiny_session):
    vf = VectorFile("l_out-1", np.arange(2 * N_EMBD).reshape(2, N_EMBD), [3, 5], tiny_session.fingerprint(), "add", 1.5, {"fvpatch.prompt": "x"})
    path = save(vf, tmp_path / "v.safetensors")
    back = load(path)
    assert (back.tensor, back.positions, back.mode, back.scale, back.layer) == ("l_out-1", [3, 5], "add", 1.5, 1)
    np.testing.assert_array_equal(back.rows, vf.rows)
    assert back.model == tiny_session.fingerprint() and back.meta["fvpatch.prompt"] == "x"
    with pytest.raises(FileExistsError):
        save(vf, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]  # no temp file left behind


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(VectorFileError, match="not a valid safetensors"):
        load(bad)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(VectorFileError, match="not an fvpatch vector file"):
        load(tmp_path / "plain.safetensors")
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "v.pt"
    pickled.write_bytes(pickle.dumps({"l_out-1": _Unpickling(marker), "rows": np.ones((2, N_EMBD), np.float32)}))
    with pytest.raises(VectorFileError, match="not a valid safetensors"):
        load(pickled)
    assert not marker.exists()  # refused without being unpickled


class _Unpickling:
    """Creates `path` when unpickled: a pickled vector file that proves whether the loader ran it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_answer_logprobs_packs_sequences_without_changing_scores(tiny_session):
    """Scoring many (prompt, answer, patch) items in one decode equals scoring each with run()."""
    prompt = tiny_session.tokenize("Q: hot\nA:")
    answer = tiny_session.tokenize(" cold", add_bos=False)
    rng = np.random.default_rng(1)
    bank = [rng.standard_normal(N_EMBD).astype(np.float32) for _ in range(5)]
    items = [(prompt, answer, [Patch("l_out-1", v, -1, "add", generated=True)]) for v in bank] + [(prompt, answer, [])]
    packed = tiny_session.answer_logprobs(items)
    for (p, a, patches), lp in zip(items, packed):
        r = tiny_session.run(p + a, patches=[Patch(x.tensor, x.vector, len(p) - 1, x.mode, x.scale) for x in patches]
                             + [Patch(x.tensor, x.vector, t, x.mode, x.scale) for x in patches for t in range(len(p), len(p) + len(a) - 1)],
                             all_logits=True)
        rows = r.prompt_logits[len(p) - 1 : len(p) + len(a) - 1]
        ref = rows[np.arange(len(a)), a] - np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) - rows.max(1)
        np.testing.assert_allclose(lp, ref, atol=2e-3)  # other batch shapes sum in another order
    assert len({round(float(lp.sum()), 3) for lp in packed}) == len(items)  # every vector really applied


def test_tokenize_shows_the_indices_a_session_uses(tiny_gguf, tiny_session):
    """`fvpatch tokenize` reads only the vocabulary, yet lists the tokens a decode of the prompt is made of."""
    import json

    from click.testing import CliRunner

    from fvpatch.cli import main

    r = CliRunner().invoke(main, ["tokenize", "-m", str(tiny_gguf), "-p", PROMPT, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["tokens"]
    assert [row["id"] for row in rows] == tiny_session.tokenize(PROMPT)
    assert [row["from_end"] for row in rows][-1] == -1 and rows[0]["index"] == 0
