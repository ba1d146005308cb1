"""Near and far analogies (after Green et al. 2010): accuracy by how far apart A and C are.

    .venv/bin/python -m train.report_nearfar [--model gemma-3-270m]

A re-analysis of analogy results already scored, no model run: the Google analogy questions
(results/<model>/google/*.json, train.report_google) and the generated relation analogies (the model's
`fvpatch eval analogy` JSON). For each question, the distance between A and C is the cosine distance of their
vectors in the model's own output embedding (the rows of the unembedding; a word of several tokens is the mean
of its tokens' rows). Questions are cut into three equal bins of distance, near, middle and far, within each
set, and each method's accuracy (multiple choice, open exact word) is given per bin. Writes
results/<model>/nearfar.{json,md,png}.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from fvpatch.analogy import LABELS
from fvpatch.atomic import write_figure, write_report
from fvpatch.modelfile import ModelFile
from fvpatch.models import resolve_model, short_name
from fvpatch.unembed import load_unembed
from train.report_google import OWN
from train.reporting import add_options, results_dir, run

BINS = ("near", "middle", "far")


def word_vector(mf: ModelFile, rows: np.ndarray, word: str) -> np.ndarray:
    v = rows[mf.tokenize(f" {word}", add_bos=False)].mean(0)
    return v / np.linalg.norm(v)


def item_sets(results: Path, name: str) -> dict[str, list[dict]]:
    """Set name -> scored analogy items (each with stem, choice, answer, and per-condition mc/exact), from `results`."""
    sets = {}
    google = sorted((results / name / "google").glob("*.json"))
    if google:
        sets["Google analogy set"] = [it for f in google for it in json.loads(f.read_text())["items"]]
    for path in (results / name / "cfv.json", results / "cfv" / f"{name}-q4_k_m.json"):
        if path.exists():
            sets["generated relation analogies"] = json.loads(path.read_text())["items"]
    return sets


def by_bin(items: list[dict], distances: np.ndarray) -> dict:
    edges = np.quantile(distances, [1 / 3, 2 / 3])
    bins = np.digitize(distances, edges)
    conditions = [c for c in items[0]["mc"] if all(c in it["mc"] for it in items)]
    out = {"edges": edges.tolist(), "n": [int((bins == b).sum()) for b in range(3)], "accuracy": {}}
    for cond in conditions:
        out["accuracy"][cond] = {metric: [float(np.mean([it[metric][cond] for it, b in zip(items, bins) if b == k and cond in it[metric]] or [np.nan]))
                                          for k in range(3)] for metric in ("mc", "exact")}
    return out


def markdown(report: dict) -> str:
    lines = [f"# Near and far analogies: {report['model']}", "", f"Regenerate: `{report['command']}`. A–C cosine distance in the model's "
             "output embedding, cut into three equal bins per set; accuracy per bin (near / middle / far), multiple choice and "
             "open exact word, from the scored results (no new model run).", ""]
    for name, r in report["sets"].items():
        e = r["edges"]
        lines += [f"## {name}", "", f"Bins: near < {e[0]:.3f} ≤ middle < {e[1]:.3f} ≤ far; n = {' / '.join(map(str, r['n']))}.", "",
                  "| method | multiple choice: near / middle / far | exact word: near / middle / far |", "|---|---|---|"]
        for cond, acc in r["accuracy"].items():
            cell = lambda xs: " / ".join("–" if np.isnan(x) else f"{100 * x:.0f}" for x in xs)  # noqa: E731
            lines.append(f"| {(LABELS | OWN).get(cond, cond)} | {cell(acc['mc'])} | {cell(acc['exact'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], sets.items()):
        for cond, acc in r["accuracy"].items():
            ax.plot(range(3), [100 * x for x in acc["exact"]], marker="o", label=(LABELS | OWN).get(cond, cond))
        ax.set_xticks(range(3), BINS)
        ax.set_ylabel("open completion, exact word (%)")
        ax.set_title(f"{report['model']}: {name}")
        ax.set_ylim(0, 100)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    add_options(ap, None)  # one pass over results already scored: nothing to resume
    args = ap.parse_args()
    path = resolve_model(args.model)
    name = short_name(path)
    results = results_dir(args)
    rows = load_unembed(path).output
    report = {"model": name, "command": f".venv/bin/python -m train.report_nearfar --model {name}", "sets": {}}
    with ModelFile(path, vocab_only=True) as mf:
        for set_name, items in item_sets(results, name).items():
            d = np.array([1 - float(word_vector(mf, rows, it["stem"][0]) @ word_vector(mf, rows, it["choice"][it["answer"]][0])) for it in items])
            report["sets"][set_name] = by_bin(items, d)
    out = results / name / "nearfar.json"
    write_report(out, report, markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
