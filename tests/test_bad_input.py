"""Bad input on every command: a non-zero exit, one line on stderr, no traceback, and no file written or changed.

The cases run in-process (click's CliRunner) on the tiny synthetic GGUF, and the training commands are refused
before any weights load. The ones that used to abort the whole process (llama.cpp asserting on a small --n-ctx,
std::bad_alloc on OMP_NUM_THREADS=100000) run as subprocesses, where an abort shows as a signal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fvpatch import Save, vectorfile
from fvpatch.cfvmap import CFVMap
from fvpatch.bank import Bank, save_bank
from fvpatch.cli import main
from tests.test_vectorfile import refused_in_one_line
from tests.tiny_model import N_EMBD, N_LAYER

PROMPT = "Q: hot\nA:"
BANK = ["antonym", "capitalize", "present-past"]


@pytest.fixture(scope="module")
def inputs(tiny_session, tmp_path_factory) -> dict[str, str]:
    """Input files the cases name: a vector made on the tiny model, one of two rows, one that records no model and two
    of the wrong width, banks with a broken
    map or names, a pairs file and an analogy file that are not what they should be."""
    d = tmp_path_factory.mktemp("inputs")
    fp = tiny_session.fingerprint()
    row = tiny_session.run(PROMPT, saves=[Save("l_out-1", (-1,))]).saved["l_out-1"]
    vectorfile.save(vectorfile.VectorFile("l_out-1", row, [-1], fp, "add"), d / "v.safetensors")
    vectorfile.save(vectorfile.VectorFile("l_out-1", np.ones((2, N_EMBD)), [0, 1], fp, "add", meta={"fvpatch.n_prompt": "7"}), d / "rows.safetensors")
    vectorfile.save(vectorfile.VectorFile("l_out-1", row, [-1], {}, "add"), d / "nofp.safetensors")
    for mode in vectorfile.MODES:
        vectorfile.save(vectorfile.VectorFile("l_out-1", np.ones(N_EMBD + 1), [-1], fp, mode), d / f"wide-{mode}.safetensors")
    meta = CFVMap(np.eye(len(BANK)), np.zeros(len(BANK)), 1.0).to_meta()
    save_bank(Bank(BANK, np.ones((len(BANK), N_EMBD)), "l_out-1", fp, meta=meta), d / "bank.safetensors")
    save_bank(Bank(BANK, np.ones((len(BANK), N_EMBD)), "l_out-1", fp, meta=meta | {"fvpatch.cfv.weight": "[[NaN, 0, 0], [0, 1, 0], [0, 0, 1]]"}),
              d / "nan-map.safetensors")
    bad = vectorfile.load(d / "bank.safetensors")
    bad.meta["fvpatch.bank.names"] = "[antonym"
    vectorfile.save(bad, d / "bad-names.safetensors")
    (d / "latin1.json").write_bytes('[{"input": "café", "output": "x"}]'.encode("latin-1"))
    (d / "analogies.jsonl").write_text('{"stem": ["a", "b"], "choice": [["c", "d"]], "answer": 1e400}\n')
    (d / "one-choice.jsonl").write_text('{"stem": ["hot", "cold"], "choice": [["tall", "short"]], "answer": 0}\n')
    (d / "bogus-relation.jsonl").write_text('{"stem": ["hot", "cold"], "choice": [["tall", "short"], ["tall", "big"]], "answer": 0, "relation": "bogus"}\n')
    (d / "five.csv").write_text("input,output\n" + "".join(f"w{i},v{i}\n" for i in range(5)))
    (d / "thirty.csv").write_text("input,output\n" + "".join(f"w{i},v{i}\n" for i in range(30)))
    vectorfile.save(vectorfile.VectorFile("l_out-1", np.zeros(N_EMBD), [-1], fp, "add"), d / "zero.safetensors")
    save_bank(Bank(["antonym", "animal-young"], np.ones((2, N_EMBD)), "l_out-1", fp), d / "own-bank.safetensors")
    vectorfile.save(vectorfile.VectorFile("l_out-1", np.full(N_EMBD, 3e38), [-1], fp, "add"), d / "huge.safetensors")
    vectorfile.save(vectorfile.VectorFile("kqv_out-1", np.ones(N_EMBD), [-1], fp, "add"), d / "heads.safetensors")
    return {p.stem.replace("-", "_"): str(p) for p in d.iterdir()}


# (arguments, what the one line must say); {m} is the tiny model, {o} the folder the command writes in, which holds
# `exists.safetensors`, a regular file `plain`, a folder `folder` and a named pipe `fifo`; other names are the files of
# `inputs`
MODEL = ["-m", "{m}"]
GEN = ["generate", *MODEL, "-p", PROMPT]
SAVE = ["save", *MODEL, "-p", PROMPT, "--save"]
PATCH = ["patch", *MODEL, "-p", PROMPT]
LENS = ["lens", *MODEL, "-p", PROMPT]
ANALOGY = ["analogy", *MODEL, "hot:cold::tall:?"]
FFV = ["train", "ffv", *MODEL, "--task", "antonym", "-o", "{o}/f"]
FV = ["train", "fv", *MODEL, "--task", "antonym", "-o", "{o}/f"]
CFV = ["train", "cfv", *MODEL, "--bank", "{bank}", "-o", "{o}/c"]
TASK = ["eval", "task", *MODEL, "--task", "antonym"]
CASES = {
    "n-ctx 0": ([*GEN, "--n-ctx", "0"], "--n-ctx"),
    "n-ctx past int32": ([*GEN, "--n-ctx", str(2**32)], "--n-ctx"),
    "-n -5": ([*GEN, "-n", "-5"], "--max-tokens"),
    "more tokens than the context": ([*GEN, "-n", "100000"], "exceeds the context"),
    "temperature nan": ([*GEN, "--temperature", "nan"], "not a finite number"),
    "temperature -1": ([*GEN, "--temperature", "-1"], "not at least 0"),
    "temperature 1e308": ([*GEN, "--temperature", "1e308"], "not at most 2"),
    "generate an empty prompt": (["generate", *MODEL, "-p", ""], "'--prompt' / '-p': is empty"),
    "save an empty prompt": (["save", *MODEL, "-p", "", "--save", "l_out-1", "{o}/new"], "is empty"),
    "patch an empty prompt": (["patch", *MODEL, "-p", "", "--vector", "{v}"], "is empty"),
    "lens an empty prompt": (["lens", *MODEL, "-p", ""], "is empty"),
    "tokenize an empty prompt": (["tokenize", *MODEL, "-p", ""], "is empty"),
    "tokenize takes no context size (it decodes nothing)": (["tokenize", *MODEL, "-p", "x", "--n-ctx", "5"], "No such option '--n-ctx'"),
    "analogy that is not UTF-8": (["analogy", *MODEL, "caf\udce9:a::b:?"], "is not valid UTF-8 text"),
    "tokenize a prompt that is not UTF-8": (["tokenize", *MODEL, "-p", "caf\udce9"], "'--prompt' / '-p': is not valid UTF-8 text"),
    "generate a prompt that is not UTF-8": (["generate", *MODEL, "-p", "caf\udce9"], "'--prompt' / '-p': is not valid UTF-8 text"),
    "generate --seed when greedy": ([*GEN, "--seed", "5"], "--seed only shapes sampling; give --temperature above 0 too"),
    "patch --seed when greedy": ([*PATCH, "--vector", "{v}", "--seed", "5"], "--seed only shapes sampling"),
    "sweep an empty source": (["sweep", *MODEL, "-p", "", "--target", "d e"], "is empty"),
    "sweep an empty target": (["sweep", *MODEL, "-p", "a b c", "--target", ""], "'--target' / '-t': is empty"),
    "model is a folder": (["generate", "-m", "{o}/folder", "-p", "x"], "folder is a directory, not a model file"),
    "seed -1": ([*GEN, "--seed", "-1"], "--seed"),
    "threads 0": ([*GEN, "--threads", "0"], "--threads"),
    "threads 100000": ([*GEN, "--threads", "100000"], "--threads"),
    "missing model file": (["generate", "-m", "{o}/missing.gguf", "-p", "x"], "does not exist"),
    "model not GGUF": (["generate", "-m", "{o}/plain", "-p", "x"], "could not load"),
    "unknown model name": (["generate", "-m", "no-such-model", "-p", "x"], "neither a file, a known model"),
    "save over a file": ([*SAVE, "l_out-1", "{o}/exists.safetensors"], "exists; pass --force"),
    "save to a folder": ([*SAVE, "l_out-1", "{o}/folder", "--force"], "is a directory"),
    "save under a file": ([*SAVE, "l_out-1", "{o}/plain/v.safetensors"], "plain is a file, not a folder"),
    "save over a FIFO": ([*SAVE, "l_out-1", "{o}/fifo", "--force"], "fifo is a named pipe (FIFO); give a file name to write"),
    "save a name too long": ([*SAVE, "l_out-1", "{o}/" + "v" * 300], "is 300 bytes, longer than the 255"),
    "save a folder name too long": ([*SAVE, "l_out-1", "{o}/" + "d" * 256 + "/v"], "is 256 bytes, longer than the 255"),
    "save one file twice": ([*SAVE, "l_out-1", "{o}/a", "--save", "l_out-2", "{o}/a"], "more than one output"),
    "second output exists": ([*SAVE, "l_out-1", "{o}/new", "--save", "l_out-2", "{o}/exists.safetensors"], "exists"),
    "save a layer beyond": ([*SAVE, f"l_out-{N_LAYER}", "{o}/new"], f"beyond this model's {N_LAYER} layers"),
    "save a token beyond": ([*SAVE, "l_out-1", "{o}/new", "--token-idx", "99"], "outside the prompt"),
    "save a tensor that never fires": ([*SAVE, "l_outt-1", "{o}/new"], "never appeared"),
    "add a vector of the wrong width": ([*PATCH, "--vector", "{wide_add}"], "width 65 does not fit tensor 'l_out-1' of width 64"),
    "replace with the wrong width": ([*PATCH, "--vector", "{wide_replace}"], "width 65 does not fit tensor 'l_out-1' of width 64"),
    "scale nan": ([*PATCH, "--vector", "{v}", "--scale", "nan"], "not a finite number"),
    "scale overflows": ([*PATCH, "--vector", "{v}", "--scale", "1e38"], "overflows float32"),
    "two scales for one vector": ([*PATCH, "--vector", "{v}", "--scale", "3", "--scale", "1"], "one per --patch/--vector (1), not 2"),
    "two target tokens for one patch": ([*PATCH, "--vector", "{v}", "--to-token-idx", "2", "--to-token-idx", "3"], "give one --to-token-idx for every patch"),
    "no such row": ([*PATCH, "--vector", "{v}", "--from-token-idx", "5"], "no row for --from-token-idx 5"),
    "no such row from the end": ([*PATCH, "--vector", "{rows}", "--from-token-idx", "-9"], "no row for --from-token-idx -9; it has tokens [0, 1]"),
    "several rows, none chosen": ([*PATCH, "--vector", "{rows}"], "choose one with --from-token-idx"),
    "bank rows at one position": ([*PATCH, "--vector", "{bank}", "--from-token-idx", "-1"], "holds 3 rows for token -1; pick one relation with FILE#RELATION"),
    "bank with no such relation": ([*PATCH, "--vector", "{bank}#nope"], "the bank has no relation 'nope'"),
    "--all-tokens and --to-token-idx": ([*PATCH, "--vector", "{v}", "--all-tokens", "--to-token-idx", "1"], "give one of them"),
    "--all-tokens and --every-token": ([*PATCH, "--vector", "{v}", "--all-tokens", "--every-token"], "leave out --every-token"),
    "no fingerprint without --force": ([*PATCH, "--vector", "{nofp}"], "records no model arch, n_layer, n_embd, vocab, name"),
    "vector is a FIFO": ([*PATCH, "--vector", "{o}/fifo"], "fifo is a named pipe (FIFO), not a vector file"),
    "vector is a folder": ([*PATCH, "--vector", "{o}/folder"], "folder is a directory, not a vector file"),
    "missing vector": ([*PATCH, "--vector", "{o}/missing.safetensors"], "neither a file nor a shipped vector"),
    "nothing to patch": (PATCH, "give at least one"),
    "inspect a folder": (["inspect", "{o}/folder"], "is a directory"),
    "tensors --layer 99": (["tensors", *MODEL, "--layer", "99"], f"beyond this model's {N_LAYER} layers (0..{N_LAYER - 1})"),
    "tensors --layer -1": (["tensors", *MODEL, "--layer", "-1"], "--layer"),
    "lens --layer 3,3": ([*LENS, "--layer", "3,3"], "names a layer twice"),
    "lens --layer 1,9": ([*LENS, "--layer", "1,9"], "layer 9 is beyond"),
    "lens --layer 3-1": ([*LENS, "--layer", "3-1"], "names no layer"),
    "lens --token-idx -1 twice": ([*LENS, "--token-idx", "-1", "--token-idx", "-1", "--layer", "1"], "token indices -1 and -1 both name position"),
    "lens --top 0": ([*LENS, "--top", "0"], "--top"),
    "lens --png over a file": ([*LENS, "--png", "{o}/exists.safetensors"], "exists; pass --force"),
    "lens --png under a file": ([*LENS, "--png", "{o}/plain/lens.png"], "not a folder"),
    "decode a zero vector": (["decode", *MODEL, "{zero}"], "zero.safetensors: the row is all zeros, which promotes no token"),
    "decode attention-head rows": (["decode", *MODEL, "{heads}"], "kqv_out-1 rows live in the attention heads' space"),
    "decode against a row of another width": (["decode", *MODEL, "{v}", "--against", "{wide_add}"],
                                              "wide-add.safetensors: l_out-1 rows are 65 wide, not the residual width 64"),
    "card of a vector that records no model": (["vectors", "card", "{nofp}"], "records no model it was made for"),
    "card --name ''": (["vectors", "card", "{v}", "--name", " "], "'--name': is empty"),
    "card --name of two lines": (["vectors", "card", "{v}", "--name", "a\nb"], "'--name': must be one line"),
    "decode against itself": (["decode", *MODEL, "{v}", "--against", "{v}"], "hold the same row: their difference promotes no token"),
    "decode --against-token-idx alone": (["decode", *MODEL, "{v}", "--against-token-idx", "3"], "give --against NAME|FILE too"),
    "lens --force without --png": ([*LENS, "--force"], "--force overwrites the --png file"),
    "sweep --expect ''": (["sweep", *MODEL, "-p", "a b c", "--target", "d e", "--expect", ""], "'--expect': is empty"),
    "decode --top 0": (["decode", *MODEL, "{v}", "--top", "0"], "--top"),
    "decode several rows, none chosen": (["decode", *MODEL, "{rows}"], "choose one with --token-idx"),
    "decode --against no such row": (["decode", *MODEL, "{v}", "--against", "{rows}", "--against-token-idx", "5"], "no row for --against-token-idx 5"),
    "sweep -n 0": (["sweep", *MODEL, "-p", "a b c", "--target", "d e", "-n", "0"], "--max-tokens"),
    "sweep a layer beyond": (["sweep", *MODEL, "-p", "a b c", "--target", "d e", "--layer", "0,7"], "layer 7 is beyond"),
    "reversal --n 0": (["reversal", *MODEL, "--n", "0"], "--n"),
    "reversal -o a folder": (["reversal", *MODEL, "--layer", "0", "-o", "{o}/folder"], "is a directory"),
    "reversal -o under a file": (["reversal", *MODEL, "--layer", "0", "-o", "{o}/plain/r.json"], "not a folder"),
    "reversal --lengths 1": (["reversal", *MODEL, "--layer", "0", "--lengths", "1"], "list lengths must lie in 2.."),
    "analogy not an analogy": (["analogy", *MODEL, "hot:cold", "--bank", "{bank}"], "expected an analogy A:B::C:?"),
    **{f"analogy {q!r}": (["analogy", *MODEL, q, "--bank", "{bank}"], "expected an analogy A:B::C:?")
       for q in ("a:b::c:d", "a:b::c:", "hot:cold::tall:?x", "hot:cold::tall:??", "hot:cold::tall:long")},
    "analogy of question marks": (["analogy", *MODEL, "?:?::?:?", "--bank", "{bank}"], "must all be given (non-empty, not '?')"),
    "analogy --top 0": ([*ANALOGY, "--top", "0"], "--top"),
    "analogy --bank a plain vector": ([*ANALOGY, "--bank", "{v}"], "not a bank file (no fvpatch.bank.names metadata; `fvpatch train cfv` writes bank files)"),
    "bank map with NaN": ([*ANALOGY, "--bank", "{nan_map}"], "nan-map.safetensors: fvpatch.cfv.weight must be finite"),
    "bank names not JSON": ([*ANALOGY, "--bank", "{bad_names}"], "bad-names.safetensors: fvpatch.bank.names is not valid JSON"),
    "serve a missing vector": (["serve", *MODEL, "--port", "0", "--vector", "{o}/missing.safetensors"], "neither a file nor a shipped vector"),
    "serve a vector of the wrong width": (["serve", *MODEL, "--port", "0", "--vector", "{wide_add}"], "width 65 does not fit"),
    "serve two scales for a vector": (["serve", *MODEL, "--port", "0", "--vector", "{v}", "--scale", "1", "--scale", "2"], "one --scale per --vector"),
    "serve --parallel 0": (["serve", *MODEL, "--port", "0", "--parallel", "0"], "--parallel"),
    "quantize to an unknown type": (["quantize", "{m}", "Q9_9", "{o}/q.gguf"], "unknown quantization"),
    "quantize over a file": (["quantize", "{m}", "Q8_0", "{o}/exists.safetensors"], "exists; pass --force"),
    # training and evaluation: refused before any weights load
    "ffv --steps 0": ([*FFV, "--steps", "0"], "--steps"),
    "ffv --n-train -1": ([*FFV, "--n-train", "-1"], "--n-train"),
    "fv with more prompts than train pairs": (["train", "fv", *MODEL, "--task", "{thirty}", "-o", "{o}/f"],
                                              "has 18 train pairs (its 30 distinct pairs split 60/10/30 into train/valid/test: 18 train, 3 valid, 9 test), fewer than the 25 prompts asked for, one query each; give --n-prompts 18 or fewer"),
    "sweep taskvec with more prompts than train pairs": (["eval", "sweep", *MODEL, "--task", "{thirty}", "--method", "taskvec", "--k", "5"],
                                                         "give --n-prompts 18 or fewer"),
    "fv with more demonstrations than train pairs": (["train", "fv", *MODEL, "--task", "{thirty}", "--n-prompts", "5", "--k", "18", "-o", "{o}/f"],
                                                     "18-shot prompts need 18 demonstrations besides their query, and task 'thirty' has 18 train pairs"),
    "sweep --n-prompts with a vector": (["eval", "sweep", *MODEL, "--task", "antonym", "--vector", "{v}", "--n-prompts", "5"], "--n-prompts sets the demo sets of --method taskvec"),
    "ffv --lr inf": ([*FFV, "--lr", "inf"], "not a finite number"),
    "ffv --lr 0": ([*FFV, "--lr", "0"], "not above 0"),
    "ffv --l2 nan": ([*FFV, "--l2", "nan"], "not a finite number"),
    "ffv --layer 99": ([*FFV, "--layer", "99"], "--layer 99 is beyond"),
    "ffv --layer -1": ([*FFV, "--layer", "-1"], "--layer"),
    "ffv -o exists": (["train", "ffv", *MODEL, "--task", "antonym", "-o", "{o}/exists.safetensors"], "exists; pass --force"),
    "ffv -o under a file": (["train", "ffv", *MODEL, "--task", "antonym", "-o", "{o}/plain/f"], "not a folder"),
    "pairs not UTF-8": (["train", "ffv", *MODEL, "--pairs", "{latin1}", "-o", "{o}/f"], "latin1.json: not UTF-8"),
    "unknown template": ([*FFV, "--template", "nope"], "unknown template"),
    "fv --layer 99": ([*FV, "--layer", "99"], "--layer 99 is beyond"),
    "fv --heads 0": ([*FV, "--heads", "0"], "--heads"),
    "fv --heads -1": ([*FV, "--heads", "-1"], "--heads"),
    "fv --n-prompts 0": ([*FV, "--n-prompts", "0"], "--n-prompts"),
    "fv --k 1": ([*FV, "--k", "1"], "--k"),
    "fv --heatmap of a task vector": (["train", "fv", *MODEL, "--task", "antonym", "--method", "taskvec", "-o", "{o}/f", "--heatmap", "{o}/h.png"], "--heatmap"),
    "fv --heatmap on -o": ([*FV, "--heatmap", "{o}/f"], "more than one output"),
    "cfv --steps 0": ([*CFV, "--steps", "0"], "--steps"),
    "cfv --lr nan": ([*CFV, "--lr", "nan"], "not a finite number"),
    "ffv --lr 1e37": ([*FFV, "--lr", "1e37"], "is not at most 100"),
    "ffv --init fv, 2 train pairs": ([*FFV, "--init", "fv", "--n-train", "2"], "too few demonstrations for the fv start"),
    "ffv --targets icl, 1 train pair": ([*FFV, "--init", "zeros", "--targets", "icl", "--n-train", "1"], "give 2 or more"),
    "fv, no valid pairs": (["train", "fv", *MODEL, "--task", "{five}", "-o", "{o}/f"], "task 'five' has no valid pairs to choose the layer on"),
    # counted before the PyTorch model loads (it would be converted into the folder the snapshot covers)
    "ffv --pairs too few for --n-train": (["train", "ffv", *MODEL, "--pairs", "{thirty}", "-o", "{o}/f"],
                                          "task 'thirty' has 18 train pairs, fewer than --n-train 20 (its 30 distinct pairs split 60/10/30 into "
                                          "train/valid/test: 18 train, 3 valid, 9 test); give --n-train 18 or less, or 33 or more distinct pairs in "),
    "ffv --pairs with no valid pairs": (["train", "ffv", *MODEL, "--pairs", "{five}", "--n-train", "2", "-o", "{o}/f"],
                                        "task 'five' has no valid pairs for early stopping (its 5 distinct pairs split 60/10/30 into train/valid/test: "
                                        "3 train, 0 valid, 2 test); give 6 or more distinct pairs in "),
    "ffv a folder that is no model": (["train", "ffv", "-m", "{o}/folder", "--task", "antonym", "-o", "{o}/f"], "is a folder but not a Hugging Face model"),
    "cfv --lr 1e300": ([*CFV, "--lr", "1e300"], "is not at most 100"),
    "cfv a relation of your own pairs that records no pairs": (["train", "cfv", *MODEL, "--bank", "{own_bank}", "-o", "{o}/c"],
                                                               "relation 'animal-young' has 0 usable recorded pairs; an analogy with distractors needs at least 3"),
    "eval analogy generated from your own pairs": (["eval", "analogy", *MODEL, "--bank", "{own_bank}"], "and animal-young is of your own pairs; give your analogies with --data FILE"),
    "cfv from a bad bank": (["train", "cfv", *MODEL, "--bank", "{bad_names}", "-o", "{o}/c"], "fvpatch.bank.names is not valid JSON"),
    "export over its input": (["export", "{v}", "{v}", "--force"], "is also an input"),
    "export a whole bank": (["export", "{bank}", "{o}/bank.gguf"], "export one relation of a bank as BANK#RELATION"),
    "analogy --bank no such name": ([*ANALOGY, "--bank", "no-such-bank"], "neither a file nor a shipped vector"),
    "eval task a vector that records no model": ([*TASK, "--vector", "{nofp}"], "records no model"),
    "two huge vectors added": ([*PATCH, "--vector", "{huge}", "--vector", "{huge}"], "logits are not finite"),
    "eval task --device without torch": ([*TASK, "--device", "cuda"], "--dtype and --device set the PyTorch engine"),
    "eval task --n -6": ([*TASK, "--n", "-6"], "--n"),
    "eval task --n 0": ([*TASK, "--n", "0"], "--n"),
    "eval task --k 1": ([*TASK, "--k", "1"], "--k"),
    "eval task a template placeholder nothing fills": ([*TASK, "--template", "{{x}} {{y}} {{z}}"], "has placeholders {z} that nothing fills"),
    "eval task a bank relation not in it": ([*TASK, "--vector", "{bank}#nope"], "the bank has no relation 'nope'"),
    "eval task an empty valid split": (["eval", "task", *MODEL, "--task", "{five}", "--split", "valid", "--n", "2", "--k", "2"],
                                       "five: the valid split is empty: its 5 distinct pairs split 60/10/30 into train/valid/test: 3 train, 0 valid, 2 test"),
    "eval task a pool smaller than --k": (["eval", "task", *MODEL, "--task", "{five}", "--k", "4"],
                                          "4-shot prompts need 4 demonstrations, but their pool, the train split of {five} (5 distinct pairs split 60/10/30 into "
                                          "train/valid/test: 3 train, 0 valid, 2 test), holds only 3; give --k 3 or less, or more pairs in {five} (to score a held-out file against "
                                          "the pairs a vector was trained on: --task TRAINING-PAIRS --test-pairs HELD-OUT-FILE)"),
    "eval sweep a pool smaller than --k": (["eval", "sweep", *MODEL, "--task", "{five}", "--split", "test", "--vector", "{v}", "--k", "4"],
                                           "holds only 3; give --k 3 or less, or more pairs in {five}"),
    "eval task --test-pairs, a pool smaller than --k": ([*TASK[:-1], "{five}", "--test-pairs", "{thirty}", "--k", "4"],
                                                        "but their pool, the train split of {five} (5 distinct pairs split"),
    "eval task --test-pairs and --split": ([*TASK, "--test-pairs", "{five}", "--split", "test"],
                                           "--split chooses the split of --task to score; with --test-pairs every pair of that file is scored instead"),
    "eval task --test-pairs all in --task": ([*TASK[:-1], "{thirty}", "--test-pairs", "{five}"],
                                             "five.csv: every one of its 5 distinct pairs has an input that {thirty} also holds, so none is held out"),
    "eval task --test-pairs a FIFO": ([*TASK, "--test-pairs", "{o}/fifo"], "fifo is a named pipe (FIFO), not a pairs file"),
    "eval task --test-pairs missing": ([*TASK, "--test-pairs", "{o}/missing.json"], "'--test-pairs': File"),
    "eval task --test-pairs not UTF-8": ([*TASK, "--test-pairs", "{latin1}"], "latin1.json: not UTF-8"),
    "eval sweep a whole bank": (["eval", "sweep", *MODEL, "--task", "antonym", "--vector", "{bank}", "--n", "2"],
                                "bank.safetensors: the file holds 3 rows for token -1; pick one relation with FILE#RELATION"),
    "eval task -o exists": ([*TASK, "-o", "{o}/exists.safetensors"], "exists; pass --force"),
    "eval task -o under a file": ([*TASK, "-o", "{o}/plain/r.json"], "not a folder"),
    "eval task -o in /proc": ([*TASK, "-o", "/proc/x.json"], "/proc/x.json: cannot write in /proc ("),
    "eval sweep --plot in /proc": (["eval", "sweep", *MODEL, "--task", "antonym", "--vector", "{v}", "-o", "{o}/new.json", "--plot", "/proc/a.png"],
                                   "/proc/a.png: cannot write in /proc ("),
    "eval sweep --plot exists": (["eval", "sweep", *MODEL, "--task", "antonym", "--vector", "{v}", "--plot", "{o}/exists.safetensors"], "exists"),
    "eval analogy --n 0": (["eval", "analogy", *MODEL, "--n", "0"], "--n"),
    "eval analogy -o exists": (["eval", "analogy", *MODEL, "--bank", "{bank}", "-o", "{o}/exists.safetensors"], "exists; pass --force"),
    "eval analogy bad data": (["eval", "analogy", *MODEL, "--bank", "{bank}", "--data", "{analogies}", "--force"], "analogies.jsonl:1: expected"),
    "eval analogy --data --n": (["eval", "analogy", *MODEL, "--bank", "{bank}", "--data", "{analogies}", "--n", "3"], "--n only shapes generated analogies"),
    "eval analogy --data --seed": (["eval", "analogy", *MODEL, "--bank", "{bank}", "--data", "{analogies}", "--seed", "5"], "--seed only shapes generated"),
    "eval analogy one choice": (["eval", "analogy", *MODEL, "--bank", "{bank}", "--data", "{one_choice}"], "one-choice.jsonl:1: expected"),
    "eval analogy a relation not in the bank": (["eval", "analogy", *MODEL, "--bank", "{bank}", "--data", "{bogus_relation}"],
                                                "relation 'bogus' is not one of the bank's (antonym, capitalize, present-past)"),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line(case, tiny_gguf, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("FVPATCH_MODELS", str(tmp_path / "models"))  # nothing may convert the tiny model into the real cache
    out = tmp_path / "out"
    (out / "folder").mkdir(parents=True)
    (out / "plain").write_text("a regular file\n")
    (out / "exists.safetensors").write_bytes(b"an earlier result")
    os.mkfifo(out / "fifo")
    before = snapshot(tmp_path)
    args, says = CASES[case]
    r = CliRunner().invoke(main, [a.format(m=tiny_gguf, o=out, **inputs) for a in args])
    assert refused_in_one_line(r) is None, refused_in_one_line(r)
    for name, path in inputs.items():  # a message may name an input file ({five}); others hold braces of their own ({z})
        says = says.replace("{" + name + "}", path)
    assert says in r.stderr, r.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing half-written, nothing replaced


# ---- in a process of their own: what used to abort -------------------------------------------------------------


def fvpatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("FVPATCH_THREADS", "OMP_NUM_THREADS")} | (env or {})
    return subprocess.run([sys.executable, "-m", "fvpatch", *args], capture_output=True, text=True, env=environ, timeout=120)


@pytest.mark.parametrize("n_ctx", [1, 8, 31, 300])
def test_a_small_context_runs(n_ctx, tiny_gguf, tmp_path):
    """llama.cpp shrinks its batch to a context below 512 tokens (and asserted outputs per sequence against it): a
    prompt longer than that batch used to abort the process. Any context of 1 or more tokens runs now."""
    r = fvpatch("save", "-m", str(tiny_gguf), "-p", "a b c d e f g h i j k l " * 3, "--save", "l_out-1", str(tmp_path / "v.safetensors"),
                "--token-idx", "-1", "-n", "2", "--n-ctx", str(n_ctx), "--json", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("n_ctx", [1, 3])
def test_tensors_in_a_small_context_lists_the_same_widths(n_ctx, tiny_gguf):
    """`tensors` decodes a 12-token prompt here; in a context below that, llama.cpp's smaller batch split it, and every
    tensor was listed as unusable ('not one row per token') although save and patch take them in that context."""
    listing = lambda *args: json.loads(CliRunner().invoke(main, ["tensors", "-m", str(tiny_gguf), "--json", *args]).stdout)["widths"]
    small = listing("--n-ctx", str(n_ctx))
    assert small["l_out-1"] == N_EMBD and small == listing()


@pytest.mark.parametrize("var, value", [("OMP_NUM_THREADS", "100000"), ("FVPATCH_THREADS", "abc"), ("FVPATCH_THREADS", "0"),
                                        ("FVPATCH_THREADS", "513"), ("FVPATCH_THREADS", "-2")])
def test_a_bad_thread_count_is_one_line(var, value, tiny_gguf):
    r = fvpatch("generate", "-m", str(tiny_gguf), "-p", PROMPT, "-n", "1", env={var: value})
    assert r.returncode == 1 and not r.stdout
    assert r.stderr.strip().splitlines() == [f"Error: {var}={value!r} is not a thread count; give a whole number from 1 to 512"]


def test_omp_list_form(tiny_gguf):
    r = fvpatch("generate", "-m", str(tiny_gguf), "-p", PROMPT, "-n", "1", env={"OMP_NUM_THREADS": "2,1"})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value", ["abc", "0"])
def test_omp_garbage(value, tiny_gguf):
    """Refused in one line, before llama.cpp's OpenMP runtime loads and would print its own warnings about it."""
    r = fvpatch("generate", "-m", str(tiny_gguf), "-p", PROMPT, "-n", "1", env={"OMP_NUM_THREADS": value})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"Error: OMP_NUM_THREADS={value!r} is not a thread count; give a whole number from 1 to 512"]


