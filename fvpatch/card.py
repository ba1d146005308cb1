"""Model cards for vector files: what a vector does, what it was made on and from, how well it works, and how
to run it with fvpatch, PyTorch and llama.cpp, all from the file's own metadata."""

import json
from pathlib import Path

from fvpatch import vectorfile
from fvpatch.atomic import check_outputs, write_text
from fvpatch.bank import relation_names
from fvpatch.cfvmap import MAP_KEYS
from fvpatch.errors import FvpatchError
from fvpatch.models import KNOWN
from fvpatch.prompts import template

DATA_SOURCE = ("the relation pairs of Todd et al., *Function Vectors in Large Language Models* (ICLR 2024), "
               "github.com/ericwtodd/function_vectors, MIT licence, vendored in fvpatch")


def _known(vf: vectorfile.VectorFile):
    return next((m for m in KNOWN.values() if m.file == vf.model.get("file")), None)


def front_matter(vfs: list[vectorfile.VectorFile]) -> str:
    known = {_known(vf) for vf in vfs} - {None}
    tags = ["fvpatch", "function-vector", "steering-vector", "llama.cpp", "gguf"]
    tags += sorted({vf.meta["fvpatch.task"] for vf in vfs if "fvpatch.task" in vf.meta})
    lines = ["---", "library_name: fvpatch"]
    bases = sorted(m.upstream for m in known if m.upstream)
    if bases:
        lines += ["base_model:"] + [f"- {b}" for b in bases]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def _pct(meta: dict, key: str) -> str | None:
    return f"{float(meta[key]):.0%}" if key in meta else None


def command_vector(vf: vectorfile.VectorFile, file_name: str) -> str:
    """How a card's commands name the vector: the file, or a bank's first relation as BANK#RELATION, since a bank's
    rows are patched one at a time."""
    relations = relation_names(vf, file_name)
    return f"{file_name}#{relations[0]}" if relations else file_name


