"""How much 10-shot ICL moves with the draw of its demonstrations, next to the shipped FFVs, in llama.cpp.

The FFV report scores ICL with one draw of demos per query (seed 0). A single draw is one sample of a
noisy baseline: this scores the same test prompts with `--seeds` draws (demos from the same first 20 train
pairs the FFV was trained on) and the shipped FFV once, so "FFV >= ICL" can be read against ICL's spread.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_icl_spread --model qwen2.5-coder-1.5b

Batched llama.cpp (the shared-prefix decode; logits can differ from one prompt per decode by about one on a
4-bit model, so seed 0 may differ from the FFV report by an item). Resumable: each (task, seed) is written to
results/<model>/ffv/icl_spread.json as it completes and skipped on the next run; processes given disjoint
`--tasks` can share the file (each merges only its own tasks into it). A task scored with another `--n-test` is
refused (`--force` scores the tasks given again); the table holds the tasks scored with this run's `--n-test`.
"""

import argparse

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import write_json, write_text
from fvpatch.evaluate import build_items, llamacpp_predictor
from fvpatch.models import DEFAULT_MODEL
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.tasks import CORE_TASKS, load_task
from train.report_ffv import K, accuracy, model_dirs
from train.reporting import add_options, positive_int, read_json, refuse_other, run


def made_with(row: dict) -> dict:
    """The settings a task's row was scored with. A row from before they were recorded has its n_test as n (the
    runs that wrote them asked for no more test pairs than the core tasks have)."""
    return row.get("settings", {"n_test": row["n"]})


def markdown(model: str, rows: dict, seeds: int, command: str) -> str:
    lines = [f"# 10-shot ICL over {seeds} draws of demonstrations, and the shipped FFV ({model}, llama.cpp, test pairs)", "",
             f"Regenerate: `{command}`. Top-1 of the answer's first token; demos drawn from the "
             "FFV's 20 training pairs, one draw per query and seed (seed 0 is the FFV report's).", "",
             "| task | n | FFV | ICL seed 0 | ICL min – max | ICL mean | FFV ≥ ICL mean | FFV ≥ ICL min |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    order = {t: i for i, t in enumerate(CORE_TASKS)}
    done = sorted((r for r in rows.values() if len(r["icl"]) >= seeds and "ffv" in r), key=lambda r: order.get(r["task"], len(order)))
    above_mean = above_min = 0
    for r in done:
        icl = [r["icl"][str(s)] for s in range(seeds)]
        above_mean += r["ffv"] >= np.mean(icl)
        above_min += r["ffv"] >= min(icl)
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['ffv']:.0f}% | {100 * icl[0]:.0f}% | {100 * min(icl):.0f}% – {100 * max(icl):.0f}% | "
                     f"{100 * np.mean(icl):.1f}% | {'yes' if r['ffv'] >= np.mean(icl) else 'no'} | {'yes' if r['ffv'] >= min(icl) else 'no'} |")
    if done:
        lines += ["", f"FFV ≥ the mean of the ICL draws on {above_mean} of {len(done)} tasks; ≥ the worst draw on {above_min} of {len(done)}."]
    return "\n".join(lines) + "\n"


def save(out, row: dict) -> None:
    rows = read_json(out) if out.exists() else {}
    rows[row["task"]] = row
    write_json(out, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tasks", default=",".join(CORE_TASKS))
    ap.add_argument("--seeds", type=positive_int, default=5, help="Draws of demonstrations (seeds 0..N-1).")
    ap.add_argument("--n-test", type=positive_int, default=100)
    ap.add_argument("--threads", type=positive_int, default=None)
    add_options(ap, "start over: score the tasks given again (a task scored with another --n-test is refused without it)")
    args = ap.parse_args()

    path, name, results, bank = model_dirs(args.model, args)
    out = results / "icl_spread.json"
    settings = {"n_test": args.n_test}
    tasks = {t: load_task(t) for t in args.tasks.split(",")}
    rows = read_json(out) if out.exists() else {}
    if args.force:
        rows = {t: r for t, r in rows.items() if t not in tasks}
    for t in tasks.keys() & rows.keys():
        refuse_other(f"{out} ({t})", made_with(rows[t]), settings)
    tpl = template("qa")
    with Session(path, n_threads=args.threads) as session:
        predict = llamacpp_predictor(session, batched=True)
        for task_name, task in tasks.items():
            queries, pool = task.test[: args.n_test], task.train[:20]  # train.ffv.prepare's training pairs
            row = rows.setdefault(task_name, {"task": task_name, "n": len(queries), "settings": settings, "icl": {}})
            if "ffv" not in row:
                items = build_items(session.tokenize, tpl, queries, pool, K)
                row["ffv"] = accuracy(predict, items.tokens["zero_shot"], items.answers, vectorfile.load(bank / f"{task_name}.ffv.safetensors"))
                save(out, row)
            for seed in range(args.seeds):
                if str(seed) in row["icl"]:
                    continue
                items = build_items(session.tokenize, tpl, queries, pool, K, seed=seed)
                row["icl"][str(seed)] = accuracy(predict, items.tokens["icl"], items.answers)
                save(out, row)
                print(f"{task_name} seed {seed}: ICL {row['icl'][str(seed)]:.3f} (FFV {row['ffv']:.3f})", flush=True)
    # other processes' tasks too, where complete with the same settings: the table is one setting's
    rows = {t: r for t, r in read_json(out).items() if made_with(r) == settings and len(r["icl"]) >= args.seeds and "ffv" in r}
    shown = [t for t in CORE_TASKS if t in rows] + [t for t in rows if t not in CORE_TASKS]
    command = ("OMP_NUM_THREADS=1 .venv/bin/python -m train.report_icl_spread" + ("" if name == DEFAULT_MODEL else f" --model {name}")
               + ("" if shown == list(CORE_TASKS) else f" --tasks {','.join(shown)}") + f" --seeds {args.seeds} --n-test {args.n_test}")
    md = markdown(name, rows, args.seeds, command)
    write_text(out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    run(main)
