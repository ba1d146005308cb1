"""`fvpatch inspect`, `lens`, `decode`, `tokenize` and `tensors`: look at vector files, at what layers predict, at a
prompt's tokens and at the graph's tensors."""

import click
import numpy as np

from fvpatch import vectorfile
from fvpatch.bank import relation_names
from fvpatch.atomic import check_outputs
from fvpatch.errors import FvpatchError
from fvpatch.cli import (INT32_MAX, MODEL_HELP, check_layer, emit, file_row, fits, load_vector, main, model_options, open_session, parse_layers,
                         prompt_option, vector_path)
from fvpatch.lens import Lens, check_residual, decode_vector, logit_lens, plot_lens, token_label
from fvpatch.modelfile import ModelFile
from fvpatch.models import resolve_model
from fvpatch.session import Session
from fvpatch.unembed import load_unembed


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(file, as_json):
    """Show a vector file's metadata and the norm of each row.

    \b
    Example:
      fvpatch inspect capital.safetensors
    """
    vf = vectorfile.load(vector_path(file))
    norms = [round(float(n), 4) for n in np.linalg.norm(vf.rows.astype(np.float64), axis=1)]  # float32 squares overflow past 1.8e19
    payload = {"tensor": vf.tensor, "layer": vf.layer, "shape": list(vf.rows.shape), "dtype": vf.dtype, "positions": vf.positions,
               "row_norms": norms, "mode": vf.mode, "scale": vf.scale, "model": vf.model, "meta": vf.meta}
    lines = [f"tensor    {vf.tensor}  (layer {vf.layer}, {vf.rows.shape[0]} rows x {vf.width}, stored as {vf.dtype}, read as float32)",
             f"mode      {vf.mode}, scale {vf.scale}",
             f"model     {vf.model.get('name') or vf.model.get('arch')}  {vf.model.get('quant', '')}  {vf.model.get('file')}  vocab {vf.model.get('vocab', '?')}"]
    lines += [f"{k:<9} {short(str(v))}" for k, v in vf.meta.items()]
    labels = bank_names(vf, file) or [f"{pos:>4}" for pos in vf.positions]
    width = max(len(label) for label in labels)
    lines += [f"row {label:<{width}}  norm {n}" for label, n in zip(labels, norms)]
    emit(as_json, payload, lines)


def bank_names(vf: vectorfile.VectorFile, path: str) -> list[str] | None:
    """A bank's relation names, one per row (its rows all sit at one token), or None for another file."""
    try:
        names = relation_names(vf, path)
    except FvpatchError:  # inspect shows a damaged bank too
        return None
    return names if names and len(names) == len(vf.rows) else None


