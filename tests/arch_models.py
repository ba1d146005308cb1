"""Tiny random-weight f32 GGUFs, one per architecture, written with the `gguf` package for exact checks.

Small enough that llama.cpp and transformers load and run them in milliseconds; real enough that each
architecture's own graph is exercised: GQA, RoPE (llama's interleaved Q/K rows, NeoX halves elsewhere),
biases (q/k/v in qwen2, every matrix in starcoder2), LayerNorm and a plain GELU MLP (starcoder2),
per-head q/k norms (qwen3, gemma3), post-attention and post-FFN norms, scaled embeddings and logit
soft-capping (gemma2, gemma3), 8-token sliding-window layers (gemma2, gemma3), fused qkv and gate+up
matrices (phi3), tied output embeddings, and two tokenizers that llama.cpp and transformers' GGUF
tokenizer conversion both read alike: sentencepiece with byte fallback, and byte-level BPE with merges
(qwen2, qwen3, starcoder2). `gemma` (Gemma 1) is one that llama.cpp runs and transformers cannot load.

Some shapes are forced by what transformers' GGUF loader does not read from the file: qwen3's head_dim
(it keeps Qwen3Config's 128) and gemma's attention scale (query_pre_attn_scalar stays 256, while
llama.cpp scales by the head width), so those models use the real models' head widths.
"""

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_FF = 128
N_LAYER = 4
N_CTX = 512
_CHARS = [chr(c) for c in range(33, 127)]


@dataclass(frozen=True)
class Arch:
    name: str  # general.name
    n_layer: int = N_LAYER
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = N_EMBD // 4
    rope_base: float = 10000.0
    vocab: str = "spm"  # "spm": sentencepiece with byte fallback; "bpe": byte-level BPE with merges
    space_prefix: bool = True  # sentencepiece puts a space before the text (Gemma's does not)
    biases: tuple[str, ...] = ()  # the matrices that also have a bias
    layer_norm: bool = False  # LayerNorm with a bias instead of RMSNorm
    gated: bool = True  # a gated FFN (gate and up); else up, activation, down
    qk_norm: bool = False
    sandwich_norms: bool = False  # a norm on the attention output and on the FFN output, before each is added
    fused: bool = False  # one attn_qkv matrix and one ffn_up matrix holding gate and up
    tied: bool = False  # no output.weight: the token embeddings unembed
    pad_id: int | None = None  # a padding token, where the config class's default one lies outside a tiny vocabulary
    kv: dict = field(default_factory=dict)  # more metadata, keys without the architecture prefix


