"""Output files: checked before any work starts, written atomically, so that a bad path fails in a second
instead of after a long run, and a crash or an error mid-write never leaves a truncated or half-written file."""

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from fvpatch.errors import FvpatchError, OutputExists


def check_outputs(paths, force: bool = False, exist_ok: bool = False) -> list[Path]:
    """Refuse, naming the path, outputs that could not be written: a directory, a file that exists (unless
    `force`, or `exist_ok` for a file that is resumed), a folder that is a file or is not writable, or the
    same file given twice. Missing folders are fine (the writers create them)."""
    out = [Path(p) for p in paths if p is not None]
    seen = set()
    for path in out:
        key = os.path.realpath(path)
        if key in seen:
            raise FvpatchError(f"{path} is given as more than one output; give each output its own file")
        seen.add(key)
        if path.is_dir():
            raise FvpatchError(f"{path} is a directory; give a file name to write")
        if path.exists() and not (force or exist_ok):
            raise OutputExists(f"{path} exists; pass --force to overwrite it")
        folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), path.parent)
        if not folder.is_dir():
            raise FvpatchError(f"{path}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise FvpatchError(f"{path}: cannot write in {folder} (permission denied)")
    return out


@contextmanager
def replacing(path: str | Path):
    """A temporary path beside `path` for the block to write; renamed over `path` when the block succeeds, removed
    when it fails. A failure to write (full disk, no permission) is one line naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except FvpatchError:
        raise
    except OSError as e:
        raise FvpatchError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` atomically. The file gets the usual permissions (0666 less the umask), since results and
    vectors are meant to be shared."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload) -> Path:
    return write_text(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def write_report(path: str | Path, report: dict, markdown: str) -> Path:
    """A report as JSON at `path` and as Markdown beside it (.md)."""
    write_json(path, report)
    return write_text(Path(path).with_suffix(".md"), markdown)


def write_figure(fig, path: str | Path, **savefig) -> Path:
    """A matplotlib figure as a PNG, atomically (the temporary name has no .png, so the format is given)."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return Path(path)


def write_gguf(path: str | Path, arch: str, fill) -> Path:
    """A GGUF file, atomically: `fill(writer)` adds its keys and tensors to a gguf.GGUFWriter."""
    import gguf

    with replacing(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            fill(w)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return Path(path)
