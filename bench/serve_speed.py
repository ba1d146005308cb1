"""Serving a vector: `fvpatch serve` (the vector in each request, applied through the eval callback) against
stock llama-server (the exported control vector loaded at start), side by side in one run.

Four servers on the same model file, one thread each, asked in interleaved rounds for the same greedy
completion of `--tokens` tokens over HTTP (`/v1/completions`), so machine noise hits all alike: fvpatch serve
without and with the vector, llama-server without and with it (`--control-vector`, the prompt cache off so
every request decodes its whole prompt, as fvpatch serve does). Tokens/s is completion tokens over the
request's wall time, prompt included. Needs `make llama-tools`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_speed.py [--model gemma-3-270m] [--vector gemma-3-270m/present-past.ffv-all]
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from fvpatch import controlvector, vectorfile
from fvpatch.models import resolve_model
from fvpatch.server import make_server
from fvpatch.session import Session
from fvpatch.shipped import vector_path
from train.stock_llama import Server

PROMPT = "Q: walk\nA: walked\n\nQ: see\nA: saw\n\nQ: write a long story about a walk in the hills\nA:"


def tokens_per_second(url: str, n: int, body: dict) -> float:
    req = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, **body}
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", json.dumps(req).encode(),
                                                       {"Content-Type": "application/json"}), timeout=600) as r:
        got = json.load(r)["usage"]["completion_tokens"]
    dt = time.perf_counter() - t0
    assert got == n, f"{url} generated {got} tokens, not {n}; the rate would be wrong"
    return n / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model).")
    ap.add_argument("--vector", default="gemma-3-270m/present-past.ffv-all", help="A vector that exports as a control vector.")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = resolve_model(args.model)
    path = vector_path(args.vector)
    vf = vectorfile.load(path)
    with tempfile.TemporaryDirectory() as tmp, Session(model, n_threads=1) as s:
        cv = controlvector.save(controlvector.from_vectors([(vf, vf.scale, path.name)]), Path(tmp) / "cv.gguf")
        ours = make_server(s, "127.0.0.1", 0, quiet=True)
        threading.Thread(target=ours.serve_forever, daemon=True).start()
        ours_url = f"http://127.0.0.1:{ours.server_address[1]}"
        with Server(model, n_ctx=2048) as plain, Server(model, cv, n_ctx=2048) as steered:
            stock_off = {"cache_prompt": False}
            configs = {
                "fvpatch serve, no vector": (ours_url, {}),
                "fvpatch serve, vector in the request": (ours_url, {"vectors": [{"vector": str(path), "positions": "all"}]}),
                "llama-server, no vector": (plain.url, stock_off),
                "llama-server --control-vector": (steered.url, stock_off),
            }
            for url, body in configs.values():
                tokens_per_second(url, 4, body)  # warm-up
            rates = {k: [] for k in configs}
            for _ in range(args.rounds):
                for name, (url, body) in configs.items():
                    rates[name].append(tokens_per_second(url, args.tokens, body))
        ours.shutdown()
        ours.server_close()
    base = statistics.median(rates["llama-server --control-vector"])
    print(f"{model.name}, {path.name} at every token, {args.tokens} generated tokens, 1 thread each, median of {args.rounds} interleaved rounds")
    print(f"| server | tokens/s | vs llama-server --control-vector |\n|---|---:|---:|")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
