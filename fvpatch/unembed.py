"""The model's last step read from its GGUF: the final RMSNorm and the output (unembedding) matrix.

Reading Gemma 3's GGUF with gguf.GGUFReader parses all 262k tokenizer strings (~9 s) and
dequantizing its Q8_0 output matrix takes ~3 s more, so the float32 result is written once as a small
GGUF of its own, `models/unembed-<file key>.gguf`, which later runs memory-map in milliseconds.
The cache holds the same tensor names and metadata keys as a model file, so one reader serves both.
"""

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from fvpatch.atomic import write_gguf
from fvpatch.errors import FvpatchError
from fvpatch.models import file_key, models_dir

CHUNK = 128  # rows per matmul: a (128, n_vocab) float32 block is 134 MB for Gemma


@dataclass(frozen=True)
class Unembed:
    norm: np.ndarray  # (n_embd,) final RMSNorm weight, multiplied as stored: Gemma's GGUF already holds 1 + w, as llama.cpp uses it
    output: np.ndarray  # (n_vocab, n_embd) float32; Gemma ties it to token_embd.weight
    eps: float
    softcap: float  # final logit softcapping (Gemma 2); 0 means none

    @property
    def n_embd(self) -> int:
        return self.output.shape[1]

    def normalize(self, rows: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        if rows.shape[1] != self.n_embd:
            raise FvpatchError(f"rows are {rows.shape[1]} wide; the unembedding takes the residual width {self.n_embd}")
        # squared in float64: float32 squares overflow past 1.8e19, which a scaled or trained vector may exceed
        rms = np.sqrt(np.mean(np.square(rows, dtype=np.float64), axis=1, keepdims=True) + self.eps)
        return (rows / rms).astype(np.float32) * self.norm

    def logits(self, normed: np.ndarray) -> np.ndarray:
        """Logits of already normalized rows: (n, n_embd) -> (n, n_vocab)."""
        z = normed @ self.output.T
        if self.softcap:
            z = np.tanh(z / self.softcap) * self.softcap
        return z

    def top(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k token ids, logits and softmax probabilities of each row after the final norm, best first."""
        normed = self.normalize(rows)
        k = min(k, self.output.shape[0])
        ids = np.empty((len(normed), k), np.int64)
        scores = np.empty((len(normed), k), np.float32)
        probs = np.empty((len(normed), k), np.float32)
        for i in range(0, len(normed), CHUNK):
            z = self.logits(normed[i : i + CHUNK])
            ids[i : i + CHUNK], scores[i : i + CHUNK] = top_of(z, k)
            zmax = z.max(axis=1, keepdims=True)
            lse = zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True))
            probs[i : i + CHUNK] = np.exp(scores[i : i + CHUNK] - lse)
        return ids, scores, probs


def top_of(z: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of z, best first: (ids, values).

    The k best entries lie in the k blocks of `block` entries with the largest maxima, so only those are
    ranked: exact, and ~10x faster than an argpartition over Gemma's 262k-token vocabulary.
    """
    n, v = z.shape
    k = min(k, v)
    n_blocks = v // block
    if n_blocks <= k:
        cand = np.broadcast_to(np.arange(v), (n, v))
    else:
        maxima = z[:, : n_blocks * block].reshape(n, n_blocks, block).max(axis=2)
        best = np.argpartition(maxima, -k, axis=1)[:, -k:]
        cand = (best[:, :, None] * block + np.arange(block)).reshape(n, -1)
        tail = np.broadcast_to(np.arange(n_blocks * block, v), (n, v - n_blocks * block))  # a vocabulary not a multiple of block
        cand = np.concatenate([cand, tail], axis=1)
    vals = np.take_along_axis(z, cand, axis=1)
    part = np.argpartition(vals, -k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(vals, part, axis=1), axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(cand, part, axis=1), np.take_along_axis(vals, part, axis=1)


def load_unembed(model_path: str | Path, cache_dir: str | Path | None = None) -> Unembed:
    """The final norm and output matrix of a GGUF model, cached per process and on disk (default: models/)."""
    model_path = Path(model_path).resolve()
    return _load(str(model_path), file_key(model_path), str(Path(cache_dir or models_dir()).resolve()))


@lru_cache(maxsize=2)
def _load(model_path: str, key: str, cache_dir: str) -> Unembed:
    cached = Path(cache_dir) / f"unembed-{key}.gguf"
    if cached.exists():
        return _read(cached)
    u = _read(Path(model_path))
    try:
        _write(u, cached, key)
        # a file of up to GBs appears in the models folder: say so once, with how to get the space back
        print(f"note: cached the unembedding of {Path(model_path).name} as {cached} ({cached.stat().st_size / 1e9:.2f} GB, once per "
              f"model file; delete it to free the space)", file=sys.stderr)
    except FvpatchError as e:  # a read-only models folder only costs the next command this dequantization again
        print(f"note: the unembedding is not cached ({e})", file=sys.stderr)
    return u


def _read(path: Path) -> Unembed:
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    tensors = {t.name: t for t in r.tensors}
    if "output_norm.bias" in tensors or "output_norm.weight" not in tensors:
        raise FvpatchError(f"{path.name}: the lens supports models whose final norm is an RMSNorm (output_norm.weight, no bias); {arch} is not one")
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    if eps_key not in r.fields:
        raise FvpatchError(f"{path.name}: no {eps_key} in the GGUF metadata, so the final RMSNorm is unknown")
    cap = r.fields.get(f"{arch}.final_logit_softcapping")
    out = tensors.get("output.weight") or tensors["token_embd.weight"]  # tied embeddings when there is no output.weight
    return Unembed(
        norm=_dequantize(tensors["output_norm.weight"]),
        output=_dequantize(out),
        eps=float(r.fields[eps_key].contents()),
        softcap=float(cap.contents()) if cap is not None else 0.0,
    )


def _dequantize(t) -> np.ndarray:
    # float32 tensors stay views of the reader's memory map: the cached matrix is paged in by the matmul, not copied
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return w.reshape(tuple(int(n) for n in reversed(t.shape)))


def _write(u: Unembed, path: Path, key: str):
    def fill(w):
        w.add_layer_norm_rms_eps(u.eps)
        if u.softcap:
            w.add_final_logit_softcapping(u.softcap)
        w.add_string("fvpatch.unembed.source_key", key)
        w.add_tensor("output_norm.weight", np.ascontiguousarray(u.norm, np.float32))
        w.add_tensor("output.weight", np.ascontiguousarray(u.output, np.float32))

    write_gguf(path, "fvpatch-unembed", fill)  # a unique temporary name: two processes may build the same cache at once
