"""`fvpatch train ...`: vectors made in PyTorch. torch is imported inside the commands, never at import time."""

import click

from fvpatch.atomic import check_outputs
from fvpatch.cli import INT32_MAX, MODEL_HELP, SEED, FiniteFloat, check_layer, cli_threads, threads_option
from fvpatch.tasks import pairs_needed, split_percentages, split_summary

# Adam moves each coordinate by about lr a step: far beyond 1 the run only diverges, and far enough (lr times the
# residual's scale) it overflows float32 inside the optimizer
MAX_LR = 100.0


@click.group()
def train():
    """Extract or train vectors in PyTorch and write them as fvpatch vector files."""


# the names of train.model.DTYPES and DEVICES, written out so that --help needs no torch
torch_options = [
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
                 help="Weights and activations of the PyTorch model; vectors are still trained and written in float32. "
                      "bfloat16 halves the weights' memory (README: Training on bigger models)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
                 help="Where the PyTorch model runs; auto: CUDA if present, else Apple MPS, else the CPU."),
]


def _torch_options(f):
    for opt in reversed(torch_options):
        f = opt(f)
    return threads_option(f)


@train.command()
@click.option("--task", default=None, help="A vendored relation task, e.g. antonym (the files in fvpatch/datasets/).")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), default=None,
              help=f"Your own pairs: .json/.jsonl/.csv with input and output. The file is split {split_percentages()} by a hash of "
                   f"each input, and --n-train takes the first of the train split: the default 20 needs {pairs_needed(20)} or more distinct pairs.")
