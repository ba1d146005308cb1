"""Model cards for vector files: what a vector does, what it was made on and from, how well it works, and how
to run it with fvpatch, PyTorch and llama.cpp, all from the file's own metadata."""

import json
import re
import shlex
from pathlib import Path

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import check_outputs, write_text
from fvpatch.bank import NAMES_KEY, relation_names
from fvpatch.cfvmap import MAP_KEYS
from fvpatch.errors import FvpatchError
from fvpatch.models import KNOWN
from fvpatch.prompts import template
from fvpatch.tasks import is_vendored

DATA_SOURCE = ("the relation pairs of Todd et al., *Function Vectors in Large Language Models* (ICLR 2024), "
               "github.com/ericwtodd/function_vectors, MIT licence, vendored in fvpatch")
# fvpatch is not on PyPI: how a card's reader gets it (README: "Installed, not checked out")
INSTALL = ("not published on PyPI: `pip install .` in a checkout of fvpatch's source, `pip install '.[train]'` for the PyTorch "
           "example too, or its wheel as fvpatch's README says; a model fvpatch knows is fetched on first use")
PLACEHOLDER = "<your input>"  # the example input of a card whose file records none
KIND_SUFFIXES = (".ffv-all", ".ffv", ".fv", ".taskvec", ".bank", ".cfv")  # shipped files are named <task><kind>.safetensors
PAIR_FILES = (".json", ".jsonl", ".csv")


def _known(vf: vectorfile.VectorFile):
    return next((m for m in KNOWN.values() if m.file == vf.model.get("file")), None)


def model_arg(vf: vectorfile.VectorFile) -> str:
    """`-m` for the model a vector was made on: a known model's name, else the GGUF file's name."""
    known = _known(vf)
    return known.name if known else shlex.quote(str(vf.model.get("file")))


def pairs_file(meta: dict) -> str | None:
    """The user's pairs file a vector was made from, as training recorded it (`PATH, split seed N`), or None."""
    for key in ("fvpatch.pairs_source", "fvpatch.dataset"):
        source = re.sub(r", split seed \d+$", "", meta.get(key, ""))
        if Path(source).suffix.lower() in PAIR_FILES:
            return source
    return None


def sources(vf: vectorfile.VectorFile) -> list[dict]:
    """The vectors an imported control vector's layer was exported from (`fvpatch.vectors`, fvpatch's own exports
    only): the file records the sources of every layer, and each source its tensor."""
    from fvpatch.controlvector import FVPATCH_KEY

    try:
        value = json.loads(vf.meta.get(FVPATCH_KEY, "[]"))
    except json.JSONDecodeError:
        return []
    return [s for s in value if isinstance(s, dict) and s.get("tensor", vf.tensor) == vf.tensor] if isinstance(value, list) else []


def _task(vf: vectorfile.VectorFile, relation: str | None = None) -> str | None:
    """The task a vector does, as its metadata names it: a bank's relation, its own task, or that of the one vector an
    imported control vector was exported from."""
    src = sources(vf)
    return relation or vf.meta.get("fvpatch.task") or (src[0].get("task") or None if len(src) == 1 else None)


def task_arg(vf: vectorfile.VectorFile, relation: str | None = None) -> str | None:
    """What `fvpatch eval task --task` takes to score this vector on pairs it never saw: a vendored task's name, or
    the pairs file its training recorded (the same split, so its test pairs are held out); None when it records neither."""
    task = _task(vf, relation)
    if is_vendored(task):
        return task
    path = pairs_file(vf.meta)
    return shlex.quote(path) if path else None


def eval_command(vf: vectorfile.VectorFile, vector: str, relation: str | None = None) -> str:
    """The command that measures `vector` (made as `vf` records) on held-out pairs; TASK where the file names none."""
    return f"fvpatch eval task --task {task_arg(vf, relation) or 'TASK'} -m {model_arg(vf)} --vector {vector}"


def gguf_name(vector: str) -> str:
    """The control vector's file name for a vector file or BANK#RELATION: `x.safetensors` -> `x.gguf`,
    `bank.safetensors#antonym` -> `bank-antonym.gguf`."""
    return Path(vector.replace("#", "-")).name.removesuffix(".safetensors") + ".gguf"


def every_token_file(control_vector: str) -> str:
    """Where the commands that measure a control vector import it: beside the user, named after the GGUF."""
    return Path(control_vector).name.removesuffix(".gguf") + ".every-token.safetensors"


