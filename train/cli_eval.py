"""`fvpatch eval ...`: vectors scored on relation tasks and analogies, in llama.cpp and in PyTorch. torch is imported
inside the commands, never at import time."""

from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from fvpatch.atomic import check_outputs
from fvpatch.cli import MODEL_HELP, SEED, cli_threads, given, gpu_layers_option, threads_option
from fvpatch.tasks import is_vendored, split_summary
from train.cli import _torch_options, check_prompts_first

@click.group(name="eval")
def eval_cmd():
    """Evaluate vectors on relation tasks, in PyTorch and in llama.cpp."""


@eval_cmd.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None, help='JSONL analogies {"stem": [A, B], "choice": [[C, D], ...], "answer": i} (SAT/U2/U4/BATS/Google layout). Default: generated from the tasks\' test pairs.')
@click.option("--n", "n_test", type=click.IntRange(1), default=200, show_default=True, help="Generated test analogies (without --data).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the generated analogies.")
@click.option("--bank", "bank_path", type=click.Path(exists=True), default=None, help="Bank file with a learned map, as `train cfv` writes it (default: the shipped one).")
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Also write every item's result as JSON here.")
@click.option("--leave-own-out", is_flag=True, help="Solve each analogy without its own relation's vector (generated analogies): can the other vectors compose it?")
@click.option("--force", is_flag=True, help="Overwrite --out, and use a bank made on another model file.")
@gpu_layers_option
@threads_option
def analogy(data, n_test, seed, bank_path, model, out, leave_own_out, force, n_gpu_layers):
    """Solve analogies A:B::C:? in llama.cpp: no vector, analogy prompts, the best single vector, and
    composite function vectors; prints a markdown table of accuracies (no torch needed).

    \b
    Examples:
      fvpatch eval analogy --out results/cfv/gemma-3-270m-q4_k_m.json
      fvpatch eval analogy --data bats.jsonl
      fvpatch eval analogy --leave-own-out
    """
    from fvpatch.analogy import evaluate, relation_accuracy, table
    from fvpatch.analogyfile import generate, own_relations, read_analogies
    from fvpatch.cfvmap import CFVMap
    from fvpatch.bank import BANK_NAME, load_bank
    from fvpatch.errors import FvpatchError
    from fvpatch.models import check_fingerprint, resolve_model
    from fvpatch.session import Session
    from fvpatch.shipped import model_folder

    asked = [option for option, name in (("--n", "n_test"), ("--seed", "seed")) if given(name)]
    if data and asked:
        raise click.UsageError(f"{' and '.join(asked)} only shape{'s' if len(asked) == 1 else ''} generated analogies; with --data every item of the file is scored")
    check_outputs([out], force)
    analogies = read_analogies(data) if data else None
    with Session(resolve_model(model), n_gpu_layers=n_gpu_layers, n_threads=cli_threads()) as s:
        shipped = bank_path is None
        bank_path = bank_path or model_folder(s.fingerprint()) / BANK_NAME
        if Path(bank_path).is_dir() and (Path(bank_path) / BANK_NAME).is_file():  # where `train cfv --bank FOLDER` writes its map
            bank_path = Path(bank_path) / BANK_NAME
        bank = load_bank(bank_path)
        check_fingerprint(bank.model, s.fingerprint(), force)
        if analogies is None and (own := own_relations(bank.names, bank.trained_on)):
            raise FvpatchError(f"generated test analogies come from the vendored tasks' test pairs, and {', '.join(own)} "
                               f"{'is' if len(own) == 1 else 'are'} of your own pairs; give your analogies with --data FILE")
        cfv_map = CFVMap.from_bank(bank)
        unknown = sorted({x.relation for x in analogies or [] if x.relation} - set(bank.names))
        if unknown:  # a relation names the bank vector the oracle adds and the one relation accuracy expects
            raise FvpatchError(f"{data}: relation {', '.join(map(repr, unknown))} is not one of the bank's ({', '.join(bank.names)}); "
                               f"use their names or leave \"relation\" out")
        analogies = analogies or generate(bank.names, "test", n_test, seed)
        result = evaluate(s, bank, cfv_map, analogies, leave_out=leave_own_out)
    result["relation_accuracy"] = relation_accuracy(result["items"])
    result["setup"] = {"data": str(data) if data else f"generated test analogies, seed {seed}", "bank": f"shipped {BANK_NAME}" if shipped else str(bank_path),
                       "relations": bank.names, "tensor": bank.tensor, "model": bank.model.get("file"), "leave_own_out": leave_own_out}
    click.echo(f"{result['n']} analogies ({result['n_open']} open), {len(bank)} relations at {bank.tensor}")
    click.echo(table(result))
    rel = result["relation_accuracy"]
    if rel["best_ffv"] is not None and not leave_own_out:  # left out, the own relation cannot be named
        click.echo(f"relation named by the highest score: {100 * rel['best_ffv']:.1f}%, by the largest learned weight: {100 * rel['cfv_learned']:.1f}%")
    _write_json(out, result)


