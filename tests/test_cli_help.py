"""Every command's --help works and teaches with an example."""

import click
import pytest
from click.testing import CliRunner

from fvpatch.cli import main


def command_paths(group: click.Group, ctx: click.Context, prefix=()):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, click.Context(cmd, info_name=name, parent=ctx), (*prefix, name))


PATHS = list(command_paths(main, click.Context(main, info_name="fvpatch")))


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_help(path):
    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0, r.output
    cmd = main
    for name in path:
        cmd = cmd.get_command(None, name)
    if not isinstance(cmd, click.Group):
        assert "Example" in r.output, f"`fvpatch {' '.join(path)} --help` shows no example"


def test_every_command_that_decodes_in_llama_cpp_can_offload():
    """A Metal or CUDA user can offload layers wherever llama.cpp runs the model, eval included."""
    decoding = {("generate",), ("save",), ("patch",), ("lens",), ("decode",), ("sweep",), ("reversal",), ("analogy",), ("serve",),
                ("tensors",), ("eval", "task"), ("eval", "sweep"), ("eval", "analogy")}  # tokenize reads only the vocabulary
    for path in decoding:
        r = CliRunner().invoke(main, [*path, "--help"])
        assert "--n-gpu-layers" in r.output, f"`fvpatch {' '.join(path)}` cannot offload layers"
