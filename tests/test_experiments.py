"""The seed's transfer experiments as commands (fvpatch.experiments, `fvpatch sweep`, `fvpatch reversal`).

Mechanics on a tiny qwen2 GGUF (digits are single tokens, as in Qwen): the packed teacher-forced decode
decides what one-sequence greedy generation produces, rates are rates, runs resume, bad input is one line.
The default model reproduces the seed's capital layers; Qwen2.5-Coder 1.5B (marked big) the README's results.
"""

import json

import pytest
from click.testing import CliRunner

from fvpatch import experiments as ex
from fvpatch.cli import main
from fvpatch.session import Patch, Save, Session
from tests.arch_models import write_tiny_model

SOURCE, TARGET = "Egypt -> Cairo, Norway -> Oslo, Estonia ->", "France ->"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return write_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "tiny-qwen2-f32.gguf")


@pytest.fixture(scope="module")
def session(tiny_qwen):
    with Session(tiny_qwen, n_ctx=512) as s:
        yield s


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generated_lists_are_distinct_and_reproducible():
    take = lambda seed: [x for _, x in zip(range(50), ex.generate_lists(seed, (3, 4, 5)))]
    lists = take(0)
    assert lists == take(0) and lists != take(1)
    assert len(set(lists)) == 50
    assert all(len(x) in (3, 4, 5) and len(set(x)) == len(x) and set(x) <= set(ex.DIGITS) for x in lists)
    assert ex.reversal_source(ex.SEED_DEMO, ex.SEED_PARTIAL) == "1 2 3 to 3 2 1, 5 6 7 to 7 "
    assert ex.reversal_query(tuple("456")) == "4 5 6 to 6 " and ex.reversal_answer(tuple("456")) == "5 4"
    with pytest.raises(ValueError, match="lengths must lie in 2..10"):
        next(ex.generate_lists(0, (1, 3)))


def test_packed_argmax_is_what_greedy_generation_produces(session):
    """Greedy generation and the teacher-forced argmax agree up to the first token that leaves the answer."""
    targets, _, _ = ex.find_targets(session, 6, seed=0, lengths=(3, 4, 5))
    vec = {L: session.run(ex.reversal_source(ex.SEED_DEMO, ex.SEED_PARTIAL), saves=[Save(f"l_out-{L}", (-1,))]).saved[f"l_out-{L}"][0]
           for L in range(session.n_layer)}
    items = [(t.prompt, t.answer, [Patch(f"l_out-{L}", vec[L])] if L is not None else []) for t in targets for L in (None, 1, 2)]
    packed = ex.teacher_forced_argmax(session, items, chunk=7)  # chunks that split the items unevenly
    for (prompt, answer, patches), argmax in zip(items, packed):
        generated = session.run(prompt, patches=patches, max_tokens=len(answer)).generated
        wrong = [j for j, (a, b) in enumerate(zip(argmax, answer)) if a != b]
        upto = wrong[0] + 1 if wrong else len(answer)
        assert generated[:upto] == list(argmax[:upto])


def test_reversal_rates_and_their_replay(session):
    r = ex.prepare_reversal(session, n=8, seed=3, lengths=(3, 4))
    assert len(r.targets) == 8 and r.examined == 8 + len(r.dropped)
    for t in r.targets:
        assert len(t.items) in (3, 4) and t.items[-2] != "6"  # "6" is the fixed source's own next item
        assert session.detokenize(t.prompt) == ex.reversal_query(t.items) and session.detokenize(t.answer) == ex.reversal_answer(t.items)
        assert ex.reversal_query(t.items) not in t.source
    ex.run_layers(session, r, [0, 2])
    assert sorted(r.layers) == [0, 2]
    for kinds in r.layers.values():
        for rates in kinds.values():
            assert all(0.0 <= rates[k] <= 1.0 for k in ("full", "first", "copy"))
            assert rates["full"] <= rates["first"] and len(rates["full_each"]) == len(rates["first_token_each"]) == 8
    checked = ex.verify(session, r, k=10)
    assert checked["cases"] == 18 and checked["agree"] == 18, checked["disagree"]