def test_threads_flag_wins_over_the_environment(tiny_gguf):
    r = fvpatch("generate", "-m", str(tiny_gguf), "-p", PROMPT, "-n", "1", "--threads", "2", env={"FVPATCH_THREADS": "abc"})
    assert r.returncode == 0, r.stderr


def test_an_overflowing_export_scale_is_one_line_without_numpy_warnings(inputs, tmp_path):
    """In a process of its own, where numpy prints its RuntimeWarning (pytest would catch it in-process)."""
    r = fvpatch("export", inputs["v"], str(tmp_path / "x.gguf"), "--scale", "1e38")
    assert r.returncode == 1 and not r.stdout and not list(tmp_path.iterdir())
    assert r.stderr.strip().splitlines() == [f"Error: {inputs['v']}: the vector times its scale (1e+38) overflows float32; give a smaller --scale"]


# ---- what a refusal points to works -----------------------------------------------------------------------------


def patched(model, *args: str) -> dict:
    r = CliRunner().invoke(main, [*(a.format(m=model) for a in PATCH), "-n", "1", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_two_rows_of_one_file_at_two_tokens(tiny_gguf, inputs):
    """Each --patch takes its own --from-token-idx and --to-token-idx; the last of several used to win for all."""
    out = patched(tiny_gguf, "--patch", "l_out-1", inputs["rows"], "--patch", "l_out-1", inputs["rows"],
                  "--from-token-idx", "0", "--to-token-idx", "2", "--from-token-idx", "1", "--to-token-idx", "3")
    assert [(p["tensor"], p["token"]) for p in out["patches"]] == [("l_out-1", 2), ("l_out-1", 3)]


def test_patch_takes_one_scale_for_all_or_one_per_vector(tiny_gguf, inputs):
    scales = lambda *args: [p["scale"] for p in patched(tiny_gguf, "--vector", inputs["v"], "--vector", inputs["v"], *args)["patches"]]
    assert scales() == [1.0, 1.0] and scales("--scale", "2") == [2.0, 2.0]
    assert scales("--scale", "2", "--scale", "0.5") == [2.0, 0.5]  # each its own; click alone would keep 0.5 for both


def test_force_applies_a_file_that_records_no_model(tiny_gguf, inputs):
    assert patched(tiny_gguf, "--vector", inputs["nofp"], "--force")["patches"][0]["tensor"] == "l_out-1"


def test_a_bank_relation_is_patched_by_name(tiny_gguf, inputs):
    assert patched(tiny_gguf, "--vector", inputs["bank"] + "#capitalize")["patches"] == [
        {"tensor": "l_out-1", "token": -1, "mode": "add", "scale": 1.0}]
    r = CliRunner().invoke(main, [*(a.format(m=tiny_gguf) for a in PATCH), "-n", "1", "--json", "--patch", "l_out-2", inputs["bank"] + "#antonym"])
    assert r.exit_code == 0 and json.loads(r.stdout)["patches"][0]["tensor"] == "l_out-2"
    assert f"note: {inputs['bank']}#antonym holds l_out-1 rows; patching them into l_out-2" in r.stderr  # never silent


def test_eval_takes_a_bank_relation_as_patch_does(tiny_gguf, inputs, tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, [*(a.format(m=tiny_gguf) for a in TASK), "--vector", inputs["bank"] + "#antonym", "--n", "2", "--k", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["results"]["llama.cpp"]["n"] == 2
    # which items were scored, in the order of every `correct` list
    from fvpatch.tasks import load_task

    assert result["items"] == [{"input": x, "output": y} for x, y in load_task("antonym").test[:2]]
    assert all(len(c) == 2 for c in result["results"]["llama.cpp"]["correct"].values())
    assert not r.stderr  # a vendored task: no note on how a file was split


def test_an_every_token_file_is_patched_at_the_token_asked_for(tiny_gguf, tiny_session, tmp_path):
    """An imported control vector (fvpatch.apply_at = all) patches every token, or one with --to-token-idx."""
    path = tmp_path / "all.safetensors"
    vectorfile.save(vectorfile.VectorFile("l_out-1", np.ones(N_EMBD), [-1], tiny_session.fingerprint(), "add", meta={"fvpatch.apply_at": "all"}), path)
    assert patched(tiny_gguf, "--vector", str(path))["patches"][0]["token"] == "all"
    assert patched(tiny_gguf, "--vector", str(path), "--to-token-idx", "2")["patches"][0]["token"] == 2
    r = CliRunner().invoke(main, [*(a.format(m=tiny_gguf) for a in PATCH), "--vector", str(path), "--to-token-idx", "99"])
    assert refused_in_one_line(r) is None and "outside the prompt" in r.stderr


def test_inspect_names_a_banks_rows_and_shortens_long_metadata(inputs):
    r = CliRunner().invoke(main, ["inspect", inputs["bank"]])
    assert r.exit_code == 0, r.output
    rows = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("row ")]
    assert rows == json.loads(vectorfile.load(inputs["bank"]).meta["fvpatch.bank.names"])
    assert all(len(line) < 300 for line in r.stdout.splitlines())  # the pairs are kilobytes of JSON; --json has them whole
