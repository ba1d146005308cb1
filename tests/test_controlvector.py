"""Control-vector GGUF: fvpatch's export is what llama.cpp's own loader applies, and import gives it back."""

import gguf
import numpy as np
import pytest

from fvpatch import controlvector, vectorfile
from fvpatch.errors import FvpatchError
from fvpatch.session import Patch
from tests.tiny_model import N_EMBD

PROMPT = "The quick brown fox jumps over"


def _vector(session, layer, seed=0, mode="add", rows=1, tensor="l_out"):
    v = np.random.default_rng(seed).normal(0, 0.5, (rows, session.n_embd)).astype(np.float32)
    return vectorfile.VectorFile(f"{tensor}-{layer}", v, list(range(rows)) if rows > 1 else [-1], session.fingerprint(), mode=mode)


@pytest.mark.parametrize("layers", [[1], [2, 3], [1, 1]])
def test_llama_cpp_loader_matches_fvpatch_patch(tiny_session, tmp_path, layers):
    s = tiny_session
    vfs = [_vector(s, layer, seed=i) for i, layer in enumerate(layers)]
    scales = [1.5, -0.5][: len(vfs)]
    cv = controlvector.from_vectors([(vf, sc, f"v{i}") for i, (vf, sc) in enumerate(zip(vfs, scales))])
    path = controlvector.save(cv, tmp_path / "cv.gguf")

    patched = s.run(PROMPT, patches=[Patch(vf.tensor, vf.rows[0], mode="add", scale=sc, all_tokens=True) for vf, sc in zip(vfs, scales)],
                    max_tokens=6, all_logits=True)
    s.set_control_vector(controlvector.load(path).dense(s.n_layer))
    try:
        native = s.run(PROMPT, max_tokens=6, all_logits=True)
    finally:
        s.set_control_vector(None)
    plain = s.run(PROMPT, all_logits=True)
    assert np.abs(native.prompt_logits - plain.prompt_logits).max() > 1e-2  # the vector does something
    np.testing.assert_allclose(native.prompt_logits, patched.prompt_logits, atol=1e-4)
    assert native.generated == patched.generated


def test_last_block_applies_where_llama_cpp_does(tiny_session, tmp_path):
    s = tiny_session
    vf = _vector(s, s.n_layer - 1, seed=3)
    cv = controlvector.from_vectors([(vf, 1.0, "v")])
    patched = s.sequence_logits([(s.tokenize(PROMPT), s.tokenize(" the lazy", add_bos=False), [Patch(vf.tensor, vf.rows[0], mode="add", all_tokens=True)])])[0]
    s.set_control_vector(cv.dense(s.n_layer))
    try:
        native = s.sequence_logits([(s.tokenize(PROMPT), s.tokenize(" the lazy", add_bos=False), [])])[0]
    finally:
        s.set_control_vector(None)
    np.testing.assert_allclose(native, patched, atol=1e-4)


def test_round_trip_keeps_file_contents(tiny_session, tmp_path):
    vf = _vector(tiny_session, 2)
    first = controlvector.save(controlvector.from_vectors([(vf, 2.0, "v")]), tmp_path / "a.gguf")
    (n, back), = controlvector.to_vector_files(controlvector.load(first), str(first)).items()
    assert n == 2 and back.tensor == "l_out-2" and back.mode == "add" and back.meta["fvpatch.apply_at"] == "all"
    assert back.model == tiny_session.fingerprint()
    np.testing.assert_array_equal(back.rows[0], vf.rows[0] * 2)
    again = controlvector.save(controlvector.from_vectors([(back, 1.0, "b")]), tmp_path / "b.gguf")
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(again))
    assert [(t.name, t.data.tobytes()) for t in a.tensors] == [(t.name, t.data.tobytes()) for t in b.tensors]
    for key in ("general.architecture", "controlvector.model_hint", "controlvector.layer_count"):
        assert a.fields[key].parts[-1].tobytes() == b.fields[key].parts[-1].tobytes()


