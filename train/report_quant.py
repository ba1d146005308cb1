"""Vectors across quantizations: each shipped vector, made on one quantization, scored on others of the same model.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_quant [--model gemma-3-270m] [--quants Q8_0,Q4_0] [--n-test 50]

The other quantizations are written from the model file with llama.cpp's own quantizer (`fvpatch quantize`;
a known model's only copy is 4-bit, so they are requantizations of it). For every vector shipped for the model
(vectors/<model>/*.safetensors, bank files aside): top-1 of the answer's first token on the first `--n-test`
TEST pairs of its task, zero-shot prompt plus the vector at its layer (the file's mode and scale), in llama.cpp,
on the file it was made on and on each other quantization; and, for scale, each task without a vector on each
file: zero-shot, and 10-shot ICL with demonstrations from the task's first 20 train pairs (does the
quantization still do the task at all?).
No torch is used. Resumable: results/<model>/quant_transfer.json is rewritten after each (vector, quantization);
a rerun with another `--n-test` is refused (`--force` starts over), one with more `--quants` adds their columns.
"""

import argparse

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import write_json, write_report
from fvpatch.bank import NAMES_KEY
from fvpatch.errors import FvpatchError
from fvpatch.evaluate import build_items, llamacpp_predictor
from fvpatch.models import check_fingerprint, models_dir, quant_ftype, quantize, resolve_model, short_name
from fvpatch.prompts import template
from fvpatch.session import Session
from fvpatch.tasks import load_task
from train.report_ffv import accuracy
from train.report_fv import K, pct
from train.reporting import add_options, positive_int, results_dir, resume, run, vectors_dir
from train.sweep_ffv import zero_shot_top1


def markdown(report: dict) -> str:
    quants = report["quants"]
    lines = [f"# Vectors across quantizations: {report['model']}", "",
             f"Regenerate: `{report['command']}`. Top-1 (first answer token) on the first {report['n_test']} TEST pairs of each vector's "
             "task, zero-shot `Q: x\\nA:` prompt plus the vector, llama.cpp. Every vector was made on the first column's file; the "
             "others are written from it with llama.cpp's quantizer.", "",
             "| vector | layer | " + " | ".join(quants) + " |", "|---|---|" + "---|" * len(quants)]
    for task, row in report["zero_shot"].items():
        lines.append(f"| (zero-shot, no vector) {task} | - | " + " | ".join(pct(row.get(q)) for q in quants) + " |")
    for task, row in report.get("icl", {}).items():
        lines.append(f"| (10-shot ICL, no vector) {task} | - | " + " | ".join(pct(row.get(q)) for q in quants) + " |")
    for name, row in report["vectors"].items():
        lines.append(f"| {name} | {row['layer']} | " + " | ".join(pct(row["acc"].get(q)) for q in quants) + " |")
    lines += ["", "Change against the file the vectors were made on:", ""]
    for q in quants[1:]:
        diffs = [r["acc"][q] - r["acc"][quants[0]] for r in report["vectors"].values() if q in r["acc"]]
        lines.append(f"- {q}: mean {100 * np.mean(diffs):+.1f} points over {len(diffs)} vectors, worst {100 * min(diffs):+.0f}, best {100 * max(diffs):+.0f}.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name whose shipped vectors are scored (default: the default model).")
    ap.add_argument("--quants", default="Q8_0,Q4_0", help="Other quantizations to write and score on.")
    ap.add_argument("--n-test", type=positive_int, default=50)
    add_options(ap, "start over: score everything again (results made with another --n-test are refused without it)")
    args = ap.parse_args()

    source = resolve_model(args.model)
    name = short_name(source)
    out = results_dir(args) / name / "quant_transfer.json"
    settings = {"n_test": args.n_test}
    # a file from before settings were recorded: its n_test was set by its one run
    report = resume(out, settings, args.force, legacy=lambda r: {"n_test": r["n_test"]}) or {"zero_shot": {}, "vectors": {}}
    folder = vectors_dir(name)
    files = [p for p in sorted(folder.glob("*.safetensors")) if NAMES_KEY not in vectorfile.load(p).meta]
    if not files:
        raise FvpatchError(f"no vectors shipped in {folder}")
    models = {"made on": source}
    for q in args.quants.split(","):  # every name checked before the first file is written
        quant_ftype(q)
    for q in args.quants.split(","):
        path = models_dir() / f"{name}-{q.lower()}.gguf"
        models[q] = path if path.exists() else quantize(source, path, q)
    report.setdefault("icl", {})
    report |= {"model": name, "n_test": args.n_test, "settings": settings, "command": f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_quant --model {name} "
               f"--quants {args.quants} --n-test {args.n_test}"}

    for label, path in models.items():
        with Session(path) as s:
            quant = s.quant() if label != "made on" else f"{s.quant()} (made on)"
            report.setdefault("quants", [])
            if quant not in report["quants"]:
                report["quants"].append(quant)
            predict = llamacpp_predictor(s, batched=False)
            for f in files:
                vf = vectorfile.load(f)
                check_fingerprint(vf.model, s.fingerprint())  # another quantization passes; another model would not
                task = load_task(vf.meta["fvpatch.task"])
                tpl, pairs = template(vf.meta.get("fvpatch.template", "qa")), task.test[: args.n_test]
                zs = report["zero_shot"].setdefault(task.name, {})
                if quant not in zs:
                    zs[quant] = zero_shot_top1(s, predict, tpl, pairs, None)
                icl = report["icl"].setdefault(task.name, {})
                if quant not in icl:
                    items = build_items(s.tokenize, tpl, pairs, task.train[:20], K)
                    icl[quant] = accuracy(predict, items.tokens["icl"], items.answers)
                row = report["vectors"].setdefault(f.stem, {"layer": vf.layer, "acc": {}})
                if quant not in row["acc"]:
                    row["acc"][quant] = zero_shot_top1(s, predict, tpl, pairs, vf)
                    print(f"{quant:<18} {f.stem:<32} {pct(row['acc'][quant])}", flush=True)
                    write_json(out, report)
    write_report(out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
