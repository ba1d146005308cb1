"""The `fvpatch` command line: save a vector from one prompt, patch it into another, look at it."""

import importlib
import json
import math
import sys
from pathlib import Path

import click
import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import check_outputs, together
from fvpatch.errors import FvpatchError, OutOfRange
from fvpatch.models import check_fingerprint, resolve_model
from fvpatch.session import Patch, Save, Session
from fvpatch.shipped import vector_path
from fvpatch.threads import MAX_THREADS, configured_threads

INT32_MAX = 2**31 - 1  # llama.cpp's counts are 32-bit: ctypes would wrap a larger number silently (--n-ctx 2**32 means 0)
SEED = click.IntRange(0, 2**63 - 1)  # what numpy, random and torch.manual_seed all take


class LazyGroup(click.Group):
    """Subcommands that import torch live in train/; they load only when called, so the runtime stays light."""

    lazy = {"train": "train.cli:train", "eval": "train.cli_eval:eval_cmd"}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:
                raise click.ClickException(f"`fvpatch {name}` needs the training extra (pip install -e '.[train]'): {e}") from None
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        # Bad input ends in one clear line; any other exception is a bug and keeps its traceback.
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            e.ctx = None  # the message alone, without the usage block: one line, like every other refusal
            raise
        except FvpatchError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=LazyGroup)
@click.version_option(package_name="fvpatch")
def main():
    """Save residual-stream vectors from one prompt and patch them into another, in any GGUF model.

    \b
    The seed experiment, a country->capital task vector:
      fvpatch save  -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->" --save l_out-10 capital.safetensors --token-idx -1
      fvpatch patch -p "France ->" --patch l_out-10 capital.safetensors --compare

    Token indices are absolute positions in the prompt (0 is the BOS token where the model adds one;
    Qwen models add none); negative ones count from the end of the prompt. `fvpatch tokenize` shows
    them. --model takes a GGUF file, a known model's name (`fvpatch models`) or the name of a .gguf in
    models/; without it, the default model (Gemma 3 270M base, Q4_K_M) is fetched into models/ on first use.
    """


MODEL_HELP = "GGUF file, known model name (`fvpatch models`), or the name of a .gguf in models/ (default: gemma-3-270m)."


def _remember_threads(ctx, param, value):
    ctx.meta["fvpatch.threads"] = configured_threads(value)  # an invalid environment variable fails here, before any work


threads_option = click.option(
    "--threads", type=click.IntRange(1, MAX_THREADS), default=None, expose_value=False, callback=_remember_threads,
    help="CPU threads of llama.cpp and PyTorch (default: $FVPATCH_THREADS, else $OMP_NUM_THREADS, else half the cores).")


def cli_threads() -> int | None:
    """The thread count this command was given (--threads or the environment), or None for the default (fvpatch.threads.default_threads)."""
    return click.get_current_context().meta.get("fvpatch.threads")


gpu_layers_option = click.option("--n-gpu-layers", type=click.IntRange(0, INT32_MAX), default=0, show_default=True,
                                 help="Layers whose weights llama.cpp offloads (Metal/CUDA builds; 999: all).")


def model_options(f):
    f = click.option("--model", "-m", default=None, metavar="NAME|FILE", help=MODEL_HELP)(f)
    f = click.option("--n-ctx", type=click.IntRange(1, INT32_MAX), default=2048, show_default=True, help="Context size in tokens.")(f)
    f = gpu_layers_option(f)
    return threads_option(f)


def generation_options(f):
    f = prompt_option(f)
    f = click.option("--max-tokens", "-n", type=click.IntRange(0, INT32_MAX), default=12, show_default=True, help="Tokens to generate.")(f)
    f = click.option("--temperature", type=FiniteFloat(min=0, max=2), default=0.0, show_default=True, help="0 means greedy, which reproduces exactly; at most 2, as the server takes.")(f)
    f = click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling seed when --temperature > 0.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(f)
    return f


class FiniteFloat(click.ParamType):
    """A float that is a number: click's float takes 'nan' and 'inf', which would patch garbage and exit 0.
    `min` bounds it below (`above=True`: strictly, as a learning rate must be), `max` above."""

    name = "float"

    def __init__(self, min: float | None = None, above: bool = False, max: float | None = None):
        self.min, self.above, self.max = min, above, max

    def convert(self, value, param, ctx):
        x = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (x <= self.min if self.above else x < self.min):
            self.fail(f"{value!r} is not {'above' if self.above else 'at least'} {self.min:g}", param, ctx)
        if self.max is not None and x > self.max:
            self.fail(f"{value!r} is not at most {self.max:g}", param, ctx)
        return x


