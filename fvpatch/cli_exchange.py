"""`fvpatch export` and `fvpatch import`: vectors to and from llama.cpp control-vector GGUF files."""

import os
from pathlib import Path

import click

from fvpatch import controlvector, vectorfile
from fvpatch.atomic import check_outputs, together
from fvpatch.cli import FiniteFloat, emit, load_vector, main
from fvpatch.errors import FvpatchError


@main.command("export")
@click.argument("sources", nargs=-1, required=True, metavar="VECTOR...")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True, help="Output format: llama.cpp's control-vector GGUF.")
@click.option("--scale", "scales", type=FiniteFloat(), multiple=True, help="Scale of each VECTOR, in order (default: each file's own scale).")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def export_cmd(sources, out, fmt, scales, force):
    """Export vectors as a llama.cpp control vector (GGUF), for `llama-completion` / `llama-server --control-vector`.

    VECTOR is a vector file, a shipped vector's name (MODEL/NAME where several models ship one), or one
    relation of a bank as BANK#RELATION. Vectors for the same layer are summed after scaling. Only an
    added residual vector (l_out-N, N >= 1, mode add) can be a control vector, and llama.cpp adds it at
    EVERY token, prompt and generated, where fvpatch adds a function vector at the last prompt token and
    the generated ones: the README's positions table says what that costs each shipped vector, and for
    any other vector the note on stderr gives the `fvpatch import` and `fvpatch eval task` commands that
    measure it.

    \b
    Example:
      fvpatch export gemma-3-270m/antonym.ffv antonym.gguf
      llama-completion -m models/gemma-3-270m-q4_k_m.gguf --control-vector antonym.gguf -p "Q: hot" -n 3 --temp 0 -no-cnv
    """
    if scales and len(scales) != len(sources):
        raise click.UsageError(f"give one --scale per VECTOR ({len(sources)}), or none")
    _not_an_input(out, [s.rpartition("#")[0] if "#" in s and not Path(s).exists() else s for s in sources])
    check_outputs([out], force)
    loaded = [load_vector(s) for s in sources]
    items = [(vf, scales[i] if scales else vf.scale, sources[i]) for i, vf in enumerate(loaded)]
    cv = controlvector.from_vectors(items)
    for vf, _, origin in items:
        note = position_note(vf, origin, out if len(items) == 1 else None)
        if note:
            click.echo(note, err=True)
    controlvector.save(cv, out, overwrite=force)
    layers = ", ".join(f"l_out-{n}" for n in cv.directions)
    click.echo(f"{out}: control vector for {cv.model_hint or 'a model the vector does not record'}, {layers}; use: llama-completion -m MODEL --control-vector {out} -p PROMPT -n 8 --temp 0 -no-cnv (or llama-server --control-vector {out}, with --swa-full on Gemma)")


def position_note(vf: vectorfile.VectorFile, origin: str, control_vector: str | None) -> str | None:
    """The note `export` and `vectors pack` print for a vector made for the last prompt token, which a control vector
    adds at every token: what that costs where it was measured, else the commands that measure it, for any vector.
    `control_vector`: the GGUF that holds this vector alone; None when it is summed with others (the commands export
    it alone first). None for a vector made for every token."""
    from fvpatch.card import TASK_HINT, every_token_commands, gguf_name, task_arg

    if vf.meta.get("fvpatch.apply_at", "last") == "all":
        return None
    head = f"note: {origin} was made to be added at the last prompt token; a control vector adds it at every token"
    counts = vectorfile.positions_top1(vf.meta)
    if counts is not None:
        n, last, every = counts["n"], counts["last"], counts["all"]
        return f"{head} (held-out top-1 on {n} test pairs: {last / n:.0%} at the last token, {every / n:.0%} at every token)"
    alone = control_vector or gguf_name(origin)
    commands = every_token_commands(vf, alone, export=None if control_vector else origin)  # a bank's relation names its task
    hint = f" {TASK_HINT}" if task_arg(vf) is None else ""
    return f"{head}, where its accuracy has not been measured; to measure it: {' && '.join(commands)}{hint}"


