"""The Python API misused as a script might misuse it: one clear FvpatchError, never a crash in C, a silently
wrong answer, or a raw error from numpy or ctypes."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from fvpatch.errors import FvpatchError, NotFound
from fvpatch.session import Patch, Save, Session
from fvpatch.slots import Slots

PROMPT = "one two three four five"


def test_a_closed_session_refuses_every_use(tiny_gguf):
    """In a process of its own: before the guard, these aborted or segfaulted the interpreter."""
    script = f"""
from fvpatch.errors import FvpatchError
from fvpatch.session import Session
s = Session({str(tiny_gguf)!r})
s.close()
s.close()  # twice is fine
for name, call in [("run", lambda: s.run("a b")), ("run ids", lambda: s.run([1, 2])), ("tokenize", lambda: s.tokenize("a")),
                   ("detokenize", lambda: s.detokenize([1])), ("is_eog", lambda: s.is_eog(1)), ("fingerprint", lambda: s.fingerprint()),
                   ("last_logits", lambda: s.last_logits([[1, 2]])), ("set_control_vector", lambda: s.set_control_vector(None))]:
    try:
        call()
        print(name, "ran")
    except FvpatchError as e:
        assert "is closed" in str(e), (name, e)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


def test_threads_sharing_a_session_take_turns(tiny_session):
    """Unguarded, two threads decoding at once aborted the process; now each gets what it gets alone."""
    expected = tiny_session.run(PROMPT, saves=[Save("l_out-1")], max_tokens=5)
    got = []

    def go():
        for _ in range(4):
            got.append(tiny_session.run(PROMPT, saves=[Save("l_out-1")], max_tokens=5))

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 12
    assert all(r.generated == expected.generated and np.array_equal(r.saved["l_out-1"], expected.saved["l_out-1"]) for r in got)


def test_slots_own_their_session_until_closed(tiny_gguf):
    with Session(tiny_gguf, n_ctx=512) as s:
        slots = Slots(s, 2)
        job = slots.submit(s.tokenize(PROMPT), [], 100)
        next(iter(job))
        with pytest.raises(FvpatchError, match="serving requests"):
            s.run(PROMPT)
        with pytest.raises(FvpatchError, match="already serves Slots"):
            Slots(s, 1)
        with pytest.raises(FvpatchError, match="not a token id"):  # refused at submit: it would fail the whole batch
            slots.submit([1, s.n_vocab], [], 2)
        s.close()  # closes the slots first: the running job ends in one line, not a crash in the worker
        with pytest.raises(FvpatchError, match="slots were closed before this request finished"):
            list(job)


@pytest.mark.parametrize("make,says", [
    (lambda s: s.run([2, 10**6]), "not a token id"),
    (lambda s: s.run([2, -5]), "not a token id"),
    (lambda s: s.run([2.0, 3.5]), "not a token id"),
    (lambda s: s.run(b"hello"), "must be a list of token ids, got bytes"),
    (lambda s: s.run(PROMPT, max_tokens=-5), "max_tokens must be"),
    (lambda s: s.run(PROMPT, max_tokens=2, temperature=float("nan")), "temperature must be"),
    (lambda s: s.run(PROMPT, max_tokens=2, temperature=10**400), "temperature must be a finite number"),  # was an OverflowError
    (lambda s: s.answer_logprobs([(s.tokenize(PROMPT), [-1], [])]), "answer of item 0 holds -1"),
    (lambda s: s.last_logits([s.tokenize(PROMPT), [1, 10**6]]), "prompt 1 holds 1000000"),
    (lambda s: s.decode([(2, i, 0) for i in range(s.n_ubatch + 1)], set(), {}), "at most"),
    (lambda s: s.row_logits(3), "has no logits"),
    (lambda s: s.set_control_vector(np.full((s.n_layer - 1, s.n_embd), np.nan)), "NaN or inf"),
    (lambda s: Save("l_out-1", ()), "one or more token indices"),
    (lambda s: Patch("l_out-1", np.ones(s.n_embd), token=1.5), "token is a token index"),
    (lambda s: Patch("l_out-1", np.ones(s.n_embd), scale="2"), "scale must be a finite number"),
    (lambda s: Patch("l_out-1", None), "empty or holds NaN"),
    (lambda s: Patch("l_out-1", ["a"] * s.n_embd), "must be numbers"),
    (lambda s: Patch("l_out-1", np.ones(s.n_embd), mode="replace", all_tokens=True), "add instead"),
    (lambda s: Patch("l_out-1", np.ones(s.n_embd), scale=10**40), "overflows float32"),
    # two writes of one row where one replaces: the later undid the earlier, silently
    (lambda s: s.run(PROMPT, patches=[Patch("l_out-1", np.ones(s.n_embd), -1), Patch("l_out-1", np.zeros(s.n_embd), -1)]), "two patches write l_out-1 at position"),
    (lambda s: s.run(PROMPT, patches=[Patch("l_out-1", np.ones(s.n_embd), 2, generated=True), Patch("l_out-1", np.ones(s.n_embd), 3, "add", generated=True)],
                     max_tokens=2), "two patches write l_out-1 at each generated token"),
    (lambda s: s.last_logits([s.tokenize(PROMPT)] * 2, [Patch("l_out-1", np.ones(s.n_embd), -1), Patch("l_out-1", np.zeros(s.n_embd), -1)]),
     "two patches write l_out-1 at position"),
    (lambda s: s.sequence_logits([(s.tokenize(PROMPT), [], [Patch("l_out-1", np.ones(s.n_embd), -1), Patch("l_out-1", np.zeros(s.n_embd), -1)])]),
     "two patches write l_out-1 at position"),
    (lambda s: Patch(5, np.ones(s.n_embd)), "tensor is a graph tensor name"),
    (lambda s: Save(None), "tensor is a graph tensor name"),
    (lambda s: s.detokenize([10**6]), "outside the vocabulary"),
    (lambda s: s.piece(-5), "outside the vocabulary"),
    (lambda s: s.forget(999), "not one of this session's"),
    (lambda s: s.row_logits(2**40), "outside a batch"),
    (lambda s: s.run(PROMPT, max_tokens=3, on_token=lambda t: s.forget()), "on_token may not use the session"),
    (lambda s: s.run(PROMPT, max_tokens=3, on_token=lambda t: s.run("a", max_tokens=1)), "on_token may not use the session"),
])
def test_misuse_is_one_clear_error(tiny_session, make, says):
    with pytest.raises(FvpatchError, match=says):
        make(tiny_session)
    assert tiny_session.run(PROMPT, max_tokens=1).generated  # and the session goes on