def _foreign(path, directions, layer_count_type, hint="llama", dtype=np.float32):
    """A control vector laid out as another writer lays it out, written with the gguf package."""
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", hint)
    (w.add_uint32 if layer_count_type == "uint32" else w.add_int32)("controlvector.layer_count", len(directions))
    for n, v in directions.items():
        w.add_tensor(f"direction.{n}", v.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind,writer", [("uint32", "repeng"), ("int32", "llama.cpp cvector-generator")])
def test_import_foreign_files(tmp_path, kind, writer):
    dirs = {n: np.full(8, n, np.float32) for n in (3, 2, 1)}  # repeng writes the deepest block first
    cv = controlvector.load(_foreign(tmp_path / "f.gguf", dirs, kind))
    assert cv.writer == writer and cv.model_hint == "llama" and sorted(cv.directions) == [1, 2, 3]
    files = controlvector.to_vector_files(cv, "f.gguf")
    assert {n: f.tensor for n, f in files.items()} == {1: "l_out-1", 2: "l_out-2", 3: "l_out-3"}
    assert files[2].meta["fvpatch.controlvector.writer"] == writer
    np.testing.assert_array_equal(files[3].rows[0], dirs[3])


@pytest.mark.parametrize("make,error", [
    (lambda s: _vector(s, 0), "block 0"),
    (lambda s: _vector(s, 2, tensor="kqv_out"), "l_out-N"),
    (lambda s: _vector(s, 2, mode="replace"), "replaces"),
    (lambda s: _vector(s, 2, rows=3), "3 rows"),
])
def test_what_cannot_be_a_control_vector(tiny_session, make, error):
    with pytest.raises(FvpatchError, match=error):
        controlvector.from_vectors([(make(tiny_session), 1.0, "v")])


def test_bad_control_vector_files(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(FvpatchError, match="not a readable GGUF"):
        controlvector.load(not_gguf)
    with pytest.raises(FvpatchError, match="block 0"):
        controlvector.load(_foreign(tmp_path / "zero.gguf", {0: np.ones(8)}, "int32"))
    with pytest.raises(FvpatchError, match="NaN"):
        controlvector.load(_foreign(tmp_path / "nan.gguf", {1: np.full(8, np.nan)}, "int32"))
    with pytest.raises(FvpatchError, match=r"must be a 1-D F32 tensor, got F16 of shape \[8\]$"):
        controlvector.load(_foreign(tmp_path / "f16.gguf", {1: np.ones(8)}, "int32", dtype=np.float16))


def _import(*args):
    from click.testing import CliRunner

    from fvpatch.cli import main

    return CliRunner().invoke(main, ["import", *map(str, args)])


def test_import_of_another_architecture_needs_its_model(tmp_path, gemma_path):
    """A file that says it is for a llama model is not stamped for the default Gemma unless the user says so."""
    source = _foreign(tmp_path / "llama.gguf", {3: np.ones(640)}, "uint32", hint="llama")
    r = _import(source, tmp_path / "v.safetensors")
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"Error: {source} says it is for a 'llama' model, not the default {gemma_path.name} (gemma3); "
        f"give its model with --model, or pass --force to stamp it for {gemma_path.name} anyway"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.gguf"]
    for out, extra in (("forced", ["--force"]), ("named", ["--model", gemma_path])):
        r = _import(source, tmp_path / f"{out}.safetensors", *extra)
        assert r.exit_code == 0 and "says it is for a 'llama' model; stamped for" in r.stderr, r.output


def test_import_to_a_folder_of_one_direction(tmp_path, tiny_gguf):
    """OUT ending in / is a folder even when one direction is imported."""
    source = _foreign(tmp_path / "f.gguf", {1: np.ones(N_EMBD), 2: np.ones(N_EMBD)}, "int32")
    r = _import(source, f"{tmp_path / 'new'}/", "--layer", "2", "--model", tiny_gguf)
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["l_out-2.safetensors"]


def test_exportable_says_what_export_takes(tiny_session):
    from fvpatch.bank import NAMES_KEY

    assert controlvector.exportable(_vector(tiny_session, 2))
    assert not controlvector.exportable(_vector(tiny_session, 2, mode="replace"))
    bank_row = _vector(tiny_session, 2)
    bank_row.meta[NAMES_KEY] = '["antonym"]'  # a bank exports one relation at a time, as BANK#RELATION
    assert not controlvector.exportable(bank_row)


@pytest.mark.parametrize("directions, error", [
    ({"1": np.ones(8)}, r"keyed by block number \(an integer >= 1\), got '1'"),
    ({True: np.ones(8)}, "keyed by block number"),
    ({1.0: np.ones(8)}, "keyed by block number"),
    ({0: np.ones(8)}, "block 0"),
    ({1: np.ones((2, 8))}, r"direction.1 must be a non-empty 1-D vector .* got shape \(2, 8\)"),
    ({1: np.ones(0)}, "direction.1 must be a non-empty 1-D vector"),
    ({1: np.ones(8), 2: np.ones(4)}, r"share one width, got \[4, 8\]"),
    ({1: ["a"] * 8}, "direction.1 must be real numbers"),
    ({}, "at least one direction"),
    ([np.ones(8)], "at least one direction"),
])
def test_control_vectors_made_in_code_are_checked(directions, error):
    with pytest.raises(FvpatchError, match=error) as err:
        controlvector.ControlVector(directions, "llama")
    assert "\n" not in str(err.value)


def test_control_vector_directions_become_float32_vectors(tmp_path):
    torch = pytest.importorskip("torch")
    cv = controlvector.ControlVector({np.int64(2): torch.full((8,), 0.5, dtype=torch.bfloat16), 1: [1] * 8}, "llama")
    assert sorted(cv.directions) == [1, 2] and all(type(n) is int and v.dtype == np.float32 for n, v in cv.directions.items())
    assert cv.n_embd == 8 and cv == cv and cv != controlvector.ControlVector(dict(cv.directions), "llama")
    back = controlvector.load(controlvector.save(cv, tmp_path / "cv.gguf"))
    np.testing.assert_array_equal(back.directions[2], np.full(8, 0.5, np.float32))


def test_patch_takes_an_imported_folder_as_the_whole_control_vector(tiny_session, tiny_gguf, tmp_path):
    """`import` writes one file per layer of a multi-layer control vector (repeng, llama-cvector-generator); `patch
    --vector FOLDER` applies them all, at every token, as llama.cpp applies the GGUF, and --scale scales them all."""
    import json

    from click.testing import CliRunner

    from fvpatch.cli import main

    s = tiny_session
    vfs = [_vector(s, layer, seed=layer) for layer in (1, 2, 3)]
    cv_path = controlvector.save(controlvector.from_vectors([(vf, 1.0, f"v{i}") for i, vf in enumerate(vfs)]), tmp_path / "cv.gguf")
    assert _import(cv_path, tmp_path / "cv", "--model", tiny_gguf).exit_code == 0
    r = CliRunner().invoke(main, ["patch", "-m", str(tiny_gguf), "-p", PROMPT, "--vector", str(tmp_path / "cv"), "--scale", "0.5", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["patches"] == [{"tensor": f"l_out-{n}", "token": "all", "mode": "add", "scale": 0.5} for n in (1, 2, 3)]
    s.set_control_vector(0.5 * controlvector.load(cv_path).dense(s.n_layer))
    try:
        assert out["completion"] == s.run(PROMPT, max_tokens=4).text
    finally:
        s.set_control_vector(None)
    assert out["completion"] != s.run(PROMPT, max_tokens=4).text  # the vector does something
