"""Files: inputs checked to be regular files, outputs checked before any work starts and written atomically, so
that a bad path fails in a second instead of after a long run, and a crash or an error mid-write never leaves a
truncated or half-written file."""

import contextlib
import json
import os
import secrets
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from fvpatch.errors import FvpatchError, NotFound, OutputExists

REGULAR = "a regular file"
_KINDS = {stat.S_IFREG: REGULAR, stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe (FIFO)",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
_NAME_MAX = 255  # where no folder says (Linux's and most filesystems' limit)


def path_kind(path: str | Path) -> str | None:
    """What is at `path`, a symlink followed ("a regular file", "a directory", "a named pipe (FIFO)", ...), or None
    when nothing is. A path the system cannot look up (a name too long, a loop of links) is one line."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise FvpatchError(f"{path}: cannot use it ({e.strerror or e})") from None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def input_file(path: str | Path, what: str) -> Path:
    """`path` when it is a regular file; else one line saying what is there (a FIFO would block the read)."""
    kind = path_kind(path)
    if kind is None:
        raise NotFound(f"{what} {path} does not exist")
    if kind != REGULAR:
        raise FvpatchError(f"{path} is {kind}, not a {what}")
    return Path(path)


def check_outputs(paths, force: bool = False, exist_ok: bool = False) -> list[Path]:
    """Refuse, naming the path, outputs that could not be written: a name longer than the filesystem takes,
    anything but a regular file (a directory, a FIFO, a device), a file that exists (unless `force`, or `exist_ok`
    for a file that is resumed), a folder that is a file or is not writable, or the same file given twice.
    Missing folders are fine (the writers create them). A symlink is written through: its target is checked."""
    out = [Path(p) for p in paths if p is not None]
    seen = set()
    for path in out:
        _check_name_lengths(path)
        target = _target(path)
        if target in seen:
            raise FvpatchError(f"{path} is given as more than one output; give each output its own file")
        seen.add(target)
        kind = path_kind(path)
        if kind not in (None, REGULAR):
            raise FvpatchError(f"{path} is {kind}; give a file name to write")
        if kind and not (force or exist_ok):
            raise OutputExists(f"{path} exists; pass --force to overwrite it")
        folder = next((p for p in (target.parent, *target.parent.parents) if p.exists()), target.parent)
        if not folder.is_dir():
            raise FvpatchError(f"{path}: {folder} is a file, not a folder")
        cannot = _cannot_create_in(folder)
        if cannot:
            raise FvpatchError(f"{path}: cannot write in {folder} ({cannot})")
    return out


def _cannot_create_in(folder: Path) -> str | None:
    """Why no file can be created in `folder`, or None when one can. Tried, not asked of os.access, which says yes to
    root in /proc or on a read-only filesystem, where the write would fail only after the work."""
    probe = _temporary_name(folder)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return (e.strerror or str(e)).lower()
    _discard(probe)
    return None


def _temporary_name(folder: Path) -> Path:
    """A short unique name in `folder` for a file being written, whatever the length of the name it will get."""
    return folder / f".fvpatch-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _check_name_lengths(path: Path):
    """Every name in `path` within what its filesystem takes, so that a long name fails before the work, not at the rename."""
    limit = _name_max(path)
    long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise FvpatchError(f"the name {long[:40]}... is {len(os.fsencode(long))} bytes, longer than the {limit} this filesystem takes")


def _name_max(path: Path) -> int:
    """The longest name the filesystem of `path`'s nearest existing folder takes."""
    for folder in path.absolute().parents:
        with contextlib.suppress(OSError, ValueError):  # a folder not there yet, or a name too long itself
            return os.pathconf(folder, "PC_NAME_MAX")
    return _NAME_MAX


def _target(path: Path) -> Path:
    """The file that writing `path` replaces: a symlink's target, so that the link stays a link."""
    return Path(os.path.realpath(path))


_batch: ContextVar[list[tuple[Path, Path, Path]] | None] = ContextVar("fvpatch_atomic_batch", default=None)


@contextmanager
def together():
    """Files written in the block are renamed into place only when the whole block succeeds, so that a command with
    several outputs leaves all of them or, on an error at the third, none: not the first two replaced."""
    batch: list[tuple[Path, Path, Path]] = []
    token = _batch.set(batch)
    try:
        yield
        for tmp, target, path in batch:
            _rename(tmp, target, path)
    finally:
        _batch.reset(token)
        for tmp, _, _ in batch:
            _discard(tmp)


@contextmanager
def replacing(path: str | Path):
    """A temporary path beside `path` for the block to write; renamed over `path` when the block succeeds (at the end
    of an enclosing `together()`), removed when it fails. A failure to write (full disk, no permission) is one line
    naming `path`. The temporary name is short whatever `path`'s is, so any name the filesystem takes can be written."""
    path = Path(path)
    target = _target(path)
    tmp = _temporary_name(target.parent)
    batch = _batch.get()
    handed_over = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if batch is None:
            _rename(tmp, target, path)
        else:
            batch.append((tmp, target, path))
            handed_over = True
    except FvpatchError:
        raise
    except OSError as e:
        raise FvpatchError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        if not handed_over:
            _discard(tmp)


def _rename(tmp: Path, target: Path, path: Path):
    try:
        os.replace(tmp, target)
    except OSError as e:
        raise FvpatchError(f"{path}: cannot write it ({e.strerror or e})") from None


def _discard(tmp: Path):
    with contextlib.suppress(OSError):  # cleaning up must never hide the error that stopped the write
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
    """A report as JSON at `path` and as Markdown beside it (.md), both or neither."""
    with together():
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
