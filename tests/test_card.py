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


def run_card_line(card: str, start: str, cwd: Path, *more: str) -> str:
    """Run the card's one line that starts with `start` as printed (plus `more`), from `cwd`; its stdout."""
    import os
    import subprocess
    import sys

    command, = [line for line in card.splitlines() if line.startswith(start)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "-c", " ".join([command, *more])], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_cards_fvpatch_command_runs_as_printed(tmp_path, gemma_path):
    """Run from the pack's folder, the card's `fvpatch patch` line applies the vector written beside it."""
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all"])
    assert r.exit_code == 0, r.output
    result = json.loads(run_card_line((tmp_path / "pack" / "README.md").read_text(), "fvpatch patch", tmp_path / "pack", "--json"))
    assert result["completion"] != result["unpatched"]


def test_a_banks_card_patches_its_first_relation(tmp_path, gemma_path):
    """A bank's rows are relations, patched one at a time: its card's commands name BANK#RELATION, and run."""
    r = CliRunner().invoke(main, ["vectors", "card", "gemma-3-270m/analogy.bank"])
    assert r.exit_code == 0, r.output
    assert "16 function vectors of **Gemma 3 270m**, one per relation" in r.stdout and "saved at tokens" not in r.stdout
    assert 'patched(model, load_vector("gemma-3-270m/analogy.bank#antonym"))' in r.stdout
    result = json.loads(run_card_line(r.stdout, "fvpatch patch", tmp_path, "--json"))
    assert result["completion"] != result["unpatched"]
    run_card_line(r.stdout, "fvpatch export", tmp_path)
    bank = vectorfile.load(vector_path("gemma-3-270m/analogy.bank"))
    assert controlvector.load(tmp_path / "analogy.bank-antonym.gguf").directions[bank.layer].tolist() == bank.rows[0].tolist()
    assert "llama-completion -m gemma-3-270m-q4_k_m.gguf --control-vector analogy.bank-antonym.gguf -p $'Q: " in r.stdout


def test_a_standalone_card_exports_its_control_vector(tmp_path):
    """Outside a pack no control vector lies beside the card: it shows the `fvpatch export` that makes the one
    its llama.cpp command names, and that command writes it."""
    r = CliRunner().invoke(main, ["vectors", "card", "gemma-3-270m/antonym.ffv"])
    assert r.exit_code == 0, r.output
    assert "fvpatch export gemma-3-270m/antonym.ffv antonym.ffv.gguf\nllama-completion -m gemma-3-270m-q4_k_m.gguf --control-vector antonym.ffv.gguf " in r.stdout
    run_card_line(r.stdout, "fvpatch export", tmp_path)
    original = vectorfile.load(vector_path("gemma-3-270m/antonym.ffv"))
    assert controlvector.load(tmp_path / "antonym.ffv.gguf").directions[original.layer].tolist() == original.rows[0].tolist()
    r = CliRunner().invoke(main, ["vectors", "card", "gemma-3-270m/antonym.taskvec"])  # replace mode: no control vector
    assert r.exit_code == 0 and "llama-completion" not in r.stdout and "no control vector for gemma-3-270m/antonym.taskvec" in r.stderr


def test_pack_force_refuses_vectors_of_an_earlier_pack(tmp_path):
    """A pack's README.md describes every vector in its folder: --force over an earlier pack of other vectors is
    refused, naming them, and nothing is deleted or written; the same vectors again are rewritten."""
    pack = tmp_path / "pack"
    first = ["gemma-3-270m/present-past.ffv-all", "gemma-3-270m/antonym.taskvec"]
    assert CliRunner().invoke(main, ["vectors", "pack", str(pack), *first]).exit_code == 0
    (pack / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in pack.iterdir()}
    r = CliRunner().invoke(main, ["vectors", "pack", str(pack), "gemma-3-270m/antonym.ffv", "--force"])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == (
        f"Error: {pack} holds antonym.taskvec.safetensors, present-past.ffv-all.gguf, present-past.ffv-all.safetensors, which this pack "
        "does not write and its README.md would not describe; remove them or pack into another folder")
    assert {p.name: p.read_bytes() for p in pack.iterdir()} == before
    r = CliRunner().invoke(main, ["vectors", "pack", str(pack), *first, "--force"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in pack.iterdir()) == sorted(before)


def test_a_card_of_a_shipped_vector_names_it_as_given(tmp_path):
    """Outside a pack there is no file beside the card: its command names the vector as the user did, which resolves anywhere."""
    r = CliRunner().invoke(main, ["vectors", "card", "gemma-3-270m/antonym.ffv", "-o", str(tmp_path / "antonym.md")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "antonym.md").read_text()
    assert "--vector gemma-3-270m/antonym.ffv --compare" in card and 'patched(model, "gemma-3-270m/antonym.ffv")' in card
    assert vector_path("gemma-3-270m/antonym.ffv").is_file()
