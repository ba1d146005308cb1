"""Does a last-token FFV survive being added at every token, as a llama.cpp control vector adds it, and how
does that depend on its layer? The positions report found Gemma 3 270M's FFVs (layer 4) broken at every token
and Qwen2.5-Coder 1.5B's (layer 16) mostly intact; this trains one at each of several layers of one model.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_ffv_depth [--model gemma-3-270m] [--layers 2,4,...]

For each core task and layer: a last-token FFV with the training defaults (taskvec init, lr 0.05, <= 60 steps,
early stopping on valid pairs), kept under results/<model>/ffv_depth/ (analysis only, not shipped); then, in
llama.cpp, top-1 of the answer's first token on the first `--n-test` TEST pairs, zero-shot prompt, the vector at
the last prompt token, at every token, and at the last token and on the query's own tokens (`walk` in
`Q: walk\nA:`; one prompt per decode), as in the positions report. Also the vector's
norm over the median norm of the residual it is added to, over the tokens of those prompts other than the first
(a BOS or first token's residual is far larger than the rest on these models). Nothing is chosen from these numbers.
Resumable: results/<model>/ffv_depth.json is rewritten after each (task, layer); a rerun with another `--n-test`
is refused (`--force` scores every (task, layer) again, from the vectors already trained).
"""

import argparse
from dataclasses import replace

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import write_json, write_report
from fvpatch.evaluate import build_items, llamacpp_predictor
from fvpatch.models import resolve_model, short_name
from fvpatch.prompts import Template, template
from fvpatch.session import Patch, Save, Session
from fvpatch.tasks import CORE_TASKS, load_task
from train.ffv import Config, prepare, train_ffv
from train.model import load_model
from train.reporting import add_options, positive_int, results_dir, resume, run
WAYS = ("last", "all", "query")


def query_positions(s: Session, tpl: Template, tokens: list[int]) -> list[int]:
    """The positions of the query's own tokens in a zero-shot prompt (`walk` in `Q: walk\nA:`)."""
    head, tail = tpl.query_affixes()
    before, after = s.tokenize(head), s.tokenize(tail, add_bos=False)
    if tokens[: len(before)] != before or tokens[len(tokens) - len(after) :] != after:
        raise ValueError("the template's tokens do not stand apart from the query's in this prompt")
    return list(range(len(before), len(tokens) - len(after)))


def norm_ratio(s: Session, token_lists: list[list[int]], vf: vectorfile.VectorFile) -> float:
    norms = []
    for t in token_lists:
        rows = s.run(t, saves=[Save(vf.tensor, tuple(range(1, len(t))))]).saved[vf.tensor]
        norms += np.linalg.norm(rows, axis=1).tolist()
    return float(np.linalg.norm(vf.rows[0]) / np.median(norms))


def markdown(report: dict) -> str:
    rows = report["runs"]
    layers = sorted({r["layer"] for r in rows.values()})
    tasks = [t for t in CORE_TASKS if any(r["task"] == t for r in rows.values())]
    lines = [f"# Last-token FFVs by layer, at the last token and at every token: {report['model']}", "",
             f"Regenerate: `{report['command']}`. Top-1 (first answer token) on the first {report['n_test']} TEST pairs, zero-shot "
             "prompt, llama.cpp, one prompt per decode: `last` / `all` / `query` (the vector at the last prompt token / at every "
             "token / at the last token and on the query's own tokens). "
             "`norm`: the vector's norm over the median residual norm at its layer (tokens after the first). Nothing is chosen "
             "from these numbers.", "",
             "| layer | " + " | ".join(tasks) + " | mean last / all / query | mean norm |", "|---:|" + "---|" * (len(tasks) + 2)]
    for layer in layers:
        cells, means, norms = [], [], []
        for t in tasks:
            r = rows.get(f"{t}@{layer}")
            if r is None:
                cells.append("–")
                continue
            cells.append(" / ".join(f"{100 * r[w]:.0f}" for w in WAYS))
            means.append([r[w] for w in WAYS]), norms.append(r["norm_ratio"])
        mean = " / ".join(f"{100 * m:.1f}" for m in np.mean(means, axis=0)) if len(means) == len(tasks) else "–"
        norm = f"{np.mean(norms):.2f}" if len(norms) == len(tasks) else "–"
        lines.append(f"| {layer} | " + " | ".join(cells) + f" | {mean} | {norm} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model).")
    ap.add_argument("--layers", default="2,4,6,8,10,12,14,16")
    ap.add_argument("--tasks", default=",".join(CORE_TASKS))
    ap.add_argument("--n-test", type=positive_int, default=50)
    add_options(ap, "start over: score every (task, layer) again (results made with another --n-test are refused without it)")
    args = ap.parse_args()
    source = resolve_model(args.model)
    name = short_name(source)
    layers = [int(x) for x in args.layers.split(",")]
    out = results_dir(args) / name / "ffv_depth.json"
    vec_dir = out.with_suffix("")
    settings = {"n_test": args.n_test}
    # a file from before settings were recorded: its n_test was set by its one run
    report = resume(out, settings, args.force, legacy=lambda r: {"n_test": r["n_test"]}) or {"runs": {}}
    report |= {"model": name, "n_test": args.n_test, "settings": settings, "command": f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_ffv_depth "
               f"--model {name} --layers {args.layers} --tasks {args.tasks} --n-test {args.n_test}"}
    tpl = template("qa")
    lm = load_model(source)
    with Session(source) as s:
        predict = llamacpp_predictor(s, batched=False)
        for task_name in args.tasks.split(","):
            task = load_task(task_name)
            data = prepare(lm, task, tpl)
            items = build_items(s.tokenize, tpl, task.test[: args.n_test], data.task.train)
            zero = items.tokens["zero_shot"]
            for layer in layers:
                key = f"{task_name}@{layer}"
                if "query" in report["runs"].get(key, {}):
                    continue
                path = vec_dir / f"{task_name}.ffv-l{layer}.safetensors"
                if path.exists():
                    vf = vectorfile.load(path)
                else:
                    vf, _ = train_ffv(lm, data, tpl, Config(layer=layer), progress=False)
                    vectorfile.save(vf, path, overwrite=True)
                every = replace(vf, meta={**vf.meta, "fvpatch.apply_at": "all"})
                hits = {way: float(np.mean(np.array(predict(zero, v)) == np.array(items.answers))) for way, v in (("last", vf), ("all", every))}
                # the vector at the last token and on the query's own tokens: the tokens it disturbs that matter
                query = [int(np.argmax(s.run(t, patches=[Patch(vf.tensor, vf.rows[0], p, "add") for p in [*query_positions(s, tpl, t), len(t) - 1]]).logits))
                         for t in zero]
                hits["query"] = float(np.mean(np.array(query) == np.array(items.answers)))
                report["runs"][key] = {"task": task_name, "layer": layer, "n": len(zero), **hits, "norm_ratio": norm_ratio(s, zero[:10], vf),
                                       "best_step": int(vf.meta["fvpatch.best_step"])}
                print(f"{key:<24} last {hits['last']:.2f}  all {hits['all']:.2f}  last+query {hits['query']:.2f}  norm {report['runs'][key]['norm_ratio']:.2f}", flush=True)
                write_json(out, report)
    write_report(out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
