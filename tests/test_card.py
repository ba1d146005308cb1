"""`fvpatch vectors pack`: a folder to share (vector files, control vectors where a vector can be one, a card
whose commands name the files written beside it)."""

from click.testing import CliRunner

from fvpatch import controlvector, vectorfile
from fvpatch.cli import main
from fvpatch.shipped import vector_path


def test_pack_writes_what_its_card_names(tmp_path):
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all", "gemma-3-270m/antonym.taskvec"])
    assert r.exit_code == 0, r.output
    assert "no control vector for antonym.taskvec.safetensors" in r.stderr  # a replace-mode vector cannot be one
    pack = tmp_path / "pack"
    assert sorted(p.name for p in pack.iterdir()) == ["README.md", "antonym.taskvec.safetensors", "present-past.ffv-all.gguf",
                                                      "present-past.ffv-all.safetensors"]
    card = (pack / "README.md").read_text()
    assert "llama-completion -m gemma-3-270m-q4_k_m.gguf --control-vector present-past.ffv-all.gguf -p $'Q: " in card
    assert "--vector present-past.ffv-all.safetensors" in card and "--vector antonym.taskvec.safetensors" in card
    original = vectorfile.load(vector_path("gemma-3-270m/present-past.ffv-all"))
    assert controlvector.load(pack / "present-past.ffv-all.gguf").directions[original.layer].tolist() == original.rows[0].tolist()


def test_pack_refuses_an_existing_folder(tmp_path):
    (tmp_path / "pack").mkdir()
    r = CliRunner().invoke(main, ["vectors", "pack", str(tmp_path / "pack"), "gemma-3-270m/present-past.ffv-all"])
    assert r.exit_code != 0 and "exists; pass --force" in r.output and not any((tmp_path / "pack").iterdir())
