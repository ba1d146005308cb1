"""Per task, the FFV at the last prompt token or at every token, chosen on VALID pairs, scored on test pairs.

A last-token FFV can only act after the query has been read; added at every token (as llama.cpp applies a
control vector) it also reaches the query's own tokens, at an earlier layer. For each core task this takes,
from the FFV sweep (`train.sweep_ffv --positions all`), the valid top-1 of the shipped last-token config
and of every every-token run; keeps the better (ties: the lower valid loss); where every-token wins, trains
that vector and scores it on the test pairs in llama.cpp, one prompt per decode as the FFV report does.
Where the last token wins, the shipped FFV and the FFV report's score stand. Test pairs choose nothing.
Then it scores the chosen FFV and 10-shot ICL item by item on the same test prompts, and tests the items only
one of them gets right with an exact sign test: whether "FFV >= ICL" on this test set is a difference at all.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_ffv_positions --model qwen2.5-coder-1.5b --dtype bfloat16

Writes vectors/<model>/<task>.ffv-all.safetensors for every task where every-token wins, and
results/<model>/ffv/positions_choice.{json,md}; resumable (a task's result is kept while the sweep's choice for it stands).
A task's result made with another --n-test, --dtype or --layer is refused, and so is replacing a shipped
every-token FFV, unless --force (which redoes every task).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import check_outputs, write_json, write_text
from fvpatch.evaluate import build_items, llamacpp_predictor
from fvpatch.paired import compare
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.tasks import CORE_TASKS, load_task
from train.ffv import ALL_TOKENS, Config, prepare, train_ffv
from train.model import DTYPES, load_model
from train.report_ffv import K, model_dirs
from train.reporting import add_options, positive_int, read_json, refuse_other, run
from train.sweep_ffv import config, default_out, read_runs


def choose(runs: list[dict], task: str, last: Config) -> tuple[dict, dict | None]:
    """(the shipped last-token config's sweep run, the best every-token run or None), both on valid pairs.
    Every-token runs of any layer and step budget compete; longer budgets exist where shorter runs still improved at their last step."""
    mine = [r for r in runs if r["task"] == task]
    shipped = [r for r in mine if config(r) == (last.layer, last.init, last.lr, last.steps, False, "last", 0.0, "answer")]
    every = [r for r in mine if config(r)[1:3] + config(r)[4:] == (ALL_TOKENS.init, ALL_TOKENS.lr, False, "all", 0.0, "answer")]
    if not shipped:
        raise SystemExit(f"{task}: the sweep has no run of the shipped config (layer {last.layer}, {last.init}, lr {last.lr}); run train.sweep_ffv first")
    best = max(every, key=lambda r: (r["valid_top1"], -r["valid_loss"]), default=None)
    return shipped[0], best


def wins(shipped: dict, every: dict | None) -> bool:
    return every is not None and (every["valid_top1"], -every["valid_loss"]) > (shipped["valid_top1"], -shipped["valid_loss"])


def paired_items(session: Session, task, tpl, vf, n_test: int) -> dict:
    """The chosen FFV and 10-shot ICL (seed 0) item by item on the same test pairs, one prompt per decode."""
    items = build_items(session.tokenize, tpl, task.test[:n_test], task.train[:20], K)
    predict, answers = llamacpp_predictor(session, batched=False), np.array(items.answers)
    return compare(np.array(predict(items.tokens["zero_shot"], vf)) == answers, np.array(predict(items.tokens["icl"], None)) == answers)


def ship_every_token(lm, session: Session, task, run: dict, tpl, n_test: int, bank) -> dict:
    """Train the every-token vector of a sweep run and ship it with its test top-1; its item-by-item comparison with ICL."""
    cfg = Config(layer=run["layer"], init=ALL_TOKENS.init, lr=ALL_TOKENS.lr, steps=run["steps"], positions="all")
    vf, _ = train_ffv(lm, prepare(lm, task, tpl, positions="all"), tpl, cfg)
    paired = paired_items(session, task, tpl, vf, n_test)
    vf.meta.update({"fvpatch.test_top1": f"{paired['ffv'] / paired['n']:.4f}", "fvpatch.test_n": str(paired["n"]),
                    "fvpatch.test_engine": f"llama.cpp, {session.path.name}, zero-shot {tpl.name} prompts, top-1 first token"})
    vectorfile.save(vf, bank / f"{task.name}.ffv-all.safetensors", overwrite=True)
    return paired


def chosen_vector(bank: Path, row: dict) -> Path:
    """The vector file of a task's chosen FFV."""
    return bank / f"{row['task']}{'.ffv-all' if row['chosen'] == 'every token' else '.ffv'}.safetensors"


def same_choice(row: dict, shipped: dict, every: dict | None) -> bool:
    """Whether a written result still stands: runs added to the sweep since can change the choice."""
    return (config(row["last"]), row["every"] and config(row["every"])) == (config(shipped), every and config(every))


def markdown(model: str, rows: list[dict], command: str) -> str:
    lines = [f"# FFV at the last token or at every token, chosen per task on valid pairs ({model})", "",
             f"Regenerate: `{command}`. Valid: PyTorch top-1 on the task's valid pairs (the FFV sweep). Test: llama.cpp top-1 of the "
             "first answer token on test pairs, one prompt per decode; ICL is the FFV report's 10-shot ICL (seed 0) and the mean of five "
             "demo draws (results/<model>/ffv/icl_spread.md).", "",
             "| task | valid: last token (layer) | valid: every token (layer, step budget) | chosen | test: chosen FFV | test: ICL seed 0 | ICL, mean of 5 draws | ≥ ICL seed 0 | ≥ ICL mean | items only FFV / only ICL gets | p |",
             "|---|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        e = r["every"]
        lines.append(f"| {r['task']} | {100 * r['last']['valid_top1']:.0f}% ({r['last']['valid_loss']:.2f}; {r['last']['layer']}) | "
                     + (f"{100 * e['valid_top1']:.0f}% ({e['valid_loss']:.2f}; {e['layer']}, {e['steps']} steps)" if e else "-")
                     + f" | {r['chosen']} | {100 * r['test']:.0f}% | {100 * r['icl']:.0f}% | "
                     + ("-" if r["icl_mean"] is None else f"{100 * r['icl_mean']:.1f}%")
                     + f" | {'yes' if r['test'] >= r['icl'] else 'no'} | {'-' if r['icl_mean'] is None else 'yes' if r['test'] >= r['icl_mean'] else 'no'} | "
                     + ("- | - |" if "paired" not in r else f"{r['paired']['only_ffv']} / {r['paired']['only_icl']} | {r['paired']['p']:.2f} |"))
    lines += ["", f"Chosen FFV ≥ ICL (seed 0) on {sum(r['test'] >= r['icl'] for r in rows)} of {len(rows)} tasks.", "",
              "Items only FFV / only ICL gets: the test pairs that exactly one of the two answers right (chosen FFV, ICL seed 0, same "
              "prompts, one per decode); p: exact two-sided sign test on those items (McNemar's exact test). A p well above 0.05 "
              "means the two cannot be told apart on this test set."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="Of the sweep to read and of the vectors trained.")
    ap.add_argument("--layer", type=int, default=16, help="The shipped last-token FFVs' layer.")
    ap.add_argument("--n-test", type=positive_int, default=100)
    ap.add_argument("--threads", type=positive_int, default=None)
    add_options(ap, "start over: redo every task, replacing the shipped every-token FFVs it chooses")
    args = ap.parse_args()

    path, name, results, bank = model_dirs(args.model, args, writes=True)
    out = results / "positions_choice.json"
    settings = {"n_test": args.n_test, "dtype": args.dtype, "layer": args.layer}
    done = {} if args.force else {r["task"]: r for r in (read_json(out) if out.exists() else [])}
    for task_name, row in done.items():
        # a row from before settings were recorded: the layer of its shipped config, the test pairs it scored (this
        # run's --n-test where that gives as many); its dtype is not recorded and is taken to be this run's sweep's
        n = row["paired"]["n"] if "paired" in row else len(load_task(task_name).test[: args.n_test])
        legacy = {"n_test": args.n_test if n == len(load_task(task_name).test[: args.n_test]) else n, "dtype": args.dtype, "layer": row["last"]["layer"]}
        refuse_other(f"{out} ({task_name})", row.get("settings", legacy), settings)
    runs = read_runs(default_out(args.model, args.dtype))
    spread = json.loads((results / "icl_spread.json").read_text()) if (results / "icl_spread.json").exists() else {}
    last = Config(layer=args.layer)
    choices = {t: choose(runs, t, last) for t in CORE_TASKS}
    redo = [t for t, (shipped, every) in choices.items() if t not in done or not same_choice(done[t], shipped, every)]
    check_outputs([bank / f"{t}.ffv-all.safetensors" for t in redo if wins(*choices[t])], force=args.force)
    tpl = template("qa")
    lm = None
    with Session(path, n_threads=args.threads) as session:
        for task_name in CORE_TASKS:
            shipped, every = choices[task_name]
            row = done.get(task_name)
            if task_name in redo:
                report = json.loads((results / "tasks" / f"{task_name}.json").read_text())["acc"]["llamacpp"]
                icl_draws = list(spread.get(task_name, {}).get("icl", {}).values())
                row = {"task": task_name, "settings": settings, "last": shipped, "every": every, "chosen": "every token" if wins(shipped, every) else "last token",
                       "icl": report["icl_10shot"], "icl_mean": sum(icl_draws) / len(icl_draws) if icl_draws else None}
                for r in (shipped, every):
                    if r is not None:
                        r.pop("curve", None)
                if row["chosen"] == "last token":
                    row["test"] = report["ffv"]
                else:
                    lm = lm or load_model(path, "cpu", args.dtype)
                    row["paired"] = ship_every_token(lm, session, load_task(task_name), every, tpl, args.n_test, bank)
                    row["test"] = row["paired"]["ffv"] / row["paired"]["n"]
                done[task_name] = row
                write_json(out, list(done.values()))
                print(f"{task_name}: {row['chosen']}, test {row['test']:.3f} vs ICL {row['icl']:.3f}", flush=True)
            if "paired" not in row:
                row["paired"] = paired_items(session, load_task(task_name), tpl, vectorfile.load(chosen_vector(bank, row)), args.n_test)
                if (row["paired"]["ffv"], row["paired"]["icl"]) != (round(row["test"] * row["paired"]["n"]), round(row["icl"] * row["paired"]["n"])):
                    raise SystemExit(f"{task_name}: per-item counts {row['paired']} do not reproduce the reported test {row['test']} / ICL {row['icl']}")
                write_json(out, list(done.values()))
    rows = [done[t] for t in CORE_TASKS if t in done]
    command = f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_ffv_positions --model {args.model} --dtype {args.dtype}"
    write_text(results / "positions_choice.md", markdown(name, rows, command))
    print(markdown(name, rows, command))


if __name__ == "__main__":
    run(main)
