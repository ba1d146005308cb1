"""The chosen FFV against 10-shot ICL on each core task's WHOLE test split, item by item, in llama.cpp.

The FFV reports score a task's first 100 test pairs (all of them where it has fewer). On Qwen the FFV and ICL
differ there by 0-5 points with p >= 0.45: the first 100 items cannot tell them apart. Antonym, capitalize and
english-french hold 719, 244 and 1409 test pairs, so this scores every one. Nothing is chosen here: the vectors
are the ones train.report_ffv_positions chose on valid pairs (the shipped last-token FFVs for a model without
that choice), and ICL is the FFV report's seed 0 (demos from the FFV's 20 training pairs, drawn by query index,
so the first 100 prompts are the ones scored before and must reproduce their counts; the script stops if they
don't). One prompt per decode, as `fvpatch patch` runs.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_full_test --model qwen2.5-coder-1.5b [--tasks antonym,...]

Resumable: per-item results go to results/<model>/ffv/full_test.json (full_test-last_token.json with --last-token)
every --chunk items and are kept while the vector file is unchanged (its sha256); processes given disjoint --tasks
can share the file.

ICL seed 0 is one draw of demonstrations. `--icl-seeds 1,2,3,4` also scores those draws on every test pair (to
full_test-icl_draws.json, resumable the same way; on Qwen about 1.1 s per prompt) and adds a table of the FFV against the
mean of all the draws scored.
"""

import argparse
import hashlib
import json

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import write_text
from fvpatch.errors import FvpatchError
from fvpatch.evaluate import build_items, llamacpp_predictor
from fvpatch.paired import compare
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.tasks import CORE_TASKS, load_task
from train.report_ffv import K, model_dirs
from train.report_ffv_positions import chosen_vector
from train.report_icl_spread import save
from train.reporting import add_options, positive_int, run


def hits(predict, tokens: list, answers: list, vector=None) -> list[int]:
    """1 where the top-1 token is the answer's first token, else 0, item by item."""
    return (np.array(predict(tokens, vector)) == np.array(answers)).astype(int).tolist()


def score(session: Session, task, tpl, vector_path, row: dict, chunk: int, out) -> None:
    """Extend row["ffv"] and row["icl"] (0/1 per test item, in test order) to the whole test split."""
    items = build_items(session.tokenize, tpl, task.test, task.train[:20], K)
    predict, vf = llamacpp_predictor(session, batched=False), vectorfile.load(vector_path)
    while len(row["ffv"]) < len(items.answers):
        at = slice(len(row["ffv"]), len(row["ffv"]) + chunk)
        row["ffv"] += hits(predict, items.tokens["zero_shot"][at], items.answers[at], vf)
        missing = slice(len(row["icl"]), len(row["ffv"]))  # ICL's results can come from another vector's run
        row["icl"] += hits(predict, items.tokens["icl"][missing], items.answers[missing])
        if len(row["ffv"]) >= row["first"]["n"]:
            check_first(row)
        save(out, row)
        print(f"{task.name}: {len(row['ffv'])} / {len(items.answers)} items", flush=True)


def score_draw(session: Session, task, tpl, seed: int, row: dict, chunk: int, out) -> None:
    """Extend row["icl"][seed] (0/1 per test item) to the whole test split: 10-shot ICL with that draw of demos."""
    items = build_items(session.tokenize, tpl, task.test, task.train[:20], K, seed=seed)
    predict, done = llamacpp_predictor(session, batched=False), row["icl"].setdefault(str(seed), [])
    while len(done) < len(items.answers):
        at = slice(len(done), len(done) + chunk)
        done += hits(predict, items.tokens["icl"][at], items.answers[at])
        save(out, row)
        print(f"{task.name} ICL seed {seed}: {len(done)} / {len(items.answers)} items", flush=True)


