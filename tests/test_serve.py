"""`fvpatch serve` answers the real openai client, with and without vectors, and never mixes requests."""

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from fvpatch.server import make_server
from fvpatch.session import Session

pytestmark = pytest.mark.slow
PROMPT = "Q: maximal\nA:"


@pytest.fixture(scope="module")
def server(gemma_path, tmp_path_factory):
    with Session(gemma_path) as s:
        srv = make_server(s, "127.0.0.1", 0, "gemma-3-270m", quiet=True, vector_dir=tmp_path_factory.mktemp("vectors"))
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        yield srv
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none", max_retries=0)


def cli_patch(gemma_path, vector, *extra) -> str:
    """The same prompt and vector through `fvpatch patch`, the reference a served answer must equal."""
    out = subprocess.run([sys.executable, "-m", "fvpatch.cli", "patch", "-m", str(gemma_path), "-p", PROMPT, "--vector", vector, "-n", "4",
                          "--every-token", "--json", *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["completion"]


def test_completion_with_and_without_a_vector(client, gemma_path):
    plain = client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, temperature=0)
    steered = client.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, temperature=0,
                                        extra_body={"vectors": [{"vector": "antonym.ffv"}]})
    assert steered.choices[0].text.strip().startswith("minimal")
    assert plain.choices[0].text != steered.choices[0].text
    assert steered.choices[0].text == cli_patch(gemma_path, "antonym.ffv")
    assert steered.usage.completion_tokens == 4 and steered.choices[0].finish_reason == "length"


ASKS = [("antonym.ffv", PROMPT), ("present-past.ffv", PROMPT), (None, PROMPT)] * 2


def ask_all(client) -> list[str]:
    """Six requests at once, three vectors (one of them none)."""
    def ask(vector_prompt):
        vector, prompt = vector_prompt
        body = {"vectors": [{"vector": vector}]} if vector else {}
        return client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, extra_body=body).choices[0].text

    with ThreadPoolExecutor(len(ASKS)) as pool:
        return list(pool.map(ask, ASKS))


def test_concurrent_requests_take_turns_and_keep_their_own_vectors(client, gemma_path):
    got = ask_all(client)
    assert got[:3] == got[3:]
    assert got[0] == cli_patch(gemma_path, "antonym.ffv") and got[1] == cli_patch(gemma_path, "present-past.ffv")
    assert len(set(got[:3])) == 3


def test_concurrent_requests_decoded_together_keep_their_own_vectors(gemma_path, client):
    """With --parallel 3 the six are decoded together. Batched, a 4-bit model's logits move a little (README,
    "Batched evaluation"), so later near-tied tokens may differ from a lone run; the first token, where each
    vector decides, may not. Exact equality with lone runs is tests/test_slots.py's, on an f32 model."""
    alone = ask_all(client)[:3]
    with Session(gemma_path) as s:
        srv = make_server(s, "127.0.0.1", 0, quiet=True, parallel=3)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            together = ask_all(openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none", max_retries=0))
        finally:
            srv.shutdown()
            srv.server_close()
    firsts = [" minimal", " maximal", " The"]  # each answer's first token
    assert all(text.startswith(f) for text, f in zip(alone + together, firsts * 3))


def test_streaming_gives_the_same_text(client):
    body = {"vectors": [{"vector": "antonym.ffv", "positions": "last"}]}
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=body).choices[0].text
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=body, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == whole


@pytest.mark.parametrize("vectors,message", [
    ([{"vector": "no-such-vector"}], "neither a shipped vector nor a file in the server.s vector folder"),
    ([{"vector": "/etc/passwd"}], "neither a shipped vector nor a file in the server.s vector folder"),
    ([{"vector": "../../../../etc/passwd"}], "neither a shipped vector nor a file"),
    ([{"vector": "a" * 300}], "neither a shipped vector nor a file"),  # too long a name for the filesystem: was a dropped connection
    ([{"vector": "antonym.ffv", "scale": "big"}], "scale must be a finite number"),
    ([{"vector": "antonym.ffv", "positions": "middle"}], "positions must be"),
    ([{"vector": "antonym.taskvec", "positions": "all"}], "only an added vector"),
    ("antonym.ffv", "vectors must be a list"),
])
def test_a_bad_vector_is_a_400_and_the_server_keeps_serving(client, vectors, message):
    with pytest.raises(openai.BadRequestError, match=message) as e:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body={"vectors": vectors})
    assert "\n" not in e.value.body["message"]
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).choices[0].text


