"""The Google analogy test set (Mikolov et al. 2013) per category: prompts, ICL, the FFV bank and its CFV.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_google [--model gemma-3-270m] [--n 50] [--k 4]

For each of the 14 categories: `fvpatch.google_analogy.split` keeps 20 of its word pairs (10 where it has fewer
than 40) to learn from and draws up to `--n` test questions that use none of their words (a seeded sample).
Each question A:B::C:? is scored in llama.cpp (fvpatch.analogy.evaluate) as multiple choice over D and `--k`
- 1 other D's of the category, and as open completion from C (first token, exact word), under:
zero-shot `Q: C\\nA:`; the prompts `A:B::C:` and `A is to B as C is to`; 10-shot ICL of the category's training
pairs; the single bank FFV whose score on A:B is highest; the CFV of the model's shipped bank (unlearned and
learned map) on `Q: C\\nA:`, and the learned CFV added to the `A is to B as C is to` prompt. The bank's 16
relations are not the Google categories; once `python -m train.google_ffv` has trained one FFV per category on its
training pairs, also the category's own FFV, the best of those 14 by score on A:B, and the CFV of the bank of
those 14 (unlearned and learned; the learned one bare, with the `is to` prompt and with the 10-shot ICL
prompt). Its map is fit once, on the relation objective, from the categories' valid pairs (no test question's
words, no pair an FFV was trained on; the temperature too, on the same pairs' relation log-weight) and shipped
beside the 14 FFVs as vectors/<model>/google/analogy.bank.safetensors (`fvpatch analogy --bank` takes it).
Resumable: results/<model>/google/<category>.json per category, then google.{json,md} once every category is
scored with the same --n and --k. A category scored with another --n or --k is refused (`--force` scores the
categories given again).
"""

import argparse
import random
from pathlib import Path

import numpy as np

from fvpatch import google_analogy as ga
from fvpatch.analogy import CONDITIONS, LABELS, MORE_CONDITIONS, bank_scores, evaluate
from fvpatch.analogyfile import Analogy
from fvpatch.cfvmap import CFVMap
from fvpatch.atomic import write_json, write_report
from fvpatch.bank import BANK_NAME, load_bank, save_bank
from fvpatch.errors import FvpatchError
from fvpatch.models import check_fingerprint, resolve_model, short_name
from fvpatch.session import Session
from train.reporting import add_options, positive_int, read_json, refuse_other, results_dir, run, vectors_dir

SHOWN = ("no_vector", "prompt_colon", "prompt_is_to", "icl", "best_ffv", "cfv_unlearned", "cfv_learned", "cfv_learned_is_to")


N_VALID = 3


def category_split(category: list[ga.Question], seed: int = 0):
    """20 training pairs (fewer in the small categories, so that 10 pairs are left: 3 valid pairs and the test's)."""
    return ga.split(category, min(20, len(ga.pairs(category)) - 10), N_VALID, seed)


def questions(category: list[ga.Question], n: int, k: int, seed: int = 0) -> tuple[list[ga.Pair], list[Analogy]]:
    train, _, test = category_split(category, seed)
    test = random.Random(f"google-test:{seed}").sample(test, min(n, len(test)))
    items = []
    for q in test:
        options = ga.choices(q, category, k, seed)
        items.append(Analogy(q.a, q.b, [(q.c, d) for d in options], options.index(q.d), q.category))
    return train, items


def done(out: Path, category: str) -> Path:
    return out / f"{category}.json"


def made_with(rec: dict) -> dict:
    """The settings a category's record was scored with."""
    return {"n": rec["n_asked"], "k": rec["k"]}


OWN = {"own_ffv": "the category's own FFV (20 pairs)", "best_own_ffv": "best of the 14 category FFVs by score on A:B",
       "own_cfv_unlearned": "CFV of the 14 category FFVs, unlearned softmax(s/T)", "own_cfv_learned": "CFV of the 14 category FFVs, learned map",
       "own_cfv_learned_is_to": "CFV of the 14 category FFVs (learned) + prompt `A is to B as C is to`",
       "own_cfv_learned_icl": "CFV of the 14 category FFVs (learned) + 10-shot ICL prompt"}
OWN_CFV = {"own_cfv_unlearned": "cfv_unlearned", "own_cfv_learned": "cfv_learned", "own_cfv_learned_is_to": "cfv_learned_is_to",
           "own_cfv_learned_icl": "cfv_learned_icl"}


def category_map(s: Session, own_bank, categories: dict, own_dir: Path) -> CFVMap:
    """The map over the category FFVs, read from the bank file beside them, else fit and written there."""
    path = own_dir / BANK_NAME
    if path.exists():
        return CFVMap.from_bank(load_bank(path))
    from train.cfv import FitConfig, fit_map

    rows = [(a, b, cat) for cat, qs in categories.items() for a, b in category_split(qs)[1]]
    scores = bank_scores(s, own_bank, [(a, b) for a, b, _ in rows], progress=True)
    cfv_map, hist = fit_map(None, own_bank, [Analogy(a, b, [(a, b)], 0, cat) for a, b, cat in rows], scores, FitConfig("relation"), progress=False)
    own_bank.meta = cfv_map.to_meta() | {"fvpatch.cfv.source": f"the valid pairs of the {len(categories)} categories ({len(rows)} pairs), relation objective"}
    save_bank(own_bank, path)
    print(f"category CFV map: T = {cfv_map.temperature:g}, relation loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f} -> {path}", flush=True)
    return cfv_map


