"""Human relational similarity against the FFV bank's view of word pairs: the hook for a human-rated set.

    .venv/bin/python -m train.report_relsim --data FILE [--model gemma-3-270m] [--bank PATH]

No human-rated relational similarity set could be had from the package index under an open licence (searched
2026-11: `relbert`, `word-embeddings-benchmarks` and `vecto` ship code that downloads SemEval-2012 Task 2 from
the web at run time, and the copies of that set on the Hugging Face hub carry the licence "other"). So nothing
is vendored and no table is shipped; bring a set you may use, as JSONL, one relation per line:

    {"relation": "...", "prototypes": [["A", "B"], ...], "pairs": [["A", "B", score], ...]}

which is SemEval-2012 Task 2's layout (Jurgens et al. 2012): per relation subcategory, a few prototypical pairs
chosen by people, and pairs with human prototypicality scores. A pair's profile is its row of bank scores in
llama.cpp, log P(B | `Q: A\\nA:`, FFV r added) for every FFV r of the bank, centred over the bank so that a pair
the model finds easy under every vector is not close to everything. The model's similarity of a pair to its
relation is the cosine between its profile and the prototypes' mean profile; per relation, Spearman's rho
against the human scores, and the mean rho. Writes results/<model>/relsim.{json,md}.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fvpatch.analogy import bank_scores
from fvpatch.atomic import check_outputs, write_report
from fvpatch.bank import load_bank
from fvpatch.errors import FvpatchError
from fvpatch.models import check_fingerprint, resolve_model, short_name
from fvpatch.session import Session
from fvpatch.shipped import model_folder
from train.reporting import checkout_results, run


def read_relations(path: Path) -> list[dict]:
    """The rated relations of a JSONL file, checked: each needs a name, prototypes, and at least 3 scored pairs."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            rel = {"relation": str(row["relation"]), "prototypes": [(str(a), str(b)) for a, b in row["prototypes"]],
                   "pairs": [(str(a), str(b), float(s)) for a, b, s in row["pairs"]]}
        except (ValueError, KeyError, TypeError) as e:
            raise FvpatchError(f"{where}: not a rated relation {{relation, prototypes: [[A, B]...], pairs: [[A, B, score]...]}} ({e})") from None
        if not rel["prototypes"] or len(rel["pairs"]) < 3 or not all(np.isfinite(s) for *_, s in rel["pairs"]):
            raise FvpatchError(f"{where}: a relation needs at least one prototype and three pairs with finite scores")
        out.append(rel)
    if not out:
        raise FvpatchError(f"{path}: no rated relations")
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(x, y) -> float:
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def profiles(scores: np.ndarray) -> np.ndarray:
    return scores - scores.mean(1, keepdims=True)


def cosine_to(rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return rows @ centre / (np.linalg.norm(rows, axis=1) * np.linalg.norm(centre) + 1e-12)


def correlate(session: Session, bank, relations: list[dict], progress: bool = True) -> dict:
    per = {}
    for rel in relations:
        proto = profiles(bank_scores(session, bank, rel["prototypes"], progress))
        rated = profiles(bank_scores(session, bank, [(a, b) for a, b, _ in rel["pairs"]], progress))
        model = cosine_to(rated, proto.mean(0))
        per[rel["relation"]] = {"n": len(rel["pairs"]), "rho": spearman(model, [s for *_, s in rel["pairs"]]), "model": model.tolist()}
    rhos = [r["rho"] for r in per.values() if np.isfinite(r["rho"])]
    return {"relations": per, "mean_rho": float(np.mean(rhos)) if rhos else None, "bank": bank.names, "tensor": bank.tensor}


def markdown(report: dict) -> str:
    lines = [f"# Human relational similarity: {report['model']}", "", f"`{report['command']}`; data: {report['data']}. Spearman's rho "
             "between people's prototypicality scores and the cosine of each pair's bank-score profile to its prototypes' mean profile.", "",
             "| relation | pairs | rho |", "|---|---:|---:|"]
    for name, r in report["relations"].items():
        lines.append(f"| {name} | {r['n']} | {r['rho']:.3f} |")
    mean = report["mean_rho"]
    lines += ["", f"Mean rho over {len(report['relations'])} relations: {'-' if mean is None else f'{mean:.3f}'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="JSONL of rated relations (see above)")
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model)")
    ap.add_argument("--bank", default=None, help="folder of FFVs or a bank file (default: the FFVs shipped for the model)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: results/<model>/relsim.json; .md beside it)")
    ap.add_argument("--force", action="store_true", help="overwrite the report")
    args = ap.parse_args(argv)
    try:
        relations = read_relations(args.data)
        path = resolve_model(args.model)
        out = args.out or checkout_results("--out FILE") / short_name(path) / "relsim.json"
        check_outputs([out, out.with_suffix(".md")], args.force)
        with Session(path) as session:
            bank = load_bank(args.bank or model_folder(session.fingerprint()))
            check_fingerprint(bank.model, session.fingerprint())
            report = correlate(session, bank, relations)
    except (FvpatchError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    command = "python -m train.report_relsim " + " ".join(sys.argv[1:] if argv is None else argv)
    report |= {"model": path.name, "data": str(args.data), "command": command}
    write_report(out, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    run(main)  # main() turns bad input into one line itself; run() does Ctrl-C's