def test_chat_needs_a_template(client):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_chat_with_a_vector_on_an_instruct_model(smollm_path, tmp_path):
    from fvpatch import vectorfile
    from fvpatch.session import Save

    with Session(smollm_path) as s:
        # a vector of this model: its residual after block 10 at the end of another text
        row = s.run("The weather in Paris is", saves=[Save("l_out-10")]).saved["l_out-10"]
        path = vectorfile.save(vectorfile.VectorFile("l_out-10", row, [-1], s.fingerprint(), mode="add"), tmp_path / "v.safetensors")
        srv = make_server(s, "127.0.0.1", 0, quiet=True, vector_dir=tmp_path)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none", max_retries=0)
            msgs = [{"role": "user", "content": "Name a colour."}]
            plain = c.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0)
            steered = c.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0,
                                                extra_body={"vectors": [{"vector": str(path), "scale": 2.0, "positions": "all"}]})
            assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content
            assert steered.choices[0].message.content != plain.choices[0].message.content
            chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].message.content
            scored = c.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
            assert "".join(t.token for t in scored.choices[0].logprobs.content) == plain.choices[0].message.content
            assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in scored.choices[0].logprobs.content)
            with pytest.raises(openai.BadRequestError, match="top_logprobs needs"):
                c.chat.completions.create(model="m", messages=msgs, max_tokens=2, top_logprobs=2)
            streamed = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, stream=True, logprobs=True, top_logprobs=2))
            assert [t.model_dump() for ch in streamed if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content] == \
                [t.model_dump() for t in scored.choices[0].logprobs.content]
            parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
            assert c.chat.completions.create(model="m", messages=parts, max_tokens=6, temperature=0).choices[0].message.content == \
                plain.choices[0].message.content
        finally:
            srv.shutdown()
            srv.server_close()


def test_a_stop_string_never_reaches_the_client(client):
    """The held-back tail: ` minimal` ends in `al`, which may be the start of the stop string `al\\n`."""
    body = {"vectors": [{"vector": "antonym.ffv"}]}
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, stop=["al\n"], extra_body=body)
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, stop=["al\n"], extra_body=body, stream=True)
    assert whole.choices[0].text == "".join(c.choices[0].text for c in stream) == " minim"
    assert whole.choices[0].finish_reason == "stop"


def test_a_position_outside_the_prompt_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="outside the prompt"):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body={"vectors": [{"vector": "antonym.ffv", "positions": [99]}]})


def test_a_vector_on_a_tensor_that_never_fires_is_a_400(client, gemma, server):
    from fvpatch import vectorfile

    # a real name on another architecture (mixture-of-experts), within Gemma's layers, absent from its graph
    path = vectorfile.save(vectorfile.VectorFile("ffn_moe_out-3", np.ones((1, gemma.n_embd), np.float32), [-1], gemma.fingerprint(), mode="add"),
                           server.generator.vector_dir / "moe.safetensors")
    with pytest.raises(openai.BadRequestError, match="never appears in this model's compute graph"):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body={"vectors": [{"vector": path.name}]})
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).choices[0].text
    # a per-head view: in the graph, but not one row per token
    path = vectorfile.save(vectorfile.VectorFile("Qcur_normed-3", np.ones((1, 256), np.float32), [-1], gemma.fingerprint(), mode="add"),
                           server.generator.vector_dir / "heads.safetensors")
    with pytest.raises(openai.BadRequestError, match="is not one row per token"):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body={"vectors": [{"vector": path.name}]})


