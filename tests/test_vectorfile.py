"""Vector files: what is read (F32, F16, BF16, all finite, every meaningful key typed) and what is refused,
through `fvpatch.vectorfile.load` and through the CLI (`fvpatch inspect`, `fvpatch patch` on the tiny model)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file

from fvpatch.bank import Bank, load_bank, save_bank
from fvpatch.cli import main
from fvpatch.shipped import VECTORS_DIR
from fvpatch.vectorfile import VectorFile, VectorFileError, load, save

PROMPT = "ab cd"
FROM_TOKEN = "2"  # the saved row that `patch` applies


# ---- raw safetensors bytes, built and read without fvpatch (the fuzz test uses these too) ----------------


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | str | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    text = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return len(text).to_bytes(8, "little") + text + data


def encode(rows: np.ndarray, dtype: str) -> bytes:
    """Rows as the dtype stores them (BF16: the high half of each float32, which must be exact)."""
    if dtype == "BF16":
        bits = np.asarray(rows, np.float32).view(np.uint32)
        assert not (bits & 0xFFFF).any(), "rows must be exact in bfloat16"
        return (bits >> 16).astype("<u2").tobytes()
    return np.asarray(rows).astype({"F32": "<f4", "F16": "<f2", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U8": "u1"}[dtype]).tobytes()


def decode(data: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(data, {"F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float32).reshape(shape)


def as_dtype(raw: bytes, dtype: str) -> bytes:
    """The same vector file stored in another dtype: rows rounded to it first, so the conversion is exact."""
    header, data = split(raw)
    (name,) = [k for k in header if k != "__metadata__"]
    rows = decode(data, header[name]["dtype"], header[name]["shape"])
    if dtype == "BF16":
        rows = (rows.view(np.uint32) & 0xFFFF0000).view(np.float32)
    data = encode(rows, dtype)
    header[name].update(dtype=dtype, data_offsets=[0, len(data)])
    return join(header, data)


def save_with_cli(model: Path, path: Path) -> bytes:
    r = CliRunner().invoke(main, ["save", "--model", str(model), "-p", PROMPT, "--save", "l_out-1", str(path), "-n", "1"])
    assert r.exit_code == 0, r.output
    return path.read_bytes()


def strict_json(text: str):
    def refuse(c):
        raise ValueError(f"{c} is not JSON")

    return json.loads(text, parse_constant=refuse)


def inspect(path: Path):
    return CliRunner().invoke(main, ["inspect", str(path), "--json"])


def patch(path: Path, model: Path, *extra: str):
    return CliRunner().invoke(main, ["patch", "--model", str(model), "-p", PROMPT, "--vector", str(path),
                                     "--from-token-idx", FROM_TOKEN, "-n", "1", "--json", *extra])


def refused_in_one_line(r) -> str | None:
    """None when the command refused cleanly: non-zero exit, one line of error on stderr (besides `patch`'s
    note on a vector made on another quantization or file), no traceback, nothing on stdout."""
    if r.exit_code == 0:
        return "exit 0"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return f"uncaught {type(r.exception).__name__}: {r.exception}"
    lines = [line for line in r.stderr.strip().splitlines() if ": note: vector made on " not in line]
    if len(lines) != 1 or "Traceback" in r.output or r.stdout:
        return f"stderr {r.stderr!r}, stdout {r.stdout[:200]!r}"
    return None


# ---- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_gguf, tmp_path_factory) -> bytes:
    """A vector file as `fvpatch save` writes it on the tiny model: l_out-1, 5 rows (tokens 0..4) x 64, F32."""
    return save_with_cli(tiny_gguf, tmp_path_factory.mktemp("saved") / "v.safetensors")


# ---- what loads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(VECTORS_DIR.glob("*/*.safetensors")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_vectors_load_exactly_as_before(path):
    """Every shipped file reads as the reader before this one read it (safetensors' own loader, metadata as is)."""
    vf, rows = load(path), load_file(path)
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
    assert list(rows) == [vf.tensor] == [meta["fvpatch.tensor"]] and vf.dtype == "F32"
    assert vf.rows.dtype == np.float32 and np.array_equal(vf.rows, rows[vf.tensor]) and vf.rows.flags.writeable
    assert vf.positions == [int(p) for p in json.loads(meta["fvpatch.positions"])]
    assert (vf.mode, vf.scale) == (meta["fvpatch.mode"], float(meta["fvpatch.scale"]))
    assert vf.model == {k.removeprefix("fvpatch.model."): v for k, v in meta.items() if k.startswith("fvpatch.model.")}
    assert {**vf.metadata(), "fvpatch.creator": meta["fvpatch.creator"]} == meta  # saving it again writes the same keys


def test_save_writes_plain_safetensors(tmp_path, saved):
    (tmp_path / "v.safetensors").write_bytes(saved)
    vf = load(tmp_path / "v.safetensors")
    again = save(vf, tmp_path / "again.safetensors")
    header, _ = split(again.read_bytes())
    assert header["l_out-1"]["dtype"] == "F32" and header["__metadata__"] == vf.metadata()
    np.testing.assert_array_equal(load_file(again)["l_out-1"], vf.rows)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_f16_and_bf16_are_converted_exactly_and_recorded(tmp_path, saved, tiny_gguf, dtype):
    path = tmp_path / "v.safetensors"
    path.write_bytes(as_dtype(saved, dtype))
    header, data = split(path.read_bytes())
    vf = load(path)
    assert vf.dtype == dtype and vf.rows.dtype == np.float32
    np.testing.assert_array_equal(vf.rows, decode(data, dtype, header["l_out-1"]["shape"]))
    r = inspect(path)
    assert r.exit_code == 0 and strict_json(r.stdout)["dtype"] == dtype
    assert patch(path, tiny_gguf).exit_code == 0
    back = load(save(vf, tmp_path / "f32.safetensors"))  # saving writes float32, the same numbers
    assert back.dtype == "F32" and np.array_equal(back.rows, vf.rows)


def test_huge_finite_rows_are_read_and_inspect_prints_strict_json(tmp_path, saved):
    header, data = split(saved)
    rows = decode(data, "F32", header["l_out-1"]["shape"]).copy()
    rows[0] = np.finfo(np.float32).max  # finite, but its float32 norm would be inf
    path = tmp_path / "v.safetensors"
    path.write_bytes(join(header, encode(rows, "F32")))
    r = inspect(path)
    assert r.exit_code == 0 and math.isfinite(strict_json(r.stdout)["row_norms"][0])


# ---- what is refused: each bad input the hardening issue names, and their neighbours -------------------


def edit_meta(key: str, value):
    """Set a metadata key to a string (or, to retype it, anything else), or drop it (None)."""

    def edit(header, data):
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value
        return join(header, data)

    return edit


def edit_entry(**changes):
    def edit(header, data):
        header["l_out-1"].update(changes)
        return join(header, data)

    return edit


def retyped(dtype):
    """The same numbers stored as another dtype, sizes and offsets consistent: only the dtype is wrong."""

    def edit(header, data):
        rows = decode(data, "F32", header["l_out-1"]["shape"])
        data = encode(rows, dtype)
        header["l_out-1"].update(dtype=dtype, data_offsets=[0, len(data)])
        return join(header, data)

    return edit


def with_value(value, dtype="F32"):
    def edit(header, data):
        raw = as_dtype(join(header, data), dtype)
        header, data = split(raw)
        bits = {("F32", "nan"): b"\x00\x00\xc0\x7f", ("F32", "inf"): b"\x00\x00\x80\x7f", ("F32", "-inf"): b"\x00\x00\x80\xff",
                ("F16", "inf"): b"\x00\x7c", ("F16", "nan"): b"\x00\x7e", ("BF16", "nan"): b"\xc0\x7f", ("BF16", "-inf"): b"\x80\xff"}[dtype, value]
        at = 7 * len(bits)
        return join(header, data[:at] + bits + data[at + len(bits):])

    return edit


def text_edit(old: str, new: str):
    def edit(header, data):
        text = json.dumps(header)
        assert old in text
        return join(text.replace(old, new, 1), data)

    return edit


def whole(fn):
    return lambda header, data: fn(join(header, data))


WIDTH = 64
BAD = {
    # dtypes that were cast to float32 silently, and the one that crashed
    "f64": (retyped("F64"), "dtype 'F64'; only F32, F16, BF16"),
    "int32": (retyped("I32"), "dtype 'I32'"),
    "int64": (retyped("I64"), "dtype 'I64'"),
    "u8": (retyped("U8"), "dtype 'U8'"),
    "dtype-lowercase": (edit_entry(dtype="f32"), "dtype 'f32'"),
    "dtype-null": (edit_entry(dtype=None), "dtype None"),
    # non-finite rows, in each dtype read
    "nan-row": (with_value("nan"), "NaN or inf"),
    "inf-row": (with_value("inf"), "NaN or inf"),
    "-inf-row": (with_value("-inf"), "NaN or inf"),
    "f16-inf-row": (with_value("inf", "F16"), "NaN or inf"),
    "f16-nan-row": (with_value("nan", "F16"), "NaN or inf"),
    "bf16-nan-row": (with_value("nan", "BF16"), "NaN or inf"),
    "bf16-inf-row": (with_value("-inf", "BF16"), "NaN or inf"),
    # metadata that was missing, malformed or coerced
    "metadata-null": (lambda h, d: join({**h, "__metadata__": None}, d), "no __metadata__"),
    "metadata-list": (lambda h, d: join({**h, "__metadata__": [h["__metadata__"]]}, d), "must map strings to strings"),
    "metadata-number-value": (edit_meta("fvpatch.scale", 1), "must map strings to strings"),
    "positions-overflow": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, 1e400]"), "the number '1e400' where only integers belong"),
    "positions-float": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, 1.7]"), "the number '1.7'"),
    "positions-string": (edit_meta("fvpatch.positions", '[0, 1, 2, 3, "3"]'), "positions must be a list of token positions"),
    "positions-bool": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, true]"), "positions must be a list of token positions"),
    "positions-not-a-list": (edit_meta("fvpatch.positions", "3"), "positions must be a list"),
    "positions-nan": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, NaN]"), "holds NaN, which is not JSON"),
    "positions-below-minus-one": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, -2]"), "positions must be a list"),
    "positions-beyond-int32": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, 2147483648]"), "2147483648]"),
    "positions-too-few": (edit_meta("fvpatch.positions", "[0, 1, 2, 3]"), "5 rows but 4 positions"),
    "positions-past-prompt": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, 5]"), "reach past the 5-token prompt"),
    "positions-broken-json": (edit_meta("fvpatch.positions", "[0, 1, 2, 3, 4"), "fvpatch.positions is not valid JSON"),
    "positions-missing": (edit_meta("fvpatch.positions", None), "fvpatch.positions is missing"),
    "mode-missing": (edit_meta("fvpatch.mode", None), "fvpatch.mode is missing"),
    "mode-unknown": (edit_meta("fvpatch.mode", "ADD"), "mode must be one of"),
    "scale-nan": (edit_meta("fvpatch.scale", "nan"), "fvpatch.scale must be a finite number, got 'nan'"),
    "scale-inf": (edit_meta("fvpatch.scale", "inf"), "finite number"),
    "scale-overflow": (edit_meta("fvpatch.scale", "1e400"), "finite number"),
    "scale-words": (edit_meta("fvpatch.scale", "abc"), "finite number"),
    "scale-padded": (edit_meta("fvpatch.scale", " 1.0"), "finite number"),
    "scale-missing": (edit_meta("fvpatch.scale", None), "fvpatch.scale is missing"),
    "format-missing": (edit_meta("fvpatch.format", None), "not an fvpatch vector file"),
    "format-other": (edit_meta("fvpatch.format", "2"), "not an fvpatch vector file (format '2'"),
    "tensor-missing": (edit_meta("fvpatch.tensor", None), "fvpatch.tensor is missing"),
    "tensor-other": (edit_meta("fvpatch.tensor", "l_out-2"), "metadata names tensor 'l_out-2'"),
    "layer-other": (edit_meta("fvpatch.layer", "2"), "fvpatch.layer '2' does not match"),
    "n-prompt-words": (edit_meta("fvpatch.n_prompt", "five"), "fvpatch.n_prompt must be an integer >= 1"),
    "n-prompt-signed": (edit_meta("fvpatch.n_prompt", "+5"), "fvpatch.n_prompt must be an integer"),
    "n-embd-float": (edit_meta("fvpatch.model.n_embd", "64.0"), "fvpatch.model.n_embd must be an integer"),
    "test-top1-nan": (edit_meta("fvpatch.test_top1", "nan"), "fvpatch.test_top1 must be a finite number"),
    "test-top1-above-one": (edit_meta("fvpatch.test_top1", "1.5"), "accuracy in [0, 1]"),
    # the header itself
    "header-nan-literal": (text_edit(f"[5, {WIDTH}]", f"[NaN, {WIDTH}]"), "holds NaN, which is not JSON"),
    "header-repeated-key": (text_edit('"__metadata__": {', '"__metadata__": {"fvpatch.mode": "add", '), "repeats a key"),
    "header-deep": (text_edit('"__metadata__"', '"x": ' + "[" * 100_000 + "]" * 100_000 + ', "__metadata__"'), "nested too deeply"),
    "header-surrogate": (text_edit('"fvpatch.prompt": "', '"fvpatch.prompt": "\\ud800'), "lone surrogate"),
    "header-not-utf8": (text_edit('"fvpatch.prompt": "', '"fvpatch.prompt": "\udcff'), "not UTF-8"),
    "header-a-list": (lambda h, d: join(json.dumps([h]), d), "a JSON list, not an object"),
    "header-length-huge": (whole(lambda raw: (2**63).to_bytes(8, "little") + raw[8:]), "header length 9223372036854775808"),
    "header-length-zero": (whole(lambda raw: bytes(8) + raw[8:]), "header length 0"),
    "shorter-than-8": (whole(lambda raw: raw[:5]), "shorter than the 8-byte header length"),
    "empty": (whole(lambda raw: b""), "0 bytes"),
    "truncated-data": (whole(lambda raw: raw[:-4]), "promises 1280 bytes of data, the file holds 1276"),
    "trailing-bytes": (whole(lambda raw: raw + b"\0" * 4), "the file holds 1284"),
    "two-tensors": (lambda h, d: join({**h, "l_out-2": {**h["l_out-1"]}}, d), "exactly one tensor; this one holds 2"),
    "no-tensor": (lambda h, d: join({"__metadata__": h["__metadata__"]}, b""), "this one holds 0"),
    "shape-1d": (edit_entry(shape=[5 * WIDTH]), "has shape [320]"),
    "shape-3d": (edit_entry(shape=[5, WIDTH, 1]), "has shape"),
    "shape-zero": (edit_entry(shape=[0, WIDTH]), "has shape [0, 64]"),
    "shape-bool": (edit_entry(shape=[True, 5 * WIDTH]), "has shape [True, 320]"),
    "shape-string": (edit_entry(shape=["5", WIDTH]), "has shape"),
    "shape-other": (edit_entry(shape=[4, WIDTH]), "data_offsets [0, 1280] for [4, 64] F32, expected [0, 1024]"),
    "offsets-shifted": (edit_entry(data_offsets=[4, 1284]), "data_offsets [4, 1284]"),
    "offsets-bool": (edit_entry(data_offsets=[False, 1280]), "data_offsets [False, 1280]"),
    "entry-extra-key": (edit_entry(extra=1), "must have exactly dtype, shape and data_offsets"),
    "pickle": (whole(lambda raw: b"\x80\x04\x95" + raw[3:]), "header length"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_file_is_refused_in_one_line(tmp_path, saved, tiny_gguf, case):
    make, expected = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(*split(saved)))
    with pytest.raises(VectorFileError) as err:
        load(path)
    message = str(err.value)
    assert expected in message and message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400
    for r in (inspect(path), patch(path, tiny_gguf)):
        assert refused_in_one_line(r) is None, refused_in_one_line(r)
        assert expected in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.safetensors"]


