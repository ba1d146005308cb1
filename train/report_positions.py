"""Where a vector is added: at the last prompt token (fvpatch's function-vector way) or at every token (a
llama.cpp control vector), for every shipped vector that can be exported as one.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.report_positions [--model gemma-3-270m] [--n-test 50]

For each vector in vectors/<model>/ that is an added l_out-N vector (N >= 1; FVs and FFVs, not the
replace-mode task vectors, not banks): top-1 of the answer's first token on the first `--n-test` TEST pairs
of its task, zero-shot prompt plus the vector, in llama.cpp:
- `last`: at the last prompt token, as fvpatch applies a function vector;
- `all (fvpatch)`: at every prompt token through fvpatch's eval callback;
- `all (control vector)`: the vector exported with `fvpatch export` and loaded through llama.cpp's own
  control-vector API (`llama_set_adapter_cvec`), no callback.
A vector trained for every token (`train ffv --positions all`, metadata `fvpatch.apply_at = all`) is
scored the same three ways. Each vector's counts are stamped into its file as `fvpatch.positions_top1`
(rows untouched), where `fvpatch export` reads them to warn; an every-token vector also gets its held-out
top-1 at every token as `fvpatch.test_top1`. No torch is used. Resumable:
results/<model>/positions.json is rewritten after each vector; a rerun with another `--n-test` is refused
(`--force` scores every vector again).
"""

import argparse
import json

import numpy as np
from tqdm import tqdm

from fvpatch import controlvector, vectorfile
from fvpatch.atomic import write_json, write_report
from fvpatch.models import resolve_model, short_name
from fvpatch.prompts import answer_token, prompts_for, template
from fvpatch.session import Patch, Session
from fvpatch.tasks import load_task
from train.reporting import add_options, positive_int, results_dir, resume, run, vectors_dir

WAYS = ("last", "all (fvpatch)", "all (control vector)")
STAMP_KEY = "fvpatch.positions_top1"


def correct(s: Session, prompts: list[list[int]], answers: list[int], vf: vectorfile.VectorFile, way: str) -> int:
    """How many first answer tokens are the argmax with the vector applied `way`."""
    patches = [] if way == "all (control vector)" else [Patch(vf.tensor, vf.rows[0], -1, "add", vf.scale, all_tokens=way != "last")]
    if way == "all (control vector)":
        s.set_control_vector(controlvector.from_vectors([(vf, vf.scale, vf.tensor)]).dense(s.n_layer))
    try:
        return sum(int(np.argmax(s.run(p, patches=patches).logits)) == a for p, a in zip(tqdm(prompts, desc=way, leave=False), answers))
    finally:
        s.set_control_vector(None)


def markdown(report: dict) -> str:
    lines = [f"# Last token or every token: {report['model']}", "",
             f"Regenerate: `{report['command']}`. Top-1 (first answer token) on the first {report['n_test']} TEST pairs of each "
             "vector's task, zero-shot `Q: x\\nA:` prompt plus the vector, llama.cpp. `last`: added at the last prompt token (fvpatch's "
             "way); `all`: added at every token, through fvpatch's callback and as the exported control vector through llama.cpp's own "
             "loader (the two agree by construction; the column shows they do).", "",
             "| vector | layer | trained for | zero-shot | " + " | ".join(WAYS) + " |", "|---|---|---|---|" + "---|" * len(WAYS)]
    for name, row in report["vectors"].items():
        n = row["n"]
        cells = " | ".join(f"{100 * row[w] / n:.0f}%" for w in WAYS)
        lines.append(f"| {name} | {row['layer']} | {row['trained_for']} | {100 * row['zero_shot'] / n:.0f}% | {cells} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name whose shipped vectors are scored (default: the default model).")
    ap.add_argument("--n-test", type=positive_int, default=50)
    add_options(ap, "start over: score every vector again (results made with another --n-test are refused without it)")
    args = ap.parse_args()

    source = resolve_model(args.model)
    name = short_name(source)
    out = results_dir(args) / name / "positions.json"
    settings = {"n_test": args.n_test}
    # a file from before settings were recorded: its n_test was set by its one run
    report = resume(out, settings, args.force, legacy=lambda r: {"n_test": r["n_test"]}) or {"vectors": {}}
    files = {p: vf for p in sorted(vectors_dir(name, writes=True).glob("*.safetensors")) if controlvector.exportable(vf := vectorfile.load(p))}
    report |= {"model": name, "n_test": args.n_test, "settings": settings,
               "command": f"OMP_NUM_THREADS=1 .venv/bin/python -m train.report_positions --model {name} --n-test {args.n_test}"}
    with Session(source) as s:
        for f, vf in files.items():
            if f.stem in report["vectors"]:
                continue
            task = load_task(vf.meta["fvpatch.task"])
            prompts = prompts_for(template(vf.meta.get("fvpatch.template", "qa")), task.test[: args.n_test], [], 0)
            tokens = [s.tokenize(p.text) for p in prompts]
            answers = [answer_token(s.tokenize, p) for p in prompts]
            row = {"layer": vf.layer, "trained_for": vf.meta.get("fvpatch.apply_at", "last"), "n": len(prompts),
                   "zero_shot": sum(int(np.argmax(s.run(t).logits)) == a for t, a in zip(tokens, answers))}
            row |= {w: correct(s, tokens, answers, vf, w) for w in WAYS}
            report["vectors"][f.stem] = row
            vf.meta[STAMP_KEY] = json.dumps({"n": row["n"], "last": row["last"], "all": row["all (control vector)"]})
            if row["trained_for"] == "all":  # its held-out accuracy, applied as it is meant to be
                vf.meta |= {"fvpatch.test_top1": f"{row['all (control vector)'] / row['n']:.4f}", "fvpatch.test_n": str(row["n"]),
                            "fvpatch.test_zero_shot_top1": f"{row['zero_shot'] / row['n']:.4f}",
                            "fvpatch.test_engine": f"llama.cpp, {s.path.name}, zero-shot prompts, the vector at every token, top-1 first token"}
            vectorfile.save(vf, f, overwrite=True)
            print(f"{f.stem:<32} " + "  ".join(f"{w}: {row[w]}/{row['n']}" for w in WAYS), flush=True)
            write_json(out, report)
    write_report(out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