def test_closing_from_another_thread_waits_for_the_decode(tiny_gguf):
    """close() takes the session's lock: a run in progress in another thread finishes, or its next call is refused in
    one line, instead of decoding with a freed context (a segfault)."""
    script = f"""
import threading, time
from fvpatch.errors import FvpatchError
from fvpatch.session import Session
s = Session({str(tiny_gguf)!r}, n_ctx=4096)
out = []
def go():
    try:
        for _ in range(20):
            s.run("a b c d e f g h", max_tokens=150)
        out.append("ran")
    except FvpatchError as e:
        out.append("closed" if "is closed" in str(e) else str(e))
t = threading.Thread(target=go); t.start(); time.sleep(0.5); s.close(); t.join(60)
s2 = Session({str(tiny_gguf)!r}); s2.close()
try:
    s2.decode([(1, 0, 0)], set(), {{}})
except FvpatchError:
    pass
import gguf  # an allocation after a decode on a closed session used to segfault: the batch was written after being freed
print(out[0])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() in ("closed", "ran"), (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("field,says", [
    ({"max_tokens": 2.5}, "max_tokens must be a whole number"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_p": float("nan")}, "top_p must be"),
    ({"top_logprobs": 2.5}, "top_logprobs must be a whole number"),
    ({"patches": [Patch("nonexistent-99", np.ones(64), mode="add")]}, "beyond this model's"),
    # these would fail only inside the decode, and with it every request batched alongside
    ({"patches": [Patch("no_such_tensor-1", np.ones(64), mode="add")]}, "never appears in this model's compute graph"),
    ({"patches": [Patch("l_out-1", np.ones(65), mode="add")]}, "width 65 does not fit tensor 'l_out-1' of width 64"),
    ({"patches": [Patch("l_out-1", np.ones(64)), Patch("l_out-1", np.ones(64), mode="add")]}, "two patches write l_out-1 at position"),
])
def test_a_bad_request_to_slots_is_refused_at_submit_and_fails_no_other(tiny_gguf, field, says):
    with Session(tiny_gguf, n_ctx=512, exact=True) as s:
        alone = s.run(PROMPT, max_tokens=4).generated
        slots = Slots(s, 2)
        try:
            good = slots.submit(s.tokenize(PROMPT), [], 4)
            with pytest.raises(FvpatchError, match=says):
                slots.submit(**({"tokens": s.tokenize(PROMPT), "patches": [], "max_tokens": 3} | field))
            assert list(good) == alone
        finally:
            slots.close()


def test_a_save_of_one_index_and_models_that_are_not_files(tiny_session, tmp_path):
    assert Save("l_out-1", -1).tokens == (-1,)
    with pytest.raises(NotFound, match="does not exist"):
        Session(tmp_path / "missing.gguf")
    with pytest.raises(FvpatchError, match="path of a GGUF file, got int"):
        Session(5)
    with Session(tiny_session.path, hooks=False) as plain:
        patch = [Patch("l_out-1", np.ones(plain.n_embd), mode="add")]
        for call, needs in [(lambda: plain.graph_tensors(), "listing the graph's tensors needs"),
                            (lambda: plain.run(PROMPT, patches=patch), "save and patch need"),
                            (lambda: plain.last_logits([plain.tokenize(PROMPT)], patch), "patches need"),
                            (lambda: plain.sequence_logits([(plain.tokenize(PROMPT), [], patch)]), "patches need")]:
            with pytest.raises(FvpatchError, match=f"hooks=False; {needs} the eval callback"):
                call()


def test_a_last_block_patch_mid_prompt_scores_as_run_does(tiny_gguf):
    """Past the last block llama.cpp keeps only output rows: a patch there, mid-prompt, needs its row kept in the
    batched paths as `run` keeps it. They used to fail with 'cannot find entry'; the last token's logits, which
    such a patch does not reach, stay run's."""
    with Session(tiny_gguf, exact=True) as s:
        p = Patch(f"l_out-{s.n_layer - 1}", np.random.default_rng(0).normal(0, 4, s.n_embd), token=2, mode="add")
        tokens = s.tokenize(PROMPT)
        alone = s.run(tokens, patches=[p]).logits
        np.testing.assert_allclose(s.sequence_logits([(tokens, [], [p])])[0][-1], alone, atol=1e-5)
        np.testing.assert_allclose(s.last_logits([tokens, tokens[:-1] + [tokens[1]]], [p])[0], alone, atol=1e-5)
