"""Fine-tuned function vectors (train.ffv) on the tiny model: exact cached loss, training, export, llama.cpp patching."""

import dataclasses
import json
import random
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fvpatch import vectorfile
from fvpatch.cli import main
from fvpatch.models import check_fingerprint
from fvpatch.prompts import build, sample_demos, template
from fvpatch.session import Patch
from fvpatch.tasks import load_task
from train.ffv import (ICL_SETS, INITS, MEASURED_LAYERS, Config, Data, answer_nll, default_layer, encode, icl_targets, initial_vector, last_residual,
                       prepare, train_ffv)
from train.hooks import patch_residual

QA = template("qa")
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe", "hg", "ji",
         "lk", "nm", "po", "rq", "ts", "vu", "xw", "zy", "ac", "bd", "ce", "df", "eg", "fh", "gi", "hj", "ik", "jl"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ffv") / "upper.json"
    path.write_text(json.dumps([{"input": w, "output": w.upper()} for w in WORDS]))
    return path


@pytest.fixture(scope="module")
def data(tiny_lm, pairs_file):
    return prepare(tiny_lm, load_task(pairs_file), QA, n_train=20)


def reference_nll(lm, pairs, vector, layer, every_answer_token):
    """The plain definition: one full forward per pair, the vector added at the prompt's last token (and the answer's)."""
    out = []
    for x, y in pairs:
        p = build(QA, [], x, y)
        n, full = len(lm.tokenize(p.text)), lm.tokenize(p.text + p.answer)
        with ExitStack() as stack:
            for j in range(len(full) - n if every_answer_token else 1):
                stack.enter_context(patch_residual(lm.model, layer, n - 1 + j, vector))
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        out.append(-torch.stack([logp[n - 1 + j, full[n + j]] for j in range(len(full) - n)]).mean())
    return torch.stack(out)


@pytest.mark.parametrize("every_answer_token", [False, True])
def test_cached_prefix_loss_equals_full_forward(tiny_lm, data, every_answer_token):
    pairs = data.task.train[:6] + [("a", "B"), ("abcdefg", "XYZXYZW")]  # answers of 1..7 tokens, prompts of several lengths
    v = torch.randn(tiny_lm.n_embd, generator=torch.Generator().manual_seed(0))
    got = answer_nll(tiny_lm, encode(tiny_lm, QA, pairs), v, 1, every_answer_token)
    torch.testing.assert_close(got, reference_nll(tiny_lm, pairs, v, 1, every_answer_token), rtol=1e-4, atol=1e-4)


def test_training_lowers_the_loss_and_llamacpp_applies_the_vector(tiny_lm, tiny_session, data, tmp_path):
    # random weights cannot generalize to held-out pairs, so here the train pairs stand in for the valid ones
    memorize = Data(data.task, data.train, data.train)
    vf, hist = train_ffv(tiny_lm, memorize, QA, Config(layer=1, init="zeros", lr=0.5, steps=12, eval_every=3), progress=False)
    assert hist.train_loss[-1] < 0.9 * hist.train_loss[0]
    assert hist.best_step == 12 and hist.valid_loss[-1] < 0.9 * hist.valid_loss[0]
    assert float(vf.meta["fvpatch.train_loss"]) < hist.train_loss[0]
    assert json.loads(vf.meta["fvpatch.pairs"]) == [list(p) for p in data.task.train]
    assert data.task.test == []  # prepare() keeps no test pairs: none can reach training or early stopping

    path = vectorfile.save(vf, tmp_path / "upper.ffv.safetensors")
    loaded = vectorfile.load(path)
    assert (loaded.tensor, loaded.positions, loaded.mode) == ("l_out-1", [-1], "add")
    assert loaded.meta["fvpatch.init"] == "zeros" and loaded.meta["fvpatch.template"] == QA.text
    check_fingerprint(loaded.model, tiny_session.fingerprint())

    # llama.cpp with the vector patched in predicts what PyTorch does, and differs from the unpatched run
    prompt = QA.query(data.task.valid[0][0])
    tokens = tiny_session.tokenize(prompt)
    patched = tiny_session.run(tokens, patches=[Patch(loaded.tensor, loaded.row(None), -1, "add")]).logits
    plain = tiny_session.run(tokens).logits
    with torch.no_grad(), patch_residual(tiny_lm.model, 1, len(tokens) - 1, torch.from_numpy(loaded.row(None))):
        ref = tiny_lm.model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
    np.testing.assert_allclose(patched, ref, atol=1e-3 * np.abs(ref).max())
    assert np.abs(patched - plain).max() > 1e-2


