"""Logit lens and vector decoding: read residual-stream rows as if they were the model's last layer.

A row of a residual-stream tensor (l_out, ffn_out, attn_out / attn_post_norm, ...) goes through the
model's own final RMSNorm and unembedding (fvpatch.unembed), giving the tokens it promotes. Attention
tensors before the output projection (kqv_out, Qcur, ...) are refused, as is any row not n_embd wide:
kqv_out's projection into the residual stream is a graph tensor of its own in most graphs (attn_out in llama,
attn_post_norm in gemma3; qwen2 names none), which the lens reads directly, so fvpatch never re-implements that step.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvpatch.atomic import write_figure
from fvpatch.errors import FvpatchError
from fvpatch.names import layer_of, layered
from fvpatch.modelfile import ModelFile
from fvpatch.session import Save, Session
from fvpatch.unembed import Unembed, load_unembed, top_of

HEAD_SPACE = ("Qcur", "Kcur", "Vcur", "Qcur_normed", "Kcur_normed", "kqv_out")  # before the attention output projection


@dataclass
class Lens:
    tensor: str  # base name, e.g. "l_out"
    layers: list[int]
    positions: list[int]  # absolute prompt positions
    tokens: list[int]  # the prompt's tokens
    ids: np.ndarray  # (n_layers, n_positions, top) token ids, best first
    logits: np.ndarray  # (n_layers, n_positions, top) their logits
    probs: np.ndarray  # (n_layers, n_positions, top) their softmax probability over the whole vocabulary


def logit_lens(
    session: Session,
    prompt: str | list[int],
    tensor: str = "l_out",
    layers: list[int] | None = None,
    positions: list[int] | None = None,
    top: int = 5,
    unembed: Unembed | None = None,
) -> Lens:
    """Top-`top` tokens of `tensor` at each of `layers` (default: all) and prompt `positions` (default: all)."""
    if layer_of(tensor) is not None:
        raise FvpatchError(f"give the tensor's base name ({tensor.rsplit('-', 1)[0]!r}) and choose layers separately")
    if tensor in HEAD_SPACE:
        raise FvpatchError(_head_space_error(session, tensor))
    layers = list(range(session.n_layer)) if layers is None else list(layers)
    n = len(session.tokenize(prompt) if isinstance(prompt, str) else prompt)
    if positions is None:
        positions = list(range(n))
    else:
        asked, positions = positions, [session.resolve_position(p, n) for p in positions]
        for i, pos in enumerate(positions):
            if pos in positions[:i]:  # one row saved for both would not fill the grid
                raise FvpatchError(f"token indices {asked[positions.index(pos)]} and {asked[i]} both name position {pos}; give each position once")
    unembed = unembed or load_unembed(session.path)
    names = [layered(tensor, L) for L in layers]
    r = session.run(prompt, saves=[Save(name, tuple(positions)) for name in names])
    check_residual(tensor, r.saved[names[0]].shape[1], session.n_embd)
    rows = np.concatenate([r.saved[name] for name in names])
    ids, logits, probs = unembed.top(rows, top)
    shape = (len(layers), len(positions), ids.shape[1])
    return Lens(tensor, layers, positions, r.prompt_tokens, ids.reshape(shape), logits.reshape(shape), probs.reshape(shape))


def check_residual(tensor: str, width: int, n_embd: int):
    """Refuse rows the unembedding cannot read: an attention-head tensor's (even where the widths agree), or any row
    that is not the residual width."""
    base = tensor.rsplit("-", 1)[0] if layer_of(tensor) is not None else tensor
    if base in HEAD_SPACE:
        raise FvpatchError(f"{tensor} rows live in the attention heads' space, not the residual stream, even where the widths agree; "
                           f"the lens and decode read residual-stream tensors such as l_out and ffn_out")
    if width != n_embd:
        raise FvpatchError(f"{tensor} rows are {width} wide, not the residual width {n_embd} that the unembedding takes; "
                           f"the lens and decode read residual-stream tensors such as l_out and ffn_out")


def _head_space_error(session: Session, tensor: str) -> str:
    msg = (f"{tensor} rows live in the attention heads' space, not the residual stream, even where the widths agree; "
           f"the lens reads residual-stream tensors such as l_out and ffn_out")
    if tensor == "kqv_out":
        # the next named tensor of the layer is the output projection where the graph names it (attn_out in llama,
        # attn_post_norm in gemma2/3); qwen2 names none, and its next one is ffn_inp, the residual with the attention added
        try:
            graph = list(session.graph_tensors())
        except FvpatchError:  # a context too small to list the graph: the refusal stands without the hint
            return msg
        name = layered(tensor, 0)
        after = [t for t in graph[graph.index(name) + 1 :] if layer_of(t) == 0]
        base = after[0].rsplit("-", 1)[0] if after else None
        if base in ("attn_out", "attn_post_norm"):
            msg += f"; its projection into the residual stream is {base!r} (e.g. {after[0]})"
        elif base == "ffn_inp":
            msg += "; this graph names no tensor for its projection, and 'ffn_inp' is the residual stream with the attention added"
    return msg


def decode_vector(unembed: Unembed, vector: np.ndarray, top: int = 20, against: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `top` tokens a residual-width vector promotes: (ids, logits), best first.

    With `against`, each vector goes through the final norm on its own and the ranking is of the
    difference of their logits, i.e. the tokens `vector` promotes more than `against` does. Normalizing
    each first compares directions, not sizes: a patched vector's scale is a separate knob.
    """
    z = unembed.logits(unembed.normalize(vector))
    if against is not None:
        z = z - unembed.logits(unembed.normalize(against))
    ids, logits = top_of(z, top)
    return ids[0], logits[0]


def plot_lens(lens: Lens, model: ModelFile, path: str | Path, title: str = ""):
    """Heatmap of the top-1 token's probability, layers x positions, each cell labelled with that token."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FvpatchError("the lens heatmap needs matplotlib: pip install matplotlib (or the [train] extra)") from None
    n_layers, n_pos = len(lens.layers), len(lens.positions)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_pos, 1.2 + 0.32 * n_layers))
    im = ax.imshow(lens.probs[:, :, 0], cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    top1 = lens.ids[:, :, 0]
    for i in range(n_layers):
        for j in range(n_pos):
            p = lens.probs[i, j, 0]
            ax.text(j, i, token_label(model, top1[i, j]), ha="center", va="center", fontsize=7, color="white" if p > 0.6 else "black")
    ax.set_yticks(range(n_layers), [str(L) for L in lens.layers], fontsize=7)
    ax.set_xticks(range(n_pos), [token_label(model, lens.tokens[p]) for p in lens.positions], fontsize=8)
    ax.set_ylabel(f"{lens.tensor} layer")
    ax.set_xlabel("prompt token (the cell shows the top prediction for the next token)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 probability", fraction=0.03, pad=0.01)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing from font")  # CJK and other scripts DejaVu lacks
        fig.tight_layout()
        write_figure(fig, path, dpi=130)
    plt.close(fig)


def token_label(model: ModelFile, token: int, width: int = 8) -> str:
    """A token as a short visible label: spaces and newlines shown, long pieces cut."""
    s = model.piece_text(token, special=True).replace("\n", "\\n").replace(" ", "␣")
    return s if len(s) <= width else s[: width - 1] + "…"
