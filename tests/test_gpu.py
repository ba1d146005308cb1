"""The training side on a CUDA GPU: every training command with `--device cuda`, against the same command on the CPU.

Skipped where torch sees no CUDA GPU (CI, laptops); `bench/gpu.sh` runs it on a GPU machine, together with
the architecture matrix on CUDA (FVPATCH_TEST_DEVICE=cuda). On float32 the GPU must give the CPU's vectors
(PyTorch keeps TF32 off for float32 matmuls by default, so only summation order differs); bfloat16 on the
GPU must train a finite float32 vector that llama.cpp applies. Each vector file is then patched in
llama.cpp on the CPU, as a user who trains on a GPU box and runs on a laptop would.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fvpatch import vectorfile
from fvpatch.cfvmap import CFVMap
from fvpatch.bank import Bank, load_bank, save_bank
from fvpatch.cli import main
from fvpatch.session import Patch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "ba", "dc", "fe", "hg", "ji",
         "lk", "nm", "po", "rq", "ts", "vu", "xw", "zy", "ac", "bd", "ce", "df"]


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")  # the tiny model's torch copy stays out of models/

    def invoke(*args):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FVPATCH_MODELS", str(models))
            r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r

    return invoke


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "upper.json"
    path.write_text(json.dumps([{"input": w, "output": w.upper()} for w in WORDS]))
    return path


def on_both(run, tmp_path, command: list, dtype="float32") -> dict:
    """The vector files `command` writes with --device cpu and --device cuda."""
    out = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}-{dtype}.safetensors"
        run(*command, "--device", device, "--dtype", dtype, "--out", path)
        out[device] = vectorfile.load(path)
    return out


def test_ffv_trains_on_cuda_as_on_the_cpu_and_llama_cpp_applies_it(run, tiny_gguf, tiny_session, pairs_file, tmp_path):
    command = ["train", "ffv", "--pairs", pairs_file, "--model", tiny_gguf, "--n-train", "12", "--layer", "1", "--init", "taskvec", "--steps", "10"]
    vf = on_both(run, tmp_path, command)
    assert cosine(vf["cpu"].rows, vf["cuda"].rows) > 0.999
    assert vf["cuda"].meta["fvpatch.steps"] == vf["cpu"].meta["fvpatch.steps"]
    tokens = tiny_session.tokenize("Q: ab\nA:")
    logits = {d: tiny_session.run(tokens, patches=[Patch(v.tensor, v.row(None), -1, "add")]).logits for d, v in vf.items()}
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], atol=1e-2 * np.abs(logits["cpu"]).max())

    bf16 = on_both(run, tmp_path, command, "bfloat16")
    for v in bf16.values():
        assert v.rows.dtype == np.float32 and np.isfinite(v.rows).all() and v.meta["fvpatch.train_dtype"] == "bfloat16"
    assert cosine(bf16["cpu"].rows, bf16["cuda"].rows) > 0.95  # bfloat16 rounds differently on each device


def test_every_token_ffv_on_cuda(run, tiny_gguf, pairs_file, tmp_path):
    vf = on_both(run, tmp_path, ["train", "ffv", "--pairs", pairs_file, "--model", tiny_gguf, "--n-train", "12", "--layer", "2", "--positions", "all", "--steps", "6"])
    assert cosine(vf["cpu"].rows, vf["cuda"].rows) > 0.999 and vf["cuda"].meta["fvpatch.apply_at"] == "all"


@pytest.mark.parametrize("method", ["cma", "taskvec"])
def test_function_and_task_vectors_on_cuda(run, tiny_gguf, tmp_path, method):
    pairs = tmp_path / "next-letter.jsonl"
    pairs.write_text("".join(json.dumps({"input": a + b, "output": chr(ord(b) + 1)}) + "\n" for a in "abcde" for b in "pqrstuvw"))
    extra = ["--heads", "2", "--heatmap", tmp_path / "heads.png"] if method == "cma" else []
    vf = on_both(run, tmp_path, ["train", "fv", "--task", pairs, "--model", tiny_gguf, "--k", "3", "--method", method, "--layer", "1",
                                 "--n-prompts", "4", "--force", *extra])
    assert cosine(vf["cpu"].rows, vf["cuda"].rows) > 0.9999
    if method == "cma":
        assert vf["cpu"].meta["fvpatch.heads"] == vf["cuda"].meta["fvpatch.heads"] and (tmp_path / "heads.png").stat().st_size > 0

    # the torch engine's evaluation on the GPU scores as on the CPU
    scored = {}
    for device in ("cpu", "cuda"):
        result = tmp_path / f"eval-{device}.json"
        run("eval", "task", "--task", pairs, "--model", tiny_gguf, "--k", "3", "--vector", tmp_path / "cuda-float32.safetensors",
            "--engine", "torch", "--device", device, "--n", "8", "-o", result, "--force")
        scored[device] = json.loads(result.read_text())["results"]["torch"]["correct"]
    assert scored["cuda"] == scored["cpu"]


@pytest.mark.parametrize("objective", ["relation", "answer"])
def test_cfv_map_fits_on_cuda_as_on_the_cpu(run, tiny_gguf, tiny_session, tmp_path, objective):
    names = ["antonym", "capitalize", "country-capital", "present-past"]
    vectors = np.random.default_rng(0).standard_normal((len(names), tiny_session.n_embd)).astype(np.float32) * 2
    bank = save_bank(Bank(names, vectors, "l_out-1", tiny_session.fingerprint()), tmp_path / "bank.safetensors")
    maps = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.bank.safetensors"
        run("train", "cfv", "--bank", bank, "--model", tiny_gguf, "--n-train", "16", "--steps", "20", "--objective", objective,
            "--device", device, "--out", out)
        maps[device] = CFVMap.from_bank(load_bank(out))
    np.testing.assert_allclose(maps["cuda"].weight, maps["cpu"].weight, atol=1e-3)
    np.testing.assert_allclose(maps["cuda"].bias, maps["cpu"].bias, atol=1e-3)
    assert maps["cuda"].temperature == maps["cpu"].temperature
