"""`fvpatch sweep` and `fvpatch reversal`: the seed's transfer experiments over every layer, as rerunnable commands."""

import json
from pathlib import Path

import click

from fvpatch.atomic import check_outputs, write_json
from fvpatch.cli import INT32_MAX, PROMPT, SEED, PromptText, emit, main, model_options, open_session, parse_layers
from fvpatch.errors import FvpatchError
from fvpatch.experiments import Reversal, check_layers, check_lengths, prepare_reversal, reversal_answer, run_layers, transfer_sweep, verify

LAYER_HELP = "Layers: N, N,M,..., A-B or all."


@main.command()
@model_options
@click.option("--prompt", "-p", "source", type=PROMPT, required=True, help="The source prompt; its last token's row is saved.")
@click.option("--target", "-t", type=PROMPT, required=True, help="The target prompt; its last token's row is replaced.")
@click.option("--tensor", default="l_out", show_default=True, help="Graph tensor base name, saved and patched at the same layer.")
@click.option("--layer", "--layers", "layer_spec", default="all", show_default=True, help=LAYER_HELP)
@click.option("--max-tokens", "-n", type=click.IntRange(1, INT32_MAX), default=8, show_default=True, help="Tokens to generate (greedy).")
@click.option("--expect", type=PromptText("the text a continuation should start with"), default=None, help="Mark the layers whose continuation starts with this text (e.g. ' Paris'; not empty, which every continuation starts with).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def sweep(model, n_ctx, n_gpu_layers, source, target, tensor, layer_spec, max_tokens, expect, as_json):
    """Layer sweep of the seed transfer: at each layer, the source's last-token row replaces the target's
    last-token row, and the model generates greedily.

    \b
    Example: the country->capital task vector at every layer
      fvpatch sweep -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->" --target "France ->" --expect " Paris"
    """
    with open_session(model, n_ctx, n_gpu_layers) as s:
        result = transfer_sweep(s, source, target, tensor, parse_layers(layer_spec, s.n_layer), max_tokens)
        model_file = s.path.name
    hits = [L for L, text in result.completions.items() if expect is not None and text.startswith(expect)]
    payload = {"model": model_file, "source": source, "target": target, "tensor": tensor, "max_tokens": max_tokens,
               "unpatched": result.unpatched, "completions": {str(L): text for L, text in result.completions.items()}}
    lines = [f"{tensor} at the last token of {source!r}, written over the last token of {target!r}:",
             f"unpatched   {result.unpatched!r}"]
    lines += [f"layer {L:>3}{' *' if L in hits else '  '} {text!r}" for L, text in result.completions.items()]
    if expect is not None:
        payload |= {"expect": expect, "layers_expected": hits}
        lines.append(f"* continuation starts with {expect!r}: layers {', '.join(map(str, hits)) or 'none'}")
    emit(as_json, payload, lines)


@main.command()
@model_options
@click.option("--layer", "--layers", "layer_spec", default="all", show_default=True, help=LAYER_HELP)
@click.option("--n", "n_lists", type=click.IntRange(1), default=40, show_default=True, help="Target lists wanted (lists the unpatched model does not reverse).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the generated lists.")
@click.option("--lengths", default="3,4,5", show_default=True, help="List lengths to draw from.")
@click.option("--tensor", default="l_out", show_default=True, help="Graph tensor base name, saved and patched at the same layer.")
@click.option("--verify", "n_verify", type=click.IntRange(0), default=4, show_default=True, help="Replay this many patched and unpatched cases with one-sequence generation (0: none; a resumed run keeps its earlier replay).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write the results here as JSON after each layer; an interrupted run resumes from it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def reversal(model, n_ctx, n_gpu_layers, layer_spec, n_lists, seed, lengths, tensor, n_verify, output, as_json):
    """The seed's list reversal as a rate: `l_out-L` at the last token of `1 2 3 to 3 2 1, 5 6 7 to 7 `
    written over the last token of targets like `4 5 6 to 6 `, on generated lists of single-token digits
    that the unpatched model does not reverse by itself.

    Per layer, two sources: the seed's prompt (fixed, one vector for all targets) and, per target, a prompt
    of the seed's shape on other lists of the same length (matched). Rates: the whole reversed remainder
    (`full`), its first item (`first`), and the source's own next item (`copy`), from greedy decoding,
    decided by one packed teacher-forced decode per 64 cases.

    \b
    Example:
      fvpatch reversal --model qwen2.5-coder-1.5b --layer 8-20 --n 40 --seed 0 -o reversal.json
    """
    try:
        length_tuple = tuple(sorted({int(x) for x in lengths.split(",")}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {lengths!r}", param_hint="--lengths") from None
    check_lengths(length_tuple)  # before the model loads (or a known model is fetched)
    check_outputs([output], exist_ok=True)  # an existing file is an earlier run to resume
    old = read_earlier(Path(output)) if output and Path(output).exists() else None  # a file that is no results file: refused before any work
    with open_session(model, n_ctx, n_gpu_layers) as s:
        layers = parse_layers(layer_spec, s.n_layer)
        check_layers(s, tensor, layers)
        result = prepare_reversal(s, n_lists, seed, length_tuple, tensor)
        header = {"model": s.fingerprint(), "n": n_lists, "seed": seed, "lengths": list(length_tuple)}
        previous = earlier_run(Path(output), old, reversal_json(result, header), s.n_layer) if old is not None else {}
        result.layers = {int(L): v for L, v in previous.get("layers", {}).items()}
        write = (lambda r: write_json(output, reversal_json(r, header))) if output else None
        run_layers(s, result, layers, on_layer=write)
        checked = verify(s, result, n_verify, seed) if n_verify else previous.get("verify")
    payload = reversal_json(result, header) | {"verify": checked}
    if output:
        write_json(output, payload)
    emit(as_json, payload, reversal_lines(result, layers, header, checked))


def reversal_json(result: Reversal, header: dict) -> dict:
    return header | {
        "tensor": result.tensor, "fixed_source": result.fixed_source, "examined": result.examined, "dropped": result.dropped,
        "targets": [{"list": " ".join(t.items), "answer": reversal_answer(t.items), "source": t.source, "unpatched_first": first}
                    for t, first in zip(result.targets, result.unpatched_first_each)],
        "unpatched": {"full": 0.0, "first": result.unpatched_first, "copy": result.unpatched_copy},
        "sources_reverse": result.sources_reverse,
        "layers": {str(L): result.layers[L] for L in sorted(result.layers)},
    }


def read_earlier(path: Path) -> dict:
    """The JSON object in `path`, an earlier run's results file, or one line saying it is none."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FvpatchError(f"{path} exists but is not a readable results file ({e}); remove it or choose another --output") from None
    if type(old) is not dict or type(old.get("layers", {})) is not dict:
        raise FvpatchError(f"{path} exists but is not a results file of `fvpatch reversal`; remove it or choose another --output")
    return old


def earlier_run(path: Path, old: dict, fresh: dict, n_layer: int) -> dict:
    """The results of an earlier run (`old`, read from `path`), if it measured the same targets with the same settings
    and each of its layers holds what this run reports and replays."""
    differ = [k for k in fresh if k not in ("layers", "verify") and old.get(k) != fresh[k]]
    if differ:
        raise FvpatchError(f"{path} holds a run with other {', '.join(differ)}; remove it or choose another --output")
    n = len(fresh["targets"])
    for key, kinds in old.get("layers", {}).items():
        if not (key.isdigit() and str(int(key)) == key and int(key) < n_layer and _layer_result(kinds, n)):
            raise FvpatchError(f"{path} holds a malformed or impossible result for layer {key!r} (this model has layers 0..{n_layer - 1}); "
                               f"remove it or choose another --output")
    verify = old.get("verify")
    if verify is not None and not (type(verify) is dict and all(type(verify.get(k)) is int for k in ("cases", "agree"))
                                   and type(verify.get("disagree")) is list):
        raise FvpatchError(f"{path} holds a malformed replay (verify); remove it or choose another --output")
    return old


def _layer_result(kinds, n: int) -> bool:
    """Whether `kinds` is one layer's results as `run_layers` writes them for `n` targets."""
    def rates(r) -> bool:
        return (type(r) is dict and all(type(r.get(k)) in (int, float) and 0 <= r[k] <= 1 for k in ("full", "first", "copy"))
                and type(r.get("full_each")) is list and len(r["full_each"]) == n and all(x in (0, 1) and type(x) is int for x in r["full_each"])
                and type(r.get("first_token_each")) is list and len(r["first_token_each"]) == n
                and all(type(x) is str for x in r["first_token_each"]))
    return type(kinds) is dict and rates(kinds.get("fixed")) and rates(kinds.get("matched"))


def reversal_lines(result: Reversal, layers: list[int], header: dict, checked: dict | None) -> list[str]:
    pct = lambda x: f"{100 * x:5.1f}%"
    n = len(result.targets)
    lines = [
        f"{n} target lists the unpatched model does not reverse: {result.examined} generated (lengths "
        f"{','.join(map(str, header['lengths']))}, seed {header['seed']}), {len(result.dropped)} dropped as reversed unpatched",
        f"unpatched on the targets: full {pct(0.0)}, first item {pct(result.unpatched_first)}, "
        f"copy (by chance) fixed {pct(result.unpatched_copy['fixed'])}, matched {pct(result.unpatched_copy['matched'])}",
        f"source prompts the model itself reverses: fixed {pct(result.sources_reverse['fixed'])}, matched {pct(result.sources_reverse['matched'])}",
        f"{'layer':>5}  {'fixed: full':>11} {'first':>6} {'copy':>6}   {'matched: full':>13} {'first':>6} {'copy':>6}",
    ]
    for L in layers:
        f, m = result.layers[L]["fixed"], result.layers[L]["matched"]
        lines.append(f"{L:>5}  {pct(f['full']):>11} {pct(f['first'])} {pct(f['copy'])}   {pct(m['full']):>13} {pct(m['first'])} {pct(m['copy'])}")
    if checked:
        lines.append(f"replayed with one-sequence generation: {checked['agree']} of {checked['cases']} cases agree")
    return lines
