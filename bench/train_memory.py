"""Peak memory and time of PyTorch training (one FFV, one head map) per model and dtype, each in a fresh process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py --models models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --dtypes bfloat16

For every model x dtype it runs three measurements, one subprocess each, so their peaks never mix:

  convert  dequantize the GGUF into a cache of that dtype alone (a scratch models dir per dtype): peak RSS,
           time, the cache's size on disk
  ffv      load the cached model, encode 20 train and 50 valid pairs, the `taskvec` init, then `--steps`
           optimizer steps of the default config at the model's default layer (train.ffv.default_layer);
           one valid evaluation is timed alone, so the time per step excludes them and a full 60-step run
           is projected as encode + init + 60 steps + its 13 valid evaluations
  headmap  load the cached model and run train.cma.head_map on `--prompts` 10-shot prompts; the default
           `train fv` uses 25, projected as 25 x the time per prompt

Peak RSS is the process's ru_maxrss (load included; the cached weights are memory-mapped and count once
touched); on CUDA also torch's peak allocated memory. Times are the process's CPU seconds (with one thread,
what an idle core takes; this box is shared), wall times are kept in the JSON. Results go to
results/training/memory.{json,md} after each measurement; measurements already there are skipped, so an
interrupted run resumes (delete a row from the JSON to redo it). The scratch caches are deleted at the end
unless --keep-cache (only the per-dtype folders the run made; nothing else in --cache-dir). Run one model process at a time: the 1.5B model in float32 needs ~9 GB.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rss import peak_rss_gb  # bench/rss.py: scripts here run as `python bench/NAME.py`

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "training" / "memory.json"
WHAT = ("convert", "ffv", "headmap")


def cpu_seconds() -> float:
    """This process's CPU time: with one thread it is the wall time an idle core would take, whatever else the box runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args) -> dict:
    """One measurement in this (fresh) process; returns its row."""
    import torch

    from fvpatch.prompts import template
    from fvpatch.tasks import load_task
    from train.model import _converted, load_model, torch_dtype

    path, row = Path(args.model), {}
    t0 = time.perf_counter()
    if args.child == "convert":
        from fvpatch.models import file_key, models_dir

        converted = not any((models_dir() / "hf-cache").glob(f"{file_key(path)}-*/config.json"))
        cache, _ = _converted(path, torch_dtype(args.dtype))
        row["cache_gb"] = round(sum(f.stat().st_size for f in cache.iterdir()) / 1e9, 3)
        row |= {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds(), 1)}
        return row | {"peak_rss_gb": round(peak_rss_gb(), 2), "converted": converted}

    lm = load_model(path, args.device, args.dtype)
    row["load_seconds"] = round(time.perf_counter() - t0, 1)
    row["n_params"] = sum(p.numel() for p in lm.model.parameters())
    cuda = lm.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tpl, task = template("qa"), load_task(args.task)
    if args.child == "ffv":
        from train.ffv import Config, answer_nll, default_layer, initial_vector, prepare, train_ffv

        cfg = Config(layer=default_layer(lm)[0], steps=args.steps)
        t1, c1 = time.perf_counter(), cpu_seconds()
        data = prepare(lm, task, tpl)
        v0 = initial_vector(lm, data.task, tpl, cfg, data.train)
        t2, c2 = time.perf_counter(), cpu_seconds()
        _, hist = train_ffv(lm, data, tpl, cfg, v0=v0, progress=False)
        t3, c3 = time.perf_counter(), cpu_seconds()
        with torch.no_grad():
            answer_nll(lm, data.valid, v0, cfg.layer)
        c_eval = cpu_seconds() - c3
        # the loop ran `steps` steps and len(valid_step) valid evaluations (plus a residual RMS and a final train
        # loss, each cheaper than one); a full run has 60 steps and 13 evaluations
        steps, evals = hist.step[-1], len(hist.valid_step)
        per_step = (c3 - c2 - evals * c_eval) / steps
        row |= {"layer": cfg.layer, "steps": steps, "wall_seconds": round(t3 - t1, 1), "init_cpu_seconds": round(c2 - c1, 1),
                "train_cpu_seconds": round(c3 - c2, 1), "valid_eval_cpu_seconds": round(c_eval, 2), "cpu_seconds_per_step": round(per_step, 2),
                "projected_60_step_seconds": round(c2 - c1 + 60 * per_step + 13 * c_eval)}
    else:
        from train.cma import cma_prompts, head_map

        clean, corrupted, answers = cma_prompts(lm, task, tpl, args.prompts, 10)
        t1, c1 = time.perf_counter(), cpu_seconds()
        head_map(lm, clean, corrupted, answers)
        t2, c2 = time.perf_counter(), cpu_seconds()
        row |= {"prompts": args.prompts, "tokens_per_prompt": round(sum(map(len, clean)) / len(clean)), "wall_seconds": round(t2 - t1, 1),
                "cpu_seconds": round(c2 - c1, 1), "cpu_seconds_per_prompt": round((c2 - c1) / args.prompts, 1),
                "projected_25_prompt_seconds": round(25 * (c2 - c1) / args.prompts)}
    row["peak_rss_gb"] = round(peak_rss_gb(), 2)
    if cuda:
        row["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# Peak memory and time of PyTorch training", "",
             "Each row is one fresh process (`bench/train_memory.py`, one torch thread); peak RSS includes loading the model. "
             "Times are the process's CPU seconds, which with one thread is what an idle core takes (the box was shared; "
             "wall time and load average are in the JSON). Projections: a 60-step FFV (encode + init + 60 steps + 13 valid "
             "evaluations) and a 25-prompt head map, from the measured steps and prompts. "
             "Regenerate with `OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py` (resumable; see its docstring).", "",
             "| model | params | dtype | device | measurement | peak RSS | measured | per unit | projected full run | notes |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        params = f"{r['n_params'] / 1e9:.2f} B" if "n_params" in r else ""
        if r["what"] == "convert":
            cells = (f"{r['cpu_seconds']:.0f} s", "", "", f"cache {r['cache_gb']:.2f} GB on disk")
        elif r["what"] == "ffv":
            cells = (f"{r['init_cpu_seconds'] + r['train_cpu_seconds']:.0f} s", f"{r['cpu_seconds_per_step']:.2f} s/step",
                     f"{r['projected_60_step_seconds']} s (60 steps)",
                     f"layer {r['layer']}, {r['steps']} steps; encode + init {r['init_cpu_seconds']:.0f} s; a valid evaluation {r['valid_eval_cpu_seconds']:.1f} s")
        else:
            cells = (f"{r['cpu_seconds']:.0f} s", f"{r['cpu_seconds_per_prompt']:.1f} s/prompt", f"{r['projected_25_prompt_seconds']} s (25 prompts)",
                     f"{r['prompts']} prompts of ~{r['tokens_per_prompt']} tokens")
        cuda = f" (CUDA {r['cuda_peak_gb']:.2f} GB)" if "cuda_peak_gb" in r else ""
        lines.append(f"| {r['model']} | {params} | {r['dtype']} | {r['device']} | {r['what']} | {r['peak_rss_gb']:.2f} GB{cuda} | {' | '.join(cells)} |")
    first = rows[0] if rows else {}
    lines += ["", f"Machine: {first.get('machine', '?')}, torch {first.get('torch', '?')}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated GGUF paths or known names (default: the default model and the 1.5B model in models/)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--what", default=",".join(WHAT), help=f"which measurements ({', '.join(WHAT)})")
    ap.add_argument("--task", default="country-capital")
    ap.add_argument("--steps", type=int, default=10, help="ffv: optimizer steps measured")
    ap.add_argument("--prompts", type=int, default=4, help="headmap: clean/corrupted prompts")
    ap.add_argument("--cache-dir", type=Path, default=None, help="scratch models dir, one folder per dtype (default: models/hf-cache/train-memory)")
    ap.add_argument("--keep-cache", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", choices=WHAT, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    from fvpatch.atomic import write_report
    from fvpatch.models import models_dir, resolve_model

    specs = args.models.split(",") if args.models else [None, str(ROOT / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")]
    paths = [resolve_model(s) for s in specs]
    cache_dir = args.cache_dir or models_dir() / "hf-cache" / "train-memory"
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    from importlib.metadata import version

    torch_version = version("torch")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (", AVX-512 BF16" if " avx512_bf16" in flags else "")
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    # one table, one setting: rows measured otherwise (older rows, which record none, with the defaults) are not mixed in
    other = {(r.get("task", "country-capital"), r.get("steps", 10), r.get("prompts", 4)) for r in rows} - {(args.task, args.steps, args.prompts)}
    if other:
        task, steps, prompts = sorted(other)[0]
        sys.exit(f"Error: {args.out} was measured with --task {task} --steps {steps} --prompts {prompts}; use those, or another --out")
    done = {(r["model"], r["dtype"], r["device"], r["what"]) for r in rows}
    # only the per-dtype folders this run makes are its to delete: --cache-dir may name a folder that holds other things
    made = [cache_dir / d for d in args.dtypes.split(",") if not (cache_dir / d).exists()]
    for path in paths:
        for dtype in args.dtypes.split(","):
            pending = [w for w in args.what.split(",") if (path.name, dtype, "cpu" if w == "convert" else args.device, w) not in done]
            if pending and pending[0] != "convert":
                pending.insert(0, "convert")  # the cache must exist before a measurement loads it; recorded only if it converts
            for what in pending:
                device = "cpu" if what == "convert" else args.device
                cmd = [sys.executable, __file__, "--child", what, "--model", str(path), "--dtype", dtype, "--device", device,
                       "--task", args.task, "--steps", str(args.steps), "--prompts", str(args.prompts)]
                env = os.environ | {"OMP_NUM_THREADS": threads, "FVPATCH_MODELS": str(cache_dir / dtype)}
                load = os.getloadavg()[0]
                print(f"{path.name} {dtype} {what} ...", end=" ", flush=True)
                done_run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                if done_run.returncode != 0:
                    sys.exit(f"{path.name} {dtype} {what} failed:\n{done_run.stderr[-3000:]}")
                row = {"model": path.name, "dtype": dtype, "device": device, "what": what, "task": args.task, "steps": args.steps,
                       "prompts": args.prompts, **json.loads(done_run.stdout.strip().splitlines()[-1]),
                       "threads": threads, "load_average_before": round(load, 1), "machine": machine, "torch": torch_version}
                converted = row.pop("converted", None)
                if what == "convert" and ((path.name, dtype, device, what) in done or not converted):
                    print("cache already there, not recorded", flush=True)
                    continue
                print(f"peak RSS {row['peak_rss_gb']} GB", flush=True)
                rows.append(row)
                write_report(args.out, rows, markdown(rows))
    if not args.keep_cache:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
