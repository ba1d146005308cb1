"""Atomic file writes: a crash or an error mid-write never leaves a truncated or half-written file."""

import json
import os
import secrets
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place. The file gets the usual
    permissions (0666 less the umask), since results and vectors are meant to be shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload) -> Path:
    return write_bytes(path, (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