def test_every_token_loss_equals_full_forward_and_trains(tiny_lm, data, tiny_session):
    """--positions all: the vector added at every prompt and answer token, as a control vector is applied."""
    pairs = data.task.train[:6] + [("a", "B"), ("abcdefg", "XYZXYZW")]
    v = torch.randn(tiny_lm.n_embd, generator=torch.Generator().manual_seed(1))
    got = answer_nll(tiny_lm, encode(tiny_lm, QA, pairs, cache_prefix=False), v, 1, all_tokens=True)
    ref = []
    for x, y in pairs:
        p = build(QA, [], x, y)
        n, full = len(tiny_lm.tokenize(p.text)), tiny_lm.tokenize(p.text + p.answer)
        with patch_residual(tiny_lm.model, 1, None, v):
            logp = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        ref.append(-torch.stack([logp[n - 1 + j, full[n + j]] for j in range(len(full) - n)]).mean())
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-4, atol=1e-4)

    every = prepare(tiny_lm, data.task, QA, n_train=20, positions="all")
    vf, hist = train_ffv(tiny_lm, Data(every.task, every.train, every.train), QA,
                         Config(layer=1, init="zeros", lr=0.5, steps=6, eval_every=3, positions="all"), progress=False)
    assert vf.meta["fvpatch.apply_at"] == "all" and hist.valid_loss[-1] < hist.valid_loss[0]
    with pytest.raises(ValueError, match="positions 'all' needs data"):
        train_ffv(tiny_lm, data, QA, Config(layer=1, init="zeros", steps=1, positions="all"), progress=False)


def test_icl_targets_are_what_icl_predicts_at_each_answer_token(tiny_lm, data):
    pairs = data.task.train[:5] + [("abcdefg", "XYZXYZW")]  # answers of several tokens
    ex = encode(tiny_lm, QA, pairs)
    soft = icl_targets(tiny_lm, QA, ex, k=3)
    rows, _, tokens = ex.targets()
    assert soft.shape == (len(tokens), tiny_lm.model.config.vocab_size) and torch.allclose(soft.sum(-1), torch.ones(len(tokens)), atol=1e-4)
    # the plain definition for the last pair: one full forward per demo set, teacher-forced on the gold answer
    x, y = pairs[-1]
    rng, probs = random.Random(f"0:{len(pairs) - 1}"), []
    for _ in range(ICL_SETS):
        p = build(QA, sample_demos(pairs, 3, x, rng), x, y)
        n, full = len(tiny_lm.tokenize(p.text)), tiny_lm.tokenize(p.text + p.answer)
        with torch.no_grad():
            probs.append(tiny_lm.model(input_ids=torch.tensor([full])).logits[0, n - 1 : len(full) - 1].float().softmax(-1))
    torch.testing.assert_close(soft[rows == len(pairs) - 1], torch.stack(probs).mean(0), rtol=1e-4, atol=1e-5)

    vf, hist = train_ffv(tiny_lm, Data(data.task, data.train, data.train), QA, Config(layer=1, init="zeros", lr=0.5, steps=6, eval_every=3, targets="icl"),
                         progress=False)
    assert json.loads(vf.meta["fvpatch.config"])["targets"] == "icl" and hist.train_loss[-1] < hist.train_loss[0]
    with pytest.raises(ValueError, match="targets must be one of"):
        train_ffv(tiny_lm, data, QA, Config(layer=1, init="zeros", steps=1, targets="gold"), progress=False)


def test_cli_refuses_icl_targets_for_every_token(tiny_gguf, pairs_file, tmp_path):
    out = tmp_path / "v.safetensors"
    r = CliRunner().invoke(main, ["train", "ffv", "--pairs", str(pairs_file), "--model", str(tiny_gguf), "--targets", "icl", "--positions", "all", "--out", str(out)])
    assert r.exit_code != 0 and "--targets icl trains a vector for the last prompt token only" in r.output and not out.exists()


@pytest.mark.parametrize("init", INITS)
def test_inits(tiny_lm, data, init):
    residual = last_residual(tiny_lm, data.train, 2)
    v0 = initial_vector(tiny_lm, data.task, QA, Config(layer=2, init=init), data.train)
    assert v0.shape == (tiny_lm.n_embd,) and torch.isfinite(v0).all()
    if init == "random":  # as long as a typical residual at that layer
        assert 0.7 < float(v0.norm() / residual.norm(dim=-1).mean()) < 1.4
    assert (float(v0.norm()) == 0) == (init == "zeros")


