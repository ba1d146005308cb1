"""Exported control vectors in stock llama.cpp programs: llama-completion and llama-server, built by `make
llama-tools` from the llama.cpp that the pinned llama-cpp-python vendors, read `fvpatch export`'s files with
their own loader and apply them as fvpatch says they will. Marked `stock`; `make test-stock` builds the
programs and runs these."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch import vectorfile
from fvpatch.cli import main
from fvpatch.session import Patch
from fvpatch.shipped import vector_path
from train.stock_llama import TOOLS, Server

pytestmark = [pytest.mark.stock, pytest.mark.skipif(not (TOOLS / "llama-server").exists(),
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
    cv = export(tmp_path, name, "--scale", "1")
    for prompt in PROMPTS:
        ours = gemma.run(prompt, patches=patches([(name, scale)]), max_tokens=6)
        plain = gemma.run(prompt, max_tokens=6)
        out = subprocess.run([TOOLS / "llama-completion", "-m", gemma_path, "--control-vector-scaled", f"{cv}:{scale}", "-p", prompt,
                              "-n", "6", "--temp", "0", "-no-cnv", "-t", "1", "--no-display-prompt", "--simple-io", "--no-warmup"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.rstrip("\n") == ours.text.rstrip("\n"), prompt
    assert ours.text != plain.text  # the vector changes what the last prompt generates


def test_llama_server_gives_fvpatch_probabilities(gemma, gemma_path, tmp_path):
    """Two exported vectors summed in one file (0.5 × the second), as llama-server's `--control-vector`.
    `--swa-full`: llama.cpp's programs give Gemma's sliding-window layers a smaller cache than a context made with
    llama.cpp's defaults (fvpatch's), which moves this model's log-probabilities by up to ~0.1 with no vector at all
    (README, stock llama.cpp); with the same cache the two agree to float rounding."""
    specs = [("gemma-3-270m/present-past.ffv-all", 1.0), ("gemma-3-270m/singular-plural.ffv-all", 0.5)]
    cv = export(tmp_path, *(n for n, _ in specs), *(a for _, sc in specs for a in ("--scale", str(sc))))
    with Server(gemma_path, cv, ["--swa-full"]) as server:
        for prompt in PROMPTS:
            tokens = gemma.tokenize(prompt)
            top = server.top(tokens)
            logits = gemma.run(tokens, patches=patches(specs)).logits.astype(np.float64)
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
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
    out = subprocess.run(["bash", "-c", f"{command} -t 1 --temp 0 --no-display-prompt --simple-io --no-warmup"], cwd=tmp_path / "pack",
                         env={"PATH": f"{TOOLS}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=120, check=True).stdout
    prompt = command.split("-p $'")[1].split("'")[0].replace("\\n", "\n")
    ours = gemma.run(prompt, patches=patches([(name, 1.0)]), max_tokens=4)
    assert out.rstrip("\n") == ours.text.rstrip("\n") and ours.text != gemma.run(prompt, max_tokens=4).text
