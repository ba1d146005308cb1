"""The PyTorch side of the evaluation: batched last-token predictions, optionally with a vector patched in.

The protocol itself (prompts, conditions, subsets) is fvpatch.evaluate's, shared with llama.cpp.
"""

import torch
from tqdm import tqdm

from fvpatch.errors import FvpatchError
from fvpatch.evaluate import Predict
from fvpatch.vectorfile import VectorFile
from train.hooks import patch_residual
from train.model import LoadedModel


def unembed(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (b, vocab) from final hidden states (b, d) already through the final norm, as the model's head does."""
    logits = lm.model.lm_head(hidden)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def last_logits(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real token only: unembedding every position would cost more than the model."""
    hidden = lm.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return unembed(lm, hidden[torch.arange(len(last), device=hidden.device), last])


def vector_tensor(lm: LoadedModel, vector: VectorFile) -> torch.Tensor:
    if vector.layer is None or not vector.tensor.startswith("l_out-"):
        raise FvpatchError(f"the PyTorch engine patches block outputs (l_out-L); this vector is for {vector.tensor!r}")
    return torch.from_numpy(vector.row(None)).to(lm.device)


@torch.no_grad()
def torch_predictor(lm: LoadedModel, batch_size: int = 32) -> Predict:
    def predict(token_lists: list[list[int]], vector: VectorFile | None) -> list[int]:
        v = vector_tensor(lm, vector) if vector is not None else None
        out = []
        for i in tqdm(range(0, len(token_lists), batch_size), desc="torch", leave=False):
            ids, mask, last = lm.batch(token_lists[i : i + batch_size])
            if v is None:
                logits = last_logits(lm, ids, mask, last)
            else:
                at = None if vector.meta.get("fvpatch.apply_at") == "all" else last
                with patch_residual(lm.model, vector.layer, at, v, mode=vector.mode, scale=vector.scale):
                    logits = last_logits(lm, ids, mask, last)
            out += logits.argmax(-1).tolist()
        return out

    return predict
