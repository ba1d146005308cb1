"""`fvpatch vectors pack`: a folder to share (vector files, control vectors where a vector can be one, a card
whose commands name the files written beside it)."""

import json
from pathlib import Path

from click.testing import CliRunner

from fvpatch import controlvector, vectorfile
from fvpatch.cli import main
from fvpatch.shipped import vector_path


def test_pack_writes_what_its_card_names(tmp_path):
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all", "gemma-3-270m/antonym.taskvec"])
    assert r.exit_code == 0, r.output
    assert "no control vector for antonym.taskvec.safetensors" in r.stderr  # a replace-mode vector cannot be one
    pack = tmp_path / "pack"
    assert sorted(p.name for p in pack.iterdir()) == ["README.md", "antonym.taskvec.safetensors", "present-past.ffv-all.gguf",
                                                      "present-past.ffv-all.safetensors"]
    card = (pack / "README.md").read_text()
    assert "llama-completion -m gemma-3-270m-q4_k_m.gguf --control-vector present-past.ffv-all.gguf -p $'Q: " in card
    assert "--vector present-past.ffv-all.safetensors" in card and "--vector antonym.taskvec.safetensors" in card
    original = vectorfile.load(vector_path("gemma-3-270m/present-past.ffv-all"))
    assert controlvector.load(pack / "present-past.ffv-all.gguf").directions[original.layer].tolist() == original.rows[0].tolist()


def test_pack_refuses_an_existing_folder(tmp_path):
    (tmp_path / "pack").mkdir()
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all"])
    assert r.exit_code != 0 and "exists; pass --force" in r.output and not any((tmp_path / "pack").iterdir())


def test_the_cards_fvpatch_command_runs_as_printed(tmp_path, gemma_path):
    """Run from the pack's folder, the card's `fvpatch patch` line applies the vector written beside it."""
    import os
    import subprocess
    import sys

    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all"])
    assert r.exit_code == 0, r.output
    command, = [line for line in (tmp_path / "pack" / "README.md").read_text().splitlines() if line.startswith("fvpatch patch")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "-c", command + " --json"], cwd=tmp_path / "pack", env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["completion"] != result["unpatched"]


def test_a_card_of_a_shipped_vector_names_it_as_given(tmp_path):
    """Outside a pack there is no file beside the card: its command names the vector as the user did, which resolves anywhere."""
    r = CliRunner().invoke(main, ["vectors", "card", "gemma-3-270m/antonym.ffv", "-o", str(tmp_path / "antonym.md")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "antonym.md").read_text()
    assert "--vector gemma-3-270m/antonym.ffv --compare" in card and 'patched(model, "gemma-3-270m/antonym.ffv")' in card
    assert vector_path("gemma-3-270m/antonym.ffv").is_file()
