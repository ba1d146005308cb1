"""The report scripts' resuming (train.reporting): results record their settings, a rerun with others is refused in one
line before any model work and writes nothing, --force starts over, a subset never stands for the whole, shipped
vectors are not replaced without --force, and bad input is one line. On small result files and the tiny model."""

import argparse
import json
import sys

import pytest

from train import reporting


def report(module, capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    """Run `python -m train.<module> argv` in this process: (exit status, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"train.{module}").main
    monkeypatch.setattr(sys, "argv", [module, *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        reporting.run(main)
    out, err = capsys.readouterr()
    if isinstance(e.value.code, str):  # sys.exit(message): the interpreter prints it to stderr and exits 1
        return 1, out, e.value.code + err
    return e.value.code or 0, out, err  # sys.exit(None): 0


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_positive_counts():
    assert reporting.positive_int("3") == 3
    for bad in ("-3", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            reporting.positive_int(bad)


def test_resume_refuses_other_settings_and_force_starts_over(tmp_path):
    out = tmp_path / "r.json"
    assert reporting.resume(out, {"n_test": 5}, False) is None  # nothing yet
    out.write_text(json.dumps({"settings": {"n_test": 50, "ffv_only": True}, "rows": {"a": 1}}))
    assert reporting.resume(out, {"n_test": 50, "ffv_only": True}, False)["rows"] == {"a": 1}
    with pytest.raises(reporting.FvpatchError, match=r"r\.json was made with --n-test 50; rerun with those settings, or pass --force"):
        reporting.resume(out, {"n_test": 5, "ffv_only": True}, False)
    with pytest.raises(reporting.FvpatchError, match="made with --ffv-only;"):
        reporting.resume(out, {"n_test": 50, "ffv_only": False}, False)
    assert reporting.resume(out, {"n_test": 5}, True) is None
    out.write_text(json.dumps({"n_test": 50}))  # from before settings were recorded
    with pytest.raises(reporting.FvpatchError, match="does not record the settings"):
        reporting.resume(out, {"n_test": 50}, False)
    assert reporting.resume(out, {"n_test": 50}, False, legacy=lambda r: {"n_test": r["n_test"]}) == {"n_test": 50}


def test_outside_a_checkout_results_need_a_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(reporting, "IN_CHECKOUT", False)
    with pytest.raises(reporting.FvpatchError, match="give one with --results DIR"):
        reporting.results_dir(argparse.Namespace(results=None))
    assert reporting.results_dir(argparse.Namespace(results=tmp_path)) == tmp_path
    with pytest.raises(reporting.FvpatchError, match="run it in a checkout"):
        reporting.vectors_dir("m", writes=True)
    assert reporting.vectors_dir("m") == reporting.VECTORS_DIR / "m"


def test_positions_resumed_with_another_n_test_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "gemma-3-270m" / "positions.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"model": "gemma-3-270m", "n_test": 50, "vectors": {"antonym.fv": {"n": 50}}}))  # no settings: legacy
    before = snapshot(tmp_path)
    code, _, err = report("report_positions", capsys, monkeypatch, "--n-test", 5, "--results", tmp_path)
    assert code == 1 and err.strip() == f"Error: {out} was made with --n-test 50; rerun with those settings, or pass --force to start over"
    assert snapshot(tmp_path) == before


def test_bad_input_is_one_line(capsys, monkeypatch, tmp_path, gemma_path):
    code, _, err = report("report_decoding", capsys, monkeypatch, "--model", "nosuch", "--results", tmp_path)
    assert code == 1 and err.startswith("Error: 'nosuch' is neither") and len(err.strip().splitlines()) == 1
    code, _, err = report("report_positions", capsys, monkeypatch, "--model", tmp_path / "missing.gguf", "--results", tmp_path)
    assert code == 1 and err.strip() == f"Error: model file {tmp_path / 'missing.gguf'} does not exist"
    code, _, err = report("report_quant", capsys, monkeypatch, "--quants", "BOGUS", "--results", tmp_path)
    assert code == 1 and "unknown quantization 'BOGUS'" in err
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("FVPATCH_MODELS", str(models))  # where it would write the Q4_0 before refusing the second name
    code, _, err = report("report_quant", capsys, monkeypatch, "--model", gemma_path, "--quants", "Q4_0,BOGUS", "--results", tmp_path)
    assert code == 1 and "unknown quantization 'BOGUS'" in err and not any(models.iterdir())
    models.rmdir()
    code, _, err = report("report_icl_spread", capsys, monkeypatch, "--n-test", "-3")
    assert code == 2 and "-3 is not a positive count" in err
    assert not any(tmp_path.iterdir())


def test_ctrl_c_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        reporting.run(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.startswith("Interrupted; the results written so far are kept")


def test_google_category_scored_with_another_n_is_neither_rescored_nor_overwritten(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "gemma-3-270m" / "google"
    folder.mkdir(parents=True)
    (folder / "capital-common-countries.json").write_text(json.dumps({"category": "capital-common-countries", "n_asked": 50, "k": 4}))
    before = snapshot(tmp_path)
    code, _, err = report("report_google", capsys, monkeypatch, "--categories", "capital-common-countries", "--n", 5, "--results", tmp_path)
    assert code == 1 and "capital-common-countries.json was made with --n 50;" in err
    assert snapshot(tmp_path) == before


def icl_row(task: str, n: int, seeds: int, settings: bool = True) -> dict:
    return {"task": task, "n": n, **({"settings": {"n_test": n}} if settings else {}), "ffv": 0.5,
            "icl": {str(s): 0.4 for s in range(seeds)}}


def test_icl_spread_refuses_another_n_test_and_labels_its_table(tmp_path, tiny_gguf, capsys, monkeypatch):
    out = tmp_path / tiny_gguf.stem / "ffv" / "icl_spread.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"antonym": icl_row("antonym", 5, 1, settings=False), "capitalize": icl_row("capitalize", 40, 2)}))
    before = snapshot(tmp_path)
    code, _, err = report("report_icl_spread", capsys, monkeypatch, "--model", tiny_gguf, "--tasks", "antonym", "--seeds", 2,
                          "--n-test", 40, "--results", tmp_path)
    assert code == 1 and f"{out} (antonym) was made with --n-test 5;" in err
    assert snapshot(tmp_path) == before
    # every draw already scored: no model work, and the table holds only the rows of this --n-test, its command says so
    code, md, _ = report("report_icl_spread", capsys, monkeypatch, "--model", tiny_gguf, "--tasks", "capitalize", "--seeds", 2,
                         "--n-test", 40, "--results", tmp_path)
    assert code == 0 and "| capitalize | 40 |" in md and "antonym" not in md
    assert f"--model {tiny_gguf.stem} --tasks capitalize --seeds 2 --n-test 40`" in md
    assert json.loads(out.read_text())["antonym"] == icl_row("antonym", 5, 1, settings=False)  # another task's row untouched


def test_fv_and_ffv_do_not_replace_shipped_vectors_without_force(tmp_path, capsys, monkeypatch):
    """Results elsewhere, so every task is to do: the shipped vectors it would replace are refused before any model work."""
    code, _, err = report("report_fv", capsys, monkeypatch, "--tasks", "antonym", "--n-test", 5, "--results", tmp_path)
    assert code == 1 and "antonym.fv.safetensors exists; pass --force to overwrite it" in err
    code, _, err = report("report_ffv", capsys, monkeypatch, "--tasks", "antonym", "--results", tmp_path)
    assert code == 1 and "antonym.ffv.safetensors exists; pass --force to overwrite it" in err
    assert not any(tmp_path.iterdir())


def test_fv_task_made_with_other_settings_is_refused(tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "fv" / "tasks"
    tasks.mkdir(parents=True)
    settings = {"n_prompts": 25, "n_valid": 50, "n_test": 100, "dtype": "float32"}
    (tasks / "antonym.json").write_text(json.dumps({"task": "antonym", "settings": settings}))
    code, _, err = report("report_fv", capsys, monkeypatch, "--tasks", "antonym", "--n-prompts", 1, "--results", tmp_path)
    assert code == 1 and "antonym.json was made with --n-prompts 25;" in err
