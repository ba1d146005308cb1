"""Qwen2.5-Coder 1.5B Instruct (Q4_K_M): the claims README makes about it. Marked `big` (a 1.1 GB download and
minutes of CPU), so `make test` skips them; `make test-big` runs them."""

import json

import pytest
from click.testing import CliRunner

from fvpatch.cli import main

pytestmark = pytest.mark.big

SOURCE = "Egypt -> Cairo, Norway -> Oslo, Estonia ->"
TARGET = "France ->"


def run(*args) -> dict:
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("layer", [14, 15])
def test_capital_transfer_at_the_layers_readme_names(tmp_path, layer):
    vec = tmp_path / f"capital-{layer}.safetensors"
    run("save", "--model", "qwen2.5-coder-1.5b", "-p", SOURCE, "--save", f"l_out-{layer}", vec, "--token-idx", -1, "-n", 1)
    out = run("patch", "--model", "qwen2.5-coder-1.5b", "-p", TARGET, "--patch", f"l_out-{layer}", vec, "--compare", "-n", 3)
    assert out["completion"].startswith(" Paris") and not out["unpatched"].startswith(" Paris")


def test_a_q4_k_m_vector_applies_to_q8_0_without_force(tmp_path, qwen_path):
    from fvpatch.models import quantize

    q8 = quantize(qwen_path, tmp_path / "qwen-q8_0.gguf", "Q8_0")
    vec = tmp_path / "capital.safetensors"
    run("save", "--model", qwen_path, "-p", SOURCE, "--save", "l_out-14", vec, "--token-idx", -1, "-n", 1)
    r = CliRunner().invoke(main, ["patch", "--model", str(q8), "-p", TARGET, "--patch", "l_out-14", str(vec), "-n", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert "applied to qwen-q8_0.gguf (Q8_0)" in r.stderr
    assert json.loads(r.stdout)["completion"].startswith(" Paris")