def test_layers_that_are_no_layer_are_named(session):
    """A layer of -1 used to name the tensor `l_out--1`, refused as one that never fires in the graph."""
    for layer in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match=f"layers are whole numbers from 0 to 3, got {layer!r}"):
            ex.transfer_sweep(session, SOURCE, TARGET, layers=[0, layer], max_tokens=1)
    with pytest.raises(ValueError, match="beyond this model's 4 layers"):
        ex.transfer_sweep(session, SOURCE, TARGET, layers=[4], max_tokens=1)


def test_reversal_cli_writes_after_each_layer_and_resumes(tiny_qwen, tmp_path):
    out = tmp_path / "rev.json"
    r = cli("reversal", "-m", tiny_qwen, "--layer", "0-1", "--n", 5, "--verify", 0, "-o", out)
    assert r.exit_code == 0, r.output
    first = json.loads(out.read_text())
    assert list(first["layers"]) == ["0", "1"] and len(first["targets"]) == 5
    first["layers"]["0"]["resumed"] = True  # a marker: a resumed run keeps this layer instead of measuring it again
    out.write_text(json.dumps(first))
    r = cli("reversal", "-m", tiny_qwen, "--layer", "0-3", "--n", 5, "--verify", 2, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    again = json.loads(out.read_text())
    assert again == json.loads(r.output)
    assert list(again["layers"]) == ["0", "1", "2", "3"] and again["layers"]["0"]["resumed"]
    assert again["verify"]["cases"] == 4

    before = out.read_text()
    r = cli("reversal", "-m", tiny_qwen, "--layer", "0", "--n", 5, "--seed", 1, "-o", out)
    assert r.exit_code == 1 and "holds a run with other" in r.output and len(r.output.strip().splitlines()) == 1
    assert out.read_text() == before


def test_bad_input_is_one_line_and_writes_nothing(tiny_qwen, tmp_path):
    out = tmp_path / "never.json"
    cases = {
        ("reversal", "--layer", "9"): "beyond this model's 4 layers",
        ("reversal", "--layer", "1-x"): "expected N, N,M,..., A-B or all",
        ("reversal", "--lengths", "1,3"): "lengths must lie in 2..10",
        ("reversal", "--lengths", "three"): "expected comma-separated integers",
        ("reversal", "--n", "0"): "'--n': 0 is not in the range x>=1",
        ("reversal", "--tensor", "l_out-2"): "give the tensor's base name",
        ("reversal", "--tensor", "l_ou", "--layer", "1"): "never appeared",
        ("sweep", "-p", SOURCE, "-t", TARGET, "--layer", "4"): "beyond this model's 4 layers",
        ("sweep", "-p", SOURCE, "-t", TARGET, "--tensor", "l_ou"): "never appeared",
        # a reversed range among others used to be dropped silently, running the other layers only
        ("reversal", "--layer", "2,1-0"): "'1-0' names no layer: a range A-B needs A <= B",
        ("sweep", "-p", SOURCE, "-t", TARGET, "--layer", "3,1-0"): "'1-0' names no layer: a range A-B needs A <= B",
        # bytes that are not UTF-8 (here Latin-1's é) used to end in a UnicodeEncodeError traceback
        ("sweep", "-p", SOURCE, "-t", "caf\udce9 ->"): "'--target' / '-t': is not valid UTF-8 text",
    }
    for (command, *args), message in cases.items():
        r = cli(command, "-m", tiny_qwen, *args, *(["-o", out] if command == "reversal" else []))
        assert r.exit_code != 0 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 or "Usage" in r.output
    assert not out.exists()


def test_reversal_refuses_a_results_file_it_cannot_resume(tiny_qwen, tmp_path):
    """An -o file that is not a results file is refused before the model loads (here a model that does not exist); one
    edited or damaged (a layer the model lacks, a layer's outcomes for other targets, a malformed replay) is refused in
    one line, not resumed into a traceback or into results of layers that do not exist; the file is left as it was."""
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    r = cli("reversal", "-m", tmp_path / "missing.gguf", "-o", junk)
    assert r.exit_code == 1 and "junk.json exists but is not a readable results file" in r.output and len(r.output.strip().splitlines()) == 1
    r = cli("reversal", "-m", tmp_path / "missing.gguf", "--lengths", "1,3")  # --lengths too, before the model
    assert r.exit_code == 1 and "lengths must lie in 2..10" in r.output

    out = tmp_path / "rev.json"
    assert cli("reversal", "-m", tiny_qwen, "--layer", "0", "--n", 3, "--verify", 0, "-o", out).exit_code == 0
    good = json.loads(out.read_text())
    edits = {
        "a layer beyond the model": lambda d: d["layers"].update({"99": d["layers"]["0"]}),
        "a layer that is no number": lambda d: d["layers"].update({"x": d["layers"]["0"]}),
        "a layer that is not a result": lambda d: d["layers"].update({"0": "garbage"}),
        "outcomes of other targets": lambda d: d["layers"]["0"]["fixed"].update({"full_each": [1]}),
        "a malformed replay": lambda d: d.update({"verify": "zzz"}),
    }
    for what, edit in edits.items():
        bad = json.loads(json.dumps(good))
        edit(bad)
        out.write_text(json.dumps(bad))
        before = out.read_text()
        r = cli("reversal", "-m", tiny_qwen, "--layer", "0,1", "--n", 3, "--verify", 0, "-o", out)
        assert r.exit_code == 1 and "rev.json holds a malformed" in r.output and len(r.output.strip().splitlines()) == 1, (what, r.output)
        assert out.read_text() == before, what


def test_sweep_cli(tiny_qwen):
    r = cli("sweep", "-m", tiny_qwen, "-p", SOURCE, "-t", TARGET, "--layer", "all", "-n", 3, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert list(out["completions"]) == ["0", "1", "2", "3"] and "layers_expected" not in out
    expect = out["completions"]["2"]
    r = cli("sweep", "-m", tiny_qwen, "-p", SOURCE, "-t", TARGET, "--layer", "all", "-n", 3, "--expect", expect, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers_expected"] == [int(L) for L, text in out["completions"].items() if text.startswith(expect)]
    with Session(tiny_qwen, n_ctx=512) as s:
        row = s.run(SOURCE, saves=[Save("l_out-2", (-1,))]).saved["l_out-2"][0]
        assert out["completions"]["2"] == s.run(TARGET, patches=[Patch("l_out-2", row)], max_tokens=3).text
        assert out["unpatched"] == s.run(TARGET, max_tokens=3).text


@pytest.mark.slow
def test_sweep_finds_the_seed_capital_layers(gemma_path):
    """README, results on the default model: ` Paris` at layers 9-11 of Gemma 3 270M."""
    r = cli("sweep", "-m", gemma_path, "-p", SOURCE, "-t", TARGET, "--layer", "6-14", "-n", 2, "--expect", " Paris", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers_expected"] == [9, 10, 11]


@pytest.mark.big
def test_qwen_capital_layers_and_reversal_rate(qwen_path):
    """README, results on Qwen2.5-Coder 1.5B: ` Paris` at l_out-14 and -15 only; at l_out-17 and -19 the seed's
    reversal vector, and a matched one, make the model reverse about a third of 40 lists it does not reverse
    by itself (README: 30-40%; asserted with room for numerical near-ties on other CPUs)."""
    r = cli("sweep", "-m", qwen_path, "-p", SOURCE, "-t", TARGET, "--layer", "12-17", "-n", 2, "--expect", " Paris", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers_expected"] == [14, 15]
    r = cli("reversal", "-m", qwen_path, "--layer", "17,19", "--n", 40, "--verify", 0, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["targets"]) == 40 and len(out["dropped"]) >= 10  # it reverses many lists by itself: not targets
    for kinds in out["layers"].values():
        assert kinds["fixed"]["full"] >= 0.25 and kinds["matched"]["full"] >= 0.25
