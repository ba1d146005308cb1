"""Fuzzed vector files through the CLI: every mutant is refused in one line, or read as exactly what its bytes say.

Mutants of a file `fvpatch save` wrote on the tiny model (stored as F32, F16 and BF16): bit flips, truncations,
junk appended, header-length, dtype, shape and data_offsets edits, metadata values dropped, retyped or set to
bad and good strings, header structure edits, non-finite and huge finite values in the rows. Each one goes
through `fvpatch inspect FILE --json` and `fvpatch patch --vector FILE --json` on the tiny model. A refusal
must be a non-zero exit with one line on stderr, no traceback, nothing on stdout and no file written; an
exit 0 must report the dtype, shape, rows, positions, mode and scale that the file's own bytes hold, all finite.

    FVPATCH_FUZZ_N=10000 FVPATCH_FUZZ_SEED=1 .venv/bin/python -m pytest -q -s tests/test_vectorfile_fuzz.py  # the longer run
"""

import json
import os
import random
from collections import Counter

import numpy as np

from tests.test_vectorfile import as_dtype, decode, encode, inspect, join, patch, refused_in_one_line, save_with_cli, split, strict_json

N = int(os.environ.get("FVPATCH_FUZZ_N", "300"))
SEED = int(os.environ.get("FVPATCH_FUZZ_SEED", "0"))
READ = ("F32", "F16", "BF16")

# metadata values that must be refused, and some that must be read (on `inspect`; `patch` may still refuse
# them for the model's sake, e.g. another n_embd, or no row at the token it applies)
BAD_VALUES = {
    "fvpatch.format": ["2", "", "1.0", " 1", "01"],
    "fvpatch.tensor": ["l_out-2", "", "l_out-1 ", "L_OUT-1"],
    "fvpatch.layer": ["2", "01", "-1", "x", ""],
    "fvpatch.positions": ["[0, 1, 2, 3, 1e400]", "[0, 1, 2, 3, 1.7]", '[0, 1, 2, 3, "3"]', "[0, 1, 2, 3, true]", "[]", "[0, 1, 2, 3]",
                          "[0, 1, 2, 3, 4, 0]", "[0, 1, 2, 3, -2]", "[0, 1, 2, 3, 5]", "[0, 1, 2, 3, 2147483648]", "3", "null", "{}",
                          "[0, 1, 2, 3, NaN]", "[0, 1, 2, 3, 4", "", "[[0], 1, 2, 3, 4]", "[0, 1, 2, 3, 4.0]", "[0, 1, 2, 3, -0.0]"],
    "fvpatch.mode": ["", "ADD", "Replace", "add ", "multiply"],
    "fvpatch.scale": ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e309", "", " 1.0", "1.0 ", "abc", "0x10", "1,5", "1_0", "١"],
    "fvpatch.n_prompt": ["0", "-1", "x", "5.0", "+5", " 5", "4", "５", "-0"],
    "fvpatch.model.n_embd": ["64.0", "sixty-four", "", "-64", "0"],
    "fvpatch.model.n_layer": ["4.0", "", "0"],
    "fvpatch.test_top1": ["nan", "1.5", "-0.1", "x"],
    "fvpatch.test_n": ["-1", "1.0", "x"],
}
GOOD_VALUES = {
    "fvpatch.mode": ["add", "replace"],
    "fvpatch.scale": ["2.5", "-1e-3", "0.0", "1", "3e+2", ".5", "-0"],
    "fvpatch.positions": ["[4, 3, 2, 1, 0]", "[0, 0, 1, 1, 2]", "[-1, -1, -1, -1, -1]"],
    "fvpatch.n_prompt": ["6", "100"],
    "fvpatch.prompt": ["", "two\nlines", "é", "\u0000"],
    "fvpatch.creator": ["anything"],
    "fvpatch.model.file": ["other.gguf"],
    "fvpatch.test_top1": ["0.5", "1"],
    "fvpatch.test_n": ["0", "12"],
}
REQUIRED = ("fvpatch.format", "fvpatch.tensor", "fvpatch.positions", "fvpatch.mode", "fvpatch.scale")
NON_STRINGS = [None, 1, 1.5, True, [], {}, ["1"]]
BAD_DTYPES = ["F64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "f32", "bf16", "", None, 4, ["F32"]]
NON_FINITE = {"F32": ["<u4", [0x7FC00000, 0x7F800000, 0xFF800000, 0x7F800001]], "F16": ["<u2", [0x7E00, 0x7C00, 0xFC00, 0x7C01]],
              "BF16": ["<u2", [0x7FC0, 0x7F80, 0xFF80, 0x7F81]]}
MAX_FINITE = {"F32": ["<u4", 0x7F7FFFFF], "F16": ["<u2", 0x7BFF], "BF16": ["<u2", 0x7F7F]}


def entry(header):
    (name,) = [k for k in header if k != "__metadata__"]
    return header[name]


def bit_flips(rng, raw, header, data):
    out = bytearray(raw)
    start, end = (0, 8 + len(raw) - len(data)) if rng.random() < 0.5 else (len(raw) - len(data), len(raw))
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(out), "either"


def truncation(rng, raw, header, data):
    return raw[: rng.randrange(len(raw))], "refuse"


def junk_appended(rng, raw, header, data):
    return raw + rng.randbytes(rng.randint(1, 64)), "refuse"


def header_length(rng, raw, header, data):
    n = int.from_bytes(raw[:8], "little")
    value = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1, rng.getrandbits(64), rng.randrange(2, len(raw))])
    return (value if value != n else n + 1).to_bytes(8, "little") + raw[8:], "refuse"