@contextmanager
def _engines(engine: str, model, vector_model: dict | None, lm=None, dtype="float32", device="auto", batched: bool = True, n_gpu_layers: int = 0,
             force: bool = False):
    """name -> (predict, tokenize) for the engines asked for, each checked against the vector's model (None: no vector;
    `force` as `fvpatch patch --force`; `lm`: torch's, if loaded); llama.cpp's context is freed on leaving."""
    from fvpatch.evaluate import llamacpp_predictor
    from fvpatch.models import check_fingerprint, resolve_model
    from fvpatch.session import Session

    with ExitStack() as stack:
        out = {}
        if engine in ("llamacpp", "both"):
            s = stack.enter_context(Session(resolve_model(model), n_gpu_layers=n_gpu_layers, n_threads=cli_threads()))
            if vector_model is not None and (note := check_fingerprint(vector_model, s.fingerprint(), force)):
                click.echo(note, err=True)  # another quantization: said, as `fvpatch patch` says it
            out["llama.cpp"] = (llamacpp_predictor(s, batched), s.tokenize)
        if engine in ("torch", "both"):
            from train.evaluate import torch_predictor
            from train.model import load_model

            lm = lm or load_model(model, device, dtype, cli_threads())
            if vector_model is not None and lm.fingerprint:
                check_fingerprint(vector_model, lm.fingerprint, force)
            out["torch"] = (torch_predictor(lm), lm.tokenize)
        yield out


def _load_vector(vector: str | None, model):
    """--vector as `fvpatch patch` takes it (a file, a shipped vector's name, the copy made for --model first, or
    BANK#RELATION), checked to hold the one row it patches before any model loads."""
    from fvpatch.cli import load_vector
    from fvpatch.errors import FvpatchError
    from fvpatch.modelfile import ModelFile
    from fvpatch.models import resolve_model

    if vector is None:
        return None
    fingerprint = None
    source = resolve_model(model)
    if source.is_file():  # a Hugging Face model directory has no GGUF fingerprint to choose a shipped copy by
        with ModelFile(source, vocab_only=True) as mf:
            fingerprint = mf.fingerprint()
    vf = load_vector(vector, fingerprint)
    try:
        vf.row(None)
    except FvpatchError as e:
        raise FvpatchError(f"{vector}: {e}") from None
    return vf


def _task_and_template(task, template_name, vf):
    from fvpatch.prompts import template
    from fvpatch.tasks import load_task

    return load_task(task), template(template_name or (vf.meta.get("fvpatch.template") if vf else None) or "qa")


def _torch_unused(unused: bool, dtype: str, device: str):
    """--dtype and --device set PyTorch: where no PyTorch model runs, they would be silently ignored."""
    if unused and (dtype, device) != ("float32", "auto"):
        raise click.UsageError("--dtype and --device set the PyTorch engine, and llama.cpp alone runs here; give --engine torch or both "
                               "(llama.cpp offloads with --n-gpu-layers)")


def _p_text(p: float) -> str:
    return "< 0.01" if p < 0.01 else f"= {p:.2f}"  # 0.0018 printed as 0.00 read as impossible


def _check_pool(t, task: str, queries, k: int, hint: str = ""):
    """The k demonstrations of every query's ICL and shuffled prompts come from the task's train split, less the query
    itself: one too small is refused before any model loads, naming that pool and what to give."""
    from fvpatch.errors import FvpatchError

    fewest = min(sum(p[0] != x for p in t.train) for x, _ in queries)
    if fewest < k:
        fix = f"give --k {fewest} or less, or more pairs in {task}" if fewest >= 2 else f"give more pairs in {task} (--k is at least 2)"
        raise FvpatchError(f"{k}-shot prompts need {k} demonstrations, but their pool, the train split of {task} ({split_summary(t)}), "
                           f"holds only {fewest}; {fix}{hint}")


