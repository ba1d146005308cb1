"""Serving a vector: `fvpatch serve` (the vector in each request, applied through the eval callback) against
stock llama-server (the exported control vector loaded at start), side by side in one run.

One client (the default): four servers on the same model file, one thread each, asked in interleaved rounds
for the same greedy completion of `--tokens` tokens over HTTP (`/v1/completions`), so machine noise hits all
alike: fvpatch serve without and with the vector, llama-server without and with it (`--control-vector`, the
prompt cache off so every request decodes its whole prompt, as fvpatch serve does). Tokens/s is completion
tokens over the request's wall time, prompt included.

`--clients N`: N clients ask at once, each round, and tokens/s is all their completion tokens over the wall
time of the round. fvpatch serve gets a different every-token vector from each client (`--vectors`);
llama-server gets one of those vectors for all, as it can hold only one. Each runs once with one slot (requests
take turns) and once with N (decoded together: `--parallel N`, `-np N`). Also counted: how many of fvpatch's batched completions
equal the same request's completion alone. Needs `make llama-tools`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_speed.py [--model gemma-3-270m] [--vector gemma-3-270m/present-past.ffv-all]
    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_speed.py --clients 4 [--vectors gemma-3-270m/present-past.ffv-all,...]
"""
import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fvpatch import controlvector, vectorfile
from fvpatch.models import resolve_model, short_name
from fvpatch.server import make_server
from fvpatch.session import Session
from fvpatch.shipped import vector_path
from train.stock_llama import Server

PROMPT = "Q: walk\nA: walked\n\nQ: see\nA: saw\n\nQ: write a long story about a walk in the hills\nA:"


def complete(url: str, n: int, body: dict) -> str:
    req = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, **body}
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", json.dumps(req).encode(),
                                                       {"Content-Type": "application/json"}), timeout=600) as r:
        got = json.load(r)
    assert got["usage"]["completion_tokens"] == n, f"{url} generated {got['usage']['completion_tokens']} tokens, not {n}; the rate would be wrong"
    return got["choices"][0]["text"]


def tokens_per_second(url: str, n: int, body: dict) -> float:
    t0 = time.perf_counter()
    complete(url, n, body)
    return n / (time.perf_counter() - t0)


def round_rate(url: str, n: int, bodies: list[dict]) -> tuple[float, list[str]]:
    """All `bodies` asked at once: completion tokens per second over the round's wall time, and the texts."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        texts = list(pool.map(lambda b: complete(url, n, b), bodies))
    return n * len(bodies) / (time.perf_counter() - t0), texts


def serving(session: Session, parallel: int):
    server = make_server(session, "127.0.0.1", 0, quiet=True, parallel=parallel, vector_dir="/")  # the bench names its own files
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()
    server.server_close()


def one_client(model: Path, path: Path, args):
    vf = vectorfile.load(path)
    with tempfile.TemporaryDirectory() as tmp, Session(model, n_threads=1) as s:
        cv = controlvector.save(controlvector.from_vectors([(vf, vf.scale, path.name)]), Path(tmp) / "cv.gguf")
        ours, ours_url = serving(s, 1)
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
        stop(ours)
    print(f"{model.name}, {path.name} at every token, {args.tokens} generated tokens, 1 thread each, median of {args.rounds} interleaved rounds")
    table(rates, "llama-server --control-vector")


def many_clients(model: Path, paths: list[Path], args):
    n = args.clients
    paths = [paths[i % len(paths)] for i in range(n)]
    own = [{"vectors": [{"vector": str(p), "positions": "all"}]} for p in paths]
    vf = vectorfile.load(paths[0])
    with tempfile.TemporaryDirectory() as tmp, Session(model, n_threads=1) as one, Session(model, n_threads=1) as s:
        cv = controlvector.save(controlvector.from_vectors([(vf, vf.scale, paths[0].name)]), Path(tmp) / "cv.gguf")
        (taking_turns, turns_url), (together, together_url) = serving(one, 1), serving(s, n)
        stock_off = [{"cache_prompt": False}] * n
        with Server(model, cv, n_ctx=2048) as stock_turns, Server(model, cv, n_ctx=2048, parallel=n) as stock_together:
            configs = {
                "fvpatch serve --parallel 1, a vector per client": (turns_url, own),
                f"fvpatch serve --parallel {n}, a vector per client": (together_url, own),
                "llama-server -np 1 --control-vector, one vector for all": (stock_turns.url, stock_off),
                f"llama-server -np {n} --control-vector, one vector for all": (stock_together.url, stock_off),
            }
            for url, bodies in configs.values():
                round_rate(url, 4, bodies)  # warm-up
            rates, texts = {k: [] for k in configs}, {k: [] for k in configs}
            for _ in range(args.rounds):
                for name, (url, bodies) in configs.items():
                    rate, got = round_rate(url, args.tokens, bodies)
                    rates[name].append(rate)
                    texts[name] += got
        stop(taking_turns)
        stop(together)
    print(f"{model.name}, {n} clients at once, every-token vectors {', '.join(p.name for p in paths)}; {args.tokens} generated tokens "
          f"each, 1 thread per server, median of {args.rounds} interleaved rounds")
    table(rates, f"llama-server -np {n} --control-vector, one vector for all")
    # a batch's rows go through other kernel groupings than one request's: greedy text can part at a near-tie
    for engine in ("fvpatch serve", "llama-server"):
        turns, together = (texts[k] for k in configs if k.startswith(engine))
        same = sum(a == b for a, b in zip(turns, together))
        print(f"\n{engine}: {same} of {len(turns)} completions with {n} slots equal the same request's with one slot")


def table(rates: dict[str, list[float]], base_name: str):
    base = statistics.median(rates[base_name])
    print(f"| server | tokens/s | vs {base_name} |\n|---|---:|---:|")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model).")
    ap.add_argument("--vector", default="gemma-3-270m/present-past.ffv-all", help="A vector that exports as a control vector.")
    ap.add_argument("--clients", type=int, default=1, help="Clients asking at once (> 1: the parallel comparison).")
    ap.add_argument("--vectors", default="present-past,antonym,english-french,country-capital",
                    help="With --clients: comma-separated tasks (or vector names) whose every-token FFVs the clients take in turn.")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = resolve_model(args.model)
    if args.clients == 1:
        return one_client(model, vector_path(args.vector), args)
    names = [v if "/" in v or "." in v else f"{short_name(model)}/{v}.ffv-all" for v in args.vectors.split(",")]
    many_clients(model, [vector_path(v) for v in names], args)


if __name__ == "__main__":
    main()
