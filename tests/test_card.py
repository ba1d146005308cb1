"""`fvpatch vectors pack`: a folder to share (vector files, control vectors where a vector can be one, a card
whose commands name the files written beside it)."""

import json
from pathlib import Path

import numpy as np
import pytest
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


# ---- a vector of the user's own: trained on their pairs, exported, imported back -------------------------------

OWN_PAIRS = [("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"), ("Japan", "Japanese"),
             ("China", "Chinese"), ("Greece", "Greek"), ("Poland", "Polish"), ("Sweden", "Swedish"), ("Norway", "Norwegian"),
             ("Finland", "Finnish"), ("Denmark", "Danish"), ("Hungary", "Hungarian"), ("Russia", "Russian"), ("Turkey", "Turkish")]


@pytest.fixture
def own(tiny_session, tiny_gguf, tmp_path, monkeypatch):
    """A folder as a user's holds it after `fvpatch train ffv --pairs pairs.json -o lang.ffv.safetensors` on the tiny
    model: the pairs (named `pairs.json`, so the task is called `pairs`), the vector with the metadata training writes,
    and the model file its fingerprint names; the tests run from there."""
    from fvpatch.tasks import load_task

    (tmp_path / "pairs.json").write_text(json.dumps([{"input": x, "output": y} for x, y in OWN_PAIRS]))
    task = load_task(tmp_path / "pairs.json")
    (tmp_path / tiny_gguf.name).symlink_to(tiny_gguf)
    meta = {"fvpatch.method": "fine-tuned function vector", "fvpatch.task": task.name, "fvpatch.template": "Q: {x}\nA: {y}\n\n",
            "fvpatch.init": "taskvec", "fvpatch.pairs": json.dumps(task.train), "fvpatch.pairs_source": task.source,
            "fvpatch.steps": "60", "fvpatch.best_step": "60", "fvpatch.apply_at": "last"}
    row = np.random.default_rng(0).normal(0, 0.5, tiny_session.n_embd).astype(np.float32)
    vectorfile.save(vectorfile.VectorFile("l_out-2", row, [-1], tiny_session.fingerprint(), "add", meta=meta), tmp_path / "lang.ffv.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path, task


def _card(*args) -> str:
    r = CliRunner().invoke(main, ["vectors", "card", *args])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_a_card_of_your_own_vector_says_what_it_records_and_what_it_does_not(own):
    folder, task = own
    card = _card("lang.ffv.safetensors")
    # named after the vector file, not the pairs file's stem `pairs`
    assert "# lang: fine-tuned function vector" in card and "- lang\n" in card and "- pairs\n" not in card
    assert f"pairs of `lang` ({folder / 'pairs.json'}, split seed 0)" in card
    # no accuracy recorded: said plainly, with the command that measures it on the pairs training held out
    assert "**This file records no held-out accuracy.**" in card
    assert f"fvpatch eval task --task {folder / 'pairs.json'} -m tiny-llama-f32.gguf --vector lang.ffv.safetensors\n" in card
    assert "fvpatch import lang.ffv.gguf lang.ffv.every-token.safetensors\n" in card
    # a runnable example (one of its recorded pairs), and no install command that cannot work
    assert f"-p $'Q: {task.train[0][0]}\\nA:'" in card and "Q: …" not in card and "<your input>" not in card
    assert "pip install fvpatch" not in card and "not published on PyPI" in card
    named = _card("lang.ffv.safetensors", "--name", "country-language")
    assert "# country-language: fine-tuned function vector" in named and "- country-language\n" in named and "- lang\n" not in named
    assert '- "language: of a country"\n' in _card("lang.ffv.safetensors", "--name", "language: of a country")  # YAML reads it back


def test_the_cards_and_the_export_notes_commands_run_as_printed(own):
    """The card's `fvpatch eval task` line and the command chain `export`'s note gives for a vector of no measured
    accuracy at every token run as printed (plus a smaller --n and --k for the tiny model), and score what they say."""
    folder, _ = own
    line = next(line for line in _card("lang.ffv.safetensors").splitlines() if line.startswith("fvpatch eval task"))
    run_card_line(line, "fvpatch eval task", folder, "--n 2 --k 2 -o held-out.json")
    r = CliRunner().invoke(main, ["export", "lang.ffv.safetensors", "lang.gguf"])
    assert r.exit_code == 0, r.output
    note, = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert "train.report_positions" not in note and "--task TASK" not in note
    commands = note.split("to measure it: ")[1]
    assert commands == (f"fvpatch import lang.gguf lang.every-token.safetensors && fvpatch eval task --task {folder / 'pairs.json'} "
                        "-m tiny-llama-f32.gguf --vector lang.every-token.safetensors")
    run_card_line(commands, "fvpatch import", folder, "--n 2 --k 2 -o every-token.json")
    assert vectorfile.load(folder / "lang.every-token.safetensors").meta["fvpatch.apply_at"] == "all"
    held_out, every = (json.loads((folder / f"{name}.json").read_text())["results"]["llama.cpp"] for name in ("held-out", "every-token"))
    assert held_out["n"] == every["n"] == 2


def test_a_card_describes_an_imported_control_vector_as_one(own):
    folder, _ = own
    assert CliRunner().invoke(main, ["export", "lang.ffv.safetensors", "lang.gguf"]).exit_code == 0
    assert CliRunner().invoke(main, ["import", "lang.gguf", "lang-all.safetensors"]).exit_code == 0
    card = _card("lang-all.safetensors")
    assert "# lang-all: control vector" in card and "saved at tokens" not in card
    assert ("A llama.cpp control vector imported from `lang.gguf`, which `fvpatch export` wrote from `lang.ffv.safetensors` (a fine-tuned "
            "function vector trained on its maker's own pairs, task `pairs`, made for the last prompt token).") in card
    assert "at every token, prompt and generated" in card and "| positions | every token |" in card
    # no example recorded: a placeholder that says it is one, and TASK explained
    assert "-p $'Q: <your input>\\nA:'" in card and "(`<your input>` stands for an input of yours" in card
    assert "fvpatch eval task --task TASK -m tiny-llama-f32.gguf --vector lang-all.safetensors" in card and "(`TASK`:" in card


def test_pack_notes_each_vector_made_for_the_last_token_as_export_does(own):
    folder, _ = own
    r = CliRunner().invoke(main, ["vectors", "pack", "pack", "lang.ffv.safetensors", "gemma-3-270m/antonym.ffv", "gemma-3-270m/present-past.ffv-all"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: lang.ffv.safetensors was made to be added at the last prompt token; a control vector adds it at every token, where its "
        f"accuracy has not been measured; to measure it: fvpatch import pack/lang.ffv.gguf lang.ffv.every-token.safetensors && "
        f"fvpatch eval task --task {folder / 'pairs.json'} -m tiny-llama-f32.gguf --vector lang.ffv.every-token.safetensors",
        "note: antonym.ffv.safetensors was made to be added at the last prompt token; a control vector adds it at every token "
        "(held-out top-1 on 50 test pairs: 44% at the last token, 0% at every token)"]  # present-past.ffv-all was made for every token
    export = CliRunner().invoke(main, ["export", "gemma-3-270m/antonym.ffv", "a.gguf"])
    assert export.stderr.splitlines()[0] == notes[1].replace("antonym.ffv.safetensors", "gemma-3-270m/antonym.ffv")


def test_a_foreign_steering_vectors_card_scores_no_task(tmp_path, tiny_gguf):
    """A repeng or llama-cvector-generator direction is a steering vector: its card offers no `eval task` (there are no
    pairs), says it records no scale, and is not tagged as a function vector."""
    from tests.test_controlvector import _foreign
    from tests.tiny_model import N_EMBD

    source = _foreign(tmp_path / "happy.gguf", {2: np.ones(N_EMBD) / np.sqrt(N_EMBD)}, "int32")
    assert CliRunner().invoke(main, ["import", str(source), str(tmp_path / "happy.safetensors"), "--model", str(tiny_gguf)]).exit_code == 0
    r = CliRunner().invoke(main, ["vectors", "card", str(tmp_path / "happy.safetensors")])
    assert r.exit_code == 0, r.output
    assert "A steering direction, not a relation's function vector" in r.stdout and "Its norm is 1," in r.stdout
    assert "fvpatch eval task" not in r.stdout and "- function-vector" not in r.stdout and "- control-vector" in r.stdout


def test_a_layer_of_an_imported_multi_layer_export_credits_only_its_own_source(tmp_path, tiny_session, tiny_gguf):
    """Each file `import` writes records every layer's sources; a layer's card names the one exported at its layer."""
    fp = tiny_session.fingerprint()
    for name, layer in (("a", 1), ("b", 2)):
        vectorfile.save(vectorfile.VectorFile(f"l_out-{layer}", np.ones(tiny_session.n_embd), [-1], fp, "add", meta={"fvpatch.task": "antonym" if name == "a" else "capitalize"}),
                        tmp_path / f"{name}.safetensors")
    run = lambda *args: CliRunner().invoke(main, [*map(str, args)])
    assert run("export", tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "two.gguf").exit_code == 0
    assert run("import", tmp_path / "two.gguf", f"{tmp_path / 'two'}/", "--model", tiny_gguf).exit_code == 0
    r = run("vectors", "card", tmp_path / "two" / "l_out-1.safetensors")
    assert r.exit_code == 0, r.output
    assert "a.safetensors" in r.stdout and "b.safetensors" not in r.stdout and "--task antonym" in r.stdout


def test_tags_yaml_would_read_as_numbers_or_booleans_are_quoted():
    from fvpatch.card import _yaml

    assert [_yaml(t) for t in ("fvpatch", "2024", "null", "yes", "a: b")] == ["fvpatch", '"2024"', '"null"', '"yes"', '"a: b"']


def test_a_saved_activation_is_not_tagged_a_function_vector(tmp_path, tiny_gguf):
    r = CliRunner().invoke(main, ["save", "-m", str(tiny_gguf), "-p", "a b c", "--save", "l_out-1", str(tmp_path / "a.safetensors"), "--token-idx", "-1", "-n", "0"])
    assert r.exit_code == 0, r.output
    card = CliRunner().invoke(main, ["vectors", "card", str(tmp_path / "a.safetensors")]).stdout
    assert "- steering-vector" in card and "- function-vector" not in card and "- control-vector" not in card