def _test_pairs(t, task: str, path: str):
    """(kept, dropped): the distinct pairs of the --test-pairs file in its order, those whose input --task also holds
    set aside (never scored as test items: the caller says how many in one line); none kept is refused."""
    from fvpatch.atomic import input_file
    from fvpatch.errors import FvpatchError
    from fvpatch.tasks import held_out, read_pairs

    kept, dropped = held_out(t, read_pairs(input_file(path, "pairs file")))
    if not kept:
        raise FvpatchError(f"{path}: every one of its {len(dropped)} distinct pairs has an input that {task} also holds, so none is held out; "
                           f"give pairs that --task {task} does not hold")
    return kept, dropped


def _left_out_note(task: str, path: str, n_kept: int, dropped) -> str:
    """One line on the --test-pairs that --task also holds, so that none is left out silently."""
    shown = ", ".join(repr(x) for x, _ in dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
    one = len(dropped) == 1
    return (f"note: {len(dropped)} of the {n_kept + len(dropped)} distinct pairs of {path} {'has' if one else 'have'} an input that {task} also holds "
            f"({shown}); {'it is' if one else 'they are'} left out, not scored as {'a test item' if one else 'test items'}")


def _queries(t, split: str, n_items: int):
    """The first `n_items` pairs of the split scored, refused in one line where a small file leaves the split empty."""
    from fvpatch.errors import FvpatchError

    queries = t.split(split)[:n_items]
    if not queries:
        raise FvpatchError(f"{t.name}: the {split} split is empty: its {split_summary(t)}; "
                           f"add pairs to the file or score another split (--split {'test' if split == 'valid' else 'valid'})")
    return queries


eval_options = [
    click.option("--task", required=True, help="A vendored relation task (e.g. antonym) or your .json/.jsonl/.csv of input/output pairs."),
    click.option("--engine", type=click.Choice(["llamacpp", "torch", "both"]), default="llamacpp", show_default=True, help="Where to run the model."),
    click.option("--k", type=click.IntRange(2), default=10, show_default=True, help="Demonstrations in the ICL and shuffled-label prompts (at least 2, which shuffled labels need)."),
    click.option("--template", "template_name", default=None, help="Prompt template: qa, arrow, or a string with {x} and {y} (default: the vector's, else qa)."),
    click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the demonstrations drawn."),
    click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP),
    click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here."),
    click.option("--force", is_flag=True, help="Overwrite the files it writes; apply a vector that records no model, or one made on another model of the same shape."),
    gpu_layers_option,
]


def _eval_options(f):
    for opt in reversed(eval_options):
        f = opt(f)
    return _torch_options(f)


def _write_json(out, payload):
    from fvpatch.atomic import write_json

    if out:
        write_json(out, payload)


@eval_cmd.command()
@_eval_options
@click.option("--vector", default=None, metavar="NAME|FILE|BANK#RELATION", help="Vector file, shipped vector name or one relation of a bank (BANK#RELATION), patched where its file says: at the last prompt token, or at every token for one whose fvpatch.apply_at is all (an imported control vector); without it only the baselines run.")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True, help="Which split's queries to score.")
@click.option("--test-pairs", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="Score every pair of this .json/.jsonl/.csv as a test item (e.g. pairs held out from a vector's training) instead of a split of --task, "
                   "with demonstrations from --task's train split (the pairs the vector was trained on); pairs whose input --task also holds are left out, and said so.")