def test_logprobs_are_the_sessions_own(client, gemma):
    from fvpatch import vectorfile
    from fvpatch.scoring import log_softmax
    from fvpatch.session import Patch
    from fvpatch.shipped import vector_path

    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=3,
                                  extra_body={"vectors": [{"vector": "antonym.ffv"}]})
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0 and len(lp.token_logprobs) == 3
    assert all(len(top) == 3 and max(top.values()) == got for top, got in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    vf = vectorfile.load(vector_path("antonym.ffv", gemma.fingerprint()))
    logits = gemma.run(PROMPT, patches=[Patch(vf.tensor, vf.row(None), -1, vf.mode, vf.scale, generated=True)]).logits
    assert lp.token_logprobs[0] == pytest.approx(log_softmax(logits).max(), abs=1e-4)


def test_logprobs_stop_where_the_text_stops(client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, stop=["al\n"], logprobs=0,
                                  extra_body={"vectors": [{"vector": "antonym.ffv"}]})
    assert r.choices[0].text == " minim" and r.choices[0].logprobs.tokens == [" minimal"]


@pytest.mark.parametrize("fields,message", [
    ({"logprobs": 21}, "logprobs must be an integer from 0 to 20"),
    ({"top_logprobs": 2}, "top_logprobs is a chat field"),
])
def test_bad_logprobs_are_a_400(client, fields, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body=fields)


def test_a_default_vector_serves_clients_that_name_none(gemma_path, client):
    """`fvpatch serve --vector antonym.ffv`: any OpenAI client gets the vector without adding a field."""
    ask = dict(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
    steered = client.completions.create(**ask, extra_body={"vectors": [{"vector": "antonym.ffv"}]}).choices[0].text
    plain = client.completions.create(**ask).choices[0].text
    with Session(gemma_path) as s:
        srv = make_server(s, "127.0.0.1", 0, quiet=True, vectors=[{"vector": "antonym.ffv"}])
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none", max_retries=0)
            assert c.completions.create(**ask).choices[0].text == steered
            assert c.completions.create(**ask, extra_body={"vectors": []}).choices[0].text == plain
        finally:
            srv.shutdown()
            srv.server_close()


def test_a_vector_of_another_width_is_a_400(client, gemma, server):
    from fvpatch import vectorfile

    path = vectorfile.save(vectorfile.VectorFile("l_out-3", np.ones((1, gemma.n_embd + 1), np.float32), [-1], gemma.fingerprint(), mode="add"),
                           server.generator.vector_dir / "wide.safetensors")
    with pytest.raises(openai.BadRequestError, match=f"width {gemma.n_embd + 1} does not fit tensor 'l_out-3' of width {gemma.n_embd}"):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, extra_body={"vectors": [{"vector": path.name}]})


def test_several_prompts_as_text_or_tokens_are_one_choice_each(client, gemma):
    ask = dict(model="m", max_tokens=3, temperature=0, extra_body={"vectors": [{"vector": "antonym.ffv"}]})
    alone = [client.completions.create(prompt=p, **ask).choices[0].text for p in (PROMPT, "Q: wet\nA:")]
    r = client.completions.create(prompt=[PROMPT, gemma.tokenize("Q: wet\nA:")], **ask)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == alone
    assert r.usage.prompt_tokens == len(gemma.tokenize(PROMPT)) + len(gemma.tokenize("Q: wet\nA:"))


def test_echo_scores_the_prompt_as_lm_evaluation_harness_asks(client, gemma):
    """lm-eval's local-completions sends context + continuation tokens with echo, logprobs=1, max_tokens=1, and
    sums token_logprobs[ctxlen:-1]: the continuation's log-likelihood, which must be the session's own."""
    from fvpatch.scoring import log_softmax

    context, continuation = gemma.tokenize(PROMPT), gemma.tokenize(" minimal", add_bos=False)
    r = client.completions.create(model="m", prompt=context + continuation, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(context) + len(continuation) + 1
    assert r.choices[0].text.startswith("Q: maximal\nA: minimal") and lp.text_offset[len(context)] == len("Q: maximal\nA:")
    logits = gemma.run(context + continuation, all_logits=True).prompt_logits
    expected = [log_softmax(logits[i - 1])[t] for i, t in enumerate(context + continuation) if i >= len(context)]
    assert lp.token_logprobs[len(context):-1] == pytest.approx(expected, abs=1e-4)


def call(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    """GET (no body) or POST JSON to the server, as a client without the openai package would."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}", data)) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_the_tokenizer_endpoints_speak_vllms_format(server, gemma):
    _, info = call(server, "/tokenizer_info")
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>"
    assert call(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})[1]["tokens"] == [gemma.eos]
    tokens = call(server, "/tokenize", {"prompt": PROMPT})[1]["tokens"]
    assert tokens == gemma.tokenize(PROMPT)
    assert call(server, "/detokenize", {"tokens": tokens})[1]["prompt"] == PROMPT
    assert call(server, "/detokenize", {"tokens": [-1]})[0] == 400


@pytest.mark.parametrize("fields,message", [
    ({"prompt": [PROMPT] * 65}, "a list of 1 to 64 of either"),
    ({"prompt": [PROMPT, ""]}, "prompt 1 is empty"),
    ({"prompt": [2, 10**7]}, "token id 10000000 is outside the vocabulary"),
    ({"prompt": [PROMPT, PROMPT], "stream": True}, "a streamed request takes one prompt, n of 1 and no echo"),
    ({"prompt": PROMPT, "echo": True, "stream": True}, "a streamed request takes one prompt, n of 1 and no echo"),
    ({"prompt": PROMPT, "echo": "yes"}, "echo must be true or false"),
    ({"prompt": [2] * 5000}, "a prompt of 5000 tokens leaves no room in the context of 2048"),
    ({"prompt": PROMPT, "add_bos": "no"}, "add_bos must be true or false"),
])
def test_bad_prompts_are_a_400(server, fields, message):
    status, body = call(server, "/v1/completions", {"max_tokens": 2} | fields)
    assert status == 400 and message in body["error"]["message"]


def test_token_ids_without_bos_get_one_on_a_model_that_starts_texts_with_it(client, gemma):
    """As lm-evaluation-harness sends them: Gemma without BOS answers noise. The echo is the prompt as sent."""
    ask = dict(model="m", max_tokens=3, temperature=0, logprobs=1, echo=True)
    with_bos = gemma.tokenize(PROMPT)
    assert gemma.adds_bos and with_bos[0] == gemma.bos
    sent = client.completions.create(prompt=with_bos[1:], **ask).choices[0]
    whole = client.completions.create(prompt=with_bos, **ask).choices[0]
    assert sent.text == whole.text and sent.text.startswith(PROMPT)
    assert sent.logprobs.token_logprobs == whole.logprobs.token_logprobs[1:]  # the first token sent is scored after the BOS
    bare = client.completions.create(prompt=with_bos[1:], **ask, extra_body={"add_bos": False}).choices[0]
    as_text = client.completions.create(prompt=PROMPT, **ask, extra_body={"add_bos": False}).choices[0]
    assert bare.logprobs.token_logprobs[0] is None and bare.text != sent.text  # as sent, no BOS: another answer
    assert as_text.text == bare.text


def exchange(server, *requests: tuple) -> list[tuple[int, dict, bytes]]:
    """(method, path, body, headers) requests on one keep-alive connection: each answer's status, headers and body."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    out = []
    for method, path, body, headers in requests:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        out.append((r.status, dict(r.getheaders()), r.read()))
    conn.close()
    return out


def test_http_edges_get_json_answers_and_keep_the_connection_usable(server):
    ok = json.dumps({"prompt": PROMPT, "max_tokens": 1})
    answers = exchange(server,
                       ("POST", "/v1/completion", ok, None),  # a typo: 404, and its body must not be read as the next request
                       ("POST", "/v1/completions", ok, None),
                       ("GET", "/v1/completions", None, None),
                       ("POST", "/v1/models", ok, None),
                       ("POST", "/v1/completions", "[" * 100_000 + "]" * 100_000, None),
                       ("POST", "/v1/completions", b'{"prompt": "\xff"}', None),
                       ("GET", "/v1/models?api-version=1", None, None),
                       ("GET", "/v1/models/gemma-3-270m", None, None),
                       ("GET", "/health", None, None),
                       ("OPTIONS", "/v1/completions", "hello", {"Access-Control-Request-Headers": "content-type"}),
                       ("GET", "/health", "a body nobody reads", None),  # read and dropped, so the next request parses
                       ("PUT", "/v1/completions", None, None))
    status = [a[0] for a in answers]
    assert status == [404, 200, 405, 405, 400, 400, 200, 200, 200, 204, 200, 405]
    assert answers[2][1]["Allow"] == "POST, OPTIONS" and answers[3][1]["Allow"] == "GET, HEAD, OPTIONS"
    assert b"not JSON" in answers[4][2] and b"not UTF-8" in answers[5][2]
    assert json.loads(answers[7][2])["created"] > 0 and json.loads(answers[8][2]) == {"status": "ok"}
    assert all(a[1]["Access-Control-Allow-Origin"] == "*" for a in answers)
    assert json.loads(answers[11][2])["error"]["message"].startswith("PUT is not supported")
    # a chunked body is refused, and the connection closed: its chunks would read as the next request
    (status, headers, body), = exchange(server, ("POST", "/v1/completions", iter([ok.encode()]), {"Transfer-Encoding": "chunked"}))
    assert status == 411 and headers["Connection"] == "close"


@pytest.mark.parametrize("head,says", [
    (b"POST /v1/completions HTTP/1.1\r\n\r\n", b"411"),  # no Content-Length: a body would be read as the next request
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{}", b"ended after 2 of its 40 bytes"),
])
def test_a_body_that_cannot_be_read_whole_is_refused_and_the_connection_closed(server, head, says):
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
        sock.sendall(head)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(4096), b""))  # to the end: the server closes
    assert says in answer and b"Connection: close" in answer


def test_sampling_fields(server):
    ask = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0}
    texts = lambda r: [c["text"] for c in r[1]["choices"]]  # noqa: E731
    assert len({texts(call(server, "/v1/completions", ask))[0] for _ in range(3)}) > 1  # no seed: a fresh draw each time
    seeded = call(server, "/v1/completions", ask | {"seed": 7, "n": 3})
    assert [c["index"] for c in seeded[1]["choices"]] == [0, 1, 2] and len(set(texts(seeded))) > 1
    assert texts(call(server, "/v1/completions", ask | {"seed": 7, "n": 3})) == texts(seeded)
    assert seeded[1]["usage"]["prompt_tokens"] == len(server.generator.session.tokenize(ask["prompt"]))
    greedy = texts(call(server, "/v1/completions", ask | {"temperature": 0}))
    assert texts(call(server, "/v1/completions", ask | {"top_p": 0.01})) == greedy  # the nucleus is the top token
    assert call(server, "/v1/completions", ask | {"presence_penalty": 0, "logit_bias": {}, "best_of": 1})[0] == 200