def draws_markdown(rows: list[dict], draws: dict) -> list[str]:
    """The FFV against the mean over ICL's draws of demonstrations, for the tasks with every draw complete."""
    lines = ["", "## Against ICL's draws of demonstrations", "",
             "ICL with each draw of demos on the whole split (seed 0 is the column above). FFV − mean: per item, the FFV's 0/1 "
             "minus the fraction of draws right; 95% CI by the normal approximation over items.", "",
             "| task | n | FFV | ICL by seed | ICL mean | FFV ≥ ICL mean | FFV ≥ worst draw | FFV − mean, points (95% CI) |",
             "|---|---:|---:|---|---:|---|---|---|"]
    above = []
    for r in rows:
        scored = draws.get(r["task"], {}).get("icl", {})
        complete = [scored[s] for s in sorted(scored, key=int) if len(scored[s]) == len(r["ffv"])]
        if not complete:
            continue
        icl, ffv = np.array([r["icl"]] + complete, dtype=float), np.array(r["ffv"], dtype=float)
        d = ffv - icl.mean(axis=0)
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        acc = icl.mean(axis=1)
        above.append(ffv.mean() >= acc.mean())
        lines.append(f"| {r['task']} | {len(d)} | {100 * ffv.mean():.1f}% | {' / '.join(f'{100 * a:.1f}' for a in acc)} | "
                     f"{100 * acc.mean():.1f}% | {'yes' if above[-1] else 'no'} | {'yes' if ffv.mean() >= acc.min() else 'no'} | "
                     f"{100 * d.mean():+.1f} ({100 * (d.mean() - half):+.1f} to {100 * (d.mean() + half):+.1f}) |")
    if not above:
        return []
    return lines + ["", f"FFV ≥ the mean of ICL's draws on {sum(above)} of {len(above)} tasks."]


def check_first(row: dict) -> None:
    """The first items are the prompts an earlier report scored (report_ffv_positions, or the FFV report for a
    last-token FFV): their counts must come out the same."""
    before = row["first"]
    n = before["n"]
    again = compare(row["ffv"][:n], row["icl"][:n])
    if (again["ffv"], again["icl"]) != (before["ffv"], before["icl"]):
        raise SystemExit(f"{row['task']}: the first {n} items give FFV {again['ffv']} / ICL {again['icl']}, "
                         f"the earlier report gave {before['ffv']} / {before['icl']}")


def shipped_choice(results, bank, task: str, last_token: bool = False) -> tuple:
    """(vector file, its counts on the first test items): the FFV report_ffv_positions chose and its per-item counts,
    or, for a model without that choice or with `last_token`, the shipped last-token FFV and the FFV report's
    llama.cpp accuracies."""
    choice = results / "positions_choice.json"
    rows = {r["task"]: r for r in json.loads(choice.read_text())} if choice.exists() else {}
    if task in rows and not last_token:
        if "paired" not in rows[task]:
            raise SystemExit(f"{task}: the chosen FFV has no per-item results; run train.report_ffv_positions first")
        return chosen_vector(bank, rows[task]), rows[task]["paired"]
    per_task = results / "tasks" / f"{task}.json"
    report = [json.loads(per_task.read_text())] if per_task.exists() else json.loads((results / "report.json").read_text())["core"]
    row = next((r for r in report if r["task"] == task), None)
    if row is None:
        raise SystemExit(f"{task}: not in the FFV report; run train.report_ffv first")
    acc, n = row["acc"]["llamacpp"], row["n_test"]
    return bank / f"{task}.ffv.safetensors", {"n": n, "ffv": round(acc["ffv"] * n), "icl": round(acc["icl_10shot"] * n)}


