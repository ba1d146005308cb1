"""One FFV per Google analogy category, trained on the category's own word pairs.

    OMP_NUM_THREADS=1 .venv/bin/python -m train.google_ffv [--model gemma-3-270m] [--dtype float32]

Each category's split is train.report_google's: up to 20 training pairs, 3 valid pairs for early stopping, and
test questions that use none of their words. The FFV is trained with the model's default FFV config (layer
chosen on its relation tasks' valid pairs, taskvec start) on `Q: A\\nA: B`. Writes
vectors/<model>/google/<category>.ffv.safetensors, which train.report_google then scores. Resumable: a category
whose file exists is skipped.
"""

import argparse
from pathlib import Path

from fvpatch import google_analogy as ga
from fvpatch import vectorfile
from fvpatch.models import resolve_model, short_name
from fvpatch.prompts import template
from fvpatch.tasks import Task
from train.ffv import Config, default_layer, prepare, train_ffv
from train.model import DTYPES, load_model
from train.report_google import category_split

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "the Google analogy test set (Mikolov et al. 2013, Apache-2.0), vendored in fvpatch"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = ap.parse_args()
    path = resolve_model(args.model)
    folder = ROOT / "vectors" / short_name(path) / "google"
    lm = load_model(path, dtype=args.dtype)
    layer, _ = default_layer(lm)
    qa = template("qa")
    for category, questions in ga.load().items():
        out = folder / f"{category}.ffv.safetensors"
        if out.exists():
            continue
        train, valid, _ = category_split(questions)
        data = prepare(lm, Task(category, train, valid, [], SOURCE), qa, len(train), len(valid))
        vf, hist = train_ffv(lm, data, qa, Config(layer=layer))
        vectorfile.save(vf, out, overwrite=True)
        print(f"{category:<30} {len(train)} pairs, kept step {hist.best_step}, valid loss {vf.meta['fvpatch.valid_loss']}", flush=True)


if __name__ == "__main__":
    main()
