"""The wheel, installed in a fresh venv and used from another directory, lists and applies the shipped vectors.

Offline: the wheel is built without build isolation, and the venv borrows this venv's dependencies through a
.pth line (a path added that way has its own .pth files skipped, so the editable install's finder stays out).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fvpatch", "train", "vectors")  # what the build reads


def _run(cmd, cwd, env=None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the built wheel, plus this venv's site-packages for the dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("fvpatch-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the install: pip sees no other fvpatch
    return venv


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FVPATCH_MODELS")}
    return env | extra


@pytest.mark.slow
def test_installed_wheel_lists_and_applies_the_shipped_vectors(installed, gemma_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = json.loads(_run([installed / "bin" / "python", "-c", "import json, fvpatch, fvpatch.models as m, fvpatch.shipped as s; "
                             "print(json.dumps([fvpatch.__file__, str(s.VECTORS_DIR), str(m.models_dir())]))"], elsewhere, _env()))
    assert all(Path(p).is_relative_to(installed) for p in where[:2]), where  # the wheel's package, not the checkout's
    assert where[2] == str(Path.home() / ".cache" / "fvpatch" / "models")  # models go to a user cache, not site-packages

    fvpatch = [installed / "bin" / "fvpatch"]
    env = _env(FVPATCH_MODELS=str(gemma_path.parent))  # the checkout's models: nothing is downloaded
    listed = json.loads(_run(fvpatch + ["vectors", "list", "--json"], elsewhere, env))["vectors"]
    shipped = sorted(p.relative_to(ROOT / "vectors").as_posix() for p in ROOT.glob("vectors/**/*.safetensors"))
    assert sorted(f"{v['model']}/{v['name']}.safetensors" for v in listed) == shipped
    assert all(Path(v["path"]).is_relative_to(installed) for v in listed)

    out = json.loads(_run(fvpatch + ["patch", "-p", "Q: walk\nA:", "--vector", "present-past.fv", "-n", "3", "--json"], elsewhere, env))
    assert out["completion"].startswith(" walked")
    out = json.loads(_run(fvpatch + ["analogy", "hot:cold::tall:?", "--json"], elsewhere, env))
    assert out["answer"] == "short" and out["weights"][0]["relation"] == "antonym"