@pytest.mark.parametrize("fields,message", [
    ({"presence_penalty": 0.5}, "does not support presence_penalty"),
    ({"logit_bias": {"1": 5}}, "does not support logit_bias"),
    ({"best_of": 2}, "does not support best_of"),
    ({"suffix": "x"}, "does not support suffix"),
    ({"top_p": 0}, "top_p must be a number above 0"),
    # JSON integers have no size limit: one past float's range was a TypeError in numpy, and a 500
    ({"top_p": 10**400}, "top_p must be a number above 0"),
    ({"temperature": 10**400}, "temperature must be a number from 0 to 2"),
    ({"temperature": float("nan")}, "temperature must be a number from 0 to 2"),
    ({"vectors": [{"vector": "antonym.ffv", "scale": 10**400}]}, "scale must be a finite number"),
    ({"seed": 10**30}, "seed must be an integer from 0 to"),
    ({"n": 65}, "n must be an integer from 1 to 64"),
    ({"n": 2, "stream": True}, "n of 1"),
    ({"stop": 0}, "stop must be a string or a list"),
    ({"stream_options": {"include_usage": True}}, "stream_options goes with"),
    ({"max_tokens": 0}, "max_tokens must be an integer from 1 to"),
    ({"vectors": [{"vector": "antonym.ffv", "scale": 1e300}]}, "overflows float32"),
    # one row written twice, replaced: refused at submit, which used to be a 500 that left the other prompts' jobs running
    ({"vectors": [{"vector": "antonym.taskvec", "positions": [2, 2]}]}, "two patches write l_out-"),
    ({"prompt": ["Q: a b c d e f g h\nA:", PROMPT], "vectors": [{"vector": "antonym.taskvec", "positions": [2, -5]}]}, "two patches write l_out-"),  # only the second prompt collides
    ({"vectors": [{"vector": "antonym.ffv", "scale": 1e20}]}, "logits are not finite, or all equal"),
])
def test_fields_it_cannot_honour_are_a_400(server, fields, message):
    status, body = call(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2} | fields)
    assert status == 400 and message in body["error"]["message"]


