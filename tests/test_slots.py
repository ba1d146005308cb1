"""fvpatch.slots: requests decoded together generate what each would generate alone, with only its own patches.

On the tiny f32 model with exact numerics a batch's rows come out as they do alone, so the check is equality of
every generated token; on a 4-bit model batching moves logits a little (README, "Batched evaluation")."""

import threading

import numpy as np
import pytest

from fvpatch.errors import FvpatchError
from fvpatch.session import Patch, Session
from fvpatch.slots import Slots

PROMPTS = ["one two three four five six seven eight", "a b c", "hello world", "z y x w v u t s r q p o n m l k j i h g f e d c b a"]


@pytest.fixture(scope="module")
def exact(tiny_gguf):
    # a small ubatch, so long prompts are decoded in chunks beside other requests' generated tokens
    with Session(tiny_gguf, n_ctx=512, n_ubatch=16, exact=True) as s:
        yield s


def requests(s: Session) -> list[dict]:
    rng = np.random.default_rng(0)
    v = lambda: rng.normal(0, 4, s.n_embd).astype(np.float32)  # noqa: E731 - big enough to change what is generated
    last = s.n_layer - 1
    patches = [
        [],
        [Patch("l_out-1", v(), -1, "add", generated=True)],
        [Patch("l_out-2", v(), -1, "add", all_tokens=True)],
        [Patch(f"l_out-{last}", v(), -1, "add", all_tokens=True)],
        [Patch("l_out-1", v(), 2, "replace")],
        [Patch("l_out-1", v(), -1, "add", generated=True), Patch("l_out-1", v(), 0, "add", scale=0.5)],
    ]
    out = []
    for i, ps in enumerate(patches * 2):
        out.append({"tokens": s.tokenize(PROMPTS[i % len(PROMPTS)]), "patches": ps, "max_tokens": 3 + i,
                    "temperature": 0.8 if i % 5 == 4 else 0.0, "seed": i})
    return out


def alone(s: Session, r: dict) -> list[int]:
    return s.run(r["tokens"], patches=r["patches"], max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r["seed"]).generated


@pytest.mark.parametrize("n_slots", [1, 3, 12])
def test_requests_together_generate_what_each_generates_alone(exact, n_slots):
    reqs = requests(exact)
    expected = [alone(exact, r) for r in reqs]
    assert len({tuple(e[:3]) for e in expected}) > 4  # the vectors matter, so a leak between requests would show
    slots = Slots(exact, n_slots)
    try:
        jobs = [slots.submit(**r) for r in reqs]
        assert [list(j) for j in jobs] == expected
    finally:
        slots.close()


def test_requests_submitted_while_others_generate(exact):
    reqs = requests(exact)
    expected = [alone(exact, r) for r in reqs]
    slots = Slots(exact, 4)
    got = [None] * len(reqs)

    def client(i):
        got[i] = list(slots.submit(**reqs[i]))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == expected
    finally:
        slots.close()


def test_a_request_waits_for_cache_room_and_then_runs(tiny_gguf):
    with Session(tiny_gguf, n_ctx=256, n_ubatch=16, exact=True) as s:  # llama.cpp's smallest
        big = {"tokens": s.tokenize(PROMPTS[3]), "patches": [], "max_tokens": 110, "temperature": 0.0, "seed": 0}
        expected = alone(s, big)
        assert 2 * (len(big["tokens"]) + 110) > s.n_ctx  # two at once would not fit the cache
        slots = Slots(s, 4)
        try:
            assert [list(j) for j in [slots.submit(**big), slots.submit(**big)]] == [expected, expected]
        finally:
            slots.close()


def test_a_cancelled_request_frees_its_slot(exact):
    slots = Slots(exact, 1)
    try:
        long = slots.submit(exact.tokenize("a b c"), [], 200)
        first = next(iter(long))
        long.cancel()
        short = slots.submit(exact.tokenize("a b c"), [], 2)
        assert list(short)[0] == first
        assert len(list(long)) < 199  # it ended early; what it had already made still comes out
    finally:
        slots.close()


def test_a_vector_that_breaks_its_logits_fails_only_its_own_request(exact):
    """A huge vector turns one request's residual to inf/NaN: that request fails in one line, and the requests in
    the same batches, and those after it, still generate exactly what they generate alone (the broken cache rows
    do not reach other sequences)."""
    reqs = requests(exact)[:4]
    expected = [alone(exact, r) for r in reqs]
    huge = Patch("l_out-1", np.full(exact.n_embd, 1e30, np.float32), -1, "add", all_tokens=True)
    with pytest.raises(FvpatchError, match="logits are not finite"):
        exact.run(exact.tokenize(PROMPTS[3]), patches=[huge], max_tokens=2)
    slots = Slots(exact, 3)
    try:
        jobs = [slots.submit(**reqs[0]), slots.submit(exact.tokenize(PROMPTS[3]), [huge], 5), *[slots.submit(**r) for r in reqs[1:]]]
        with pytest.raises(FvpatchError, match="logits are not finite"):
            list(jobs[1])
        assert [list(j) for j in jobs[:1] + jobs[2:]] == expected
        assert [list(slots.submit(**r)) for r in reqs] == expected
    finally:
        slots.close()


