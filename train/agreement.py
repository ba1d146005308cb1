"""How closely the PyTorch model's block outputs match llama.cpp's `l_out-L` on the same prompt.

    .venv/bin/python -m train.agreement [--model PATH] [--prompt TEXT] [--dtype bfloat16]

prints a markdown table: per layer, the cosine between the two engines' vectors at each token (mean and
lowest over the prompt) and the mean relative error ||torch - llama.cpp|| / ||llama.cpp||. The gap is
llama.cpp's: it quantizes activations to 8 bits for its Q4_K/Q6_K matmuls and keeps K/V in f16.
"""

import argparse

import numpy as np
import torch

from fvpatch import Save, Session
from train.hooks import record_residual
from train.model import DTYPES, LoadedModel, load_model

PROMPT = "The capital of France is Paris. Egypt -> Cairo, Norway -> Oslo, Estonia -> Tallinn\n1, 2, 3"


def residual_agreement(lm: LoadedModel, session: Session, prompt: str) -> list[tuple[int, float, float, float]]:
    """[(layer, mean cosine, min cosine, mean relative error)] over the prompt's tokens, for every layer."""
    tokens = session.tokenize(prompt)
    layers = list(range(session.n_layer))
    result = session.run(tokens, saves=[Save(f"l_out-{L}", tokens=tuple(range(len(tokens)))) for L in layers])
    ids, mask, _ = lm.batch([tokens])
    with torch.no_grad(), record_residual(lm.model, layers) as rec:
        lm.model(input_ids=ids, attention_mask=mask)
    rows = []
    for L in layers:
        ref = result.saved[f"l_out-{L}"].astype(np.float64)
        got = rec[L][0].double().cpu().numpy()
        ref_norm, got_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(got, axis=1)
        cosine = (ref * got).sum(1) / (ref_norm * got_norm)
        rel = np.linalg.norm(got - ref, axis=1) / ref_norm
        rows.append((L, float(cosine.mean()), float(cosine.min()), float(rel.mean())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of the PyTorch model (default: float32)")
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype)
    with Session(lm.tokenizer.path) as session:
        rows = residual_agreement(lm, session, args.prompt)
    print(f"{lm.fingerprint['file']} ({args.dtype} in PyTorch), {len(lm.tokenize(args.prompt))} tokens: {args.prompt!r}\n")
    print("| layer | cosine (mean) | cosine (min) | relative error (mean) |")
    print("|---:|---:|---:|---:|")
    for L, mean, low, rel in rows:
        print(f"| {L} | {mean:.5f} | {low:.5f} | {rel:.2%} |")


if __name__ == "__main__":
    main()