def every_token_commands(vf: vectorfile.VectorFile, control_vector: str, relation: str | None = None, export: str | None = None) -> list[str]:
    """Commands that measure a vector as a control vector applies it: (export it, `export` naming the vector,) import
    the GGUF back, which applies it at every token (fvpatch.apply_at = all), and evaluate that."""
    imported = every_token_file(control_vector)
    return ([f"fvpatch export {export} {control_vector}"] if export else []) + [
        f"fvpatch import {control_vector} {imported}", eval_command(vf, imported, relation)]


TASK_HINT = "(`TASK`: the vendored task or the .json/.jsonl/.csv of input/output pairs the vector is for; the file names neither.)"


def name_of(vf: vectorfile.VectorFile, file_name: str, name: str | None = None) -> str | None:
    """What a card calls the vector: `name` when given; a vendored task's name; else, for a task of the user's own
    pairs (named after the pairs file, often `pairs`) or a vector of no task, the vector file's name."""
    if name:
        return name
    task = _task(vf)
    if is_vendored(task) or (task and not pairs_file(vf.meta) and not sources(vf)):
        return task
    stem = Path(file_name.partition("#")[0]).name.removesuffix(".safetensors")
    for suffix in KIND_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem.removesuffix(suffix)
    return stem or task


def front_matter(named: list[tuple[vectorfile.VectorFile, str | None]]) -> str:
    """Front matter of a card for (vector, the name it does its task by, or None) items."""
    known = {_known(vf) for vf, _ in named} - {None}
    # a vector of a task (a bank, or an export of one) is a function vector; a saved activation is neither kind
    kinds = [kind for kind, has in (("function-vector", lambda vf: _task(vf) or NAMES_KEY in vf.meta), ("control-vector", _steering))
             if any(has(vf) for vf, _ in named)]
    tags = ["fvpatch", *kinds, "steering-vector", "llama.cpp", "gguf"]
    tags += sorted({name for _, name in named if name})
    lines = ["---", "library_name: fvpatch"]
    bases = sorted(m.upstream for m in known if m.upstream)
    if bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["tags:"] + [f"- {_yaml(t)}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def _yaml(tag: str) -> str:
    """A tag as YAML reads it back: plain words as they are, anything YAML would read as something else (`a: b`,
    `#x`, `[x]`) quoted."""
    plain = re.fullmatch(r"\w[\w.+-]*( [\w.+-]+)*", tag) and not re.fullmatch(r"[-+.\d].*|(?i:null|true|false|yes|no|on|off|y|n|~)", tag)
    return tag if plain else json.dumps(tag, ensure_ascii=False)  # 2024, null, yes: YAML reads numbers and booleans


def _pct(meta: dict, key: str) -> str | None:
    return f"{float(meta[key]):.0%}" if key in meta else None


def command_vector(vf: vectorfile.VectorFile, file_name: str) -> str:
    """How a card's commands name the vector: the file, or a bank's first relation as BANK#RELATION, since a bank's
    rows are patched one at a time."""
    relations = relation_names(vf, file_name)
    return f"{file_name}#{relations[0]}" if relations else file_name


def _made_for(positions: str) -> str:
    return "every token" if positions == "all" else "the last prompt token"


def _source(s: dict) -> str:
    """One vector an fvpatch export was made of, as the export recorded it."""
    try:
        scale = float(s.get("scale", 1))
    except (TypeError, ValueError):
        scale = 1.0
    task = s.get("task")
    task = (f" of the task `{task}`" if is_vendored(task) else f" trained on its maker's own pairs, task `{task}`") if task else ""
    return (f"`{s.get('vector')}`" + (f" at scale {scale:g}" if scale != 1 else "")
            + f" (a {s.get('method') or 'vector'}{task}, made for {_made_for(s.get('positions', 'last'))})")


def _imported_from(vf: vectorfile.VectorFile) -> str:
    """Where an imported control vector came from, as import recorded it."""
    meta = vf.meta
    writer = meta.get("fvpatch.controlvector.writer", "an unknown writer")
    src = sources(vf)
    if writer == "fvpatch" and src:
        made = "; ".join(_source(s) for s in src)
        how = f"which `fvpatch export` wrote from {made}" + (", summed" if len(src) > 1 else "")
    elif writer == "fvpatch":
        how = "which fvpatch wrote"
    elif writer == "repeng":
        how = "written by repeng as far as its layout tells, which measures each direction at the output of the block it is applied to"
    elif writer == "llama.cpp cvector-generator":
        how = ("written by llama.cpp's `llama-cvector-generator` as far as its layout tells, which measures each direction "
               "one block below the one it is applied to")
    else:
        how = f"written by {writer}"
    return f"`{meta.get('fvpatch.source', 'a control-vector GGUF')}`, {how}"


def section(vf: vectorfile.VectorFile, file_name: str, control_vector: str | None = None, exported: bool = False,
            name: str | None = None) -> str:
    """One vector's card body. `control_vector` names its llama.cpp GGUF: a file written beside the card, or with
    `exported` the one the card's `fvpatch export` command makes first. `name`: what the card calls it (its title)."""
    m, meta = vf.model, vf.meta
    relations = relation_names(vf, file_name)
    spec = command_vector(vf, file_name)
    relation = relations[0] if relations else None
    task = meta.get("fvpatch.task")
    imported = meta.get("fvpatch.method") == "control vector"
    method = meta.get("fvpatch.method", "saved activation" if "fvpatch.prompt" in meta else "vector")
    known = _known(vf)
    model_ref = f"{m.get('name') or m.get('file')} ({m.get('file')}, {m.get('quant')})"
    everywhere = meta.get("fvpatch.apply_at") == "all"
    where = ("at every token, prompt and generated, as llama.cpp applies a control vector" if everywhere
             else "at the last prompt token (the one that predicts the answer)")
    tpl = template(meta.get("fvpatch.template", "qa"))
    prompt = tpl.query("x")
    pairs = json.loads(meta["fvpatch.pairs"]) if "fvpatch.pairs" in meta else []
    example = _held_out_input(_task(vf, relation)) or (pairs[0][0] if pairs else None)
    called = name_of(vf, file_name, name)
    title = f"# {called or vf.tensor}: {method}"
    out = [title, ""]
    added = "added to" if vf.mode == "add" else "put in place of"
    if imported:
        out += [f"A llama.cpp control vector imported from {_imported_from(vf)}. fvpatch reads its `direction.{vf.layer}` as one vector of "
                f"{vf.width} numbers for **{m.get('name')}**, {added} the residual stream after block {vf.layer} (`{vf.tensor}`) {where}.", ""]
    elif task:
        shown = ", ".join(f"{x} → {y}" for x, y in pairs[:4])
        out += [f"One vector of {vf.width} numbers that makes **{m.get('name')}** do the `{called}` relation without demonstrations"
                f"{f' ({shown}, …)' if shown else ''}: {added} the residual stream after block {vf.layer} (`{vf.tensor}`) {where}, "
                f"it turns the zero-shot prompt `{prompt.replace(chr(10), '⏎')}` into the answer.", ""]
    elif relations:
        composes = ", and `fvpatch analogy --bank` composes them for analogies A:B::C:? with the learned map this file carries" if set(MAP_KEYS) <= set(meta) else ""
        out += [f"{len(relations)} function vectors of **{m.get('name')}**, one per relation (the file's rows, in this order): "
                f"{', '.join(f'`{r}`' for r in relations)}. Each is added to the residual stream after block {vf.layer} (`{vf.tensor}`) {where}; "
                f"`--vector {file_name}#RELATION` patches one{composes}.", ""]
    elif "fvpatch.prompt" in meta:
        shown_prompt = meta["fvpatch.prompt"].replace("\n", "⏎")
        out += [f"{_rows(vf)} of the graph tensor `{vf.tensor}` of **{m.get('name')}**, saved by `fvpatch save` at tokens {vf.positions} "
                f"of the prompt `{shown_prompt}`; `fvpatch patch` {'adds' if vf.mode == 'add' else 'puts'} {'it' if len(vf.rows) == 1 else 'them'} "
                f"{'to' if vf.mode == 'add' else 'in place of'} that tensor at a token of another prompt.", ""]
    else:
        what = f"made by {method}" if "fvpatch.method" in meta else "the file records no task and no method that made it"
        out += [f"{_rows(vf)} of the graph tensor `{vf.tensor}` of **{m.get('name')}** ({what}), {added} it {where}.", ""]
    out += ["| | |", "|---|---|",
            f"| made on | {model_ref}; applies to any quantization of the same model (same name, shape and vocabulary) |",
            f"| architecture, shape | {m.get('arch')}, {m.get('n_layer')} layers, width {m.get('n_embd')} |",
            f"| tensor, layer | `{vf.tensor}` (the output of block {vf.layer}) |",
            f"| mode, scale | {vf.mode}, {vf.scale:g} |",
            f"| positions | {'every token' if everywhere else 'the last prompt token'} |"]
    source = meta.get("fvpatch.pairs_source", DATA_SOURCE)
    if pairs:
        out.append(f"| trained on | {len(pairs)} pairs of `{called}` ({source}), model frozen; "
                   f"init {meta.get('fvpatch.init')}, {meta.get('fvpatch.steps')} steps (kept step {meta.get('fvpatch.best_step')}), "
                   f"{meta.get('fvpatch.train_dtype', 'float32')} |")
    out.append("")
    out += _how_well(vf, spec, relation, control_vector, exported)
    model_arg_ = f"-m {model_arg(vf)} "
    q = tpl.query(example or PLACEHOLDER).replace("\n", "\\n")
    # patched() takes a file or a shipped name; a bank's relation is loaded as the command line loads it
    torch_vector = f'load_vector("{spec}")' if relations else f'"{spec}"'
    out += ["## How to use it", "", f"With fvpatch ({INSTALL}):", "", "```",
            f"fvpatch patch {model_arg_}-p $'{q}' --vector {spec} --compare -n 4", "```", ""]
    if not example:
        out += [f"(`{PLACEHOLDER}` stands for an input of yours: the file records no example of what the vector is for.)", ""]
    out += ["In PyTorch, on the same model in transformers (block outputs numbered as in llama.cpp):", "", "```python",
            *(["from fvpatch.cli import load_vector"] if relations else []),
            "from train.apply import patched",
            f"with patched(model, {torch_vector}):",
            f"    out = model.generate(**tokenizer(\"{q}\", return_tensors=\"pt\"), max_new_tokens=4)", "```", ""]
    if control_vector:
        out += [f"With stock llama.cpp, as a control vector (added at **every** token, see above){', exported by fvpatch first' if exported else ''}:", "", "```",
                *([f"fvpatch export {spec} {control_vector}"] if exported else []),
                f"llama-completion -m {m.get('file')} --control-vector {control_vector} -p $'{q}' -n 4 --temp 0 -no-cnv", "```", "",
                f"(`-m`: the model's file, `{m.get('file')}`, in the folder you run this from or with its path: fvpatch keeps the models "
                "it knows in its `models/` folder, `fvpatch models` says where. `--temp 0` decodes greedily, as fvpatch does; "
                "`--control-vector-scaled FILE:SCALE` scales the vector. With `llama-server`, `--swa-full` keeps a sliding-window "
                "model such as Gemma to the numbers fvpatch gives. llama.cpp builds before `llama-completion` existed call the "
                "program `llama-cli`.)", ""]
    lic = f" The vector is derived from the model's weights ({known.upstream}, licence: {known.licence})." if known else ""
    out += ["## Licence and provenance", "",
            f"Written by {meta.get('fvpatch.creator', 'fvpatch')}; every number above comes from the file's own metadata.{lic}"
            + (f" Training pairs: {source}." if pairs else ""), ""]
    return "\n".join(out)


def _rows(vf: vectorfile.VectorFile) -> str:
    return "One row" if len(vf.rows) == 1 else f"{len(vf.rows)} rows"


def _steering(vf: vectorfile.VectorFile) -> bool:
    """A control vector another program wrote (repeng, llama-cvector-generator): a steering direction, with no
    relation of pairs to score it on."""
    return vf.meta.get("fvpatch.method") == "control vector" and vf.meta.get("fvpatch.controlvector.writer") != "fvpatch"


def _how_well(vf: vectorfile.VectorFile, spec: str, relation: str | None, control_vector: str | None, exported: bool) -> list[str]:
    """The card's accuracy: the held-out numbers the file records, or that it records none and the commands that
    measure them; for a vector made for the last token that can be a control vector, its accuracy at every token."""
    meta = vf.meta
    out = ["## How well it works", ""]
    acc = [(label, _pct(meta, key)) for label, key in (("zero-shot, no vector", "fvpatch.test_zero_shot_top1"),
                                                        ("10-shot prompt (in-context learning)", "fvpatch.test_icl_top1"),
                                                        ("zero-shot + this vector", "fvpatch.test_top1"))]
    measurable = len(vf.rows) == 1 or relation is not None  # `eval task` patches one vector
    hint = [TASK_HINT, ""] if task_arg(vf, relation) is None else []
    if _steering(vf):
        norm = float(np.linalg.norm(vf.rows[0].astype(np.float64)))
        return out + [f"A steering direction, not a relation's function vector: there are no pairs to score it on. Its norm is {norm:.3g}, "
                      "and the file records no scale to apply it at: a direction of norm about 1 usually changes the text only at "
                      "larger scales (`fvpatch patch --scale S`, `llama-completion --control-vector-scaled FILE:S`).", ""]
    if acc[-1][1]:
        out += [f"Top-1 of the answer's first token on {meta.get('fvpatch.test_n')} held-out test pairs (never used in training) "
                f"({meta.get('fvpatch.test_engine', 'llama.cpp')}):", "", "| condition | top-1 |", "|---|---|"]
        out += [f"| {label} | {value} |" for label, value in acc if value]
        out.append("")
    elif measurable:
        out += ["**This file records no held-out accuracy.** `fvpatch eval task` measures it: top-1 of the answer's first token "
                "on the task's held-out test pairs (a vector trained on the task never sees them), with zero-shot and 10-shot prompts and with the vector"
                f"{' (at every token, as this file says to apply it)' if meta.get('fvpatch.apply_at') == 'all' else ''}:",
                "", "```", eval_command(vf, spec, relation), "```", "", *hint,
                *([f"(A bank's relations are scored one at a time: `--task RELATION --vector {spec.rpartition('#')[0]}#RELATION`.)", ""]
                  if relation else [])]
        hint = []
    else:
        out += [f"This file records no held-out accuracy: it holds {len(vf.rows)} rows, one per saved token, not one vector to score.", ""]
    if meta.get("fvpatch.apply_at") != "all" and control_vector:
        counts = vectorfile.positions_top1(meta)
        if counts:
            n = counts["n"]
            out += [f"Where it is added matters. On the first {n} test pairs: {counts['last'] / n:.0%} added at the last prompt token, "
                    f"{counts['all'] / n:.0%} added at every token (as llama.cpp's `--control-vector` adds it).", ""]
        else:
            made = (f"Export `{control_vector}` as *With stock llama.cpp* below does, then import it back" if exported
                    else f"Import `{control_vector}` back")
            out += ["Its accuracy added at every token, as llama.cpp's `--control-vector` adds it, has not been measured, and a vector "
                    "made for the last prompt token can lose much of it there (fvpatch's README: *Last token or every token*). "
                    f"{made}, which applies it at every token, and score that:", "", "```",
                    *every_token_commands(vf, control_vector, relation), "```", "", *hint]
    return out


def _held_out_input(task: str | None) -> str | None:
    """A test input of a vendored task, so the card's example is one the vector never saw."""
    from fvpatch.tasks import load_task

    try:
        return load_task(task).test[0][0] if is_vendored(task) else None
    except (ValueError, OSError):
        return None


def card(items: list[tuple[vectorfile.VectorFile, str, str | None]], exported: bool = False, names: list[str | None] | None = None) -> str:
    """A whole card for (vector, its file name, its control-vector file name or None) items; `exported`: the control
    vectors are not beside the card, and it shows the `fvpatch export` command that makes each. `names`: what to call
    each vector (default: its task, or its file's name for a task of the user's own pairs)."""
    names = names or [None] * len(items)
    for vf, name, _ in items:
        if not vf.model.get("arch"):  # it would read "made on None (None, None)"
            raise FvpatchError(f"{name} records no model it was made for, and a card says above all which model a vector is for")
    # a tag names what a vector does: its task (or the name given), not a file of no task
    tagged = [(vf, name_of(vf, file_name, name) if name or _task(vf) else None) for (vf, file_name, _), name in zip(items, names)]
    return front_matter(tagged) + "\n".join(section(*item, exported=exported, name=name) for item, name in zip(items, names))


def write_card(path: str | Path, text: str, overwrite: bool = False) -> Path:
    check_outputs([path], overwrite)
    return write_text(path, text)
