"""Apply an fvpatch vector file to a transformers model, with the runtime's layer and token convention.

    from train.apply import patched
    with patched(model, "vectors/gemma-3-270m/antonym.ffv.safetensors"):
        out = model.generate(**tokenizer("Q: hot\\nA:", return_tensors="pt"), max_new_tokens=3)

`l_out-L` is the output of decoder block L (`model.model.layers[L]`), as in llama.cpp. Positions follow
`fvpatch patch`: the vector goes at the prompt's token `token` (default: the last; negative counts from the
end, a non-negative index from the start of each row, so use it with right padding or one prompt), at
every generated token too with `every_token=True`, and at every token when `all_tokens` (the default for a
file whose `fvpatch.apply_at` is all, such as an imported control vector). A vector saved from llama.cpp
with `fvpatch save` works the same way: choose its row with `row=` (the saved token position).
"""

from contextlib import contextmanager

import torch

from fvpatch import vectorfile
from fvpatch.cli import load_vector
from fvpatch.errors import FvpatchError
from train.hooks import decoder_layer, patch_output
from train.model import LoadedModel


def check_model(vf: vectorfile.VectorFile, model, force: bool = False):
    """Refuse a vector made on a model of another architecture or shape than this transformers model."""
    config = getattr(model.config, "text_config", None) or model.config
    arch = config.model_type.removesuffix("_text")
    got = {"arch": arch, "n_layer": str(config.num_hidden_layers), "n_embd": str(config.hidden_size)}
    wanted = {k: vf.model.get(k) for k in got}
    if wanted["n_embd"] != got["n_embd"] or wanted["n_layer"] != got["n_layer"]:
        raise FvpatchError(f"the vector was made on a model with n_layer={wanted['n_layer']}, n_embd={wanted['n_embd']}; "
                           f"this one has n_layer={got['n_layer']}, n_embd={got['n_embd']}")
    if wanted["arch"] != arch and not force:
        raise FvpatchError(f"the vector was made on a {wanted['arch']!r} model, this one is {arch!r}; pass force=True to apply it anyway")


@contextmanager
def patched(model, vector, token: int = -1, row: int | None = None, every_token: bool = False, all_tokens: bool | None = None,
            mode: str | None = None, scale: float | None = None, force: bool = False):
    """Inside the block, every forward of `model` carries the vector (a VectorFile, a path, BANK#RELATION or a
    shipped name). `model` is a transformers model, or train.model's LoadedModel, whose GGUF fingerprint picks the
    shipped vector made for it where several models ship one by that name (a bare transformers model needs the
    folder-qualified name, e.g. "gemma-3-270m/antonym.ffv")."""
    # checked here, not at the first forward, which may be long after the vector was loaded
    mode = None if mode is None else vectorfile.check_mode(mode)
    scale = None if scale is None else vectorfile.check_scale(scale)
    fingerprint = None
    if isinstance(model, LoadedModel):
        model, fingerprint = model.model, model.fingerprint
    vf = vector if isinstance(vector, vectorfile.VectorFile) else load_vector(str(vector), fingerprint)
    check_model(vf, model, force)
    if vf.layer is None or not vf.tensor.startswith("l_out-"):
        raise FvpatchError(f"the PyTorch side patches block outputs (l_out-L); this vector is for {vf.tensor!r}")
    block = decoder_layer(model, vf.layer)
    mode = mode or vf.mode
    scale = vf.scale if scale is None else scale
    everywhere = vf.meta.get("fvpatch.apply_at") == "all" if all_tokens is None else all_tokens
    if everywhere and mode != "add":
        raise FvpatchError("a vector patched at every token is added to the residual; mode replace would overwrite every token")
    param = next(model.parameters())
    v = torch.from_numpy(vf.row(row)).to(param.device, param.dtype)

    def hook(module, args, kwargs, output):
        # a pass that starts at position 0 is a prompt; one that starts later is a generated token
        position_ids = kwargs.get("position_ids")
        prompt_pass = position_ids is None or int(position_ids.min()) == 0
        if everywhere:
            at = None
        elif prompt_pass:
            at = token
        elif every_token:
            at = -1
        else:
            return output
        return patch_output(output, at, v, mode, scale)

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield vf
    finally:
        handle.remove()

