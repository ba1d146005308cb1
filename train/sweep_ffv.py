"""Choose FFV's defaults on VALID pairs only: a grid of layer x init x learning rate over relation tasks.

Each run trains on the task's first 20 train pairs, stops early on its first 50 valid pairs and scores
zero-shot + vector top-1 (first answer token) on those same valid pairs in PyTorch. Results are appended
to a JSON file after every run, so an interrupted sweep resumes where it stopped. The default model's go
to results/ffv/sweep.json, another model's to results/<model>/ffv_sweep.json (its known name, else the
file's stem; a dtype other than float32 adds -<dtype> to the name, so its runs never mix with float32 ones).

    .venv/bin/python -m train.sweep_ffv --layers 2,4,6,8,10,12,14 --inits fv,zeros --lrs 0.05
    OMP_NUM_THREADS=1 .venv/bin/python -m train.sweep_ffv --model models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --layers 4,8
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from fvpatch.atomic import write_text
from fvpatch.models import resolve_model, short_name
from fvpatch.prompts import answer_token, prompts_for, template
from fvpatch.tasks import CORE_TASKS, load_task
from train.evaluate import torch_predictor
from train.ffv import Config, initial_vector, last_residual, prepare, train_ffv
from train.model import DEVICES, DTYPES, load_model

RESULTS = Path(__file__).resolve().parent.parent / "results"
OUT = RESULTS / "ffv" / "sweep.json"
HEADER = """# FFV defaults on {model}, measured on VALID pairs only

Zero-shot + FFV top-1 (first answer token, PyTorch, {dtype}) on each task's first 50 (or all, if fewer) valid pairs,
after training on its first 20 train pairs with early stopping on those valid pairs; in brackets the best
valid loss (answer NLL). Regenerate with `.venv/bin/python -m train.sweep_ffv{args}` (see its --help).

"""


def default_out(model: str | None, dtype: str) -> Path:
    suffix = "" if dtype == "float32" else f"-{dtype}"
    if model is None:
        return OUT.with_name(f"sweep{suffix}.json")
    return RESULTS / short_name(resolve_model(model)) / f"ffv_sweep{suffix}.json"


def zero_shot_top1(lm, predict, tpl, pairs, vf) -> float:
    prompts = prompts_for(tpl, pairs, [], 0)
    answers = [answer_token(lm.tokenize, p) for p in prompts]
    preds = predict([lm.tokenize(p.text) for p in prompts], vf)
    return sum(p == a for p, a in zip(preds, answers)) / len(answers)


def config(r: dict) -> tuple:
    """A run's configuration (runs from before --positions were all at the last token, without a penalty, on gold answers)."""
    return (r["layer"], r["init"], r["lr"], r["steps"], r["every_answer_token"], r.get("positions", "last"), r.get("l2_from_init", 0.0),
            r.get("targets", "answer"))


def summary(runs: list[dict]) -> str:
    """Markdown: valid top-1 (and valid loss) per configuration and task, with the mean over tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    configs = sorted({config(r) for r in runs})
    by = {(r["task"], *config(r)): r for r in runs}
    lines = ["| layer | init | lr | steps | every answer token | positions | l2 from init | targets | " + " | ".join(tasks) + " | mean top-1 | mean loss |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + 2)]
    for c in configs:
        got = [by.get((t, *c)) for t in tasks]
        cells = " | ".join("-" if g is None else f"{100 * g['valid_top1']:.0f}% ({g['valid_loss']:.2f})" for g in got)
        full = all(g is not None for g in got)
        mean = f"{100 * sum(g['valid_top1'] for g in got) / len(got):.1f}%" if full else "-"
        loss = f"{sum(g['valid_loss'] for g in got) / len(got):.2f}" if full else "-"
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {'yes' if c[4] else 'no'} | {c[5]} | {c[6]:g} | {c[7]} | {cells} | {mean} | {loss} |")
    return "\n".join(lines) + "\n"


def read_runs(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(CORE_TASKS))
    ap.add_argument("--layers", default="6")
    ap.add_argument("--inits", default="fv")
    ap.add_argument("--lrs", default=str(Config.lr))
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--l2-from-inits", default="0", help="Penalties on the distance from the initial vector (train ffv --l2-from-init).")
    ap.add_argument("--targets", default="answer", help="Training targets: answer (gold tokens), icl (10-shot ICL's distribution), or both, comma-separated.")
    ap.add_argument("--every-answer-token", action="store_true")
    ap.add_argument("--positions", choices=["last", "all"], default="last", help="Train for the last prompt token or for every token (a control vector).")
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model).")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", choices=list(DEVICES), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="JSON file of the runs (default: see above); a .md table is written next to it")
    args = ap.parse_args()
    args.out = args.out or default_out(args.model, args.dtype)

    done = {(r["task"], *config(r)) for r in read_runs(args.out)}
    lm = load_model(args.model, args.device, args.dtype)
    header = HEADER.format(model=lm.fingerprint["file"], dtype=args.dtype,
                           args="".join(f" --{k} {v}" for k, v in (("model", args.model), ("dtype", args.dtype)) if v not in (None, "float32")))
    predict = torch_predictor(lm)
    tpl = template("qa")
    for name in args.tasks.split(","):
        data = prepare(lm, load_task(name), tpl, positions=args.positions)
        fv = None
        for layer in map(int, args.layers.split(",")):
            for init in args.inits.split(","):
                for lr, l2, targets in itertools.product(map(float, args.lrs.split(",")), map(float, args.l2_from_inits.split(",")), args.targets.split(",")):
                    key = (name, layer, init, lr, args.steps, args.every_answer_token, args.positions, l2, targets)
                    if key in done:
                        continue
                    cfg = Config(layer=layer, init=init, lr=lr, steps=args.steps, l2_from_init=l2, every_answer_token=args.every_answer_token,
                                 positions=args.positions, targets=targets)
                    t = time.perf_counter()
                    if init == "fv" and fv is None:  # the function vector does not depend on the layer it is added at
                        fv = initial_vector(lm, data.task, tpl, cfg, data.train)
                    vf, hist = train_ffv(lm, data, tpl, cfg, v0=fv if init == "fv" else None, progress=False)
                    r = {
                        "task": name, "layer": layer, "init": init, "lr": lr, "steps": args.steps, "every_answer_token": args.every_answer_token,
                        "positions": args.positions, "l2_from_init": l2, "targets": targets,
                        "valid_top1": zero_shot_top1(lm, predict, tpl, data.task.valid, vf),
                        "valid_loss": min(hist.valid_loss), "init_valid_loss": hist.valid_loss[0], "best_step": hist.best_step,
                        "seconds": round(time.perf_counter() - t, 1), "norm": float(torch.from_numpy(vf.rows).norm()),
                        "residual_norm": float(last_residual(lm, data.train, layer).norm(dim=-1).mean()),
                        "curve": {"step": hist.step, "train": hist.train_loss, "valid_step": hist.valid_step, "valid": hist.valid_loss},
                    }
                    print(f"{name:16} L{layer:<2} {init:7} lr {lr:<5} l2i {l2:<4} {targets:6} valid top1 {r['valid_top1']:.2f} loss {r['valid_loss']:.3f} best@{r['best_step']} {r['seconds']}s", flush=True)
                    runs = read_runs(args.out) + [r]  # re-read: another process may share the file (give each its own --tasks)
                    write_text(args.out, json.dumps(runs))
                    write_text(args.out.with_suffix(".md"), header + summary(runs))


if __name__ == "__main__":
    main()
