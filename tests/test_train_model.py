"""The PyTorch side's model loading, tokenization and hooks (train.model, train.hooks), on tiny models."""

import pytest
import torch
from torch import nn

from train.hooks import decoder_layers, head_to_residual, patch_heads, patch_residual, record_heads, record_residual

TEXTS = ["France ->", " leading space", "two  spaces\tand\nnewlines\n\n", "-> ->", "12345 678.9", "über naïve café 日本 🙂", ""]


def forward(lm, prompts):
    ids, mask, last = lm.batch(prompts)
    return lm.model(input_ids=ids, attention_mask=mask).logits, last


def test_tokenize_is_llama_cpps(tiny_lm, tiny_session):
    for text in TEXTS:
        assert tiny_lm.tokenize(text) == tiny_session.tokenize(text)
        assert tiny_lm.tokenize(text, add_bos=False) == tiny_session.tokenize(text, add_bos=False)
    tokens = tiny_lm.tokenize("a -> b")
    assert tiny_lm.decode(tokens) == tiny_session.detokenize(tokens) == " a -> b"  # SPM's space prefix


def test_loaded_model_facts(tiny_lm, tiny_session, tiny_gguf):
    assert tiny_lm.fingerprint == tiny_session.fingerprint()
    assert (tiny_lm.n_layer, tiny_lm.n_embd, tiny_lm.n_head, tiny_lm.head_dim) == (4, 64, 4, 16)
    assert not tiny_lm.model.training
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_conversion_is_cached(tiny_lm, tiny_gguf, monkeypatch, tmp_path):
    from train.model import load_model

    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path))
    first = load_model(tiny_gguf)
    (cache,) = (tmp_path / "hf-cache").iterdir()
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    second = load_model(tiny_gguf)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_only_the_dtype_used_is_cached_and_a_float32_cache_serves_every_dtype(tiny_lm, tiny_gguf, monkeypatch, tmp_path):
    from fvpatch.models import file_key
    from train.model import load_model

    key = file_key(tiny_gguf)
    reference = tiny_lm.model.state_dict()  # float32, converted in the tiny_lm fixture's own models dir
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "a"))
    bf16 = load_model(tiny_gguf, dtype="bfloat16")
    (cache,) = (tmp_path / "a" / "hf-cache").iterdir()
    assert cache.name == f"{key}-bfloat16"
    f32_bytes = sum(v.numel() * 4 for v in reference.values())
    assert (cache / "model.safetensors").stat().st_size < 0.55 * f32_bytes
    for name, value in bf16.model.state_dict().items():  # converted straight to bfloat16 = float32's weights rounded
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[name].to(torch.bfloat16)), name

    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "b"))
    load_model(tiny_gguf)
    fp16 = load_model(tiny_gguf, dtype="float16")
    assert [p.name for p in (tmp_path / "b" / "hf-cache").iterdir()] == [f"{key}-float32"]  # nothing more written
    for name, value in fp16.model.state_dict().items():
        assert value.dtype == torch.float16 and torch.equal(value, reference[name].to(torch.float16)), name


def test_a_model_that_overflows_float16_is_refused(tiny_lm):
    import copy
    import dataclasses

    from train.model import _check_float16_range

    half = dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).half(), dtype=torch.float16)
    _check_float16_range(half)  # the tiny model's activations fit
    decoder_layers(half.model)[2].mlp.down_proj.weight.mul_(1e5)  # as Gemma 3's residual stream outgrows float16 at block 7
    with pytest.raises(ValueError, match=r"overflows float16 \(block 2's output"):
        _check_float16_range(half)


def test_device_auto_prefers_cuda_then_mps_and_a_missing_device_is_a_clear_error(monkeypatch):
    from train.model import torch_device, torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert torch_device("auto") == torch_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        torch_device("cuda")
    with pytest.raises(ValueError, match="no Apple MPS backend"):
        torch_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps"):
        torch_device("tpu")
    assert torch_dtype("bfloat16") == torch_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        torch_dtype("int8")