def test_header_is_checked_before_the_data_is_read(tmp_path, saved):
    """A 4 GiB file (sparse: no disk) whose header is refused: only the header is read, not the data."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs /proc/self/io to count the bytes read")
    read = lambda: int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"])
    header, data = split(saved)
    for entry, size in (({"dtype": "F64", "shape": [2**26, 8], "data_offsets": [0, 2**32]}, 2**32),  # dtype refused
                        ({"dtype": "F32", "shape": [2**26, 16], "data_offsets": [0, 2**32]}, 2**31)):  # data too short
        path = tmp_path / "big.safetensors"
        head = join({"__metadata__": header["__metadata__"], "l_out-1": entry}, b"")
        with path.open("wb") as f:
            f.write(head)
            f.truncate(len(head) + size)
        before = read()
        with pytest.raises(VectorFileError):
            load(path)
        assert read() - before < 1 << 20


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e400"])
def test_patch_refuses_a_non_finite_scale(tmp_path, saved, tiny_gguf, scale):
    path = tmp_path / "v.safetensors"
    path.write_bytes(saved)
    r = patch(path, tiny_gguf, "--scale", scale)
    assert r.exit_code == 2 and "is not a finite number" in r.stderr and "Traceback" not in r.output
    assert patch(path, tiny_gguf, "--scale", "-2.5").exit_code == 0


def test_patch_refuses_a_product_that_overflows(tmp_path, saved, tiny_gguf):
    """Finite vector, finite scale, but their product overflows float32: the logits would be NaN, and --json would print NaN."""
    path = tmp_path / "v.safetensors"
    path.write_bytes(saved)
    r = patch(path, tiny_gguf, "--scale", "1e38")
    assert refused_in_one_line(r) is None and "overflows float32" in r.stderr


@pytest.mark.parametrize("rows, positions, scale, match", [
    (np.full((1, 4), np.nan), [-1], 1.0, "NaN or inf"),
    (np.ones((1, 4)), [-1], float("inf"), "scale must be a finite number"),
    (np.ones((1, 4)), [-1], "abc", "scale must be a finite number, got 'abc'"),
    (np.ones((1, 4)), [-1], True, "scale must be a finite number, got True"),
    (np.ones((1, 4)), [-1], 10**400, "scale must be a finite number"),
    (np.ones((1, 4)), [1.5], 1.0, "positions must be a list"),
    (np.ones((0, 4)), [], 1.0, "non-empty"),
    ([["a", "b"]], [-1], 1.0, "vector rows must be real numbers, got an array of <U1"),
    ([[1.0, 2.0], [3.0]], [0, 1], 1.0, "vector rows must be an array of numbers"),
    (np.ones((1, 4)) * 1j, [-1], 1.0, "vector rows must be real numbers, got an array of complex128"),
])
def test_vector_files_made_in_code_are_checked_before_saving(tmp_path, rows, positions, scale, match):
    with pytest.raises(VectorFileError, match=match) as err:
        save(VectorFile("l_out-1", rows, positions, {}, "add", scale), tmp_path / "v.safetensors")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_torch_rows_of_any_float_dtype_are_taken_through_float32(tmp_path):
    torch = pytest.importorskip("torch")
    values = torch.tensor([[1.5, -2.0, 3.25, 0.0078125]])  # exact in bfloat16 and float16
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        vf = VectorFile("l_out-1", values.to(dtype).requires_grad_(), [-1], {}, "add")
        assert vf.rows.dtype == np.float32 and np.array_equal(vf.rows, values.numpy())
    assert np.array_equal(load(save(vf, tmp_path / "v.safetensors")).rows, values.numpy())


def test_vector_files_compare_without_a_traceback():
    a, b = (VectorFile("l_out-1", np.ones(4), [-1], {}, "add") for _ in range(2))
    assert a == a and a != b  # one object is itself; two are not compared element by element


# keys the VectorFile's own fields write; meta used to overwrite them (a mode add vector reloaded as replace)
@pytest.mark.parametrize("key, value", [("fvpatch.mode", "replace"), ("fvpatch.scale", "3.0"), ("fvpatch.layer", "7"),
                                        ("fvpatch.format", "2"), ("fvpatch.positions", "[0]"), ("fvpatch.tensor", "l_out-2"),
                                        ("fvpatch.creator", "me"), ("fvpatch.model.n_embd", "64")])
def test_meta_cannot_override_what_the_fields_write(tmp_path, key, value):
    path = tmp_path / "v.safetensors"
    with pytest.raises(VectorFileError, match=rf"^cannot save {path}: VectorFile.meta may not set '{key}': save writes those keys itself"):
        save(VectorFile("l_out-4", np.ones(4), [-1], {}, mode="add", meta={key: value}), path)
    late = VectorFile("l_out-4", np.ones(4), [-1], {}, mode="add")
    late.meta[key] = value  # meta filled in after construction is checked too
    with pytest.raises(VectorFileError, match="may not set"):
        save(late, path)
    with pytest.raises(VectorFileError, match="may not set"):
        save_bank(Bank(["a"], np.ones((1, 4)), "l_out-4", {}, meta={key: value}), path)
    for owned in ("fvpatch.bank.names", "fvpatch.bank.pairs"):
        with pytest.raises(VectorFileError, match=rf"^cannot save {path}: Bank.meta may not set '{owned}'"):
            save_bank(Bank(["a"], np.ones((1, 4)), "l_out-4", {}, meta={owned: "[]"}), path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tensor, rows, positions, model, meta, match", [
    ("l_out-4", np.ones((3, 4)), [0, 5, 9], {}, {"fvpatch.n_prompt": "3"}, "positions \\[0, 5, 9\\] reach past the 3-token prompt"),
    ("l_out-4", np.ones(4), [-1], {}, {"fvpatch.n_prompt": "x"}, "fvpatch.n_prompt must be an integer >= 1, got 'x'"),
    ("l_out-4", np.ones(4), [-1], {"n_embd": "abc"}, {}, "fvpatch.model.n_embd must be an integer >= 1, got 'abc'"),
    ("l_out-4", np.ones(4), [-1], {"n_layer": 0}, {}, "fvpatch.model.n_layer must be an integer >= 1, got '0'"),
    ("l_out-4", np.ones(4), [-1], {}, {"fvpatch.test_top1": "1.5"}, "accuracy in \\[0, 1\\]"),
    ("l_out-4", np.ones(4), [-1], {}, {"fvpatch.apply_at": "every"}, "fvpatch.apply_at must be one of"),
    ("l_out-4", np.ones(4), [-1], {}, {"fvpatch.positions_top1": "{}"}, "fvpatch.positions_top1 must be"),
    ("l_out-4", np.ones(4), [-1], {}, {1: "x"}, "VectorFile.meta must be a dict with string keys"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, tensor, rows, positions, model, meta, match):
    """save checks its metadata with load's own checks: it never writes a file that load refuses."""
    path = tmp_path / "v.safetensors"
    with pytest.raises(VectorFileError, match=rf"^cannot save {path}: .*{match}"):
        save(VectorFile(tensor, rows, positions, model, "add", meta=meta), path)
    assert not list(tmp_path.iterdir())