def section(vf: vectorfile.VectorFile, file_name: str, control_vector: str | None = None, exported: bool = False) -> str:
    """One vector's card body. `control_vector` names its llama.cpp GGUF: a file written beside the card, or with
    `exported` the one the card's `fvpatch export` command makes first."""
    m, meta = vf.model, vf.meta
    relations = relation_names(vf, file_name)
    spec = command_vector(vf, file_name)
    task = meta.get("fvpatch.task")
    method = meta.get("fvpatch.method", "saved activation")
    known = _known(vf)
    model_ref = f"{m.get('name') or m.get('file')} ({m.get('file')}, {m.get('quant')})"
    everywhere = meta.get("fvpatch.apply_at") == "all"
    where = ("at every token, prompt and generated, as llama.cpp applies a control vector" if everywhere
             else "at the last prompt token (the one that predicts the answer)")
    tpl = template(meta.get("fvpatch.template", "qa"))
    prompt = tpl.query("x")
    pairs = json.loads(meta["fvpatch.pairs"]) if "fvpatch.pairs" in meta else []
    example = _held_out_input(task or (relations[0] if relations else None)) or (pairs[0][0] if pairs else "…")
    title = f"# {task}: {method}" if task else f"# {vf.tensor}: {method}"
    out = [title, ""]
    if task:
        shown = ", ".join(f"{x} → {y}" for x, y in pairs[:4])
        out += [f"One vector of {vf.width} numbers that makes **{m.get('name')}** do the `{task}` relation without demonstrations"
                f"{f' ({shown}, …)' if shown else ''}: {'added to' if vf.mode == 'add' else 'put in place of'} the residual stream after block {vf.layer} (`{vf.tensor}`) {where}, "
                f"it turns the zero-shot prompt `{prompt.replace(chr(10), '⏎')}` into the answer.", ""]
    elif relations:
        composes = ", and `fvpatch analogy --bank` composes them for analogies A:B::C:? with the learned map this file carries" if set(MAP_KEYS) <= set(meta) else ""
        out += [f"{len(relations)} function vectors of **{m.get('name')}**, one per relation (the file's rows, in this order): "
                f"{', '.join(f'`{r}`' for r in relations)}. Each is added to the residual stream after block {vf.layer} (`{vf.tensor}`) {where}; "
                f"`--vector {file_name}#RELATION` patches one{composes}.", ""]
    else:
        out += [f"Rows of the graph tensor `{vf.tensor}` of {m.get('name')}, saved at tokens {vf.positions} of a prompt.", ""]
    out += ["| | |", "|---|---|",
            f"| made on | {model_ref}; applies to any quantization of the same model (same name, shape and vocabulary) |",
            f"| architecture, shape | {m.get('arch')}, {m.get('n_layer')} layers, width {m.get('n_embd')} |",
            f"| tensor, layer | `{vf.tensor}` (the output of block {vf.layer}) |",
            f"| mode, scale | {vf.mode}, {vf.scale:g} |",
            f"| positions | {'every token' if everywhere else 'the last prompt token'} |"]
    source = meta.get("fvpatch.pairs_source", DATA_SOURCE)
    if pairs:
        out.append(f"| trained on | {len(pairs)} pairs of `{task}` ({source}), model frozen; "
                   f"init {meta.get('fvpatch.init')}, {meta.get('fvpatch.steps')} steps (kept step {meta.get('fvpatch.best_step')}), "
                   f"{meta.get('fvpatch.train_dtype', 'float32')} |")
    out.append("")
    acc = [(label, _pct(meta, key)) for label, key in (("zero-shot, no vector", "fvpatch.test_zero_shot_top1"),
                                                        ("10-shot prompt (in-context learning)", "fvpatch.test_icl_top1"),
                                                        ("zero-shot + this vector", "fvpatch.test_top1"))]
    if acc[-1][1]:
        out += ["## How well it works", "",
                f"Top-1 of the answer's first token on {meta.get('fvpatch.test_n')} held-out test pairs (never used in training), "
                f"({meta.get('fvpatch.test_engine', 'llama.cpp')}):", "", "| condition | top-1 |", "|---|---|"]
        out += [f"| {label} | {value} |" for label, value in acc if value]
        counts = vectorfile.positions_top1(meta)
        if counts:
            n = counts["n"]
            out += ["", f"Where it is added matters. On the first {n} test pairs: {counts['last'] / n:.0%} added at the last prompt token, "
                        f"{counts['all'] / n:.0%} added at every token (as llama.cpp's `--control-vector` adds it)."]
        else:
            out += ["", "Its accuracy added at every token (as llama.cpp's `--control-vector` adds it) has not been measured."]
        out.append("")
    model_arg = f"-m {known.name} " if known else f"-m {m.get('file')} "
    q = tpl.query(example).replace("\n", "\\n")
    # patched() takes a file or a shipped name; a bank's relation is loaded as the command line loads it
    torch_vector = f'load_vector("{spec}")' if relations else f'"{spec}"'
    out += ["## How to use it", "", "With fvpatch (`pip install fvpatch`; the model is fetched on first use where fvpatch knows it):", "", "```",
            f"fvpatch patch {model_arg}-p $'{q}' --vector {spec} --compare -n 4", "```", "",
            "In PyTorch, on the same model in transformers (block outputs numbered as in llama.cpp):", "", "```python",
            *(["from fvpatch.cli import load_vector"] if relations else []),
            "from train.apply import patched",
            f"with patched(model, {torch_vector}):",
            f"    out = model.generate(**tokenizer(\"{q}\", return_tensors=\"pt\"), max_new_tokens=4)", "```", ""]
    if control_vector:
        out += [f"With stock llama.cpp, as a control vector (added at **every** token, see above){', exported by fvpatch first' if exported else ''}:", "", "```",
                *([f"fvpatch export {spec} {control_vector}"] if exported else []),
                f"llama-completion -m {m.get('file')} --control-vector {control_vector} -p $'{q}' -n 4 -no-cnv", "```", "",
                "(`--control-vector-scaled FILE:SCALE` scales it; llama.cpp builds before `llama-completion` existed call the "
                "program `llama-cli`.)", ""]
    lic = f" The vector is derived from the model's weights ({known.upstream}, licence: {known.licence})." if known else ""
    out += ["## Licence and provenance", "",
            f"Written by {meta.get('fvpatch.creator', 'fvpatch')}; every number above comes from the file's own metadata.{lic}"
            + (f" Training pairs: {source}." if pairs else ""), ""]
    return "\n".join(out)


def _held_out_input(task: str | None) -> str | None:
    """A test input of a vendored task, so the card's example is one the vector never saw."""
    from fvpatch.tasks import load_task

    try:
        return load_task(task).test[0][0] if task else None
    except (ValueError, OSError):
        return None


def card(items: list[tuple[vectorfile.VectorFile, str, str | None]], exported: bool = False) -> str:
    """A whole card for (vector, its file name, its control-vector file name or None) items; `exported`: the control
    vectors are not beside the card, and it shows the `fvpatch export` command that makes each."""
    for vf, name, _ in items:
        if not vf.model.get("arch"):  # it would read "made on None (None, None)"
            raise FvpatchError(f"{name} records no model it was made for, and a card says above all which model a vector is for")
    return front_matter([vf for vf, _, _ in items]) + "\n".join(section(*item, exported=exported) for item in items)


def write_card(path: str | Path, text: str, overwrite: bool = False) -> Path:
    check_outputs([path], overwrite)
    return write_text(path, text)