def test_max_tokens_defaults_and_zero(server, gemma):
    status, body = call(server, "/v1/completions", {"prompt": [gemma.bos] + [9259] * (gemma.n_ctx - 6)})  # room for 5
    assert status == 200 and body["usage"]["completion_tokens"] <= 5
    assert call(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": None})[1]["usage"]["completion_tokens"] == 16
    status, body = call(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1})
    choice = body["choices"][0]
    assert status == 200 and choice["text"] == PROMPT and body["usage"]["completion_tokens"] == 0
    # text on a model that starts it with BOS: the echo leaves the BOS out, and scores the first token after it
    assert "".join(choice["logprobs"]["tokens"]) == PROMPT and choice["logprobs"]["token_logprobs"][0] is not None
    assert len(choice["logprobs"]["tokens"]) == len(gemma.tokenize(PROMPT)) - 1
    assert call(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True})[1]["choices"][0]["text"] == PROMPT


def test_chat_max_tokens_defaults_to_a_slots_share_of_the_context(smollm_path, tmp_path):
    """With --parallel P a chat request without max_tokens gets what its prompt leaves of a P-th of the context (as
    llama-server's slots), so P such requests run together; the whole context would make each run alone."""
    from fvpatch.openai_api import read_request

    with Session(smollm_path, hooks=False) as s:
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        one = read_request(s, chat, True, {}, [], tmp_path)
        n_prompt = len(one.prompts[0])
        assert one.max_tokens == s.n_ctx - n_prompt
        assert read_request(s, chat, True, {}, [], tmp_path, parallel=4).max_tokens == s.n_ctx // 4 - n_prompt
        assert read_request(s, chat | {"max_tokens": 1000}, True, {}, [], tmp_path, parallel=4).max_tokens == 1000
        long = {"messages": [{"role": "user", "content": "hi " * (s.n_ctx // 4)}]}
        assert read_request(s, long, True, {}, [], tmp_path, parallel=4).max_tokens == 16  # a share is at least 16


def stream(server, body: dict) -> list[dict]:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
                                                       json.dumps(body | {"stream": True}).encode())) as r:
        lines = r.read().decode().splitlines()
    assert lines[-2] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


@pytest.mark.parametrize("stop", [[], ["al\n"]])
def test_streamed_logprobs_are_the_whole_answers(server, stop):
    ask = {"prompt": PROMPT, "max_tokens": 6, "logprobs": 2, "stop": stop, "vectors": [{"vector": "antonym.ffv"}]}
    whole = call(server, "/v1/completions", ask)[1]["choices"][0]
    chunks = [c["choices"][0] for c in stream(server, ask)]
    assert "".join(c["text"] for c in chunks) == whole["text"] and chunks[-1]["finish_reason"] == whole["finish_reason"]
    parts = [c["logprobs"] for c in chunks if c["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole["logprobs"][key]


def test_a_stream_can_end_with_its_usage(server):
    chunks = stream(server, {"prompt": PROMPT, "max_tokens": 3, "stream_options": {"include_usage": True}})
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_leaves_frees_its_slot(server, client, streamed):
    import socket
    import time

    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": streamed}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        if streamed:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.3)  # generating: the answer comes only at the end
    slots = server.generator.slots
    for _ in range(100):  # 10 s: not cancelled, the 2000 tokens would keep the slot for about 30 s
        if not slots._active and not slots._waiting:
            break
        time.sleep(0.1)
    assert not slots._active
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).choices[0].text