def test_cli_trains_lists_and_patches(tiny_gguf, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))
    out = tmp_path / "vectors" / "upper.ffv.safetensors"
    runner = CliRunner()
    r = runner.invoke(main, ["train", "ffv", "--pairs", str(pairs_file), "--model", str(tiny_gguf), "--layer", "1",
                             "--init", "zeros", "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "l_out-1" in r.output and out.is_file()
    r = runner.invoke(main, ["train", "ffv", "--pairs", str(pairs_file), "--model", str(tiny_gguf), "--out", str(out)])
    assert r.exit_code != 0 and "exists" in r.output

    import fvpatch.shipped

    monkeypatch.setattr(fvpatch.shipped, "VECTORS_DIR", tmp_path / "vectors")
    r = runner.invoke(main, ["vectors", "list", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["vectors"]
    assert (row["name"], row["tensor"], row["mode"], row["task"]) == ("upper.ffv", "l_out-1", "add", "upper")
    r = runner.invoke(main, ["patch", "-p", "Q: ab\nA:", "--vector", "upper.ffv", "--model", str(tiny_gguf), "-n", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["patches"][0] == {"tensor": "l_out-1", "token": -1, "mode": "add", "scale": 1.0}


def test_cli_scores_a_held_out_file_against_the_training_pairs(tiny_gguf, pairs_file, tmp_path, monkeypatch):
    """`eval task --test-pairs`: every pair of a held-out file is a test item, in its order, with demonstrations from the
    train split of the pairs the vector was trained on; one that the training file also holds is left out, and said so."""
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))
    vector = tmp_path / "upper.ffv.safetensors"
    run = CliRunner().invoke
    r = run(main, ["train", "ffv", "--pairs", str(pairs_file), "--model", str(tiny_gguf), "--layer", "1", "--init", "zeros", "--steps", "2", "--out", str(vector)])
    assert r.exit_code == 0, r.output
    held = ["kb", "md", "pf", "rh", "tj", "vl", "xn"]  # not in WORDS; `ab` is, and `ab` -> `AB` duplicated is one pair
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps([{"input": w, "output": w.upper()} for w in [*held[:3], "ab", *held[3:], held[0]]]))
    result = tmp_path / "heldout-results.json"
    r = run(main, ["eval", "task", "--task", str(pairs_file), "--test-pairs", str(heldout), "--vector", str(vector), "--model", str(tiny_gguf),
                   "--k", "3", "--engine", "both", "-o", str(result)])
    assert r.exit_code == 0, r.output
    notes = lambda r: [line for line in r.stderr.splitlines() if line.startswith("note: ")]  # besides progress bars
    assert notes(r) == [f"note: 1 of the 8 distinct pairs of {heldout} has an input that {pairs_file} also holds ('ab'); "
                                             f"it is left out, not scored as a test item"]
    train = load_task(pairs_file).train
    assert r.stdout.startswith(f"{heldout}: 7 held-out items, demonstrations from the {len(train)} train pairs of {pairs_file}, ")
    out = json.loads(result.read_text())
    assert out["items"] == [{"input": w, "output": w.upper()} for w in held]  # the file's order, what each `correct` list follows
    assert out["left_out"] == [{"input": "ab", "output": "AB"}] and out["test_pairs"] == str(heldout) and out["split"] is None  # no split of --task scored
    for engine in ("llama.cpp", "torch"):
        assert out["results"][engine]["n"] == 7 and all(len(c) == 7 for c in out["results"][engine]["correct"].values())
    assert out["results"]["llama.cpp"]["correct"] == out["results"]["torch"]["correct"]

    # --n takes the first of the file; without --test-pairs the training file's own test split is scored, and said so
    r = run(main, ["eval", "task", "--task", str(pairs_file), "--test-pairs", str(heldout), "--model", str(tiny_gguf), "--k", "3", "--n", "2",
                   "-o", str(result), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads(result.read_text())["items"] == [{"input": w, "output": w.upper()} for w in held[:2]]
    r = run(main, ["eval", "task", "--task", str(pairs_file), "--model", str(tiny_gguf), "--k", "3", "-o", str(result), "--force"])
    assert r.exit_code == 0, r.output
    test = load_task(pairs_file).test
    assert json.loads(result.read_text())["items"] == [{"input": x, "output": y} for x, y in test]
    assert notes(r) == [f"note: {pairs_file} holds 36 distinct pairs split 60/10/30 into train/valid/test: 21 train, 4 valid, 11 test; its test "
                                             f"split is scored (-o lists the items; --test-pairs FILE scores every pair of a held-out file)"]


def test_cli_pairs_help_says_how_the_file_is_split():
    r = CliRunner().invoke(main, ["train", "ffv", "--help"])
    help_text = " ".join(r.output.split())
    assert "The file is split 60/10/30 into train/valid/test by a hash of each input" in help_text
    assert "the default 20 needs 33 or more distinct pairs" in help_text


def test_cli_defaults_are_the_measured_ones():
    from train.cli import ffv

    from train.ffv import ALL_TOKENS

    defaults = {p.name: p.default for p in ffv.params}
    cfg = Config()
    assert {k: defaults[k] for k in ("steps", "l2", "l2_from_init", "seed", "targets")} == {k: getattr(cfg, k) for k in ("steps", "l2", "l2_from_init", "seed", "targets")}
    assert defaults["layer"] is None and MEASURED_LAYERS["Gemma 3 270m"] == cfg.layer  # the layer is chosen per model
    # init and lr follow --positions: Config's for the last token, ALL_TOKENS' for every token
    assert defaults["init"] is None and defaults["lr"] is None and defaults["positions"] == cfg.positions == "last"
    assert (ALL_TOKENS.init, ALL_TOKENS.lr, ALL_TOKENS.positions) == ("zeros", 0.02, "all")


def test_default_layer_is_per_model(tiny_lm):
    assert default_layer(tiny_lm) == (1, False)  # not swept: Gemma's 4 of 18 layers at the same depth of 4
    assert default_layer(dataclasses.replace(tiny_lm, fingerprint={**tiny_lm.fingerprint, "name": "Gemma 3 270m"})) == (4, True)


def test_sweep_writes_each_model_and_dtype_to_its_own_file(tiny_gguf):
    from train.sweep_ffv import OUT, RESULTS, default_out

    assert default_out(None, "float32") == OUT  # the default model's results/ffv/sweep.json
    assert default_out(str(tiny_gguf), "float32") == RESULTS / tiny_gguf.stem / "ffv_sweep.json"
    assert default_out(str(tiny_gguf), "bfloat16") == RESULTS / tiny_gguf.stem / "ffv_sweep-bfloat16.json"


def test_cli_dtype_and_device_choices_are_the_loaders():
    from train.cli import cfv, ffv, fv
    from train.cli_eval import sweep, task
    from train.model import DEVICES, DTYPES

    for command in (ffv, cfv, fv, task, sweep):
        params = {p.name: p for p in command.params}
        assert list(params["dtype"].type.choices) == list(DTYPES) and params["dtype"].default == "float32"
        assert list(params["device"].type.choices) == list(DEVICES) and params["device"].default == "auto"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lower_precision_model_trains_a_float32_vector(tiny_lm, tiny_gguf, pairs_file, data, tmp_path, monkeypatch, dtype):
    from train.model import load_model

    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    lm = load_model(tiny_gguf, "cpu", dtype)
    assert lm.dtype == getattr(torch, dtype) and next(lm.model.parameters()).dtype == lm.dtype
    low = prepare(lm, load_task(pairs_file), QA, n_train=20)
    v = torch.randn(lm.n_embd, generator=torch.Generator().manual_seed(0))
    # the same per-pair losses as the float32 model, to the precision of the dtype, and float32 themselves
    got = answer_nll(lm, low.train, v, 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, answer_nll(tiny_lm, data.train, v, 1), rtol=0.05, atol=0.05)

    vf, hist = train_ffv(lm, Data(low.task, low.train, low.train), QA, Config(layer=1, init="zeros", lr=0.5, steps=6, eval_every=3), progress=False)
    assert vf.rows.dtype == np.float32 and hist.train_loss[-1] < 0.9 * hist.train_loss[0]


def test_cli_trains_in_bfloat16_and_refuses_a_missing_device(tiny_gguf, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))
    out = tmp_path / "upper.ffv.safetensors"
    args = ["train", "ffv", "--pairs", str(pairs_file), "--model", str(tiny_gguf), "--init", "zeros", "--steps", "2", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--dtype", "bfloat16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "no FFV layer has been chosen on this model's valid pairs; using layer 1" in r.stderr  # no --layer, no sweep
    vf = vectorfile.load(out)
    assert vf.rows.dtype == np.float32 and json.loads(vf.meta["fvpatch.config"])["layer"] == 1
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*args, "--force", "--device", "cuda"])
        assert r.exit_code != 0 and "sees no CUDA GPU" in r.output and len(r.output.strip().splitlines()) == 1