class PromptText(click.ParamType):
    """Prompt text, not empty: an empty prompt is at most the BOS token, with nothing of the user's to read or patch.
    `what` names other text that must not be empty, in the refusal."""

    name = "text"

    def __init__(self, what: str = "the prompt text"):
        self.what = what

    def convert(self, value, param, ctx):
        if value == "":
            self.fail(f"is empty; give {self.what}", param, ctx)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer cannot take
            self.fail("is not valid UTF-8 text", param, ctx)
        return value


PROMPT = PromptText()
prompt_option = click.option("--prompt", "-p", type=PROMPT, required=True, help="The prompt text.")


def open_session(model, n_ctx, n_gpu_layers) -> Session:
    return Session(resolve_model(model), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=cli_threads())


def emit(as_json: bool, payload: dict, lines: list[str]):
    if as_json:
        click.echo(json.dumps(payload, ensure_ascii=False))
    else:
        for line in lines:
            click.echo(line)


def top_tokens(session: Session, logits: np.ndarray, k: int = 5) -> list[dict]:
    idx = np.argsort(-logits)[:k]
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return [{"token": session.piece_text(i, special=True), "id": int(i), "p": round(float(p[i]), 4)} for i in idx]


@main.command()
@model_options
@generation_options
def generate(model, n_ctx, n_gpu_layers, prompt, max_tokens, temperature, seed, as_json):
    """Run the model on a prompt with no patch, for comparison.

    \b
    Example:
      fvpatch generate -p "France ->" -n 8
    """
    check_seed(temperature)
    with open_session(model, n_ctx, n_gpu_layers) as s:
        r = s.run(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        emit(as_json, {"prompt": prompt, "completion": r.text, "top": top_tokens(s, r.logits)}, [f"{prompt}{r.text}"])


def given(name: str) -> bool:
    """Whether the current command's parameter `name` was given, not left at its default."""
    return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def check_seed(temperature: float):
    """Refuse a --seed given with greedy decoding, which it would not change."""
    if temperature == 0 and given("seed"):
        raise click.UsageError("--seed only shapes sampling; give --temperature above 0 too, or leave --seed out (greedy decoding uses no seed)")


@main.command()
@model_options
@generation_options
@click.option("--save", "saves", nargs=2, multiple=True, required=True, metavar="TENSOR FILE", help="Save rows of graph tensor TENSOR (e.g. l_out-14) to FILE. Repeatable (one file each; a tensor may go to several).")
@click.option("--token-idx", "token_idx", type=int, multiple=True, help="Token positions to save (default: every prompt token). Repeatable.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def save(model, n_ctx, n_gpu_layers, prompt, max_tokens, temperature, seed, as_json, saves, token_idx, force):
    """Save rows of graph tensors at prompt tokens into vector files.

    \b
    Example: the residual after block 10 at the last token of a 2-shot prompt
      fvpatch save -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->" --save l_out-10 capital.safetensors --token-idx -1
    """
    check_seed(temperature)
    check_outputs([path for _, path in saves], force)
    with open_session(model, n_ctx, n_gpu_layers) as s:
        n_prompt = len(s.tokenize(prompt))
        positions = tuple(token_idx) or tuple(range(n_prompt))
        r = s.run(prompt, saves=[Save(t, positions) for t, _ in saves], max_tokens=max_tokens, temperature=temperature, seed=seed)
        fp = s.fingerprint()
        written = []
        with together():
            for tensor, path in saves:
                vf = vectorfile.VectorFile(
                    tensor, r.saved[tensor], r.saved_positions[tensor], fp, "replace", 1.0,
                    {"fvpatch.prompt": prompt, "fvpatch.n_prompt": str(n_prompt)},
                )
                vectorfile.save(vf, path, overwrite=force)
                written.append({"file": path, "tensor": tensor, "positions": r.saved_positions[tensor]})
        emit(as_json, {"prompt": prompt, "completion": r.text, "saved": written},
             [f"{prompt}{r.text}"] + [f"saved {w['tensor']} at tokens {w['positions']} -> {w['file']}" for w in written])


def load_vector(spec: str, model: dict | None = None) -> vectorfile.VectorFile:
    """A vector file or shipped name (the one made for `model`, a fingerprint, first), or one relation of a bank (a
    bank file or folder) as BANK#RELATION."""
    if "#" not in spec or Path(spec).exists():
        return vectorfile.load(vector_path(spec, model))
    path, _, relation = spec.rpartition("#")  # a folder of the path may hold a #; a relation never does
    from fvpatch.bank import load_bank

    bank = load_bank(vector_path(path, model))
    if relation not in bank.names:
        raise FvpatchError(f"{path}: the bank has no relation {relation!r} (it has {', '.join(bank.names)})")
    row = bank.vectors[bank.names.index(relation)]
    return vectorfile.VectorFile(bank.tensor, row, [-1], bank.model, mode="add", meta={"fvpatch.task": relation})


def per_patch(values: tuple, n: int, option: str):
    """The value of a repeatable option for patch `i`: none given, None; one, it for all; else one per patch. click
    alone would keep the last of several values, silently."""
    if len(values) > 1 and len(values) != n:
        raise click.UsageError(f"give one {option} for every patch, or one per --patch/--vector ({n}), not {len(values)}")
    return lambda i: None if not values else values[i] if len(values) > 1 else values[0]


def imported_layers(spec: str) -> list[str] | None:
    """The files of the folder `fvpatch import` writes for a control vector of several layers (one per layer, applied
    together as llama.cpp applies the GGUF), or None where `spec` is not such a folder."""
    folder = Path(spec)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files and all(vectorfile.load(f).meta.get("fvpatch.method") == "control vector" for f in files):
        return [str(f) for f in files]
    return None


def fits(path, vector_model: dict, model: dict, force: bool):
    """Refuse a vector made on another model, naming the file; note on stderr one made on another quantization."""
    try:
        note = check_fingerprint(vector_model, model, force)
    except FvpatchError as e:
        raise FvpatchError(f"{path}: {e}") from None
    if note:
        click.echo(f"{Path(path).name}: {note}", err=True)


@main.command()
@model_options
@generation_options
@click.option("--patch", "patches", nargs=2, multiple=True, metavar="TENSOR FILE", help="Patch the vector in FILE (or BANK#RELATION) into graph tensor TENSOR. Repeatable.")
@click.option("--vector", "vectors", multiple=True, metavar="NAME|FILE", help="Patch a vector file, a shipped vector by name, one relation of a bank as BANK#RELATION, or every layer of an imported control vector (the folder `fvpatch import` writes) into the tensor it names. Repeatable.")
@click.option("--from-token-idx", "from_idx", type=int, multiple=True, help="Which saved row of the file to use (default: its only row). One for every patch, or one per --patch/--vector, in order.")
@click.option("--to-token-idx", "to_idx", type=int, multiple=True, help="Prompt position to patch (default: the last). Given, it also patches a file whose fvpatch.apply_at is all at this token only. One for every patch, or one per --patch/--vector, in order.")
@click.option("--mode", type=click.Choice(vectorfile.MODES), default=None, help="replace or add (default: the file's mode).")
@click.option("--scale", "scales", type=FiniteFloat(), multiple=True, help="Multiply the vector (default: the file's scale). One for every patch, or one per --patch/--vector, in order.")
@click.option("--every-token", is_flag=True, help="Also patch every generated token, as function vectors are applied.")
@click.option("--all-tokens", is_flag=True, help="Patch every prompt and generated token, as llama.cpp applies a control vector (the default for a file whose fvpatch.apply_at is all, unless --to-token-idx is given).")
@click.option("--compare", is_flag=True, help="Also run without the patch and print both.")
@click.option("--force", is_flag=True, help="Apply a vector made on another model (same shape; another quantization needs no --force).")
def patch(model, n_ctx, n_gpu_layers, prompt, max_tokens, temperature, seed, as_json, patches, vectors, from_idx, to_idx, mode, scales, every_token, all_tokens, compare, force):
    """Patch saved or trained vectors into a prompt's forward pass and generate.

    \b
    Examples:
      fvpatch patch -p "France ->" --patch l_out-10 capital.safetensors --compare
      fvpatch patch -p $'Q: hot\\nA:' --vector antonym.ffv --every-token
      fvpatch patch -p $'Q: hot\\nA:' --vector gemma-3-270m/analogy.bank#antonym -n 3
      fvpatch patch -p "4 5 6 to 6" --patch l_out-8 rev.safetensors --from-token-idx 13 --to-token-idx 7

    --from-token-idx, --to-token-idx and --scale each take one value for every patch, or one per --patch and
    --vector in the order given (--patch ones first): two rows of one file at two tokens are two --patch.
    """
    if not patches and not vectors:
        raise click.UsageError("give at least one --patch TENSOR FILE or --vector NAME")
    if all_tokens and to_idx:
        raise click.UsageError("--all-tokens patches every token and --to-token-idx one: give one of them")
    if all_tokens and every_token:
        raise click.UsageError("--all-tokens already patches every generated token: leave out --every-token")
    check_seed(temperature)
    given = [*patches, *((None, v) for v in vectors)]
    from_token, to_token, scale_of = (per_patch(values, len(given), option)
                                      for values, option in ((from_idx, "--from-token-idx"), (to_idx, "--to-token-idx"), (scales, "--scale")))
    # (tensor, file, index of what was given): an imported control vector's folder stands for all its layers
    sources = [(tensor, f, i) for i, (tensor, spec) in enumerate(given) for f in (imported_layers(spec) if tensor is None else None) or [spec]]
    with open_session(model, n_ctx, n_gpu_layers) as s:
        fp = s.fingerprint()
        specs, notes = [], []
        for tensor, spec, i in sources:
            vf = load_vector(spec, fp)
            fits(spec, vf.model, fp, force)
            if tensor is not None and tensor != vf.tensor:  # cross-layer patching is an experiment, but never a silent one
                notes.append(f"note: {spec} holds {vf.tensor} rows; patching them into {tensor}")
            everywhere = all_tokens or (vf.meta.get("fvpatch.apply_at") == "all" and to_token(i) is None)  # an asked-for token wins
            scale = vf.scale if scale_of(i) is None else scale_of(i)
            token = -1 if to_token(i) is None else to_token(i)
            specs.append(Patch(tensor or vf.tensor, file_row(spec, vf, from_token(i)), token, mode or vf.mode, scale, every_token, everywhere))
        r = s.run(prompt, patches=specs, max_tokens=max_tokens, temperature=temperature, seed=seed)
        for note in notes:  # once the run has taken the patches: a refusal stays one line
            click.echo(note, err=True)
        payload = {"prompt": prompt, "completion": r.text, "top": top_tokens(s, r.logits),
                   "patches": [{"tensor": p.tensor, "token": "all" if p.all_tokens else p.token, "mode": p.mode, "scale": p.scale} for p in specs]}
        lines = [f"patched:   {prompt}{r.text}"]
        if compare:
            r0 = s.run(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
            payload["unpatched"] = r0.text
            lines.insert(0, f"unpatched: {prompt}{r0.text}")
        emit(as_json, payload, lines)


def file_row(name: str, vf: vectorfile.VectorFile, idx: int | None, option: str = "--from-token-idx") -> np.ndarray:
    """The row of vector file `name` saved at token `idx`, given with `option` (negative: from the end of the prompt
    it was saved from); a refusal names the file."""
    position = idx
    if idx is not None and idx < 0 and "fvpatch.n_prompt" in vf.meta:
        position += int(vf.meta["fvpatch.n_prompt"])
    try:
        return vf.row(position, option, idx)
    except vectorfile.VectorFileError as e:
        raise vectorfile.VectorFileError(f"{name}: {e}") from None


def check_layer(layer: int | None, n_layer: int):
    """A --layer of one block against the model (click's range has already refused negative ones)."""
    if layer is not None and layer >= n_layer:
        raise OutOfRange(f"--layer {layer} is beyond this model's {n_layer} layers (0..{n_layer - 1})")


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """--layer: N, N,M,..., A-B or all; each layer once and within the model."""
    if spec == "all":
        return list(range(n_layer))
    try:
        layers = []
        for part in spec.split(","):
            lo, dash, hi = part.partition("-")
            if dash and int(hi) < int(lo):  # range() would yield nothing, and the other parts would run without it
                raise click.BadParameter(f"{part!r} names no layer: a range A-B needs A <= B", param_hint="--layer")
            layers += range(int(lo), int(hi) + 1) if dash else [int(lo)]
    except ValueError:
        raise click.BadParameter(f"expected N, N,M,..., A-B or all, got {spec!r}", param_hint="--layer") from None
    beyond = [L for L in layers if L >= n_layer]
    if beyond:
        raise click.BadParameter(f"layer {beyond[0]} is beyond this model's {n_layer} layers (0..{n_layer - 1})", param_hint="--layer")
    if not layers or len(set(layers)) != len(layers):
        raise click.BadParameter(f"{spec!r} names {'no layer' if not layers else 'a layer twice'}", param_hint="--layer")
    return layers


from fvpatch import cli_catalog  # noqa: E402 - registers its commands on `main`
from fvpatch import cli_look  # noqa: E402 - registers `inspect`, `lens`, `decode`, `tokenize` and `tensors` on `main`
from fvpatch import cli_experiments  # noqa: E402 - registers `sweep` and `reversal` on `main`
from fvpatch import cli_exchange  # noqa: E402 - registers `export` and `import` on `main`
from fvpatch import cli_serve  # noqa: E402 - registers `serve` on `main`
from fvpatch import cli_analogy  # noqa: E402 - registers `analogy` on `main`

if __name__ == "__main__":
    # run as a script this file is __main__, and the command modules register on fvpatch.cli's `main`, not this one's
    from fvpatch.cli import main as registered

    sys.exit(registered())