@click.option("--n", "n_items", type=click.IntRange(1), default=100, show_default=True, help="Queries scored (the first of the split; with --test-pairs: all of the file's unless given).")
@click.option("--demos", type=click.Choice(["per-query", "shared"]), default="per-query", show_default=True, help="Each query its own draw of demonstrations (Todd et al.'s protocol, the README's tables, which also score one prompt per decode: --one-at-a-time), or one draw for all (a prefix batched llama.cpp decodes once: many times faster).")
@click.option("--one-at-a-time", is_flag=True, help="llama.cpp: one prompt per decode, as `fvpatch patch` runs, instead of batched (slower; logits can differ by about one on a 4-bit model).")
def task(task, engine, k, template_name, seed, model, out, force, n_gpu_layers, dtype, device, vector, split, test_pairs, n_items, demos, one_at_a_time):
    """Top-1 accuracy of the answer's first token on a relation task: zero-shot, k-shot ICL, shuffled-label
    k-shot, and with a vector: zero-shot + vector, shuffled + vector; on all items and on those ICL solves.
    With a vector it also says whether zero-shot + vector and ICL differ at all on these items: the gap with
    its 95% confidence interval, and an exact sign test on the items only one of them gets right.

    A file given to --task is split 60/10/30 into train/valid/test by a hash of each input, and only its
    test (or valid) split is scored. To score pairs held out from a vector's training, give the training
    pairs to --task and the held-out file to --test-pairs. -o lists the items scored, in the order of
    each `correct` list.

    \b
    Examples:
      fvpatch eval task --task antonym --vector vectors/gemma-3-270m/antonym.fv.safetensors
      fvpatch eval task --task capitalize --vector capitalize.taskvec.safetensors --engine both -o results/cap.json
      fvpatch eval task --task pairs.json --test-pairs heldout.json --vector v.safetensors -o heldout-results.json
    """
    from fvpatch.evaluate import build_items, evaluate
    from fvpatch.paired import compare

    _torch_unused(engine == "llamacpp", dtype, device)
    if test_pairs and given("split"):
        raise click.UsageError("--split chooses the split of --task to score; with --test-pairs every pair of that file is scored instead")
    check_outputs([out], force)
    vf = _load_vector(vector, model)
    t, tpl = _task_and_template(task, template_name, vf)
    own_file = not is_vendored(task)
    if test_pairs:
        kept, dropped = _test_pairs(t, task, test_pairs)
        queries = kept[:n_items] if given("n_items") else kept
        _check_pool(t, task, queries, k)
        note = _left_out_note(task, test_pairs, len(kept), dropped) if dropped else None
    else:
        queries, dropped = _queries(t, split, n_items), []
        _check_pool(t, task, queries, k, " (to score a held-out file against the pairs a vector was trained on: --task TRAINING-PAIRS --test-pairs HELD-OUT-FILE)"
                    if own_file else "")
        note = (f"note: {task} holds {split_summary(t)}; its {split} split is scored (-o lists the items; --test-pairs FILE scores every pair of a held-out file)"
                if own_file else None)
    results = {}
    with _engines(engine, model, vf.model if vf else None, dtype=dtype, device=device, batched=not one_at_a_time, n_gpu_layers=n_gpu_layers, force=force) as engines:
        for name, (predict, tokenize) in engines.items():
            items = build_items(tokenize, tpl, queries, t.train, k, seed, shared_demos=demos == "shared")
            results[name] = evaluate(predict, items, vf)
    if note:  # once scored, so that a refusal on the way is still the one line on stderr
        click.echo(note, err=True)
    first = next(iter(results.values()))
    scored = f"{test_pairs}: {first['n']} held-out items, demonstrations from the {len(t.train)} train pairs of {task}" if test_pairs else f"{t.name}, {split} split: {first['n']} items"
    solved = " / ".join(f"{r['n_icl_solved']}" for r in results.values()) + (f" ({' / '.join(results)})" if len(results) > 1 else "")
    click.echo(f"{scored}, {solved} solved by {k}-shot ICL; template {tpl.name!r}" + (f"; vector {vf.tensor} ({vf.mode}, {'every token' if vf.meta.get('fvpatch.apply_at') == 'all' else 'last prompt token'})" if vf else ""))
    click.echo("| condition | " + " | ".join(f"{e}: all | {e}: ICL-solved" for e in results) + " |")
    click.echo("|---|" + "---:|---:|" * len(results))
    for cond in first["all"]:
        cells = [f"{100 * r['all'][cond]:.1f}% | " + ("-" if r["icl_solved"][cond] is None else f"{100 * r['icl_solved'][cond]:.1f}%") for r in results.values()]
        click.echo(f"| {cond} | " + " | ".join(cells) + " |")
    if vf:
        for name, r in results.items():
            r["vector_vs_icl"] = c = compare(r["correct"]["zero_shot+vector"], r["correct"]["icl"])
            click.echo(f"{name}: zero-shot + vector − ICL = {100 * (c['ffv'] - c['icl']) / c['n']:+.1f} points (95% CI {100 * c['ci'][0]:+.1f} to "
                       f"{100 * c['ci'][1]:+.1f}); {c['only_ffv']} items only the vector gets, {c['only_icl']} only ICL (sign test p {_p_text(c['p'])})")
    pairs = lambda ps: [{"input": x, "output": y} for x, y in ps]
    held = {"test_pairs": test_pairs, "left_out": pairs(dropped)} if test_pairs else {}
    # items: what was scored, in the order of every `correct` list (a pairs file's own layout, so the failures can be fed back)
    settings = {"model": str(model or "default"), "engine": engine, "seed": seed, "one_at_a_time": one_at_a_time,
                **({"dtype": dtype, "device": device} if engine != "llamacpp" else {})}  # two runs' files tell apart
    _write_json(out, {"task": t.name, "split": None if test_pairs else split, **held, "k": k, "demos": demos, "template": tpl.text, "vector": vector,
                      "settings": settings, "items": pairs(queries), "results": results})


