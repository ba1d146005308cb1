"""The hook for human relational similarity (train.report_relsim): reading rated sets, Spearman, the report."""

import json

import numpy as np
import pytest

from fvpatch.bank import Bank, save_bank
from train.report_relsim import main, ranks, read_relations, spearman

RELATIONS = ["antonym", "capitalize", "country-capital"]


def test_spearman_with_ties_is_pearson_of_mean_ranks():
    np.testing.assert_array_equal(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


@pytest.mark.parametrize("line, message", [
    ('{"relation": "x", "prototypes": [["a", "b"]]}', "not a rated relation"),
    ('{"relation": "x", "prototypes": [], "pairs": [["a", "b", 1], ["c", "d", 2], ["e", "f", 3]]}', "at least one prototype"),
    ('{"relation": "x", "prototypes": [["a", "b"]], "pairs": [["a", "b", 1], ["c", "d", "NaN"], ["e", "f", 3]]}', "finite"),
    ("not json", "not a rated relation"),
])
def test_bad_rated_sets_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_relations(path)
    assert "\n" not in str(err.value)


def test_report_on_the_tiny_model(tmp_path, tiny_gguf, tiny_session, capsys):
    vectors = np.random.default_rng(0).standard_normal((len(RELATIONS), tiny_session.n_embd)).astype(np.float32) * 2
    bank = save_bank(Bank(RELATIONS, vectors, "l_out-1", tiny_session.fingerprint()), tmp_path / "bank.safetensors")
    data = tmp_path / "rated.jsonl"
    rows = [{"relation": "opposites", "prototypes": [["hot", "cold"], ["up", "down"]], "pairs": [["big", "small", 40.0], ["wet", "dry", 30.0], ["cat", "dog", -10.0], ["in", "out", 20.0]]},
            {"relation": "capitals", "prototypes": [["France", "Paris"]], "pairs": [["Peru", "Lima", 50.0], ["Cuba", "Havana", 45.0], ["cat", "tree", -30.0]]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "relsim.json"
    args = ["--data", str(data), "--model", str(tiny_gguf), "--bank", str(bank), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert list(report["relations"]) == ["opposites", "capitals"] and report["bank"] == RELATIONS
    for r in report["relations"].values():
        assert -1 <= r["rho"] <= 1 and len(r["model"]) == r["n"]
    assert "| opposites | 4 |" in out.with_suffix(".md").read_text()
    assert main(args) == 1 and "exists" in capsys.readouterr().err  # nothing overwritten without --force
