"""Writing outputs: through a symlink to its target, any name the filesystem takes, and several outputs of one command
all or none. (Outputs that are refused, a FIFO or a name too long among them, are cases of tests/test_bad_input.py.)"""

import os

import pytest
from click.testing import CliRunner

from fvpatch import vectorfile
from fvpatch.atomic import together, write_text
from fvpatch.cli import main
from fvpatch.errors import FvpatchError

PROMPT = "Q: hot\nA:"


def save(model, *outputs: str, force: bool = True):
    args = ["save", "-m", str(model), "-p", PROMPT, "-n", "1", "--token-idx", "-1"]
    for i, out in enumerate(outputs):
        args += ["--save", f"l_out-{i + 1}", str(out)]
    return CliRunner().invoke(main, args + (["--force"] if force else []))


def test_a_symlink_is_written_through(tiny_gguf, tmp_path):
    """--force replaces the link's target and keeps the link, as a shell's `>` would."""
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"an earlier result")
    (tmp_path / "link").symlink_to(target.name)
    r = save(tiny_gguf, tmp_path / "link")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == target.name
    assert vectorfile.load(target).tensor == "l_out-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target.safetensors"]  # no temporary file left


def test_a_symlink_is_refused_without_force(tiny_gguf, tmp_path):
    (tmp_path / "target").write_bytes(b"an earlier result")
    (tmp_path / "link").symlink_to("target")
    r = save(tiny_gguf, tmp_path / "link", force=False)
    assert r.exit_code == 1 and "exists; pass --force" in r.stderr
    assert (tmp_path / "target").read_bytes() == b"an earlier result"


def test_the_longest_name_the_filesystem_takes_is_written(tiny_gguf, tmp_path):
    """The temporary name does not grow with the output's, so a 255-byte name is written like any other."""
    longest = "v" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".safetensors")) + ".safetensors"
    r = save(tiny_gguf, tmp_path / "keep.safetensors", tmp_path / longest)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep.safetensors", longest])


def test_together_renames_all_or_none(tmp_path):
    """An error after the first of two outputs is written leaves the first one as it was."""
    (tmp_path / "a").write_text("old a")
    with pytest.raises(FvpatchError, match="the second failed"):
        with together():
            write_text(tmp_path / "a", "new a")
            assert (tmp_path / "a").read_text() == "old a"  # written to a temporary file, not yet in place
            raise FvpatchError("the second failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (tmp_path / "a").read_text() == "old a"
    with together():
        write_text(tmp_path / "a", "new a")
        write_text(tmp_path / "b", "new b")
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
