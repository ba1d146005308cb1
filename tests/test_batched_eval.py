"""Session.last_logits: the shared prefix decoded once and copied, the rests packed, gives one-at-a-time's logits."""

import numpy as np
import pytest

from fvpatch.errors import FvpatchError
from fvpatch.session import Patch, Session

PREFIX = "one two three four five six seven eight nine ten "
RESTS = ["a b c", "x y", "hello world again", "z", "a b c d e f"]


@pytest.fixture(scope="module")
def exact(tiny_gguf):
    with Session(tiny_gguf, n_ctx=512, exact=True) as s:
        yield s


def _patches(s, v):
    last = s.n_layer - 1
    return {
        "none": [],
        "last token": [Patch("l_out-1", v, -1, "add")],
        "every token": [Patch("l_out-2", v, -1, "add", all_tokens=True)],
        "every token, last block": [Patch(f"l_out-{last}", v, -1, "add", all_tokens=True)],
        "inside the prefix": [Patch("l_out-1", v, 3, "replace")],
    }


@pytest.mark.parametrize("case", ["none", "last token", "every token", "every token, last block", "inside the prefix"])
def test_same_logits_as_one_at_a_time(exact, case):
    s = exact
    prompts = [s.tokenize(PREFIX + r) for r in RESTS]
    patches = _patches(s, np.random.default_rng(0).normal(0, 2, s.n_embd).astype(np.float32))[case]
    for got, prompt in zip(s.last_logits(prompts, patches), prompts):
        np.testing.assert_allclose(got, s.run(prompt, patches=patches).logits, atol=1e-4)


def test_no_shared_prefix_and_many_packs(exact):
    s = exact
    prompts = [s.tokenize(f"{i} " * (1 + i % 7), add_bos=False) for i in range(70)]  # more prompts than sequences
    for got, prompt in zip(s.last_logits(prompts), prompts):
        np.testing.assert_allclose(got, s.run(prompt).logits, atol=1e-4)


def test_a_rest_that_does_not_fit(tiny_gguf):
    with Session(tiny_gguf, n_ctx=64, n_ubatch=32) as s:
        with pytest.raises(FvpatchError, match="raise --n-ctx"):
            s.last_logits([s.tokenize("a " * 40), s.tokenize("b " * 50)])