def dtype_edit(rng, raw, header, data):
    """Another dtype in the header alone (F16 and BF16 share a size: their swap is a valid, other file), or
    the rows re-encoded in it, sizes consistent, so that only the dtype is wrong."""
    old = entry(header)["dtype"]
    rows = decode(data, old, entry(header)["shape"])
    new = rng.choice(BAD_DTYPES + list(READ))
    if rng.random() < 0.5 and new in ("F32", "F16", "F64", "I32", "I64", "U8"):
        data = encode(rows, new)
        entry(header).update(dtype=new, data_offsets=[0, len(data)])
        return join(header, data), "either" if new in READ else "refuse"
    entry(header)["dtype"] = new
    same_size = new in READ and (new == old or {new, old} == {"F16", "BF16"})
    return join(header, data), "either" if same_size else "refuse"


def shape_edit(rng, raw, header, data):
    r, w = entry(header)["shape"]
    entry(header)["shape"] = rng.choice([[r], [r * w], [w, r], [r, w, 1], [1, r, w], [0, w], [r, 0], [-r, -w], [r + 1, w], [r, w - 1],
                                         [True, r * w], [str(r), w], [r, None], None, f"{r}x{w}", [2**64, w], [r, w * 2**62], []])
    return join(header, data), "refuse"


def offsets_edit(rng, raw, header, data):
    nb = len(data)
    entry(header)["data_offsets"] = rng.choice([[0, nb - 1], [1, nb + 1], [0, nb + 1], [nb, 0], [0], [0, nb, 0], None, [-1, nb - 1],
                                                ["0", nb], [0, 2**64], [False, nb], {"0": nb}, [0, str(nb)]])
    return join(header, data), "refuse"


def entry_keys(rng, raw, header, data):
    e = entry(header)
    if rng.random() < 0.5:
        del e[rng.choice(sorted(e))]
    else:
        e[rng.choice(["extra", "Dtype", "offsets"])] = 1
    return join(header, data), "refuse"


def metadata_value(rng, raw, header, data):
    meta = header["__metadata__"]
    kind = rng.choice(["bad", "good", "drop", "retype"])
    if kind == "bad":
        key = rng.choice(sorted(BAD_VALUES))
        meta[key] = rng.choice(BAD_VALUES[key])
        return join(header, data), "refuse"
    if kind == "good":
        key = rng.choice(sorted(GOOD_VALUES))
        meta[key] = rng.choice(GOOD_VALUES[key])
        return join(header, data), "accept"
    key = rng.choice(sorted(meta))
    if kind == "drop":
        del meta[key]
        return join(header, data), "refuse" if key in REQUIRED else "accept"
    meta[key] = rng.choice(NON_STRINGS)
    return join(header, data), "refuse"


def structure(rng, raw, header, data):
    text = json.dumps(header)
    e = entry(header)
    kind = rng.choice(["metadata", "top", "second tensor", "no tensor", "repeated key", "nan literal", "deep", "not utf8", "surrogate", "float"])
    if kind == "metadata":
        return join({**header, "__metadata__": rng.choice([None, [], "x", 1, [header["__metadata__"]]])}, data), "refuse"
    if kind == "top":
        return join(json.dumps(rng.choice([[header], "header", 1, None, []])), data), "refuse"
    if kind == "second tensor":
        return join({**header, "l_out-2": dict(e)}, data), "refuse"
    if kind == "no tensor":
        return join({"__metadata__": header["__metadata__"]}, data), "refuse"
    if kind == "repeated key":
        key = rng.choice(sorted(header["__metadata__"]))
        return join(text.replace('"__metadata__": {', f'"__metadata__": {{{json.dumps(key)}: "x", ', 1), data), "refuse"
    if kind == "nan literal":
        return join(text.replace('"shape": [', f'"shape": [{rng.choice(["NaN", "Infinity", "-Infinity"])}, ', 1), data), "refuse"
    if kind == "deep":
        depth = rng.choice([2_000, 50_000])
        return join(text.replace('{"__metadata__"', '{"x": ' + "[" * depth + "]" * depth + ', "__metadata__"', 1), data), "refuse"
    if kind == "surrogate":  # a lone surrogate, as the escape a JSON header can hold
        return join(text.replace('"__metadata__": {', '"__metadata__": {"fvpatch.x": "\\udc80", ', 1), data), "refuse"
    if kind == "not utf8":
        at = text.index('"fvpatch.')
        return join(text[:at].encode() + bytes([rng.choice([0x80, 0xC0, 0xFF, 0xED])]) + text[at:].encode(), data), "refuse"
    return join(text.replace('"data_offsets": [0, ', '"data_offsets": [0.0, ', 1), data), "refuse"


