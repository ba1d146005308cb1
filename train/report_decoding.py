"""Relation-word decoding: do a relation's vectors promote the words that name the relation?

    .venv/bin/python -m train.report_decoding [--model gemma-3-270m]

For each vector shipped for the model (FV, task vector, FFV, every-token FFV), the vector goes through the
model's final norm and unembedding (as `fvpatch decode` does) and each word naming its relation is ranked
among all tokens: the rank of its best token (the word's first token, with and without a leading space, as
written and capitalized), 1 being the top. The words were written down for each relation before any vector
was decoded and are not changed after: RELATION_WORDS below. No model run, no torch: the unembedding only.
Writes results/<model>/decoding.{json,md} (the default model's too go under results/<model>/).
"""

import argparse

import numpy as np

from fvpatch import vectorfile
from fvpatch.atomic import write_report
from fvpatch.bank import NAMES_KEY
from fvpatch.modelfile import ModelFile
from fvpatch.models import resolve_model, short_name
from fvpatch.unembed import load_unembed
from train.reporting import add_options, results_dir, run, vectors_dir

RELATION_WORDS = {
    "antonym": ["opposite", "antonym", "contrary", "reverse", "inverse", "not"],
    "synonym": ["synonym", "same", "similar", "equivalent", "meaning"],
    "capitalize": ["capital", "uppercase", "upper", "caps", "capitalize"],
    "capitalize_first_letter": ["capital", "uppercase", "letter", "first", "initial"],
    "lowercase_first_letter": ["lowercase", "lower", "letter", "first", "small"],
    "country-capital": ["capital", "city", "capitals", "government"],
    "english-french": ["French", "France", "translation", "translate", "français"],
    "english-german": ["German", "Germany", "translation", "translate", "Deutsch"],
    "english-spanish": ["Spanish", "Spain", "translation", "translate", "español"],
    "landmark-country": ["country", "located", "nation", "where", "landmark"],
    "person-occupation": ["occupation", "job", "profession", "work", "career"],
    "person-sport": ["sport", "sports", "athlete", "plays", "game"],
    "present-past": ["past", "ed", "was", "tense", "did", "yesterday"],
    "singular-plural": ["plural", "plurals", "many", "multiple", "several"],
    "next_item": ["next", "after", "following", "successor", "then"],
    "prev_item": ["previous", "before", "prior", "preceding", "predecessor"],
}
METHODS = {"fv": "FV", "taskvec": "task vector", "ffv": "FFV", "ffv-all": "FFV (every token)"}


def word_tokens(mf: ModelFile, word: str) -> set[int]:
    """The first token of each spelling of `word` a tokenizer may start it with."""
    spellings = {word, word.capitalize(), f" {word}", f" {word.capitalize()}"}
    return {mf.tokenize(s, add_bos=False)[0] for s in spellings if mf.tokenize(s, add_bos=False)}


def ranks(logits: np.ndarray, mf: ModelFile, words: list[str]) -> dict[str, int]:
    """1-based rank of each word's best token among all tokens."""
    order = np.empty(len(logits), np.int64)
    order[np.argsort(-logits, kind="stable")] = np.arange(1, len(logits) + 1)
    return {w: int(min(order[t] for t in word_tokens(mf, w))) for w in words}


def markdown(report: dict) -> str:
    methods = [m for m in METHODS if any(m in r for r in report["relations"].values())]
    lines = [f"# Relation-word decoding: {report['model']}", "",
             f"Regenerate: `{report['command']}`. Best rank (1 = top of {report['n_vocab']:,} tokens) of any of the relation's words in the "
             "vector's decoding (final norm + unembedding), and which word; `-` where no such vector is shipped.", "",
             "| relation | words | " + " | ".join(METHODS[m] for m in methods) + " | FFV above FV |", "|---|---|" + "---|" * (len(methods) + 1)]
    for rel, row in report["relations"].items():
        cells = []
        for m in methods:
            if m in row:
                w, r = min(row[m].items(), key=lambda kv: kv[1])
                cells.append(f"{r:,} ({w})")
            else:
                cells.append("-")
        above = "-" if "fv" not in row or "ffv" not in row else ("yes" if min(row["ffv"].values()) < min(row["fv"].values()) else "no")
        lines.append(f"| {rel} | {', '.join(RELATION_WORDS[rel])} | " + " | ".join(cells) + f" | {above} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or known model name (default: the default model).")
    add_options(ap, None)  # one pass, no model run: nothing to resume
    args = ap.parse_args()
    path = resolve_model(args.model)
    name = short_name(path)
    out = results_dir(args) / name / "decoding.json"
    unembed = load_unembed(path)
    report = {"model": name, "command": f".venv/bin/python -m train.report_decoding --model {name}", "relations": {}}
    with ModelFile(path, vocab_only=True) as mf:
        report["n_vocab"] = mf.n_vocab
        for f in sorted(vectors_dir(name).glob("*.safetensors")):
            vf = vectorfile.load(f)
            task, _, method = f.stem.rpartition(".")
            if NAMES_KEY in vf.meta or task not in RELATION_WORDS or method not in METHODS:
                continue
            z = unembed.logits(unembed.normalize(vf.rows[0]))[0]
            report["relations"].setdefault(task, {})[method] = ranks(z, mf, RELATION_WORDS[task])
    write_report(out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run(main)
