"""fvpatch against the PyTorch ways of doing the same thing: function-vector-patched greedy generation.

The same weights (the GGUF, dequantized to float32 for PyTorch), the same prompt tokens, the task's shipped FFV
added after block L at the last prompt token and at every generated token, 64 new tokens:
  fvpatch       llama.cpp on the Q4_K_M file, the vector through the eval callback (`fvpatch patch --every-token`)
  transformers  a forward hook on the decoder block (function_vectors style; train.apply.patched), float32, CPU
  nnsight       nnsight's LanguageModel around the same transformers model, the vector added inside its trace
                (optional: pip install nnsight; skipped when it is not installed)
Each runs in a fresh process of its own, one after the other, so peak memory (the process's max RSS) is its own.
Time to first token is a generate of 1 token; tokens/s is (n - 1) / (time of n tokens - time of 1), the model
loaded and warmed up first. Printed as ratios against fvpatch, with how many generated tokens agree.

    OMP_NUM_THREADS=1 .venv/bin/python bench/peers.py --model qwen2.5-coder-1.5b [--task country-capital] [--threads 1]
"""

import argparse
import json
import subprocess
import sys
import time

from rss import peak_rss_gb  # bench/rss.py: scripts here run as `python bench/NAME.py`

ENGINES = ("fvpatch", "transformers", "nnsight")


def child(engine: str, model: str, task: str, n: int, threads: int) -> dict:
    from fvpatch import vectorfile
    from fvpatch.models import resolve_model
    from fvpatch.modelfile import ModelFile
    from fvpatch.prompts import prompts_for, template
    from fvpatch.shipped import find_vector
    from fvpatch.tasks import load_task

    path = resolve_model(model)
    with ModelFile(path, vocab_only=True) as mf:
        vf = vectorfile.load(find_vector(f"{task}.ffv", mf.fingerprint()))
        prompt = prompts_for(template("qa"), load_task(task).test[:1], [], 0)[0].text
        tokens = mf.tokenize(prompt)
    if engine == "nnsight":  # nnsight wants a tokenizer object even when given token ids; transformers reads the GGUF's
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    t0 = time.perf_counter()
    if engine == "fvpatch":
        from fvpatch.session import Patch, Session

        s = Session(path, n_threads=threads)
        patch = [Patch(vf.tensor, vf.rows[0], -1, "add", vf.scale, generated=True)]
        generate = lambda k: s.run(tokens, patches=patch, max_tokens=k).generated  # noqa: E731
    else:
        import torch

        from train.apply import patched
        from train.model import load_model

        lm = load_model(path, "cpu", "float32", threads)
        ids = torch.tensor([tokens])
        if engine == "transformers":
            def generate(k):
                with torch.no_grad(), patched(lm.model, vf, every_token=True):
                    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False)
                return out[0, len(tokens):].tolist()
        else:
            from nnsight import LanguageModel

            nlm = LanguageModel(lm.model, tokenizer=tokenizer)
            v = torch.from_numpy(vf.rows[0] * vf.scale)

            def generate(k):
                with nlm.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False) as tracer:
                    for _ in tracer.iter[:k]:  # k forwards: the prompt pass, then one per generated token but the last
                        nlm.model.layers[vf.layer].output[:, -1, :] += v
                    out = tracer.result.save()
                return out[0, len(tokens):].tolist()
    load = time.perf_counter() - t0
    generate(1)  # warm-up
    t = time.perf_counter()
    first = generate(1)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    toks = generate(n)
    total = time.perf_counter() - t
    return {"engine": engine, "load_s": load, "ttft_s": ttft, "tokens": toks, "first": first[0],
            "tok_per_s": (len(toks) - 1) / max(total - ttft, 1e-9), "peak_rss_gb": peak_rss_gb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="country-capital")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.task, args.n, args.threads)))
        return

    rows = []
    for engine in args.engines.split(","):
        if engine == "nnsight":
            try:
                import nnsight  # noqa: F401
            except ImportError:
                print("nnsight is not installed (pip install nnsight): skipped", file=sys.stderr)
                continue
        done = subprocess.run([sys.executable, __file__, "--child", engine, "--model", args.model, "--task", args.task, "--n", str(args.n),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            print(f"{engine} failed: {done.stderr.strip()[-800:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["engine"] == "fvpatch"), None)
    if ref is None:
        sys.exit("fvpatch did not run, so there is nothing to compare against")
    print(f"{args.model}, {args.task} FFV, {args.n} greedy tokens, {args.threads} thread(s)\n")
    print("| engine | load s | time to first token s | tokens/s | peak RSS GB | fvpatch's tokens/s is | its peak RSS is fvpatch's x | first token = fvpatch | tokens = fvpatch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
        print(f"| {r['engine']} | {r['load_s']:.1f} | {r['ttft_s']:.3f} | {r['tok_per_s']:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{ref['tok_per_s'] / r['tok_per_s']:.1f}x | {r['peak_rss_gb'] / ref['peak_rss_gb']:.1f}x | {'yes' if r['first'] == ref['first'] else 'no'} | "
              f"{same}/{min(len(r['tokens']), len(ref['tokens']))} |")


if __name__ == "__main__":
    main()
