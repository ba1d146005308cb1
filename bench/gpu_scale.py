"""Time and peak memory of PyTorch training at real model sizes, on a GPU (or any device), from the shapes alone.

    python bench/gpu_scale.py --tokenizer DIR [--shapes qwen2.5-1.5b qwen2.5-7b] [--devices cuda cpu] [--out DIR]

A model's time and memory depend on its shape, not on its weights, so each shape is built with random
weights straight on the device (no download: what a GPU box with no network can run), with a real
tokenizer (`--tokenizer`: a Hugging Face tokenizer directory, e.g. Qwen2.5's, written from the GGUF by
`AutoTokenizer.from_pretrained(dir, gguf_file=...).save_pretrained(DIR)`), so prompts have their real lengths.
Per shape x device x dtype, one row each for:

  ffv      `train ffv` with the defaults (antonym, 20 train and 50 valid pairs, `taskvec` init, layer 16 of 28),
           every step run (no early stopping: random weights learn nothing worth stopping on); on the CPU only
           `--cpu-steps` steps, the full 60-step run projected from them
  headmap  `train fv`'s head map: 25 ten-shot prompts (`--prompts`), every head patched

Peak memory: torch's peak allocation on CUDA; the process's peak RSS otherwise. Rows are written to
OUT/gpu_scale.{json,md} as each completes; rows already there are skipped. The numbers are what the
README's "What an 8B model needs" quotes; accuracy needs the real weights and is not measured here.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fvpatch.atomic import write_json, write_text
from fvpatch.prompts import template
from fvpatch.tasks import load_task

from rss import peak_rss_gb  # bench/rss.py: scripts here run as `python bench/NAME.py`

# the published configurations' shapes (config.json of each Hugging Face repository)
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        vocab_size=152064, tie_word_embeddings=False),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, tokenizer: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.hooks import decoder_layers, head_shape
    from train.model import LoadedModel, _HFTokenizer

    config = Qwen2Config(**SHAPES[shape], rope_theta=1e6, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    n_head, head_dim = head_shape(model)
    return LoadedModel(model, device, dtype, len(decoder_layers(model)), config.hidden_size, n_head, head_dim, None, _HFTokenizer(tokenizer))


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


def measure_ffv(lm, steps: int) -> dict:
    from train.ffv import Config, answer_nll, initial_vector, prepare, train_ffv

    tpl = template("qa")
    cfg = Config(layer=min(16, lm.n_layer - 1), steps=steps, patience=10**6)
    t0 = time.perf_counter()
    data = prepare(lm, load_task("antonym"), tpl)
    v0 = initial_vector(lm, data.task, tpl, cfg, data.train)
    sync(lm.device)
    t1 = time.perf_counter()
    _, hist = train_ffv(lm, data, tpl, cfg, v0=v0, progress=False)
    sync(lm.device)
    t2 = time.perf_counter()
    with torch.no_grad():
        answer_nll(lm, data.valid, v0, cfg.layer)
    sync(lm.device)
    t_eval = time.perf_counter() - t2
    evals = len(hist.valid_step)
    per_step = max(0.0, (t2 - t1 - evals * t_eval)) / hist.step[-1]
    return {"layer": cfg.layer, "steps": hist.step[-1], "init_seconds": round(t1 - t0, 2), "train_seconds": round(t2 - t1, 2),
            "seconds_per_step": round(per_step, 4), "valid_eval_seconds": round(t_eval, 3),
            "full_run_seconds": round(t1 - t0 + 60 * per_step + 13 * t_eval, 1)}


def measure_headmap(lm, prompts: int) -> dict:
    from train.cma import cma_prompts, head_map

    clean, corrupted, answers = cma_prompts(lm, load_task("antonym"), template("qa"), prompts, 10)
    sync(lm.device)
    t0 = time.perf_counter()
    head_map(lm, clean, corrupted, answers)
    sync(lm.device)
    seconds = time.perf_counter() - t0
    return {"prompts": prompts, "tokens_per_prompt": round(sum(map(len, clean)) / len(clean)), "seconds": round(seconds, 2),
            "full_run_seconds": round(25 * seconds / prompts, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["# Training at real model sizes (random weights, real shapes and prompts)", "",
             "`bench/gpu_scale.py`: each shape built with random weights on the device; times are wall seconds, "
             "a full FFV run is encode + init + 60 steps + 13 valid evaluations, a full head map 25 ten-shot prompts. "
             "Peak memory is torch's peak allocation on CUDA, the process's peak RSS on the CPU.", "",
             "| shape | params | device | dtype | what | peak memory | full run | per unit | notes |", "|---|---:|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["what"] == "ffv":
            unit, notes = f"{r['seconds_per_step']:.3f} s/step", f"layer {r['layer']}, {r['steps']} steps run; encode + init {r['init_seconds']:.1f} s"
        else:
            unit, notes = f"{r['seconds'] / r['prompts']:.2f} s/prompt", f"{r['prompts']} prompts of ~{r['tokens_per_prompt']} tokens"
        lines.append(f"| {r['shape']} | {r['n_params'] / 1e9:.2f} B | {r['device_name']} | {r['dtype']} | {r['what']} | {r['peak_gb']:.1f} GB | "
                     f"{r['full_run_seconds']:.0f} s | {unit} | {notes} |")
    first = rows[0] if rows else {}
    lines += ["", f"Machine: {first.get('machine', '?')}; torch {first.get('torch', '?')}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"], choices=list(SHAPES))
    ap.add_argument("--devices", nargs="+", default=["cuda"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--what", nargs="+", default=["ffv", "headmap"], choices=["ffv", "headmap"])
    ap.add_argument("--cpu-steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("results/training"))
    args = ap.parse_args()

    from train.model import torch_device, torch_dtype

    path = args.out / "gpu_scale.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["shape"], r["device"], r["dtype"], r["what"]) for r in rows}
    for shape in args.shapes:
        for device_name in args.devices:
            device = torch_device(device_name)
            for dtype_name in args.dtypes:
                todo = [w for w in args.what if (shape, device_name, dtype_name, w) not in done]
                if not todo:
                    continue
                lm = build(shape, device, torch_dtype(dtype_name), args.tokenizer)
                if device.type == "cuda":
                    measure_ffv(lm, 2)  # untimed: the first CUDA work of a process also loads kernels and sets up cuBLAS
                for what in todo:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row = measure_ffv(lm, 60 if device.type == "cuda" else args.cpu_steps) if what == "ffv" else measure_headmap(lm, args.prompts)
                    row |= {"shape": shape, "device": device_name, "dtype": dtype_name, "what": what, "peak_gb": round(peak_gb(device), 2),
                            "n_params": sum(p.numel() for p in lm.model.parameters()),
                            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
                            "machine": f"{platform.node()} {platform.machine()}", "torch": torch.__version__}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_json(path, rows)
                    write_text(args.out / "gpu_scale.md", markdown(rows))
                del lm
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
