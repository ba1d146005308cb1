"""How many CPU threads llama.cpp and PyTorch use: `--threads N`, else $FVPATCH_THREADS, else $OMP_NUM_THREADS,
else half the cores (bench/threads.py: on a 2-core machine that other work also uses, 2 threads generated 30x
slower than 1, since ggml's and OpenMP's workers spin-wait for a core that is busy elsewhere; half the logical
cores is also llama.cpp's own default, one per physical core where cores are hyper-threaded).
"""

import os
import re

from fvpatch.errors import FvpatchError

# llama.cpp aborts the whole process (std::bad_alloc) on a count like 100000 (10000 still ran); ggml.h declares
# 512 its maximum (GGML_MAX_N_THREADS), and more threads than cores only make ggml's workers spin-wait for each
# other, so refusing more loses no useful setting.
MAX_THREADS = 512
ENV_VARS = ("FVPATCH_THREADS", "OMP_NUM_THREADS")


def parse_threads(text: str, where: str) -> int:
    """A thread count from 1 to MAX_THREADS. OpenMP's list form (`2,1`: 2 threads, then 1 in nested regions)
    gives its first number."""
    first = text.split(",")[0].strip()
    if not re.fullmatch(r"[0-9]{1,9}", first) or not 1 <= int(first) <= MAX_THREADS:
        raise FvpatchError(f"{where}={text!r} is not a thread count; give a whole number from 1 to {MAX_THREADS}")
    return int(first)


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def configured_threads(flag: int | None = None) -> int | None:
    """The thread count asked for (the --threads value first, then the environment), or None where none is."""
    if flag is not None:
        return parse_threads(str(flag), "--threads")
    for var in ENV_VARS:
        if os.environ.get(var, "").strip():
            return parse_threads(os.environ[var], var)
    return None