def short(text: str, most: int = 160) -> str:
    """A metadata value as one readable line: a bank's pairs or map run to kilobytes."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters; --json shows all)"


def lens_lines(lens: Lens, s: Session) -> list[str]:
    """One layer or one position: a line per position or layer with its top-k. Otherwise a grid of top-1 tokens."""
    pos_label = [f"{p:>4} {s.piece_text(lens.tokens[p], special=True)!r:<12}" for p in lens.positions]
    topk = lambda i, j: "  ".join(f"{s.piece_text(t, special=True)!r} {z:.1f}" for t, z in zip(lens.ids[i, j], lens.logits[i, j]))
    if len(lens.layers) == 1:
        return [f"{lens.tensor}-{lens.layers[0]}, top {lens.ids.shape[2]} tokens (logit) at each position:"] + [
            f"{pos_label[j]} {topk(0, j)}" for j in range(len(lens.positions))]
    if len(lens.positions) == 1:
        return [f"position {pos_label[0].strip()}, top {lens.ids.shape[2]} tokens (logit) of {lens.tensor} at each layer:"] + [
            f"layer {L:>3}  {topk(i, 0)}" for i, L in enumerate(lens.layers)]
    lines = [f"top-1 token of {lens.tensor} (rows: prompt positions, columns: layers)",
             " " * 18 + "".join(f"{L:>10}" for L in lens.layers)]
    lines += [pos_label[j] + " " + "".join(f"{token_label(s, lens.ids[i, j, 0], 9):>10}" for i in range(len(lens.layers))) for j in range(len(lens.positions))]
    return lines


@main.command()
@model_options
@prompt_option
@click.option("--tensor", default="l_out", show_default=True, help="Graph tensor base name of residual width (l_out, ffn_out, attn_out or attn_post_norm, ...).")
@click.option("--layer", "layer_spec", default="all", show_default=True, help="N, N,M,..., A-B or all.")
@click.option("--token-idx", type=int, multiple=True, help="Prompt positions to read (default: all). Repeatable.")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Tokens per cell, where one layer or one position is shown, and in --json; the grid of several of each shows the top-1.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Also draw a layers x positions heatmap of the top-1 token (needs matplotlib).")
@click.option("--force", is_flag=True, help="Overwrite the --png file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def lens(model, n_ctx, n_gpu_layers, prompt, tensor, layer_spec, token_idx, top, png, force, as_json):
    """Logit lens: the tokens each layer's residual stream already predicts, through the final norm and unembedding.

    \b
    Examples:
      fvpatch lens -p "1 2 3 to 3 2 1, 5 6 7 to 7" --png lens.png
      fvpatch lens -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->" --token-idx -1 --top 5
    """
    if force and not png:
        raise click.UsageError("--force overwrites the --png file; give --png FILE or leave --force out")
    check_outputs([png], force)
    with open_session(model, n_ctx, n_gpu_layers) as s:
        result = logit_lens(s, prompt, tensor, parse_layers(layer_spec, s.n_layer), list(token_idx) or None, top)
        if png:
            plot_lens(result, s, png, title=f"logit lens of {tensor}: {prompt!r}")
        cells = [[[{"token": s.piece_text(t, special=True), "id": int(t), "logit": round(float(z), 3), "p": round(float(p), 4)}
                   for t, z, p in zip(result.ids[i, j], result.logits[i, j], result.probs[i, j])]
                  for j in range(len(result.positions))] for i in range(len(result.layers))]
        payload = {"prompt": prompt, "tensor": tensor, "layers": result.layers,
                   "positions": [{"index": p, "piece": s.piece_text(result.tokens[p], special=True)} for p in result.positions], "top": cells}
        emit(as_json, payload, lens_lines(result, s) + ([f"heatmap -> {png}"] if png else []))


@main.command()
@model_options
@click.argument("vector", metavar="NAME|FILE|BANK#RELATION")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Tokens to show.")
@click.option("--token-idx", type=int, default=None, help="Which saved row of the file (default: its only row).")
@click.option("--against", default=None, metavar="NAME|FILE", help="Show the tokens VECTOR promotes more than this vector does.")
@click.option("--against-token-idx", type=int, default=None, help="Which saved row of the --against file (default: its only row).")
@click.option("--force", is_flag=True, help="Decode a vector made on another model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def decode(model, n_ctx, n_gpu_layers, vector, top, token_idx, against, against_token_idx, force, as_json):
    """The tokens a saved vector promotes: the vector through the model's final norm and unembedding.

    \b
    Examples:
      fvpatch decode capital.safetensors --top 20
      fvpatch decode capital.safetensors --against other.safetensors
    """
    if against_token_idx is not None and against is None:
        raise click.UsageError("--against-token-idx picks a row of the --against vector; give --against NAME|FILE too")
    with ModelFile(resolve_model(model), vocab_only=True) as mf:
        fp = mf.fingerprint()
        rows = []
        for path, idx, option in [(vector, token_idx, "--token-idx")] + ([(against, against_token_idx, "--against-token-idx")] if against else []):
            vf = load_vector(path, fp)
            fits(path, vf.model, fp, force)
            try:
                check_residual(vf.tensor, vf.width, mf.n_embd)
            except FvpatchError as e:
                raise FvpatchError(f"{path}: {e}") from None
            rows.append(file_row(path, vf, idx, option))
            if not rows[-1].any():  # the final norm leaves it zero: every logit 0, the order of the ties arbitrary
                raise FvpatchError(f"{path}: the row is all zeros, which promotes no token")
        if against and np.array_equal(rows[0], rows[1]):
            raise FvpatchError(f"{vector} and {against} hold the same row: their difference promotes no token")
        ids, logits = decode_vector(load_unembed(mf.path), rows[0], top, rows[1] if against else None)
        toks = [{"token": mf.piece_text(t, special=True), "id": int(t), "logit": round(float(z), 3)} for t, z in zip(ids, logits)]
        what = "logit difference" if against else "logit"
        emit(as_json, {"vector": vector, "against": against, "top": toks},
             [f"{t['token']!r:<20} {t['logit']:>8.2f}" for t in toks] + [f"({what}; {len(toks)} tokens)"])


@main.command()
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)
@prompt_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def tokenize(model, prompt, as_json):
    """Show the prompt's tokens with the absolute indices that --token-idx and --to-token-idx take (a
    control token such as BOS by its text, <bos>). Only the vocabulary is read, not the weights.

    \b
    Example:
      fvpatch tokenize -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->"
    """
    with ModelFile(resolve_model(model), vocab_only=True) as mf:
        toks = mf.tokenize(prompt)
        n = len(toks)
        rows = [{"index": i, "from_end": i - n, "id": t, "piece": mf.piece_text(t, special=True)} for i, t in enumerate(toks)]
        emit(as_json, {"tokens": rows}, [f"{r['index']:>4} {r['from_end']:>5}  {r['id']:>7}  {r['piece']!r}" for r in rows])


@main.command()
@model_options
@click.option("--layer", type=click.IntRange(0, INT32_MAX), default=None, help="Only the tensors of this layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def tensors(model, n_ctx, n_gpu_layers, layer, as_json):
    """List the graph tensor names a decode computes, in order, with their row width: the names --save and
    --patch accept, and the length a vector for each must have (the residual stream's is the model's width).
    A tensor shown without a width cannot be saved or patched: it is not one row per token (a per-head view),
    or several nodes share its name.

    \b
    Example:
      fvpatch tensors --layer 0
    """
    # The names and widths do not depend on the context, which llama.cpp makes 256 tokens at the least anyway; but its
    # batch shrinks with a smaller --n-ctx, and a batch of 1 token cannot tell a one-head view from a row
    with open_session(model, max(n_ctx, 256), n_gpu_layers) as s:
        check_layer(layer, s.n_layer)
        widths = s.graph_tensors()
    if layer is not None:
        widths = {n: w for n, w in widths.items() if n.endswith(f"-{layer}")}
    emit(as_json, {"tensors": list(widths), "widths": widths},
         [f"{n:<24} {'- (not one row per token, or a name several nodes share)' if w is None else w}" for n, w in widths.items()])
