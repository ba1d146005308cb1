"""Composite function vectors: bank files, analogy data, batched bank scoring in both engines, the map's fit."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch.analogy import bank_scores, condition_weights, encode, evaluate, solve
from fvpatch.analogyfile import Analogy, generate, parse_analogy, read_analogies, write_analogies
from fvpatch.cfvmap import CFVMap, compose
from fvpatch.errors import FvpatchError
from fvpatch.bank import Bank, load_bank, save_bank
from fvpatch.session import Patch
from fvpatch.tasks import load_task
from fvpatch.vectorfile import VectorFile, save

RELATIONS = ["antonym", "capitalize", "country-capital", "present-past"]
PAIRS = [("hot", "cold"), ("France", "Paris"), ("walk", "walked")]


@pytest.fixture  # a fresh bank per test: a test may set its map, and the next must not see it
def tiny_bank(tiny_session):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(RELATIONS), tiny_session.n_embd)).astype(np.float32) * 2
    return Bank(RELATIONS, vectors, "l_out-1", tiny_session.fingerprint())


def test_bank_file_round_trip_and_folder_of_vectors(tmp_path, tiny_bank):
    for name, v in zip(tiny_bank.names, tiny_bank.vectors):
        meta = {"fvpatch.task": name, "fvpatch.pairs": json.dumps([["a", "b"]])}
        save(VectorFile(tiny_bank.tensor, v, [-1], tiny_bank.model, mode="add", meta=meta), tmp_path / f"{name}.ffv.safetensors")
    folder = load_bank(tmp_path)
    assert folder.names == sorted(RELATIONS) and folder.layer == 1 and folder.trained_on["antonym"] == [("a", "b")]
    folder.meta = CFVMap(np.eye(4), np.arange(4.0), 0.5).to_meta()
    back = load_bank(save_bank(folder, tmp_path / "bank.safetensors"))
    assert back.names == folder.names and np.array_equal(back.vectors, folder.vectors) and back.trained_on == folder.trained_on
    m = CFVMap.from_bank(back)
    assert np.array_equal(m.weight, np.eye(4)) and np.array_equal(m.bias, np.arange(4.0)) and m.temperature == 0.5
    save(VectorFile("l_out-2", tiny_bank.vectors[0], [-1], tiny_bank.model, mode="add"), tmp_path / "odd.ffv.safetensors")
    with pytest.raises(ValueError, match="share one layer"):
        load_bank(tmp_path)
    with pytest.raises(ValueError, match="no learned analogy map"):
        CFVMap.from_bank(tiny_bank)


def test_analogy_files_and_questions(tmp_path):
    path = tmp_path / "u2.jsonl"
    rows = [{"stem": ["word", "language"], "answer": 1, "choice": [["paint", "portrait"], ["note", "music"], ["tale", "story"]], "prefix": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (x,) = read_analogies(path)
    assert (x.a, x.b, x.c, x.d, x.open) == ("word", "language", "note", "music", False)
    assert read_analogies(write_analogies([x], tmp_path / "again.jsonl"))[0] == x
    path.write_text('{"stem": ["a", "b"], "choice": [["c", "d"]], "answer": 3}\n')
    with pytest.raises(ValueError, match="answer an index"):
        read_analogies(path)
    assert parse_analogy("hot:cold::tall:?") == ("hot", "cold", "tall")
    assert parse_analogy(" big : small :: up ") == ("big", "small", "up")
    with pytest.raises(ValueError, match="expected an analogy"):
        parse_analogy("hot:cold:tall")


def test_generated_analogies_are_reproducible_and_keep_test_pairs_apart():
    test = generate(RELATIONS, "test", 24, seed=3)
    assert test == generate(RELATIONS, "test", 24, seed=3) and test != generate(RELATIONS, "test", 24, seed=4)
    tasks = {r: load_task(r) for r in RELATIONS}
    for x in test:
        assert x.open and len(x.choices) == 4 and len({d for _, d in x.choices}) == 4
        assert (x.a, x.b) in tasks[x.relation].test and (x.c, x.d) in tasks[x.relation].test
    assert [sum(x.relation == r for x in test) for r in RELATIONS] == [6] * 4
    used = {"antonym": tasks["antonym"].train[:20]}
    train = generate(RELATIONS, "train", 40, exclude=used)
    test_pairs = {p for t in tasks.values() for p in t.test}
    for x in train:
        assert (x.a, x.b) not in test_pairs and (x.c, x.d) not in test_pairs
        assert (x.a, x.b) not in used["antonym"] and (x.c, x.d) not in used["antonym"]
    with pytest.raises(FvpatchError, match="at least 2 relations"):  # one relation has no distractor of another: it used to loop forever
        generate(["antonym"], "test", 2)


def test_llamacpp_bank_scores_packed_equal_one_at_a_time(tiny_session, tiny_bank):
    packed = bank_scores(tiny_session, tiny_bank, PAIRS)
    assert packed.shape == (len(PAIRS), len(tiny_bank))
    for n, (a, b) in enumerate(PAIRS):
        prompt, answer = encode(tiny_session.tokenize, f"Q: {a}\nA:", f" {b}")
        for i, v in enumerate(tiny_bank.vectors):
            (single,) = tiny_session.answer_logprobs([(prompt, answer, [Patch(tiny_bank.tensor, v, -1, "add")])])
            assert packed[n, i] == pytest.approx(single.sum(), abs=5e-3)  # packed float sums differ ~1e-3
    assert np.ptp(packed, axis=1).min() > 0.1  # the vectors change the scores, so the check has teeth


def test_torch_bank_scores_batched_equal_one_at_a_time_and_match_llamacpp(tiny_lm, tiny_session, tiny_bank):
    import torch

    from fvpatch.analogy import QA
    from train.cfv import bank_scores as torch_scores
    from train.ffv import answer_nll, encode as torch_encode

    batched = torch_scores(tiny_lm, tiny_bank, PAIRS, pairs_per_batch=2)
    for n, pair in enumerate(PAIRS):
        ex = torch_encode(tiny_lm, QA, [pair])
        for i, v in enumerate(tiny_bank.vectors):
            single = -(answer_nll(tiny_lm, ex, torch.from_numpy(v), tiny_bank.layer) * ex.n_answer).item()
            assert batched[n, i] == pytest.approx(single, abs=1e-4)
    np.testing.assert_allclose(batched, bank_scores(tiny_session, tiny_bank, PAIRS), atol=1e-2)


@pytest.mark.parametrize("objective", ["relation", "answer"])
def test_map_fit_is_reproducible(tiny_lm, tiny_bank, objective):
    import torch

    from train.cfv import FitConfig, bank_scores as torch_scores, fit_map, map_logits

    analogies = generate(RELATIONS, "train", 12, seed=0)
    scores = torch_scores(tiny_lm, tiny_bank, [(x.a, x.b) for x in analogies])
    cfg = FitConfig(objective=objective, steps=6, batch=5, lr=0.1)
    m1, h1 = fit_map(tiny_lm, tiny_bank, analogies, scores, cfg, progress=False)
    m2, _ = fit_map(tiny_lm, tiny_bank, analogies, scores, cfg, progress=False)
    assert np.array_equal(m1.weight, m2.weight) and np.array_equal(m1.bias, m2.bias) and m1.temperature == m2.temperature
    assert not np.allclose(m1.weight, np.eye(len(tiny_bank)) / m1.temperature)  # it moved
    # the runtime applies the fitted map exactly as training did
    w = torch.softmax(map_logits(torch.from_numpy(m1.weight), torch.from_numpy(m1.bias), torch.from_numpy(scores)), -1)
    np.testing.assert_allclose(m1.learned(scores), w.numpy(), atol=1e-12)
    assert m1.learned(scores).sum(1) == pytest.approx(np.ones(len(scores)))


def test_map_fit_from_llama_cpp_scores_alone(tiny_session, tiny_bank):
    """Without a torch model (scores from llama.cpp), the relation objective fits and T is chosen on the relation."""
    from train.cfv import TEMPERATURES, FitConfig, fit_map, relation_temperature

    analogies = generate(RELATIONS, "train", 12, seed=0)
    scores = bank_scores(tiny_session, tiny_bank, [(x.a, x.b) for x in analogies])
    t, curve = relation_temperature(tiny_bank, scores, [x.relation for x in analogies])
    assert set(curve) == set(TEMPERATURES) and curve[t] == max(curve.values())
    m, hist = fit_map(None, tiny_bank, analogies, scores, FitConfig("relation", steps=20, lr=0.1), progress=False)
    assert m.temperature == t and hist["loss"][-1] < hist["loss"][0]
    with pytest.raises(ValueError, match="answer objective runs the model"):
        fit_map(None, tiny_bank, analogies, scores, FitConfig("answer"), progress=False)
    with pytest.raises(FvpatchError, match="the map diverged"):  # never a bank whose map is NaN
        fit_map(None, tiny_bank, analogies, scores, FitConfig("relation", steps=3, lr=1e300), progress=False)


def test_evaluate_solve_and_commands(tmp_path, tiny_session, tiny_gguf, tiny_bank):
    from fvpatch.cli import main

    k = len(tiny_bank)
    cfv_map = CFVMap(np.eye(k) * 2, np.zeros(k), 1.0)
    analogies = generate(RELATIONS, "test", 4, seed=0)
    result = evaluate(tiny_session, tiny_bank, cfv_map, analogies, progress=False)
    assert result["n"] == result["n_open"] == 4
    assert set(result["accuracy"]) == {"no_vector", "prompt_colon", "prompt_is_to", "best_ffv", "cfv_unlearned", "cfv_learned", "oracle_ffv"}
    for acc in result["accuracy"].values():
        assert all(0 <= v <= 1 for v in acc.values())
    public = Analogy("word", "language", [("paint", "portrait"), ("note", "music")], 1)  # SAT/U2 style: a C per choice
    result = evaluate(tiny_session, tiny_bank, cfv_map, [public], progress=False)
    assert result["n_open"] == 0 and "oracle_ffv" not in result["accuracy"]
    assert result["accuracy"]["cfv_learned"]["exact"] is None and result["accuracy"]["cfv_learned"]["mc"] in (0.0, 1.0)
    sol = solve(tiny_session, tiny_bank, cfv_map, "hot", "cold", "tall", max_tokens=3)
    assert sum(w for _, w in sol.weights) == pytest.approx(1.0) and sorted(sol.scores) == sorted(RELATIONS)
    w = cfv_map.learned(np.array([list(sol.scores.values())]))[0]
    np.testing.assert_allclose(compose(tiny_bank, w), w @ tiny_bank.vectors, rtol=1e-5, atol=1e-5)

    tiny_bank.meta = cfv_map.to_meta()
    bank_file = save_bank(tiny_bank, tmp_path / "bank.safetensors")
    runner = CliRunner()
    r = runner.invoke(main, ["analogy", "hot:cold::tall:?", "--model", str(tiny_gguf), "--bank", str(bank_file), "--json", "-n", "3"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["completion"] == sol.completion and len(out["weights"]) == 4
    data = write_analogies(analogies[:2], tmp_path / "a.jsonl")
    r = runner.invoke(main, ["eval", "analogy", "--data", str(data), "--model", str(tiny_gguf), "--bank", str(bank_file), "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "| CFV, learned map |" in r.output and json.loads((tmp_path / "r.json").read_text())["n"] == 2
    folder = tmp_path / "ffvs"
    save_bank(tiny_bank, folder / "analogy.bank.safetensors")  # where `train cfv --bank FOLDER` writes its map
    r = runner.invoke(main, ["eval", "analogy", "--data", str(data), "--model", str(tiny_gguf), "--bank", str(folder)])
    assert r.exit_code == 0 and "| CFV, learned map |" in r.output, r.output
    r = runner.invoke(main, ["eval", "analogy", "--data", str(data), "--model", str(tiny_gguf), "--bank", str(bank_file), "--leave-own-out"])
    assert r.exit_code == 0 and "| CFV, learned map |" in r.output and "oracle" not in r.output, r.output
    r = runner.invoke(main, ["analogy", "hot:cold", "--model", str(tiny_gguf), "--bank", str(bank_file)])
    assert r.exit_code != 0 and "expected an analogy" in r.output


def test_cfv_with_the_icl_prompt_needs_demos(tiny_session, tiny_bank):
    k = len(tiny_bank)
    analogies = generate(RELATIONS, "test", 2, seed=0)
    conditions = ["icl", "cfv_learned", "cfv_learned_icl"]
    with pytest.raises(ValueError, match="needs demonstrations"):
        evaluate(tiny_session, tiny_bank, CFVMap(np.eye(k), np.zeros(k), 1.0), analogies, ["cfv_learned_icl"], progress=False)
    demos = {r: list(load_task(r).train[:3]) for r in RELATIONS}
    result = evaluate(tiny_session, tiny_bank, CFVMap(np.eye(k), np.zeros(k), 1.0), analogies, conditions, progress=False, demos=demos)
    assert set(result["accuracy"]) == set(conditions)
    assert set(result["items"][0]["completion"]) == set(conditions)


def test_leaving_the_own_relation_out():
    rng = np.random.default_rng(0)
    k, relations = len(RELATIONS), ["capitalize", "antonym", "capitalize"]
    bank = Bank(RELATIONS, rng.standard_normal((k, 8)), "l_out-1", {})
    cfv_map = CFVMap(np.eye(k) * 2 + 0.1 * rng.standard_normal((k, k)), 0.1 * rng.standard_normal(k), 0.5)
    scores = -rng.uniform(0, 10, (3, k))
    own = [RELATIONS.index(r) for r in relations]
    scores[range(3), own] = 0.0  # the own relation explains A:B best
    w = condition_weights(bank, cfv_map, scores, relations, leave_out=True)
    assert "oracle_ffv" not in w
    for n, i in enumerate(own):
        others = [j for j in range(k) if j != i]
        for cond in ("best_ffv", "cfv_unlearned", "cfv_learned"):
            assert w[cond][n, i] == 0 and w[cond][n].sum() == pytest.approx(1.0)
        assert w["best_ffv"][n, others].argmax() == np.argmax(scores[n, others])
        np.testing.assert_allclose(w["cfv_unlearned"][n, others], CFVMap(np.eye(k - 1), np.zeros(k - 1), 0.5).unlearned(scores[n, others]))
    moved = scores.copy()
    moved[range(3), own] = -50.0  # a left-out relation's own score must not steer the others' weights
    np.testing.assert_allclose(condition_weights(bank, cfv_map, moved, relations, leave_out=True)["cfv_learned"], w["cfv_learned"])
    assert condition_weights(bank, cfv_map, scores, relations)["best_ffv"][range(3), own].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="not in the bank"):
        condition_weights(bank, cfv_map, scores, ["antonym", "synonym", "antonym"], leave_out=True)


@pytest.mark.slow
def test_shipped_bank_is_the_shipped_ffvs_and_solves_an_analogy(gemma_path):
    from fvpatch.bank import BANK_NAME
    from fvpatch.shipped import VECTORS_DIR
    from fvpatch.cli import main

    folder_path = VECTORS_DIR / "gemma-3-270m"
    shipped, folder = load_bank(folder_path / BANK_NAME), load_bank(folder_path)
    assert shipped.names == folder.names and len(shipped) >= 16
    np.testing.assert_array_equal(shipped.vectors, folder.vectors)  # a bank refit after the FFVs changed would differ
    CFVMap.from_bank(shipped)
    r = CliRunner().invoke(main, ["analogy", "hot:cold::tall:?", "--model", str(gemma_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["answer"] == "short" and out["weights"][0]["relation"] == "antonym"


def test_bank_meta_keeps_its_method_and_cannot_set_the_bank_keys(tmp_path):
    torch = pytest.importorskip("torch")
    vectors = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, 4.0]], dtype=torch.bfloat16)  # exact in bfloat16
    bank = Bank(["a", "b"], vectors, "l_out-1", {}, meta={"fvpatch.method": "averaged FVs", "fvpatch.cfv.note": "x"})
    assert bank.vectors.dtype == np.float32 and bank == bank and bank != Bank(["a", "b"], bank.vectors, "l_out-1", {})
    back = load_bank(save_bank(bank, tmp_path / "bank.safetensors"))
    assert back.meta == {"fvpatch.method": "averaged FVs", "fvpatch.cfv.note": "x"} and np.array_equal(back.vectors, bank.vectors)
    assert load_bank(save_bank(Bank(["a"], np.ones((1, 4)), "l_out-1", {}), tmp_path / "plain.safetensors")).meta == {
        "fvpatch.method": "bank of function vectors"}
    back.meta["fvpatch.bank.names"] = '["c", "d"]'  # would have been overwritten by the names, silently
    with pytest.raises(FvpatchError, match="Bank.meta may not set 'fvpatch.bank.names'"):
        save_bank(back, tmp_path / "again.safetensors")
    with pytest.raises(FvpatchError, match="bank vectors must be real numbers"):
        Bank(["a"], [["x", "y"]], "l_out-1", {})


def test_a_bank_relation_in_a_folder_whose_name_holds_a_hash(tmp_path, tiny_bank):
    from fvpatch.cli import load_vector

    folder = tmp_path / "d#1"
    folder.mkdir()
    path = save_bank(tiny_bank, folder / "bank.safetensors")
    vf = load_vector(f"{path}#{tiny_bank.names[1]}")
    np.testing.assert_array_equal(vf.rows[0], tiny_bank.vectors[1])


MINE = [("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("lion", "roar")]


def test_relations_of_ones_own_pairs_draw_analogies_from_their_recorded_pairs():
    """A relation that is no vendored task, or one named like a vendored task whose vector was trained on other pairs,
    gets its analogies from the pairs the bank records for it; a vendored task's own FFV keeps the task's splits."""
    from fvpatch.analogyfile import own_relations

    antonym_train = load_task("antonym").train[:20]
    trained_on = {"antonym": antonym_train, "animal-sound": MINE}
    assert own_relations(["antonym", "animal-sound"], trained_on) == {"animal-sound": MINE}
    assert own_relations(["antonym"], {"antonym": MINE}) == {"antonym": MINE}  # a pairs file called antonym.json
    own = own_relations(["antonym", "animal-sound"], trained_on)
    analogies = generate(["antonym", "animal-sound"], "train", 20, exclude=trained_on, own=own)
    mine = [x for x in analogies if x.relation == "animal-sound"]
    assert mine and all((x.a, x.b) in MINE and x.choices[x.answer] in MINE for x in mine)
    assert all((x.a, x.b) not in antonym_train for x in analogies if x.relation == "antonym")


def test_train_cfv_fits_a_bank_with_an_ffv_of_ones_own_pairs(tmp_path, tiny_session, tiny_gguf):
    from fvpatch.cli import main

    rng = np.random.default_rng(1)
    folder = tmp_path / "mine"
    for task, pairs in (("antonym", load_task("antonym").train[:20]), ("animal-sound", MINE)):
        meta = {"fvpatch.task": task, "fvpatch.pairs": json.dumps(pairs)}
        save(VectorFile("l_out-1", rng.standard_normal(tiny_session.n_embd), [-1], tiny_session.fingerprint(), "add", meta=meta),
             folder / f"{task}.ffv.safetensors")
    out = tmp_path / "mine.bank.safetensors"
    r = CliRunner().invoke(main, ["train", "cfv", "--bank", str(folder), "--model", str(tiny_gguf), "-o", str(out), "--n-train", "8", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "note: animal-sound is of your own pairs: its training analogies are drawn from the pairs its FFV was trained on" in r.stderr
    assert load_bank(out).names == ["animal-sound", "antonym"] and CFVMap.from_bank(load_bank(out)) is not None
    r = CliRunner().invoke(main, ["analogy", "dog:bark::cow:?", "--model", str(tiny_gguf), "--bank", str(out), "-n", "2"])
    assert r.exit_code == 0, r.output
