"""Control vectors between fvpatch and stock llama.cpp programs, built by `make llama-tools` from the
llama.cpp that the pinned llama-cpp-python vendors: llama-completion and llama-server read `fvpatch export`'s
files with their own loader and apply them as fvpatch says they will, and llama-cvector-generator's files
import as fvpatch says they were measured. Marked `stock`; `make test-stock` builds the programs and runs these."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch import vectorfile
from fvpatch.cli import main
from fvpatch.scoring import log_softmax
from fvpatch.session import Patch
from fvpatch.shipped import vector_path
from train.stock_llama import TOOLS, Server

PROGRAMS = ("llama-completion", "llama-server", "llama-cvector-generator")
pytestmark = [pytest.mark.stock, pytest.mark.skipif(not all((TOOLS / p).exists() for p in PROGRAMS),
                                                    reason=f"no stock llama.cpp programs in {TOOLS}: run `make llama-tools`")]
PROMPTS = ["Q: walk\nA:", "Q: France\nA:", "Q: cat\nA:"]


def export(tmp_path, *args) -> Path:
    out = tmp_path / "cv.gguf"
    r = CliRunner().invoke(main, ["export", *args, str(out)])
    assert r.exit_code == 0, r.output
    return out


def patches(specs: list[tuple[str, float]]) -> list[Patch]:
    """fvpatch's own way of doing what a control vector does: each vector's rows added at every token, times `scale`
    (the exports below give --scale explicitly, so a file's own scale plays no part on either side)."""
    vfs = [(vectorfile.load(vector_path(name)), scale) for name, scale in specs]
    return [Patch(vf.tensor, vf.rows[0], -1, "add", scale, all_tokens=True) for vf, scale in vfs]


@pytest.mark.parametrize("name,scale", [("gemma-3-270m/present-past.ffv-all", 1.0), ("gemma-3-270m/country-capital.fv", 0.5)])
def test_llama_completion_generates_what_fvpatch_generates(gemma, gemma_path, tmp_path, name, scale):
    """`--swa-full` as in the server test below: without it these prompts happen to agree too, but a near tie
    elsewhere could flip on numerics that have nothing to do with the vector."""
    cv = export(tmp_path, name, "--scale", "1")
    for prompt in PROMPTS:
        ours = gemma.run(prompt, patches=patches([(name, scale)]), max_tokens=6)
        plain = gemma.run(prompt, max_tokens=6)
        out = subprocess.run([TOOLS / "llama-completion", "-m", gemma_path, "--control-vector-scaled", f"{cv}:{scale}", "-p", prompt,
                              "-n", "6", "--temp", "0", "-no-cnv", "-t", "1", "--no-display-prompt", "--simple-io", "--no-warmup", "--swa-full"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.rstrip("\n") == ours.text.rstrip("\n"), prompt
    assert ours.text != plain.text  # the vector changes what the last prompt generates


def test_llama_server_gives_fvpatch_probabilities(gemma, gemma_path, tmp_path):
    """Two exported vectors summed in one file (0.5 × the second), as llama-server's `--control-vector`.
    `--swa-full`: llama.cpp's programs give Gemma's sliding-window layers a smaller cache than a context made with
    llama.cpp's defaults (fvpatch's), which moves this model's log-probabilities by up to ~0.2 with no vector at all
    (README, stock llama.cpp); with the same cache the two agree to float rounding."""
    specs = [("gemma-3-270m/present-past.ffv-all", 1.0), ("gemma-3-270m/singular-plural.ffv-all", 0.5)]
    cv = export(tmp_path, *(n for n, _ in specs), *(a for _, sc in specs for a in ("--scale", str(sc))))
    with Server(gemma_path, cv, ["--swa-full"]) as server:
        for prompt in PROMPTS:
            tokens = gemma.tokenize(prompt)
            top = server.top(tokens)
            logp = log_softmax(gemma.run(tokens, patches=patches(specs)).logits)
            assert [i for i, _ in top] == list(np.argsort(-logp)[:5]), prompt
            np.testing.assert_allclose([lp for _, lp in top], logp[[i for i, _ in top]], atol=1e-3)


def test_a_packed_cards_llama_command_runs_as_written(gemma, gemma_path, tmp_path):
    """The command a shared pack's card gives stock llama.cpp users runs from the pack's folder and
    generates what fvpatch generates with the vector at every token."""
    name = "gemma-3-270m/present-past.ffv-all"
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), name])
    assert r.exit_code == 0, r.output
    (tmp_path / "pack" / gemma_path.name).symlink_to(gemma_path)  # the card names the model file, as users hold it
    command, = [line for line in (tmp_path / "pack" / "README.md").read_text().splitlines() if line.startswith("llama-")]
    assert "--temp 0" in command  # greedy, as fvpatch: llama-completion samples at 0.8 by default
    out = subprocess.run(["bash", "-c", f"{command} -t 1 --no-display-prompt --simple-io --no-warmup"], cwd=tmp_path / "pack",
                         env={"PATH": f"{TOOLS}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=120, check=True).stdout
    prompt = command.split("-p $'")[1].split("'")[0].replace("\\n", "\n")
    ours = gemma.run(prompt, patches=patches([(name, 1.0)]), max_tokens=4)
    assert out.rstrip("\n") == ours.text.rstrip("\n") and ours.text != gemma.run(prompt, max_tokens=4).text


def test_cvector_generator_files_import_as_measured_one_block_below(smollm_path, tmp_path):
    """A file from llama.cpp's own generator (`--method mean`): its direction.N is the normalised mean of
    positive minus negative rows of l_out-(N-1), which fvpatch's save reproduces exactly, and import
    records that convention and keeps where the file applies it (l_out-N)."""
    from fvpatch import Session
    from fvpatch.session import Save

    pos, neg = ["I love this film", "What a wonderful day"], ["I hate this film", "What a terrible day"]
    for name, prompts in (("pos", pos), ("neg", neg)):
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    subprocess.run([TOOLS / "llama-cvector-generator", "-m", smollm_path, "--positive-file", tmp_path / "pos.txt", "--negative-file",
                    tmp_path / "neg.txt", "--method", "mean", "-o", tmp_path / "gen.gguf", "-t", "1"], capture_output=True, timeout=300, check=True)
    r = CliRunner().invoke(main, ["import", str(tmp_path / "gen.gguf"), str(tmp_path / "imported"), "--model", str(smollm_path)])
    assert r.exit_code == 0, r.output
    with Session(smollm_path) as s:
        for n in (1, 15, s.n_layer - 1):
            vf = vectorfile.load(tmp_path / "imported" / f"l_out-{n}.safetensors")
            assert vf.tensor == f"l_out-{n}" and vf.meta["fvpatch.controlvector.writer"] == "llama.cpp cvector-generator"
            assert vf.meta["fvpatch.controlvector.measured_at"].startswith("l_out-(N-1)")
            rows = []
            for p, q in zip(pos, neg):
                tp, tq = s.tokenize(p), s.tokenize(q)
                assert len(tp) == len(tq)  # the generator pads the shorter prompt; these need none
                save = [Save(f"l_out-{n - 1}", tuple(range(len(tp))))]
                diff = s.run(tp, saves=save).saved[f"l_out-{n - 1}"] - s.run(tq, saves=save).saved[f"l_out-{n - 1}"]
                rows += [d for d in diff if d.max() > 1e-6]  # the generator drops rows it takes for zero this way
            mean = np.mean(rows, axis=0)
            np.testing.assert_allclose(vf.rows[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_the_openai_client_gets_the_same_answer_from_fvpatch_serve_and_llama_server(gemma_path, tmp_path):
    """One vector, two servers: fvpatch serve takes it with the request, stock llama-server at start. The same
    greedy text, and the same log-probabilities of each token's five likeliest, to 1e-3. (llama-server answers
    `logprobs` on /v1/completions in chat's format, a `content` list.)"""
    import threading

    import openai

    from fvpatch import Session
    from fvpatch.server import make_server

    name = "gemma-3-270m/present-past.ffv-all"
    ask = dict(model="gemma-3-270m", max_tokens=6, temperature=0, logprobs=5)
    with Session(gemma_path) as s:
        srv = make_server(s, "127.0.0.1", 0, "gemma-3-270m", quiet=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            ours = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="none", max_retries=0)
            served = [ours.completions.create(prompt=p, extra_body={"vectors": [{"vector": name}]}, **ask).choices[0] for p in PROMPTS]
        finally:
            srv.shutdown()
            srv.server_close()
    with Server(gemma_path, export(tmp_path, name), ["--swa-full"]) as stock:
        theirs = openai.OpenAI(base_url=stock.url + "/v1", api_key="none", max_retries=0)
        # cache_prompt off: reusing the previous prompt's cached prefix changes the numerics enough to flip a near tie
        stock = [theirs.completions.create(prompt=p, extra_body={"cache_prompt": False}, **ask).choices[0] for p in PROMPTS]
    assert [c.text for c in stock] == [c.text for c in served]
    for ours_choice, stock_choice in zip(served, stock):
        content = stock_choice.model_dump()["logprobs"]["content"]
        assert len(content) == len(ours_choice.logprobs.top_logprobs)
        for top, theirs_top in zip(ours_choice.logprobs.top_logprobs, content):
            assert {t["token"]: pytest.approx(t["logprob"], abs=1e-3) for t in theirs_top["top_logprobs"]} == top