def test_a_tensor_named_like_the_metadata_is_refused():
    for name in ("__metadata__", 4, None):
        with pytest.raises(VectorFileError, match="tensor must be a graph tensor name"):
            VectorFile(name, np.ones(4), [-1], {}, "add")


@pytest.mark.parametrize("key, value, match", [
    ("fvpatch.bank.names", "[1, 2]", "fvpatch.bank.names must be a JSON list of relation names"),
    ("fvpatch.bank.names", '["a", NaN]', "holds NaN"),
    ("fvpatch.bank.pairs", '{"a": [["x"]]}', "fvpatch.bank.pairs must be a JSON object"),
])
def test_bank_metadata_is_typed(tmp_path, key, value, match):
    path = save_bank(Bank(["a", "b"], np.ones((2, WIDTH)), "l_out-1", {}), tmp_path / "bank.safetensors")
    header, data = split(path.read_bytes())
    header["__metadata__"][key] = value
    path.write_bytes(join(header, data))
    with pytest.raises(VectorFileError, match=match):
        load_bank(path)


def test_a_vector_of_a_model_without_a_fingerprint_saves_and_needs_force(tmp_path):
    """A model loaded from a Hugging Face folder has no GGUF fingerprint (None): its vectors used to fail to save."""
    path = save(VectorFile("l_out-1", np.ones(4), [-1], None, "add"), tmp_path / "hf.safetensors")
    assert load(path).model == {}
    with pytest.raises(VectorFileError, match="model must be a fingerprint"):
        VectorFile("l_out-1", np.ones(4), [-1], "gemma")


def test_save_checks_fields_changed_after_construction(tmp_path):
    vf = VectorFile("l_out-1", np.ones(4), [-1], {}, "add")
    vf.mode = "bogus"
    with pytest.raises(VectorFileError, match="mode must be one of"):
        save(vf, tmp_path / "x.safetensors")
    vf.mode, vf.rows = "add", np.full((1, 4), np.nan)
    with pytest.raises(VectorFileError, match="NaN"):
        save(vf, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
