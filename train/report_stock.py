"""Shipped vectors in stock llama.cpp: each one `fvpatch export` can write, loaded by llama-server's own
`--control-vector` and scored as in the positions report, against fvpatch's control-vector path.

    make llama-tools
    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_stock [--model gemma-3-270m] [--n-test 50] [--swa-full]

For each vector of vectors/<model>/ that exports as a control vector (fvpatch.controlvector.exportable),
and once with no vector: top-1 of the answer's first token on the first `--n-test` TEST pairs of its task,
zero-shot prompt, the vector at every token,
- `fvpatch`: the exported file's directions loaded through llama.cpp's control-vector API in fvpatch's session;
- `llama-server`: stock llama-server started with `--control-vector FILE` (one server per vector), asked over
  HTTP for the next token's log-probabilities, the prompt given as fvpatch's token ids.
Also the items whose top-1 differs and the largest gap in the log-probability of the server's top token.
`--swa-full` passes that flag to the server (a full-size cache for sliding-window layers, which a context
made with llama.cpp's defaults has). No torch is used. Resumable: results/<model>/stock[-swa_full].json is
rewritten after each vector; a rerun with another `--n-test` is refused (`--force` scores every vector again).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fvpatch import controlvector, vectorfile
from fvpatch.atomic import write_json, write_report
from fvpatch.models import resolve_model, short_name
from fvpatch.prompts import answer_token, prompts_for, template
from fvpatch.scoring import log_softmax
from fvpatch.session import Session
from fvpatch.tasks import load_task
from train.reporting import add_options, positive_int, results_dir, resume, run, vectors_dir
from train.stock_llama import Server


def score(s: Session, model: Path, tokens: list[list[int]], answers: list[int], cv: Path | None, extra: list[str]) -> dict:
    """Both engines on the same token ids, the vector (if any) as llama.cpp's control vector in each."""
    s.set_control_vector(None if cv is None else controlvector.load(cv).dense(s.n_layer))
    try:
        ours = [log_softmax(s.run(t).logits) for t in tqdm(tokens, desc="fvpatch", leave=False)]
    finally:
        s.set_control_vector(None)
    with Server(model, cv, extra) as server:
        theirs = [server.top(t, 1)[0] for t in tqdm(tokens, desc="llama-server", leave=False)]
    top = [int(np.argmax(lp)) for lp in ours]
    # the server's log-probability of its own top token against fvpatch's for that token
    gaps = [abs(lp[i] - their) for lp, (i, their) in zip(ours, theirs)]
    return {"n": len(tokens), "fvpatch": sum(t == a for t, a in zip(top, answers)),
            "llama-server": sum(i == a for (i, _), a in zip(theirs, answers)),
            "differ": sum(t != i for t, (i, _) in zip(top, theirs)), "max_gap": float(max(gaps))}


def markdown(report: dict) -> str:
    lines = [f"# Shipped vectors in stock llama-server: {report['model']}", "",
             f"Regenerate: `{report['command']}`. Top-1 (first answer token) on the first {report['n_test']} TEST pairs of each "
             "vector's task, zero-shot `Q: x\\nA:` prompt, the exported vector at every token: through llama.cpp's control-vector "
             "API in fvpatch, and in stock llama-server (`--control-vector`). `differ`: items whose top-1 differs; `max gap`: the "
             "largest difference in the log-probability of the server's top token.", "",
             "| vector | layer | n | fvpatch | llama-server | differ | max gap |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["vectors"].items():
        n = row["n"]
        lines.append(f"| {name} | {row['layer']} | {n} | {100 * row['fvpatch'] / n:.0f}% | {100 * row['llama-server'] / n:.0f}% | "
                     f"{row['differ']} | {row['max_gap']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name whose shipped vectors are scored (default: the default model).")
    ap.add_argument("--n-test", type=positive_int, default=50)
    ap.add_argument("--swa-full", action="store_true", help="Start llama-server with --swa-full.")
    add_options(ap, "start over: score every vector again (results made with another --n-test are refused without it)")
    args = ap.parse_args()

    source = resolve_model(args.model)
    name = short_name(source)
    out = results_dir(args) / name / ("stock-swa_full.json" if args.swa_full else "stock.json")
    settings = {"n_test": args.n_test}
    # a file from before settings were recorded: its n_test was set by its one run
    report = resume(out, settings, args.force, legacy=lambda r: {"n_test": r["n_test"]}) or {"vectors": {}}
    files = {p: vf for p in sorted(vectors_dir(name).glob("*.safetensors")) if controlvector.exportable(vf := vectorfile.load(p))}
    report |= {"model": name, "n_test": args.n_test, "settings": settings, "command": f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_stock --model {name} "
               f"--n-test {args.n_test}" + (" --swa-full" if args.swa_full else "")}
    extra = ["--swa-full"] if args.swa_full else []
    with Session(source) as s, tempfile.TemporaryDirectory() as tmp:
        # the no-vector row scores the prompts of the first vector's task
        first = next(iter(files.values()))
        for key, vf in [(None, first)] + [(f.stem, vf) for f, vf in files.items()]:
            stem = key or f"(no vector; {vf.meta['fvpatch.task']} prompts)"
            if stem in report["vectors"]:
                continue
            task = load_task(vf.meta["fvpatch.task"])
            prompts = prompts_for(template(vf.meta.get("fvpatch.template", "qa")), task.test[: args.n_test], [], 0)
            tokens = [s.tokenize(p.text) for p in prompts]
            answers = [answer_token(s.tokenize, p) for p in prompts]
            cv = key and controlvector.save(controlvector.from_vectors([(vf, vf.scale, vf.tensor)]), Path(tmp) / f"{key}.gguf", overwrite=True)
            row = {"layer": vf.layer if key else "–", **score(s, source, tokens, answers, cv, extra)}
            report["vectors"][stem] = row
            print(f"{stem:<40} fvpatch {row['fvpatch']}/{row['n']}  llama-server {row['llama-server']}/{row['n']}  "
                  f"differ {row['differ']}  max gap {row['max_gap']:.4f}", flush=True)
            write_json(out, report)
    write_report(out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