def markdown(model: str, rows: list[dict], command: str, what: str = "Chosen FFV", draws: dict | None = None) -> str:
    lines = [f"# {what} vs 10-shot ICL on the whole test split ({model}, llama.cpp)", "",
             f"Regenerate: `{command}`. Top-1 of the answer's first token, one prompt per decode. FFV: the vector named, the one "
             "chosen per task on valid pairs (results/<model>/ffv/positions_choice.md) or, without that choice, the shipped last-token FFV; ICL: 10-shot, seed 0 of the FFV report. \"First 100\" is the "
             "subset the FFV reports score; \"whole split\" adds the rest of the test pairs, scored after those results were known "
             "and with nothing chosen on them.", "",
             "| task | vector | first 100: FFV / ICL | whole split: n | FFV | ICL | FFV ≥ ICL | items only FFV / only ICL gets | p | FFV − ICL, points (95% CI) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        first, whole = r["first"], compare(r["ffv"], r["icl"])
        lines.append(f"| {r['task']} | {r['vector']} | {first['ffv']} / {first['icl']} of {first['n']} | {whole['n']} | "
                     f"{100 * whole['ffv'] / whole['n']:.1f}% | {100 * whole['icl'] / whole['n']:.1f}% | {'yes' if whole['ffv'] >= whole['icl'] else 'no'} | "
                     f"{whole['only_ffv']} / {whole['only_icl']} | {whole['p']:.2f} | {100 * (whole['ffv'] - whole['icl']) / whole['n']:+.1f} "
                     f"({100 * whole['ci'][0]:+.1f} to {100 * whole['ci'][1]:+.1f}) |")
    above = sum(sum(r["ffv"]) >= sum(r["icl"]) for r in rows)
    lines += ["", f"FFV ≥ ICL on the whole test split on {above} of {len(rows)} tasks.", "",
              "p: exact two-sided sign test on the items only one of the two gets right (McNemar's exact test). CI: Newcombe's "
              "score interval for the difference of two accuracies on the same items (his method 10, 1998)."]
    return "\n".join(lines + draws_markdown(rows, draws or {})) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default=",".join(CORE_TASKS))
    ap.add_argument("--chunk", type=positive_int, default=100, help="Items scored between two writes of the results.")
    ap.add_argument("--last-token", action="store_true", help="Score the shipped last-token FFVs instead of the chosen ones "
                    "(was choosing every token on valid pairs right?); ICL's results are taken from the chosen FFVs' run.")
    ap.add_argument("--icl-seeds", default="", help="Also score these draws of ICL's demonstrations on every test pair, "
                    "e.g. 1,2,3,4 (seed 0 is always scored).")
    ap.add_argument("--threads", type=positive_int, default=None)
    # nothing to refuse on a rerun: every result covers the whole split, and a changed vector (its sha256) restarts its task
    add_options(ap, None)
    args = ap.parse_args()

    path, name, results, bank = model_dirs(args.model, args)
    chosen_out = results / "full_test.json"
    out = results / "full_test-last_token.json" if args.last_token else chosen_out
    draws_out = results / "full_test-icl_draws.json"
    if not all(s.isdigit() for s in args.icl_seeds.split(",") if s):
        raise FvpatchError(f"--icl-seeds {args.icl_seeds}: give seeds as whole numbers, e.g. 1,2,3,4")
    seeds = [int(s) for s in args.icl_seeds.split(",") if s and int(s) != 0]  # seed 0 is scored with the FFV
    tpl = template("qa")
    with Session(path, n_threads=args.threads) as session:
        for task_name in args.tasks.split(","):
            vector_path, first = shipped_choice(results, bank, task_name, args.last_token)
            sha = hashlib.sha256(vector_path.read_bytes()).hexdigest()
            rows = json.loads(out.read_text()) if out.exists() else {}
            row = rows.get(task_name)
            if row is None or row["sha256"] != sha:
                row = {"task": task_name, "vector": vector_path.name, "sha256": sha, "first": first, "ffv": [], "icl": []}
                if out != chosen_out and chosen_out.exists():
                    row["icl"] = json.loads(chosen_out.read_text()).get(task_name, {}).get("icl", [])
            score(session, load_task(task_name), tpl, vector_path, row, args.chunk, out)
        for seed in seeds:  # every task's draw before the next draw, so a cut-short run leaves whole draws
            for task_name in args.tasks.split(","):
                draws = json.loads(draws_out.read_text()) if draws_out.exists() else {}
                row = draws.get(task_name, {"task": task_name, "icl": {}})
                score_draw(session, load_task(task_name), tpl, seed, row, args.chunk, draws_out)
    rows = json.loads(out.read_text())
    done = [rows[t] for t in CORE_TASKS if t in rows and len(rows[t]["ffv"]) == len(load_task(t).test)]
    command = (f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_full_test --model {args.model}" + (" --last-token" if args.last_token else "")
               + (f" --icl-seeds {','.join(map(str, seeds))}" if seeds else ""))
    draws = json.loads(draws_out.read_text()) if draws_out.exists() else {}
    md = markdown(name, done, command, "Shipped last-token FFV" if args.last_token else "Chosen FFV", draws)
    write_text(out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    run(main)
