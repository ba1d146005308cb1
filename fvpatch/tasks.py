"""Relation tasks: lists of (input, output) pairs, by name from the vendored datasets or from a user's file.

Splits are decided by a hash of each input with a fixed seed, not by a random generator: the same
item lands in the same split on every machine, numpy version and file order, and two pairs that share
an input never straddle train and test.
"""

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fvpatch.errors import FvpatchError, NotFound

DATA_DIR = Path(__file__).resolve().parent / "datasets" / "function_vectors"
CORE_TASKS = ("antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural")
SPLIT_SEED = 0
TEST_FRACTION = 0.3
VALID_FRACTION = 0.1

Pair = tuple[str, str]


@dataclass
class Task:
    name: str
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    source: str = ""  # where the pairs came from, recorded in the vectors made from them

    def split(self, name: str) -> list[Pair]:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {name!r}")
        return getattr(self, name)


def task_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATA_DIR.glob("*/*.json"))}


def list_tasks() -> list[str]:
    return list(task_files())


def is_vendored(name) -> bool:
    """Whether `name` is a vendored task's (not a user's pairs file)."""
    return bool(name) and str(name) in task_files()


def read_pairs(path: str | Path) -> list[Pair]:
    """Input/output pairs from .json (a list of objects), .jsonl (one object a line) or .csv (header input,output)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"task file {path} does not exist")
    try:
        return _read_pairs(path)
    except UnicodeDecodeError as e:
        raise FvpatchError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None


def _read_pairs(path: Path) -> list[Pair]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FvpatchError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise FvpatchError(f"{path}: expected a JSON list of {{\"input\": ..., \"output\": ...}} objects, got a {type(rows).__name__}")
        where = [f"{path}: item {i}" for i in range(len(rows))]
    elif suffix == ".jsonl":
        rows, where = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FvpatchError(f"{path}:{n}: not valid JSON ({e})") from None
            where.append(f"{path}:{n}")
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"input", "output"} <= set(reader.fieldnames):
                raise FvpatchError(f"{path}: the CSV header must name columns 'input' and 'output', got {reader.fieldnames}")
            rows = list(reader)
        where = [f"{path}:{n}" for n in range(2, len(rows) + 2)]
    else:
        raise FvpatchError(f"{path}: unknown task file type {suffix!r}; use .json, .jsonl or .csv")
    pairs = [_pair(row, w) for row, w in zip(rows, where)]
    if not pairs:
        raise FvpatchError(f"{path}: holds no input/output pairs")
    return pairs


def _pair(row, where: str) -> Pair:
    if not isinstance(row, dict) or "input" not in row or "output" not in row:
        raise FvpatchError(f"{where}: expected an object with 'input' and 'output', got {row!r:.80}")
    x, y = row["input"], row["output"]
    if not isinstance(x, str) or not isinstance(y, str) or not x.strip() or not y.strip():
        raise FvpatchError(f"{where}: 'input' and 'output' must be non-empty strings, got {x!r:.40} and {y!r:.40}")
    return x.strip(), y.strip()


def split_sizes(n: int) -> tuple[int, int, int]:
    """How many of `n` distinct pairs `split_pairs` puts in (train, valid, test)."""
    n_test, n_valid = round(n * TEST_FRACTION), round(n * VALID_FRACTION)
    return n - n_test - n_valid, n_valid, n_test


def split_percentages() -> str:
    """The split as a user reads it: '60/10/30 into train/valid/test'."""
    return f"{round(100 * (1 - VALID_FRACTION - TEST_FRACTION))}/{round(100 * VALID_FRACTION)}/{round(100 * TEST_FRACTION)} into train/valid/test"


def split_summary(task: "Task") -> str:
    """How a task's pairs were split, for a message: '10 distinct pairs split 60/10/30 into train/valid/test: 6 train,
    1 valid, 3 test'."""
    sizes = (len(task.train), len(task.valid), len(task.test))
    return f"{sum(sizes)} distinct pairs split {split_percentages()}: {sizes[0]} train, {sizes[1]} valid, {sizes[2]} test"


def pairs_needed(n_train: int) -> int:
    """The fewest distinct pairs whose train split holds `n_train` pairs (a larger file's never holds fewer)."""
    n = n_train
    while split_sizes(n)[0] < n_train:
        n += 1
    return n


def split_pairs(pairs: list[Pair], seed: int = SPLIT_SEED) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, valid, test), ordered by a seeded hash of the input; duplicate pairs are dropped."""
    unique = list(dict.fromkeys(pairs))
    order = sorted(unique, key=lambda p: (hashlib.sha256(f"{seed}\0{p[0]}".encode()).hexdigest(), p[1]))
    _, n_valid, n_test = split_sizes(len(order))
    return order[n_test + n_valid :], order[n_test : n_test + n_valid], order[:n_test]


def held_out(task: Task, pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(kept, dropped): the distinct `pairs` in their order, those whose input `task` also holds (in any split: a vector
    made from the task may have seen it) set aside, so that what is kept is held out from the task's pairs."""
    seen = {x for split in (task.train, task.valid, task.test) for x, _ in split}
    unique = list(dict.fromkeys(pairs))
    return [p for p in unique if p[0] not in seen], [p for p in unique if p[0] in seen]


def load_task(name_or_path: str | Path, seed: int = SPLIT_SEED) -> Task:
    """A vendored task by name (`antonym`, `country-capital`, ...) or a user's .json/.jsonl/.csv file."""
    files = task_files()
    if str(name_or_path) in files:
        name, path = str(name_or_path), files[str(name_or_path)]
        source = f"{path.relative_to(DATA_DIR.parent).as_posix()} (Todd et al. 2023, MIT)"
    elif Path(name_or_path).suffix.lower() in (".json", ".jsonl", ".csv"):
        path = Path(name_or_path)
        name, source = path.stem, str(path)
    else:
        raise NotFound(f"unknown task {str(name_or_path)!r}: give a .json/.jsonl/.csv file or one of {', '.join(files)}")
    train, valid, test = split_pairs(read_pairs(path), seed)
    if len(train) < 2 or not test:
        raise FvpatchError(f"{path}: {len(train) + len(valid) + len(test)} distinct pairs are too few to split into train/valid/test")
    return Task(name, train, valid, test, f"{source}, split seed {seed}")