@eval_cmd.command()
@_eval_options
@click.option("--vector", default=None, metavar="NAME|FILE|BANK#RELATION", help="A function vector (add mode) to move across layers: a file, a shipped vector's name or one relation of a bank, BANK#RELATION.")
@click.option("--method", type=click.Choice(["taskvec"]), default=None, help="Instead of --vector: compute the task vector of every layer (needs torch).")
@click.option("--n-prompts", type=click.IntRange(1), default=25, show_default=True, help="--method taskvec: demo sets averaged, one train pair each as their query.")
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True, help="Which split's queries to score.")
@click.option("--n", "n_items", type=click.IntRange(1), default=50, show_default=True, help="Queries scored per layer.")
@click.option("--condition", type=click.Choice(["zero_shot", "shuffled"]), default="zero_shot", show_default=True, help="Which prompts get the vector.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw accuracy against layer to this PNG.")
def sweep(task, engine, k, template_name, seed, model, out, force, n_gpu_layers, dtype, device, vector, method, n_prompts, split, n_items, condition, plot):
    """Accuracy with the vector placed at each layer in turn (a function vector is added there unchanged;
    task vectors are recomputed per layer), next to the zero-shot and ICL baselines.

    \b
    Examples:
      fvpatch eval sweep --task capitalize --vector capitalize.fv.safetensors --engine torch
      fvpatch eval sweep --task country-capital --method taskvec --plot results/cc_sweep.png
    """
    from dataclasses import replace

    from fvpatch import vectorfile
    from fvpatch.evaluate import base_correct, build_items
    from fvpatch.evaluate import sweep as layer_sweep

    if (vector is None) == (method is None):
        raise click.UsageError("give exactly one of --vector FILE or --method taskvec")
    if method is None and given("n_prompts"):
        raise click.UsageError("--n-prompts sets the demo sets of --method taskvec; a --vector is moved across layers as it is")
    _torch_unused(engine == "llamacpp" and method is None, dtype, device)
    check_outputs([out, plot], force)
    vf = _load_vector(vector, model)
    t, tpl = _task_and_template(task, template_name, vf)
    queries = _queries(t, split, n_items)
    _check_pool(t, task, queries, k)
    if method:
        check_prompts_first(t, n_prompts, k, task)
    lm = None
    if vf is not None:
        if not vf.model.get("n_layer"):
            raise click.ClickException(f"{vector} does not record its model's n_layer")
        files = {L: replace(vf, tensor=f"l_out-{L}") for L in range(int(vf.model["n_layer"]))}
    else:
        from train.model import load_model
        from train.taskvec import task_vectors

        lm = load_model(model, device, dtype, cli_threads())
        rows = task_vectors(lm, t, tpl, k, n_prompts, seed=seed).cpu().numpy()
        files = {L: vectorfile.VectorFile(f"l_out-{L}", rows[L], [-1], lm.fingerprint, mode="replace") for L in range(lm.n_layer)}
    results = {}
    with _engines(engine, model, vf.model if vf else None, lm, dtype, device, n_gpu_layers=n_gpu_layers, force=force) as engines:
        for name, (predict, tokenize) in engines.items():
            items = build_items(tokenize, tpl, queries, t.train, k, seed)
            base = {c: float(v.mean()) for c, v in base_correct(predict, items).items()}
            results[name] = {"baselines": base, "by_layer": layer_sweep(predict, items, files, f"{condition}+vector")}
    click.echo(f"{t.name}, {split} split, {len(queries)} items: {condition} + {'the vector' if vf else 'the task vector of each layer'} by layer")
    for name, r in results.items():
        click.echo(f"{name}: " + " ".join(f"{L}:{a:.2f}" for L, a in r["by_layer"].items())
                   + "  | " + " ".join(f"{c} {a:.2f}" for c, a in r["baselines"].items()))
    if plot:
        from train.plots import plot_layer_curves

        curves = {t.name: {f"{condition}+vector ({e})": r["by_layer"] for e, r in results.items()}}
        base = next(iter(results.values()))["baselines"]
        plot_layer_curves(curves, {t.name: {"zero-shot": base["zero_shot"], f"{k}-shot ICL": base["icl"]}}, plot, f"top-1 accuracy ({split})")
    _write_json(out, {"task": t.name, "split": split, "n": len(queries), "k": k, "template": tpl.text, "vector": vector, "method": method,
                      "condition": condition, "results": {e: {"baselines": r["baselines"], "by_layer": {str(L): a for L, a in r["by_layer"].items()}} for e, r in results.items()}})