def set_element(rng, raw, header, data, values, expect):
    fmt, choices = values[entry(header)["dtype"]]
    item = np.dtype(fmt).itemsize
    words = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) // item) * item
        value = rng.choice(choices) if isinstance(choices, list) else choices | (rng.getrandbits(1) << (8 * item - 1))
        words[at : at + item] = int(value).to_bytes(item, "little")
    return join(header, bytes(words)), expect


def non_finite_rows(rng, raw, header, data):
    return set_element(rng, raw, header, data, NON_FINITE, "refuse")


def huge_finite_rows(rng, raw, header, data):
    return set_element(rng, raw, header, data, MAX_FINITE, "accept")


MUTATORS = [bit_flips, truncation, junk_appended, header_length, dtype_edit, shape_edit, offsets_edit, entry_keys, metadata_value,
            structure, non_finite_rows, huge_finite_rows]


def lies(raw: bytes, r) -> str | None:
    """None when an `inspect --json` that exited 0 reports exactly what the file's bytes hold, all finite."""
    try:
        out = strict_json(r.stdout)
    except ValueError as e:
        return f"stdout is not strict JSON ({e})"
    header, data = split(raw)
    meta, e = header["__metadata__"], entry(header)
    if e["dtype"] not in READ or out["dtype"] != e["dtype"] or out["shape"] != e["shape"]:
        return f"read {e['dtype']} {e['shape']} as {out['dtype']} {out['shape']}"
    rows = decode(data, e["dtype"], e["shape"]).astype(np.float64)
    if not np.isfinite(rows).all():
        return "accepted non-finite rows"
    if not np.allclose(out["row_norms"], np.round(np.linalg.norm(rows, axis=1), 4), rtol=1e-6, atol=1e-4):
        return f"row norms {out['row_norms']} are not the file's"
    positions = json.loads(meta["fvpatch.positions"])
    if out["positions"] != positions or not all(type(p) is int for p in positions):
        return f"positions {meta['fvpatch.positions']!r} read as {out['positions']}"
    if out["mode"] != meta["fvpatch.mode"] or out["scale"] != float(meta["fvpatch.scale"]) or not np.isfinite(out["scale"]):
        return f"mode/scale {meta['fvpatch.mode']!r} {meta['fvpatch.scale']!r} read as {out['mode']!r} {out['scale']!r}"
    return None


def verdict(command: str, r, seen, raw: bytes, expect: str) -> tuple[str, str] | None:
    """None when `command` (its result r; `seen`, inspect's) did right by this mutant, else (what went wrong, detail)."""
    if r.exit_code == 0:
        if expect == "refuse":
            return "read a mutant that must be refused", ""
        if seen.exit_code != 0:
            return "patch read what inspect refused", ""
        try:
            strict_json(r.stdout)
        except ValueError as e:
            return "printed what is not JSON", str(e)
        wrong = lies(raw, seen)
        return ("read as other than its bytes", wrong) if wrong else None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return "uncaught exception", f"{type(r.exception).__name__}: {r.exception}"
    if expect == "accept" and command == "inspect":
        return "refused a valid mutant", r.stderr.strip()
    wrong = refused_in_one_line(r)
    return ("refused, but not in one line", wrong) if wrong else None


def test_fuzzed_vector_files_are_refused_in_one_line_or_read_as_they_are(tiny_gguf, tmp_path):
    base = save_with_cli(tiny_gguf, tmp_path / "base.safetensors")
    bases = {dtype: as_dtype(base, dtype) for dtype in READ}
    folder = tmp_path / "mutants"
    folder.mkdir()
    path = folder / "m.safetensors"
    rng = random.Random(SEED)
    failures, outcomes = [], Counter()
    for i in range(N):
        mutate = MUTATORS[i % len(MUTATORS)]  # round robin: every kind of mutant in every run
        dtype = READ[i // len(MUTATORS) % len(READ)]
        raw, expect = mutate(rng, bases[dtype], *split(bases[dtype]))
        path.write_bytes(raw)
        seen = inspect(path)
        applied = patch(path, tiny_gguf)
        outcomes["read" if seen.exit_code == 0 else "refused"] += 1
        for command, r in (("inspect", seen), ("patch", applied)):
            wrong = verdict(command, r, seen, raw, expect)
            if [p.name for p in folder.iterdir()] != ["m.safetensors"] or path.read_bytes() != raw:
                wrong = ("wrote a file", "")
            if wrong:
                failures.append((wrong[0], f"#{i} {mutate.__name__} ({dtype}) {command}: {wrong[0]}: {wrong[1][:200]}"))
    counts = Counter(what for what, _ in failures)
    print(f"\n{N} mutants (seed {SEED}): {outcomes['read']} read, {outcomes['refused']} refused by inspect; "
          f"{len(failures)} failures of {2 * N} commands" + "".join(f"; {what}: {n}" for what, n in counts.most_common()))
    assert not failures, f"{len(failures)} failures of {2 * N} commands {dict(counts)}:\n" + "\n".join(line for _, line in failures[:20])