def merge(rec: dict, r: dict, names: dict[str, str]):
    """Add `r`'s conditions to the category's record under our names: the same questions, in the same order."""
    rec["accuracy"] |= {ours: r["accuracy"][theirs] for ours, theirs in names.items()}
    for mine, theirs in zip(rec["items"], r["items"]):
        for metric in ("mc", "first_token", "exact"):
            mine[metric] |= {ours: theirs[metric][t] for ours, t in names.items() if t in theirs[metric]}


def markdown(report: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.0f}"
    shown = list(SHOWN) + [c for c in OWN if all(c in r["accuracy"] for r in report["categories"].values())]
    labels = LABELS | OWN
    lines = [f"# Google analogy test set: {report['model']}", "", f"Regenerate: `{report['command']}`. Multiple choice of {report['k']} "
             "(first number) and open completion, exact word (second), in llama.cpp; n = test questions per category.", "",
             "| category | n | " + " | ".join(labels[c] for c in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for cat, r in report["categories"].items():
        lines.append(f"| {cat} | {r['n']} | " + " | ".join(f"{pct(r['accuracy'][c]['mc'])} / {pct(r['accuracy'][c]['exact'])}" for c in shown) + " |")
    lines.append("| **mean of categories** | | " + " | ".join(
        f"**{pct(np.mean([r['accuracy'][c]['mc'] for r in report['categories'].values()]))} / "
        f"{pct(np.mean([r['accuracy'][c]['exact'] for r in report['categories'].values()]))}**" for c in shown) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=positive_int, default=50, help="Test questions per category (a seeded sample).")
    ap.add_argument("--k", type=positive_int, default=4, help="Choices per question.")
    ap.add_argument("--categories", default=None, help="Comma-separated categories to score now (default: all); the summary is written once all are scored, "
                                                         "so two processes can share the categories.")
    add_options(ap, "start over: score the categories given again (a category scored with another --n or --k is refused without it)")
    args = ap.parse_args()
    path = resolve_model(args.model)
    name = short_name(path)
    out = results_dir(args) / name / "google"
    settings = {"n": args.n, "k": args.k}
    categories = ga.load()
    chosen = args.categories.split(",") if args.categories else list(categories)
    unknown = set(chosen) - set(categories)
    if unknown:
        raise FvpatchError(f"unknown categories {sorted(unknown)}; the set has {', '.join(categories)}")
    records = {c: read_json(done(out, c)) for c in categories if done(out, c).exists()}
    for cat in chosen:
        if cat in records and not args.force:
            refuse_other(done(out, cat), made_with(records[cat]), settings)
    bank = load_bank(vectors_dir(name) / BANK_NAME)
    cfv_map = CFVMap.from_bank(bank)
    conditions = [c for c in CONDITIONS if c != "oracle_ffv"] + list(MORE_CONDITIONS)
    own = vectors_dir(name) / "google"  # train.google_ffv's per-category FFVs, when trained
    own_bank = load_bank(own) if all((own / f"{c}.ffv.safetensors").exists() for c in categories) else None
    own_map = None
    with Session(path) as s:
        check_fingerprint(bank.model, s.fingerprint())
        for cat, qs in ((c, categories[c]) for c in chosen):
            train, items = questions(qs, args.n, args.k)
            rec = None if args.force else records.get(cat)
            if rec is None:
                r = evaluate(s, bank, cfv_map, items, conditions, demos={cat: train[:10]})
                rec = {"category": cat, "n_asked": args.n, "k": args.k, "train_pairs": train, **r}
                write_json(done(out, cat), rec)
            if own_bank is not None and "own_ffv" not in rec["accuracy"]:
                # the category's own FFV, and the one of the 14 whose score on A:B is highest (the map is not used)
                k = len(own_bank)
                r = evaluate(s, own_bank, CFVMap(np.eye(k), np.zeros(k), 1.0), items, ["best_ffv", "oracle_ffv"], progress=False)
                merge(rec, r, {"own_ffv": "oracle_ffv", "best_own_ffv": "best_ffv"})
                write_json(done(out, cat), rec)
            missing = {ours: theirs for ours, theirs in OWN_CFV.items() if ours not in rec["accuracy"]}
            if own_bank is not None and missing:
                own_map = own_map or category_map(s, own_bank, categories, own)
                merge(rec, evaluate(s, own_bank, own_map, items, list(missing.values()), progress=False, demos={cat: train[:10]}), missing)
                write_json(done(out, cat), rec)
            records[cat] = rec
            print(f"{cat:<30} " + "  ".join(f"{c} {100 * rec['accuracy'][c]['mc']:.0f}" for c in rec["accuracy"]), flush=True)
    left = [q for q in categories if q not in records or made_with(records[q]) != settings]
    if left:
        print(f"summary not written: {len(left)} categories still to score with --n {args.n} --k {args.k} ({', '.join(left)})")
        return
    cats = {q: records[q] for q in categories}
    report = {"model": name, "k": args.k, "n": args.n,
              "command": f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_google --model {name} --n {args.n} --k {args.k}",
              "categories": {c: {"n": r["n"], "accuracy": r["accuracy"]} for c, r in cats.items()}}
    write_report(out.with_suffix(".json"), report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
