"""`fvpatch analogy`: complete A:B::C:? with a composite function vector from a bank of relation vectors."""

import click

from fvpatch.cli import INT32_MAX, PromptText, emit, fits, main, model_options, open_session, vector_path


@main.command()
@model_options
@click.argument("question", metavar="A:B::C:?", type=PromptText("an analogy A:B::C:?"))
@click.option("--bank", "bank_path", default=None, metavar="NAME|FILE", help="Bank file with a learned map, or a shipped bank's name (default: the one shipped for the model).")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Relation weights to show.")
@click.option("--max-tokens", "-n", type=click.IntRange(1, INT32_MAX), default=8, show_default=True, help="Tokens to generate.")
@click.option("--force", is_flag=True, help="Use a bank made on another model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def analogy(model, n_ctx, n_gpu_layers, question, bank_path, top, max_tokens, force, as_json):
    """Complete an analogy with a composite function vector: the bank's relation vectors, weighted by
    how well each explains A:B, added while the model answers C.

    \b
    Example:
      fvpatch analogy "hot:cold::tall:?"
    """
    from fvpatch.analogy import solve
    from fvpatch.analogyfile import parse_analogy
    from fvpatch.cfvmap import CFVMap
    from fvpatch.bank import BANK_NAME, load_bank
    from fvpatch.shipped import model_folder

    a, b, c = parse_analogy(question)
    with open_session(model, n_ctx, n_gpu_layers) as s:
        fp = s.fingerprint()
        if bank_path is None:
            bank_path = model_folder(fp) / BANK_NAME
            if not bank_path.exists():
                raise click.ClickException(f"no analogy bank is shipped for {fp['name']}; make one from its FFVs with "
                                           f"`fvpatch train cfv --model MODEL` (it writes {bank_path})")
        else:
            bank_path = vector_path(bank_path, fp)
        bank = load_bank(bank_path)
        fits(bank_path, bank.model, fp, force)
        cfv_map = CFVMap.from_bank(bank)
        sol = solve(s, bank, cfv_map, a, b, c, max_tokens)
    weights = sol.weights[:top]
    emit(as_json, {"question": question, "answer": sol.answer, "completion": sol.completion,
                   "weights": [{"relation": r, "weight": round(w, 4)} for r, w in weights], "scores": sol.scores},
         [f"{a}:{b}::{c}:{sol.answer}"] + [f"  {w:6.3f}  {r}" for r, w in weights])