@main.command("import")
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path())
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help="The model the control vector is for (default: the one an fvpatch export records, else gemma-3-270m).")
@click.option("--layer", type=click.IntRange(min=1), default=None, help="Import only this block's direction.")
@click.option("--force", is_flag=True, help="Overwrite existing files; stamp a file whose model_hint names another architecture for the default model anyway.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def import_cmd(source, out, model, layer, force, as_json):
    """Import a llama.cpp control vector (GGUF, from fvpatch, repeng or llama-cvector-generator) as vector files.

    Each `direction.N` becomes an add-mode vector for l_out-N, applied at every token (metadata
    `fvpatch.apply_at = all`), as llama.cpp applies it. Where the writer measured it differs: repeng at
    l_out-N, llama-cvector-generator at l_out-(N-1); the file's metadata records which writer it looks
    like. OUT is a file for one direction, else a folder that gets `l_out-N.safetensors` per direction (OUT
    ending in / is a folder even for one direction). A foreign file is stamped for --model; one whose
    model_hint names another architecture than the default model's is refused without --model or --force.

    \b
    Example:
      fvpatch import antonym.gguf antonym-all.safetensors
      fvpatch patch -p $'Q: hot\\nA:' --vector antonym-all.safetensors -n 3
    """
    cv = controlvector.load(source)
    files = controlvector.to_vector_files(cv, Path(source).name)
    if layer is not None:
        if layer not in files:
            raise FvpatchError(f"{source} has no direction for block {layer} (it has {', '.join(map(str, files))})")
        files = {layer: files[layer]}
    if not cv.model or model is not None:
        _stamp(files, cv, model, source, force)
    folder = len(files) > 1 or out.endswith(("/", os.sep)) or Path(out).is_dir()
    targets = {n: Path(out) / f"l_out-{n}.safetensors" if folder else Path(out) for n in files}
    for target in targets.values():
        _not_an_input(target, [source])
    check_outputs(targets.values(), force)
    with together():
        for n, vf in files.items():
            vectorfile.save(vf, targets[n], overwrite=force)
    emit(as_json, {"source": source, "writer": cv.writer, "files": {f"l_out-{n}": str(p) for n, p in targets.items()}},
         [f"{source} ({cv.writer}): l_out-{n} -> {p}" for n, p in targets.items()])


def _not_an_input(out, inputs: list):
    """--force overwrites an output, never an input it is reading: the same path both ways would destroy it."""
    for path in inputs:
        if Path(path).exists() and Path(out).exists() and Path(path).resolve() == Path(out).resolve():
            raise FvpatchError(f"{out} is also an input; write the result to another file")


def _stamp(files: dict[int, vectorfile.VectorFile], cv: controlvector.ControlVector, model: str | None, source: str, force: bool):
    """Record the model a foreign control vector is for, refusing one of another width or depth, and one that says it
    is for another architecture unless the user named the model or forced it."""
    from fvpatch.modelfile import ModelFile
    from fvpatch.models import resolve_model

    with ModelFile(resolve_model(model), vocab_only=True) as mf:
        fp = mf.fingerprint()
    if cv.model_hint and cv.model_hint != fp["arch"] and model is None and not force:
        raise FvpatchError(f"{source} says it is for a {cv.model_hint!r} model, not the default {fp['file']} ({fp['arch']}); "
                           f"give its model with --model, or pass --force to stamp it for {fp['file']} anyway")
    if cv.n_embd != int(fp["n_embd"]):
        fix = "give its model with --model" if model is None else f"it was not made for {model}"
        raise FvpatchError(f"{source}: directions of width {cv.n_embd}, but {fp['file']} has width {fp['n_embd']}; {fix}")
    if max(cv.directions) >= int(fp["n_layer"]):
        raise FvpatchError(f"{source}: a direction for block {max(cv.directions)}, but {fp['file']} has blocks 0..{int(fp['n_layer']) - 1}")
    if cv.model_hint and cv.model_hint != fp["arch"]:
        click.echo(f"note: {source} says it is for a {cv.model_hint!r} model; stamped for {fp['file']} ({fp['arch']})", err=True)
    for vf in files.values():
        vf.model = dict(fp)