ARCHS = {
    "llama": Arch("tiny-llama-test"),
    "qwen2": Arch("tiny-qwen2-test", vocab="bpe", biases=("attn_q", "attn_k", "attn_v"), tied=True),
    "qwen3": Arch("tiny-qwen3-test", n_head=2, n_head_kv=1, head_dim=128, vocab="bpe", qk_norm=True),
    "gemma2": Arch(
        "tiny-gemma2-test", n_head=2, n_head_kv=1, head_dim=256, space_prefix=False, sandwich_norms=True, tied=True,
        kv={"attention.sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    # six layers: gemma3 makes every sixth layer global, the others sliding-window with RoPE base 10000
    "gemma3": Arch(
        "tiny-gemma3-test", n_layer=6, n_head=2, n_head_kv=1, head_dim=256, rope_base=1e6, space_prefix=False,
        qk_norm=True, sandwich_norms=True, tied=True, kv={"attention.sliding_window": 8},
    ),
    # not named *phi3*: llama.cpp would then look for Phi-3's <|endoftext|> token in the vocabulary
    "phi3": Arch("tiny-phi-test", fused=True, pad_id=0),
    "starcoder2": Arch(
        "tiny-starcoder2-test", vocab="bpe", biases=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"),
        layer_norm=True, gated=False, tied=True,
    ),
    # Gemma 1: llama.cpp runs it, transformers' GGUF loader has no mapping for it
    "gemma": Arch("tiny-gemma-test", space_prefix=False, tied=True),
}


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    pieces = ["▁"] + [f"▁{c}" for c in _CHARS] + _CHARS
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# a few merges, so that the BPE merge loop runs: a space joins the letter after it, then common pairs
_MERGES = [("Ġ", c) for c in "abcdefghijklmnopqrstuvwxyz"] + [("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("-", ">")]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_chars() + ["".join(m) for m in _MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 3
    return tokens, [int(t) for t in types], [" ".join(m) for m in _MERGES]


def _add_tokenizer(writer: gguf.GGUFWriter, kind: str) -> int:
    if kind == "spm":
        tokens, scores, types = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
    else:  # as Qwen's files: no BOS token added, <|endoftext|> ends
        tokens, types, merges = bpe_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    return len(tokens)


def write_tiny_model(arch: str, path: str | Path, seed: int = 0, n_layer: int | None = None) -> Path:
    """A random-weight f32 GGUF of architecture `arch` (a key of ARCHS) at `path`."""
    if arch not in ARCHS:
        raise ValueError(f"no tiny model for architecture {arch!r}; there are: {', '.join(ARCHS)}")
    a = ARCHS[arch]
    n_layer = n_layer or a.n_layer
    path = Path(path)
    rng = np.random.default_rng(seed)
    q_width, kv_width = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
    widths = {"attn_q": q_width, "attn_k": kv_width, "attn_v": kv_width, "attn_output": N_EMBD, "ffn_up": N_FF, "ffn_down": N_EMBD}

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n=N_EMBD):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(a.name)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(a.n_head)
    writer.add_head_count_kv(a.n_head_kv)
    if a.head_dim != N_EMBD // a.n_head:
        writer.add_key_length(a.head_dim)
        writer.add_value_length(a.head_dim)
    writer.add_rope_dimension_count(a.head_dim)
    writer.add_rope_freq_base(a.rope_base)
    if a.layer_norm:
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-5)
    for key, value in a.kv.items():
        if isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", value)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_vocab = _add_tokenizer(writer, a.vocab)
    if not a.space_prefix:
        writer.add_add_space_prefix(False)
    if a.pad_id is not None:
        writer.add_pad_token_id(a.pad_id)

    # a tied embedding also unembeds, so it gets the output matrix's scale; the others keep unit rows
    writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD, scale=1.0 / np.sqrt(N_EMBD) if a.tied else 1.0))
    for i in range(n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", norm())
        q, k, v = w(q_width, N_EMBD), w(kv_width, N_EMBD), w(kv_width, N_EMBD)
        if a.fused:
            writer.add_tensor(f"{blk}.attn_qkv.weight", np.concatenate([q, k, v]))
        else:
            writer.add_tensor(f"{blk}.attn_q.weight", q)
            writer.add_tensor(f"{blk}.attn_k.weight", k)
            writer.add_tensor(f"{blk}.attn_v.weight", v)
        writer.add_tensor(f"{blk}.attn_output.weight", w(N_EMBD, q_width))
        writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
        if not a.gated:
            writer.add_tensor(f"{blk}.ffn_up.weight", w(N_FF, N_EMBD))
        elif a.fused:
            gate, up = w(N_FF, N_EMBD), w(N_FF, N_EMBD)
            writer.add_tensor(f"{blk}.ffn_up.weight", np.concatenate([gate, up]))
        else:
            writer.add_tensor(f"{blk}.ffn_gate.weight", w(N_FF, N_EMBD))
            writer.add_tensor(f"{blk}.ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", w(N_EMBD, N_FF))
        for name in a.biases:
            writer.add_tensor(f"{blk}.{name}.bias", w(widths[name], scale=0.1))
        if a.layer_norm:
            writer.add_tensor(f"{blk}.attn_norm.bias", w(N_EMBD, scale=0.1))
            writer.add_tensor(f"{blk}.ffn_norm.bias", w(N_EMBD, scale=0.1))
        if a.qk_norm:
            writer.add_tensor(f"{blk}.attn_q_norm.weight", norm(a.head_dim))
            writer.add_tensor(f"{blk}.attn_k_norm.weight", norm(a.head_dim))
        if a.sandwich_norms:
            writer.add_tensor(f"{blk}.post_attention_norm.weight", norm())
            writer.add_tensor(f"{blk}.post_ffw_norm.weight", norm())
    writer.add_tensor("output_norm.weight", norm())
    if a.layer_norm:
        writer.add_tensor("output_norm.bias", w(N_EMBD, scale=0.1))
    if not a.tied:
        writer.add_tensor("output.weight", w(n_vocab, N_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
