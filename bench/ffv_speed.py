"""Wall time to train one FFV from 20 pairs on the default model, with the default config, on this machine.

Times separately: loading the PyTorch model (cached conversion, not counted), encoding plus the init
(the default `taskvec`: 20 10-shot prompts), and the training loop (steps, early stopping, valid
evaluations); reports seconds per step and the load average, since a shared machine stretches every
number. Target: under 120 s in all. On a machine whose cores other jobs also use, pass --threads 1:
torch's worker threads spin-wait for each other and every step can take 20x longer.

    .venv/bin/python bench/ffv_speed.py [--task antonym] [--threads N]
"""

import argparse
import os
import time

import torch

from fvpatch.prompts import template
from fvpatch.tasks import load_task
from train.ffv import Config, initial_vector, prepare, train_ffv
from train.model import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="antonym")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    lm = load_model()
    t1 = time.perf_counter()
    tpl = template("qa")
    cfg = Config()
    data = prepare(lm, load_task(args.task), tpl)
    v0 = initial_vector(lm, data.task, tpl, cfg, data.train)
    t2 = time.perf_counter()
    _, hist = train_ffv(lm, data, tpl, cfg, v0=v0, progress=False)
    t3 = time.perf_counter()
    total = t3 - t1
    print(f"{args.task}, 20 pairs, layer {cfg.layer}, init {cfg.init}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores")
    print(f"load model         {t1 - t0:6.1f} s (not counted)")
    print(f"encode + init      {t2 - t1:6.1f} s  ({cfg.init})")
    print(f"training           {t3 - t2:6.1f} s  ({hist.step[-1]} steps, {len(hist.valid_step)} valid evals, {(t3 - t2) / hist.step[-1]:.2f} s/step all in)")
    print(f"one relation       {total:6.1f} s  = {total / 120:.2f}x the 120 s target")
    print(f"load average       {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 = both cores busy; more = shared)")


if __name__ == "__main__":
    main()