@pytest.mark.parametrize("n_slots", [0, 10_000])
def test_slots_must_fit_the_context(exact, n_slots):
    with pytest.raises(FvpatchError, match="parallel slots must be 1 to"):
        Slots(exact, n_slots)


def test_a_request_that_cannot_fit_is_refused(exact):
    slots = Slots(exact, 1)
    try:
        with pytest.raises(FvpatchError, match="a request needs a prompt and 1 to"):
            slots.submit(exact.tokenize("a b c"), [], exact.n_ctx)
    finally:
        slots.close()


def test_echo_scores_every_prompt_token_across_chunks(exact):
    """A prompt longer than the batch is decoded in chunks beside other requests; its rows' log-probabilities
    are still the one-prompt run's."""
    from fvpatch.scoring import log_softmax

    tokens = exact.tokenize(PROMPTS[3])
    assert len(tokens) > exact.n_ubatch
    patch = [Patch("l_out-1", np.full(exact.n_embd, 0.5, np.float32), -1, "add", all_tokens=True)]
    logits = exact.run(tokens, patches=patch, all_logits=True).prompt_logits
    slots = Slots(exact, 3)
    try:
        others = [slots.submit(exact.tokenize(p), [], 5) for p in PROMPTS[:2]]
        job = slots.submit(tokens, patch, 2, top_logprobs=2, echo=True)
        list(job), [list(o) for o in others]
    finally:
        slots.close()
    expected = [log_softmax(logits[i])[tokens[i + 1]] for i in range(len(tokens) - 1)]
    assert [lp for lp, _ in job.prompt_logprobs] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in job.prompt_logprobs)


def test_a_mixed_load_on_four_slots_answers_as_one_slot_does(tiny_gguf, tmp_path):
    """The whole server on the exact f32 model: streams, echoes, log-probabilities, several prompts per request
    and vectors, twelve requests at once on four slots, each answered exactly as one slot answers it alone."""
    import json
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from fvpatch import vectorfile
    from fvpatch.server import make_server

    with Session(tiny_gguf, n_ctx=512, n_ubatch=16, exact=True) as s:
        rng = np.random.default_rng(1)
        vec = lambda name: str(vectorfile.save(vectorfile.VectorFile("l_out-1", rng.normal(0, 4, (1, s.n_embd)), [-1], s.fingerprint(), mode="add"),  # noqa: E731
                                              tmp_path / f"{name}.safetensors"))
        a, b = vec("a"), vec("b")
        bodies = [
            {"prompt": PROMPTS[0], "max_tokens": 6},
            {"prompt": PROMPTS[1], "max_tokens": 5, "vectors": [{"vector": a}], "logprobs": 2},
            {"prompt": PROMPTS[3], "max_tokens": 4, "vectors": [{"vector": b, "positions": "all"}], "logprobs": 1, "echo": True},
            {"prompt": [PROMPTS[2], s.tokenize(PROMPTS[0])], "max_tokens": 3, "vectors": [{"vector": a, "scale": 0.5}]},
            {"prompt": PROMPTS[2], "max_tokens": 7, "vectors": [{"vector": b}], "stream": True},
            {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0.9, "seed": 3, "vectors": [{"vector": a}]},
        ] * 2

        def answers(parallel: int, at_once: bool) -> list:
            srv = make_server(s, "127.0.0.1", 0, quiet=True, parallel=parallel, vector_dir=tmp_path)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{srv.server_address[1]}/v1/completions"

            def ask(body):
                with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode())) as r:
                    raw = r.read().decode()
                if body.get("stream"):  # the streamed text, joined
                    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in raw.splitlines() if line.startswith("data: {"))
                return [{k: c[k] for k in ("text", "logprobs", "finish_reason")} for c in json.loads(raw)["choices"]]

            try:
                if not at_once:
                    return [ask(body) for body in bodies]
                with ThreadPoolExecutor(len(bodies)) as pool:
                    return list(pool.map(ask, bodies))
            finally:
                srv.shutdown()
                srv.server_close()

        alone = answers(1, at_once=False)
        assert alone[:6] == alone[6:] and len({json.dumps(x) for x in alone[:6]}) == 6
        together = answers(4, at_once=True)
        # the same text, tokens and alternatives; log-probabilities to float rounding (a batch sums in another order)
        assert skeleton(together) == skeleton(alone)
        np.testing.assert_allclose(floats(together), floats(alone), atol=1e-5)


def skeleton(x):
    """A JSON value with every float replaced by 0.0."""
    if isinstance(x, float):
        return 0.0
    if isinstance(x, dict):
        return {k: skeleton(v) for k, v in x.items()}
    return [skeleton(v) for v in x] if isinstance(x, list) else x


def floats(x) -> list[float]:
    if isinstance(x, float):
        return [x]
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else []
    return [f for v in values for f in floats(v)]