@click.option("--n-train", type=click.IntRange(1), default=20, show_default=True, help="Train pairs to learn from (the first of the train split).")
@click.option("--n-valid", type=click.IntRange(1), default=50, show_default=True, help="Valid pairs for early stopping (at most).")
@click.option("--layer", type=click.IntRange(0, INT32_MAX), default=None, help="Add the vector to the output of this block (l_out-LAYER). Default: the layer chosen on the model's valid pairs (4 on Gemma 3 270M, 16 on Qwen2.5-Coder 1.5B; train.ffv.MEASURED_LAYERS).")
@click.option("--init", type=click.Choice(["fv", "taskvec", "random", "zeros"]), default=None, help="Starting vector: the task vector or the function vector of 10-shot prompts over the training pairs, a random residual-sized one, or zeros. Default: taskvec, or zeros with --positions all (chosen on valid pairs, results/ffv/sweep.md).")
@click.option("--lr", type=FiniteFloat(min=0, above=True, max=MAX_LR), default=None, help=f"Adam learning rate, relative to the residual's RMS coordinate at the layer (at most {MAX_LR:g}). Default: 0.05, or 0.02 with --positions all.")
@click.option("--steps", type=click.IntRange(1), default=60, show_default=True, help="Most optimizer steps (cosine decay over them; early stopping may end sooner).")
@click.option("--l2", type=FiniteFloat(min=0), default=0.0, show_default=True, help="Penalty on the vector's squared norm (relative to the residual's).")
@click.option("--l2-from-init", type=FiniteFloat(min=0), default=0.0, show_default=True, help="Penalty on the squared distance from the initial vector.")
@click.option("--targets", type=click.Choice(["answer", "icl"]), default="answer", show_default=True, help="Fit the gold answer tokens, or what 10-shot ICL over the other training pairs predicts at each of them (soft targets; last token only).")
@click.option("--every-answer-token", is_flag=True, help="Also add the vector at every answer token (apply it with `patch --every-token`).")
@click.option("--positions", type=click.Choice(["last", "all"]), default="last", show_default=True, help="Train the vector at the last prompt token, or at every token as llama.cpp applies a control vector (`fvpatch export`).")
@click.option("--template", "template_name", default="qa", show_default=True, help="Prompt template: qa, arrow, or a string with {x} and {y}.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Vector file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@_torch_options
def ffv(task, pairs, n_train, n_valid, layer, init, lr, steps, l2, l2_from_init, targets, every_answer_token, positions, template_name, seed, model, out, force, dtype, device):
    """Fine-tune a function vector: one vector, added at the answer-predicting token of zero-shot prompts,
    learned from ~20 pairs with the model frozen.

    \b
    Examples:
      fvpatch train ffv --task antonym --out antonym.ffv.safetensors
      fvpatch train ffv --pairs examples/animal-young.json --out young.ffv.safetensors
      fvpatch patch -p $'Q: cat\\nA:' --vector young.ffv.safetensors -n 4
    """
    from fvpatch import vectorfile
    from fvpatch.prompts import template
    from fvpatch.tasks import load_task
    from train.ffv import ALL_TOKENS, Config, default_layer, prepare, train_ffv
    from train.model import load_model

    if (task is None) == (pairs is None):
        raise click.UsageError("give exactly one of --task NAME or --pairs FILE")
    if targets == "icl" and (positions == "all" or every_answer_token):
        raise click.UsageError("--targets icl trains a vector for the last prompt token only (not with --positions all or --every-answer-token)")
    defaults = ALL_TOKENS if positions == "all" else Config()
    init, lr = init or defaults.init, lr or defaults.lr
    # the fv and taskvec starts and ICL targets are prompts with demonstrations drawn from the other train pairs
    need = max({"fv": 3, "taskvec": 2}.get(init, 1), 2 if targets == "icl" else 1)
    if n_train < need:
        raise click.BadParameter(f"{n_train} train pair(s) leave too few demonstrations for the {init} start with --targets {targets}; "
                                 f"give {need} or more", param_hint="--n-train")
    check_outputs([out], force)
    tpl, pairs_task = template(template_name), load_task(task or pairs)
    _check_split_first(pairs_task, pairs, n_train)
    _check_layer_first(layer, model)
    lm = load_model(model, device, dtype, cli_threads())
    if layer is None:
        layer, measured = default_layer(lm)
        if not measured:
            click.echo(f"warning: no FFV layer has been chosen on this model's valid pairs; using layer {layer} (the default model's "
                       f"relative depth). Choose one with `python -m train.sweep_ffv --model {model}` or pass --layer", err=True)
    data = prepare(lm, pairs_task, tpl, n_train, n_valid, positions)
    cfg = Config(layer=layer, init=init, lr=lr, steps=steps, l2=l2, l2_from_init=l2_from_init, every_answer_token=every_answer_token,
                 positions=positions, seed=seed, targets=targets)
    vf, hist = train_ffv(lm, data, tpl, cfg)
    vectorfile.save(vf, out, overwrite=force)
    click.echo(f"{vf.tensor} vector ({init} init) after {vf.meta['fvpatch.steps']} steps, kept step {hist.best_step}: "
               f"train loss {vf.meta['fvpatch.train_loss']}, valid loss {vf.meta['fvpatch.valid_loss']} -> {out}")
    if hist.best_step == 0:
        click.echo(f"warning: no step improved the valid loss, so {out} holds the initial ({init}) vector; try another --layer or --lr", err=True)


@train.command()
@click.option("--bank", "bank_path", type=click.Path(exists=True), default=None, help="Folder of .ffv.safetensors or a bank file (default: the FFVs shipped for the model).")
@click.option("--n-train", type=click.IntRange(1), default=200, show_default=True, help="Training analogies, generated from the tasks' train and valid pairs (never their test pairs, nor the pairs a vector was fit on); for an FFV of your own pairs, from the pairs it was trained on, the only ones the bank records.")
@click.option("--objective", type=click.Choice(["answer", "relation"]), default="relation", show_default=True, help="Maximize log P(D | C, CFV), or the weight of the analogy's relation.")
@click.option("--l2", type=FiniteFloat(min=0), default=0.01, show_default=True, help="Penalty on the map's squared distance from the unlearned softmax(s/T).")
@click.option("--lr", type=FiniteFloat(min=0, above=True, max=MAX_LR), default=0.02, show_default=True, help=f"Adam learning rate (at most {MAX_LR:g}).")
@click.option("--steps", type=click.IntRange(1), default=100, show_default=True, help="Optimizer steps.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the generated analogies and of the minibatch order.")
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Bank file to write (default: analogy.bank.safetensors beside the bank's vectors).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@_torch_options
def cfv(bank_path, n_train, objective, l2, lr, steps, seed, model, out, force, dtype, device):
    """Fit the map that composes a bank of function vectors into one vector for an analogy A:B::C:?,
    and write the bank with its map as one file (what `fvpatch analogy` uses). The bank may hold FFVs of
    your own pairs (`train ffv --pairs`) beside vendored tasks' FFVs.

    \b
    Examples:
      fvpatch train cfv --bank vectors/gemma-3-270m --force
      fvpatch train cfv --bank my-ffvs/ -o my.bank.safetensors
    """
    from pathlib import Path

    from fvpatch.analogyfile import generate, own_relations
    from fvpatch.bank import BANK_NAME, load_bank, save_bank
    from fvpatch.modelfile import ModelFile
    from fvpatch.models import check_fingerprint, resolve_model
    from fvpatch.shipped import model_folder
    from train.cfv import FitConfig, bank_scores, fit_map
    from train.model import load_model

    if bank_path is None:  # the FFVs shipped for this model, whichever quantization of it is used
        with ModelFile(resolve_model(model), vocab_only=True) as mf:
            bank_path = model_folder(mf.fingerprint())
    out = Path(out or Path(bank_path if Path(bank_path).is_dir() else Path(bank_path).parent) / BANK_NAME)
    check_outputs([out], force)
    bank = load_bank(bank_path)
    if not (model and Path(model).is_dir()):  # before any weights load or convert
        with ModelFile(resolve_model(model), vocab_only=True) as mf:
            check_fingerprint(bank.model, mf.fingerprint())
    own = own_relations(bank.names, bank.trained_on)
    analogies = generate(bank.names, "train", n_train, seed, exclude=bank.trained_on, own=own)
    if own:  # the map then also learns from pairs those vectors were fit on: said, not hidden
        click.echo(f"note: {', '.join(own)} {'is' if len(own) == 1 else 'are'} of your own pairs: {'its' if len(own) == 1 else 'their'} "
                   f"training analogies are drawn from the pairs {'its FFV was' if len(own) == 1 else 'their FFVs were'} trained on, "
                   f"the only ones the bank records", err=True)
    lm = load_model(model, device, dtype, cli_threads())
    check_fingerprint(bank.model, lm.fingerprint)
    scores = bank_scores(lm, bank, [(x.a, x.b) for x in analogies], progress=True)
    cfv_map, hist = fit_map(lm, bank, analogies, scores, FitConfig(objective, l2, lr, steps, seed=seed))
    bank.meta = {k: v for k, v in bank.meta.items() if not k.startswith("fvpatch.cfv.")} | cfv_map.to_meta() | {"fvpatch.cfv.train_dtype": dtype}
    save_bank(bank, out, overwrite=force)
    click.echo(f"{len(bank)} relations at {bank.tensor}; {n_train} training analogies; unlearned T = {cfv_map.temperature:g}; "
               f"{objective} loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f} -> {out}")


@train.command(name="fv")
@click.option("--task", required=True, help="A vendored relation task (e.g. antonym) or your .json/.jsonl/.csv of input/output pairs.")
@click.option("--method", type=click.Choice(["cma", "taskvec"]), default="cma", show_default=True,
              help="cma: function vector from the top heads by causal mediation (Todd et al.); taskvec: task vector (Hendel et al.).")
@click.option("--layer", type=click.IntRange(0, INT32_MAX), default=None, help="Block whose output gets the vector (l_out-LAYER). Default: the best on the valid split.")
@click.option("--heads", "n_heads", type=click.IntRange(1), default=None, help="cma: number of top heads summed. Default: chosen with the layer on the valid split among 1, 2, 3, 5, 10, 20.")
@click.option("--n-prompts", type=click.IntRange(1), default=25, show_default=True, help="cma: clean/corrupted prompts for the head map; taskvec: demo sets averaged.")
@click.option("--k", type=click.IntRange(2), default=10, show_default=True, help="Demonstrations per prompt (at least 2, which shuffled labels need).")
@click.option("--n-valid", type=click.IntRange(1), default=50, show_default=True, help="Valid pairs scored per layer when choosing the layer.")
@click.option("--template", "template_name", default="qa", show_default=True, help="Prompt template: qa, arrow, or a string with {x} and {y}.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the demonstrations drawn.")
@click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="Vector file to write (default: TASK.fv.safetensors or TASK.taskvec.safetensors).")
@click.option("--heatmap", type=click.Path(dir_okay=False), default=None, help="cma: also draw the head AIE map to this PNG.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@_torch_options
def fv(task, method, layer, n_heads, n_prompts, k, n_valid, template_name, seed, model, out, heatmap, force, dtype, device):
    """Extract a function vector (causal mediation over attention heads) or a task vector from k-shot
    prompts of a relation task, choose its layer on the valid split, and write it as a vector file.

    \b
    Examples:
      fvpatch train fv --task antonym --out vectors/antonym.fv.safetensors
      fvpatch train fv --task country-capital --method taskvec --layer 9
      fvpatch patch -p $'Q: Peru\\nA:' --vector country-capital.taskvec.safetensors -n 4
    """
    import json
    from pathlib import Path

    from fvpatch import vectorfile
    from fvpatch.errors import FvpatchError
    from fvpatch.prompts import template
    from fvpatch.tasks import load_task
    from train.cma import train_fv
    from train.evaluate import torch_predictor
    from train.model import load_model
    from train.taskvec import train_taskvec

    if heatmap and method != "cma":
        raise click.UsageError("--heatmap draws the head map of --method cma; a task vector has none")
    t = load_task(task)
    if not t.valid and (layer is None or method == "cma" and n_heads is None):
        raise FvpatchError(f"task {t.name!r} has no valid pairs to choose the {'layer' if layer is None else 'number of heads'} on "
                           f"({len(t.train)} train, {len(t.test)} test); give more pairs, or --layer{' and --heads' if method == 'cma' else ''}")
    out = Path(out or f"{t.name}.{'fv' if method == 'cma' else 'taskvec'}.safetensors")
    check_outputs([out, heatmap], force)
    check_prompts_first(t, n_prompts, k, task)
    tpl = template(template_name)
    _check_layer_first(layer, model)
    lm = load_model(model, device, dtype, cli_threads())
    check_layer(layer, lm.n_layer)  # a Hugging Face directory's, now that it is loaded
    if n_heads is not None and n_heads > lm.n_layer * lm.n_head:
        raise click.BadParameter(f"{n_heads} is more than the model's {lm.n_layer * lm.n_head} heads", param_hint="--heads")
    if layer is None or method == "cma" and n_heads is None:  # chosen on the valid pairs: say how many there are
        click.echo(f"choosing the {'layer' if layer is None else 'number of heads'} on {min(n_valid, len(t.valid))} valid pairs of {t.name}", err=True)
    predict = torch_predictor(lm)
    if method == "cma":
        vf, hm, grid = train_fv(lm, t, tpl, predict, k, n_prompts, n_heads, layer, n_valid, seed)
        heads = [tuple(x) for x in json.loads(vf.meta["fvpatch.heads"])]
        click.echo("heads (layer, head): AIE  " + "  ".join(f"({L},{h}): {float(hm.aie[L, h]):.3f}" for L, h in heads))
        for n, acc in grid.items():
            click.echo(f"valid zero-shot+FV, top {n} heads, by layer: " + " ".join(f"{L}:{a:.2f}" for L, a in acc.items()))
    else:
        vf, acc = train_taskvec(lm, t, tpl, predict, k, n_prompts, layer, n_valid, seed)
        if acc:
            click.echo("valid zero-shot+TV by layer: " + " ".join(f"{L}:{a:.2f}" for L, a in acc.items()))
    scored = grid.values() if method == "cma" else [acc] if acc else []
    if scored and not any(a > 0 for accs in scored for a in accs.values()):
        click.echo(f"warning: nothing scored above 0 on the valid pairs, so the choice of {vf.tensor} is arbitrary; try more --k or --n-prompts", err=True)
    vectorfile.save(vf, out, overwrite=force)  # before the picture, so that a failing picture never costs the vector
    click.echo(f"{vf.tensor} ({vf.mode}) {method} vector for {t.name} -> {out}")
    if heatmap:
        from train.plots import plot_head_maps

        plot_head_maps({t.name: hm.aie.numpy()}, heatmap, {t.name: heads})
        click.echo(f"head map -> {heatmap}")


def check_prompts_first(t, n_prompts: int, k: int, task: str):
    """`--n-prompts` prompts (demo sets) have one train pair each as their query and `k` other train pairs as their
    demonstrations: a task with too few is refused before any model loads, naming the split and the fix."""
    from fvpatch.errors import FvpatchError

    if len(t.train) < n_prompts:
        raise FvpatchError(f"task {t.name!r} has {len(t.train)} train pairs (its {split_summary(t)}), fewer than "
                           f"the {n_prompts} prompts asked for, one query each; give --n-prompts {len(t.train)} or fewer, or more pairs in {task}")
    if len(t.train) - 1 < k:
        raise FvpatchError(f"{k}-shot prompts need {k} demonstrations besides their query, and task {t.name!r} has {len(t.train)} train pairs "
                           f"(its {split_summary(t)}); give --k {len(t.train) - 1} or less, or more pairs in {task}")


def _check_split_first(t, pairs_file: str | None, n_train: int):
    """The pairs train.ffv.prepare takes, counted before any model loads: a file too small for --n-train is refused in
    a second, saying how it was split and what to give, not after the PyTorch model has loaded."""
    from fvpatch.errors import FvpatchError
    from fvpatch.tasks import split_sizes

    n = len(t.train) + len(t.valid) + len(t.test)
    split = f"its {split_summary(t)}"
    if len(t.train) < n_train:
        more = f", or {pairs_needed(n_train)} or more distinct pairs in {pairs_file}" if pairs_file else ""
        raise FvpatchError(f"task {t.name!r} has {len(t.train)} train pairs, fewer than --n-train {n_train} ({split}); "
                           f"give --n-train {len(t.train)} or less{more}")
    if not t.valid:  # early stopping needs one
        more = next(m for m in range(n + 1, 10 * n + 10) if split_sizes(m)[1])
        raise FvpatchError(f"task {t.name!r} has no valid pairs for early stopping ({split}); give {more} or more distinct pairs"
                           + (f" in {pairs_file}" if pairs_file else ""))


def _check_layer_first(layer: int | None, model):
    """--layer against the GGUF's block count, read from its metadata before any weights load or convert (a
    Hugging Face directory is checked once loaded)."""
    from pathlib import Path

    from fvpatch.modelfile import ModelFile
    from fvpatch.models import resolve_model

    if layer is not None and not (model and Path(model).is_dir()):
        with ModelFile(resolve_model(model), vocab_only=True) as mf:
            check_layer(layer, mf.n_layer)
