"""Read and write the residual stream and the attention heads of a transformers decoder with forward hooks.

Layer L is the output of decoder block L, llama.cpp's `l_out-L`. Everything is batched: `positions` is
an int or a LongTensor (batch,) naming one token index per row, counted from the start of the row, so
with right padding it equals llama.cpp's absolute position. Head values are the attention output at the
input of o_proj, llama.cpp's `kqv_out-L`, viewed as (n_head, head_dim). A record at the layer a patch
writes sees the model's own value, before the patch, whichever context was entered first, as the
runtime's saves do.

The layers are found from the module structure (`model.model.layers`, each with a `self_attn.o_proj`
Linear), which Llama, Gemma 3 and most decoder-only models in transformers share.
"""

from contextlib import contextmanager

import torch
from torch import nn

from fvpatch.vectorfile import MODES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers (a non-empty nn.ModuleList); this architecture is not supported")
    for i, layer in enumerate(layers):
        if not isinstance(getattr(getattr(layer, "self_attn", None), "o_proj", None), nn.Linear):
            raise ValueError(f"decoder layer {i} of {type(model).__name__} has no self_attn.o_proj nn.Linear; this architecture is not supported")
    return layers


def decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} is outside this model's {len(layers)} layers (0..{len(layers) - 1})")
    return layers[layer]


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(n_head, head_dim) of the attention output that enters o_proj."""
    n_head = model.config.num_attention_heads
    width = decoder_layers(model)[0].self_attn.o_proj.in_features
    if width % n_head:
        raise ValueError(f"o_proj takes {width} features, not a multiple of the {n_head} attention heads")
    return n_head, width // n_head


def _rows_and_positions(positions: int | torch.Tensor, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.as_tensor(positions, dtype=torch.long, device=device)
    if pos.dim() == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise ValueError(f"positions must be an int or a LongTensor of shape ({batch},), got shape {tuple(pos.shape)}")
    pos = torch.where(pos < 0, pos + seq, pos)
    if bool(((pos < 0) | (pos >= seq)).any()):
        raise IndexError(f"token positions {pos.tolist()} are outside the sequence of {seq} tokens (0..{seq - 1}; use batch()'s last_index for the last real token)")
    return torch.arange(batch, device=device), pos


def _hidden(output):
    # decoder layers return the hidden states alone or first in a tuple, depending on the model
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_residual(model: nn.Module, layers: list[int]):
    """Yields {layer: Tensor(batch, seq, d)}, filled during the forward with each block's output."""
    out: dict[int, torch.Tensor] = {}

    def hook(layer):
        return lambda module, args, output: out.__setitem__(layer, _hidden(output))

    with _hooks([decoder_layer(model, L).register_forward_hook(hook(L), prepend=True) for L in layers]):
        yield out


def patch_output(output, positions, vector: torch.Tensor, mode: str = "add", scale: float = 1.0):
    """A decoder block's output with `vector` (d,) or (batch, d) added at, or put in place of, one token per
    row (`positions`; negative counts from the end of the sequence), or added at every token (None)."""
    if mode not in MODES:
        raise ValueError(f"patch mode must be one of {MODES}, got {mode!r}")
    if positions is None and mode != "add":
        raise ValueError("a vector patched at every token must be added, not put in place of the residual")
    h = _hidden(output)
    v = vector.to(h.device, h.dtype)
    if v.shape not in ((h.shape[-1],), (h.shape[0], h.shape[-1])):
        raise ValueError(f"vector must have shape ({h.shape[-1]},) or ({h.shape[0]}, {h.shape[-1]}), got {tuple(v.shape)}")
    v = v.expand(h.shape[0], -1) * scale
    if positions is None:
        return _with_hidden(output, h + v[:, None, :])
    rows, pos = _rows_and_positions(positions, h.shape[0], h.shape[1], h.device)
    if mode == "add":
        v = h[rows, pos] + v
    h = h.clone()  # the block's own output may be needed by autograd
    h[rows, pos] = v
    return _with_hidden(output, h)


@contextmanager
def patch_residual(model: nn.Module, layer: int, positions, vector: torch.Tensor, mode: str = "add", scale: float = 1.0):
    """Patch block `layer`'s output in every forward inside the block (see patch_output). Differentiable with
    respect to `vector`."""
    if mode not in MODES:
        raise ValueError(f"patch mode must be one of {MODES}, got {mode!r}")
    hook = lambda module, args, output: patch_output(output, positions, vector, mode, scale)  # noqa: E731
    with _hooks([decoder_layer(model, layer).register_forward_hook(hook)]):
        yield


@contextmanager
def record_heads(model: nn.Module, layers: list[int]):
    """Yields {layer: Tensor(batch, seq, n_head, head_dim)}: each head's output at the input of o_proj."""
    n_head, head_dim = head_shape(model)
    out: dict[int, torch.Tensor] = {}

    def hook(layer):
        return lambda module, args: out.__setitem__(layer, args[0].unflatten(-1, (n_head, head_dim)))

    with _hooks([decoder_layer(model, L).self_attn.o_proj.register_forward_pre_hook(hook(L), prepend=True) for L in layers]):
        yield out


@contextmanager
def patch_heads(model: nn.Module, layer: int, positions, head_values: torch.Tensor, mask: torch.Tensor):
    """Put head_values (batch, n_head, head_dim) in place of the heads that mask (batch, n_head) selects,
    at one token per row, so one forward can patch a different head in each row."""
    n_head, head_dim = head_shape(model)

    def hook(module, args):
        x = args[0]
        rows, pos = _rows_and_positions(positions, x.shape[0], x.shape[1], x.device)
        values = head_values.to(x.device, x.dtype)
        keep = mask.to(x.device)
        if values.shape != (x.shape[0], n_head, head_dim) or keep.shape != (x.shape[0], n_head):
            raise ValueError(
                f"head_values must have shape ({x.shape[0]}, {n_head}, {head_dim}) and mask ({x.shape[0]}, {n_head}); "
                f"got {tuple(values.shape)} and {tuple(keep.shape)}"
            )
        heads = x.unflatten(-1, (n_head, head_dim)).clone()
        heads[rows, pos] = torch.where(keep[..., None].bool(), values, heads[rows, pos])
        return (heads.flatten(-2), *args[1:])

    with _hooks([decoder_layer(model, layer).self_attn.o_proj.register_forward_pre_hook(hook)]):
        yield


def head_to_residual(model: nn.Module, layer: int, head: int, value: torch.Tensor) -> torch.Tensor:
    """A head's output (head_dim,) through its slice of o_proj: its share of the attention output (d,).

    On Llama this is exactly what the head adds to the residual stream; Gemma 3 still applies its
    post-attention norm to the sum of all heads before adding it."""
    n_head, head_dim = head_shape(model)
    if not 0 <= head < n_head:
        raise IndexError(f"head {head} is outside this model's {n_head} heads (0..{n_head - 1})")
    w = decoder_layer(model, layer).self_attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim]
    return w @ value.to(w.device, w.dtype)
