"""The seed experiments, through the CLI, on the real default model (Gemma 3 270M Q4_K_M)."""

import json

import pytest
from click.testing import CliRunner

from fvpatch.cli import main

SOURCE = "Egypt -> Cairo, Norway -> Oslo, Estonia ->"
TARGET = "France ->"


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def completion(*args) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("layer", [9, 10, 11])
def test_country_capital_task_vector(tmp_path, layer, gemma_path):
    vec = tmp_path / f"capital-{layer}.safetensors"
    completion("save", "-m", gemma_path, "-p", SOURCE, "--save", f"l_out-{layer}", vec, "--token-idx", -1, "-n", 1)
    out = completion("patch", "-m", gemma_path, "-p", TARGET, "--patch", f"l_out-{layer}", vec, "--compare", "-n", 4)
    assert out["completion"].startswith(" Paris")
    assert not out["unpatched"].startswith(" Paris")


@pytest.mark.slow
def test_seed_flags_from_and_to_token_idx(tmp_path, gemma_path):
    """`--save` keeps every prompt token; `--from-token-idx` picks the row, `--to-token-idx` the target."""
    vec = tmp_path / "all-tokens.safetensors"
    completion("save", "-m", gemma_path, "-p", SOURCE, "--save", "l_out-10", vec)
    info = completion("inspect", vec)
    assert info["positions"] == list(range(11)) and info["shape"] == [11, 640]
    out = completion("patch", "-m", gemma_path, "-p", TARGET, "--patch", "l_out-10", vec, "--from-token-idx", 10, "--to-token-idx", 2, "-n", 2)
    assert out["completion"].startswith(" Paris")
    same = completion("patch", "-m", gemma_path, "-p", TARGET, "--patch", "l_out-10", vec, "--from-token-idx", -1, "-n", 2)
    assert same["completion"] == out["completion"]


@pytest.mark.slow
def test_sequence_reversal_layers(gemma):
    """Seed: `1 2 3 to 3 2 1, 5 6 7 to 7 ` patched into `4 5 6 to 6 `. Measured: the first token becomes
    the right ` 5`-digit (`5`) at layers 9 and 10 only, `2` at 11, 12 and 14-17 and `1` at 13 (the README's
    numbers); the rest of the continuation never reverses."""
    from fvpatch import Patch, Save

    src, dst = "1 2 3 to 3 2 1, 5 6 7 to 7 ", "4 5 6 to 6 "
    names = [f"l_out-{L}" for L in range(gemma.n_layer)]
    saved = gemma.run(src, saves=[Save(n, (-1,)) for n in names]).saved
    unpatched = gemma.run(dst, max_tokens=1).text
    first = [gemma.run(dst, patches=[Patch(n, saved[n][0])], max_tokens=1).text for n in names]
    assert unpatched != "5"
    assert [L for L, t in enumerate(first) if t == "5"] == [9, 10]
    assert [L for L, t in enumerate(first) if t == "2"] == [11, 12, 14, 15, 16, 17] and first[13] == "1"


@pytest.mark.slow
def test_vector_from_another_model_is_refused(tmp_path, gemma_path, smollm_path):
    vec = tmp_path / "smol.safetensors"
    completion("save", "-m", smollm_path, "-p", "Hello there", "--save", "l_out-3", vec, "--token-idx", -1, "-n", 1)
    r = cli("patch", "-m", gemma_path, "-p", TARGET, "--patch", "l_out-3", vec)
    assert r.exit_code == 1 and "vector was made on a llama model" in r.output and len(r.output.strip().splitlines()) == 1
    assert "(it was made on the known model smollm2-135m: --model smollm2-135m)" in r.output


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, gemma_path):
    vec = tmp_path / "v.safetensors"
    completion("save", "-m", gemma_path, "-p", SOURCE, "--save", "l_out-10", vec, "--token-idx", -1, "-n", 1)
    cases = {
        ("--patch", "l_out-18", vec): "beyond this model's 18 layers",
        ("--patch", "l_out-10", vec, "--to-token-idx", 7): "outside the prompt",
        ("--patch", "l_ou-10", vec): "never appeared",
        ("--patch", "kqv_out-10", vec): "does not fit tensor 'kqv_out-10' of width 1024",
        ("--patch", "l_out-10", tmp_path / "missing.safetensors"): "neither a file nor a shipped vector",
    }
    for args, message in cases.items():
        r = cli("patch", "-m", gemma_path, "-p", TARGET, *args)
        assert r.exit_code == 1 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    r = cli("save", "-m", gemma_path, "-p", SOURCE, "--save", "l_out-10", vec)
    assert r.exit_code == 1 and "exists; pass --force" in r.output


@pytest.mark.slow
def test_vector_from_another_model_of_same_shape_needs_force(tmp_path, gemma_path):
    from fvpatch import vectorfile

    vec = tmp_path / "v.safetensors"
    completion("save", "-m", gemma_path, "-p", SOURCE, "--save", "l_out-10", vec, "--token-idx", -1, "-n", 1)
    vf = vectorfile.load(vec)
    vf.model["name"] = "Gemma 3 270m It"  # a fine-tune of the same shape and vocabulary
    vf.model["file"] = "gemma-3-270m-it.gguf"
    vectorfile.save(vf, vec, overwrite=True)
    r = cli("patch", "-m", gemma_path, "-p", TARGET, "--patch", "l_out-10", vec)
    assert r.exit_code == 1 and "pass --force" in r.output
    assert completion("patch", "-m", gemma_path, "-p", TARGET, "--patch", "l_out-10", vec, "--force", "-n", 1)["completion"] == " Paris"


@pytest.mark.slow
def test_control_tokens_in_a_prompt_are_read_as_llama_cpp_reads_them(smollm_path):
    """llama-completion and llama-server read `<|im_start|>` in a prompt as the one control token; fvpatch read it as
    characters, so the same raw chat prompt was another prompt in fvpatch (31 tokens against 14)."""
    from fvpatch.modelfile import ModelFile

    with ModelFile(smollm_path, vocab_only=True) as m:
        tokens = m.tokenize("<|im_start|>user\nHi<|im_end|>")
        assert tokens == [1, *m.tokenize("user\nHi", special=False), 2]  # 1, 2: <|im_start|>, <|im_end|>
        assert len(m.tokenize("<|im_start|>", special=False)) > 1