def test_loads_a_hugging_face_directory(tiny_lm, tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    from train.model import load_model

    tiny_lm.model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.fingerprint is None  # not tied to a GGUF file
    tokens = lm.tokenize("France ->")
    assert tokens == tiny_lm.tokenize("France ->")
    torch.testing.assert_close(forward(lm, [tokens])[0], forward(tiny_lm, [tokens])[0])


def test_batch_right_pads_and_keeps_rows_independent(tiny_lm):
    prompts = [tiny_lm.tokenize("a longer prompt here"), tiny_lm.tokenize("short")]
    ids, mask, last = tiny_lm.batch(prompts)
    assert ids.shape == (2, len(prompts[0]))
    assert last.tolist() == [len(prompts[0]) - 1, len(prompts[1]) - 1]
    assert ids[1, : len(prompts[1])].tolist() == prompts[1] and mask[1].sum() == len(prompts[1])
    batched, _ = forward(tiny_lm, prompts)
    for row, p in enumerate(prompts):
        alone, _ = forward(tiny_lm, [p])
        torch.testing.assert_close(batched[row, : len(p)], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        tiny_lm.batch([[]])


def test_patch_residual_replace_with_recorded_value_changes_nothing(tiny_lm):
    prompts = [tiny_lm.tokenize("a -> b, c ->"), tiny_lm.tokenize("x ->")]
    with record_residual(tiny_lm.model, [2]) as rec:
        clean, last = forward(tiny_lm, prompts)
    vectors = rec[2][torch.arange(2), last]
    with patch_residual(tiny_lm.model, 2, last, vectors, mode="replace"):
        patched, _ = forward(tiny_lm, prompts)
    torch.testing.assert_close(patched, clean, rtol=0, atol=0)


def test_patch_residual_adds_at_one_token_per_row_and_is_differentiable(tiny_lm):
    prompts = [tiny_lm.tokenize("a -> b, c ->"), tiny_lm.tokenize("x ->")]
    rows, positions = torch.arange(2), torch.tensor([3, 1])
    with record_residual(tiny_lm.model, [1]) as rec:
        clean_logits, last = forward(tiny_lm, prompts)
    vector = torch.randn(tiny_lm.n_embd, requires_grad=True)
    with patch_residual(tiny_lm.model, 1, positions, vector, scale=2.0), record_residual(tiny_lm.model, [1]) as same:
        added, _ = forward(tiny_lm, prompts)
    torch.testing.assert_close(same[1], rec[1], rtol=0, atol=0)  # a record sees the block's own output
    with patch_residual(tiny_lm.model, 1, positions, rec[1][rows, positions] + 2.0 * vector.detach(), mode="replace"):
        replaced, _ = forward(tiny_lm, prompts)
    torch.testing.assert_close(added, replaced)
    assert not torch.allclose(added, clean_logits)
    added[rows, last].logsumexp(-1).sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0


def test_patch_positions_and_shapes_are_checked(tiny_lm):
    prompt = [tiny_lm.tokenize("abc")]
    with pytest.raises(IndexError, match="outside the sequence"), patch_residual(tiny_lm.model, 0, 99, torch.zeros(64)):
        forward(tiny_lm, prompt)
    with pytest.raises(ValueError, match="shape"), patch_residual(tiny_lm.model, 0, 0, torch.zeros(63)):
        forward(tiny_lm, prompt)
    with pytest.raises(ValueError, match="mode"), patch_residual(tiny_lm.model, 0, 0, torch.zeros(64), mode="mul"):
        pass
    with pytest.raises(IndexError, match="4 layers"), record_residual(tiny_lm.model, [4]):
        pass


def test_batched_patch_heads_equals_single_patches(tiny_lm):
    tokens = tiny_lm.tokenize("a -> b, c -> d, e ->")
    n_head, head_dim = tiny_lm.n_head, tiny_lm.head_dim
    values = torch.randn(n_head, n_head, head_dim)  # row r puts values[r] in head r
    mask = torch.eye(n_head, dtype=torch.bool)
    position = 5
    with patch_heads(tiny_lm.model, 1, position, values, mask):
        batched, _ = forward(tiny_lm, [tokens] * n_head)
    for r in range(n_head):
        with patch_heads(tiny_lm.model, 1, position, values[r : r + 1], mask[r : r + 1]):
            single, _ = forward(tiny_lm, [tokens])
        torch.testing.assert_close(batched[r], single[0], rtol=1e-5, atol=1e-5)
    clean, _ = forward(tiny_lm, [tokens])
    assert not torch.allclose(batched[0], clean[0])  # the patch did something


def test_head_to_residual_sums_to_the_attention_output(tiny_lm):
    captured = {}
    o_proj = decoder_layers(tiny_lm.model)[2].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("out", out))
    tokens = tiny_lm.tokenize("a -> b")
    try:
        with record_heads(tiny_lm.model, [2]) as heads:
            forward(tiny_lm, [tokens])
    finally:
        handle.remove()
    assert heads[2].shape == (1, len(tokens), tiny_lm.n_head, tiny_lm.head_dim)
    total = sum(head_to_residual(tiny_lm.model, 2, h, heads[2][0, -1, h]) for h in range(tiny_lm.n_head))
    torch.testing.assert_close(total, captured["out"][0, -1], rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no decoder layers at \.model\.layers"):
        decoder_layers(nn.Linear(2, 2))
    odd = nn.Module()
    odd.model = nn.Module()
    odd.model.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"decoder layer 0 .* no self_attn\.o_proj"):
        record_residual(odd, [0]).__enter__()


@pytest.fixture(scope="module")
def tiny_gemma3():
    """A randomly initialised two-layer Gemma 3: scaled embeddings, post-attention and post-FFN norms."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16
    )
    return Gemma3ForCausalLM(config).eval()


def test_gemma3_hooks_follow_the_layer_convention(tiny_gemma3):
    ids = torch.tensor([[2, 5, 9, 11, 7]])
    with torch.no_grad(), record_residual(tiny_gemma3, [0, 1]) as rec, record_heads(tiny_gemma3, [1]) as heads:
        out = tiny_gemma3(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(rec[0], out.hidden_states[1])  # layer L = hidden_states[L + 1] ...
    assert not torch.allclose(rec[1], out.hidden_states[2])  # ... except the last, which HF returns normed
    assert heads[1].shape == (1, 5, 2, 16)
    with torch.no_grad(), patch_heads(tiny_gemma3, 1, 3, heads[1][:, 3], torch.tensor([[True, False]])):
        same = tiny_gemma3(input_ids=ids).logits
    torch.testing.assert_close(same, out.logits, rtol=0, atol=0)
