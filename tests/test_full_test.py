"""train.report_full_test: the first items must reproduce the earlier counts; the table is over the whole split."""

import pytest

from fvpatch.paired import compare
from train.report_full_test import check_first, markdown


def row(ffv, icl, first):
    return {"task": "a", "vector": "a.ffv.safetensors", "first": first, "ffv": ffv, "icl": icl}


def test_the_first_items_must_reproduce_the_earlier_counts():
    r = row([1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 0], compare([1, 1, 0, 1], [1, 0, 1, 1]))
    check_first(r)
    r["first"] = {**r["first"], "icl": 2}
    with pytest.raises(SystemExit, match="the first 4 items give FFV 3 / ICL 3"):
        check_first(r)


def test_compare_counts_the_items_only_one_gets():
    c = compare([1, 1, 0, 0, 1], [1, 0, 1, 0, 0])
    assert (c["n"], c["ffv"], c["icl"], c["only_ffv"], c["only_icl"]) == (5, 3, 2, 2, 1)
    with pytest.raises(ValueError, match="different items"):
        compare([1, 0], [1])


def test_table_is_over_the_whole_split_next_to_the_first_items():
    md = markdown("m", [row([1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 0], compare([1, 1, 0, 1], [1, 0, 1, 1]))], "cmd")
    assert "| a | a.ffv.safetensors | 3 / 3 of 4 | 6 | 66.7% | 66.7% | yes | 2 / 2 | 1.00 | +0.0 (-52.6 to +52.6) |" in md
    assert "FFV ≥ ICL on the whole test split on 1 of 1 tasks." in md


def test_the_vector_is_the_positions_choice_or_else_the_shipped_last_token_ffv(tmp_path):
    import json

    from train.report_full_test import shipped_choice

    bank = tmp_path / "vectors"
    report = {"core": [{"task": "a", "n_test": 100, "acc": {"llamacpp": {"ffv": 0.39, "icl_10shot": 0.04}}}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert shipped_choice(tmp_path, bank, "a") == (bank / "a.ffv.safetensors", {"n": 100, "ffv": 39, "icl": 4})
    with pytest.raises(SystemExit, match="not in the FFV report"):
        shipped_choice(tmp_path, bank, "b")
    paired = compare([1, 0, 1], [1, 1, 1])
    (tmp_path / "positions_choice.json").write_text(json.dumps([{"task": "a", "chosen": "every token", "paired": paired}]))
    assert shipped_choice(tmp_path, bank, "a") == (bank / "a.ffv-all.safetensors", paired)
    assert shipped_choice(tmp_path, bank, "a", last_token=True) == (bank / "a.ffv.safetensors", {"n": 100, "ffv": 39, "icl": 4})
    (tmp_path / "tasks").mkdir()  # a report written per task wins over report.json
    (tmp_path / "tasks" / "a.json").write_text(json.dumps({"task": "a", "n_test": 50, "acc": {"llamacpp": {"ffv": 0.5, "icl_10shot": 0.6}}}))
    assert shipped_choice(tmp_path, bank, "a", last_token=True)[1] == {"n": 50, "ffv": 25, "icl": 30}


def test_difference_interval_is_newcombes_paired_score_interval():
    from fvpatch.paired import difference_interval

    # the paired 2x2 example of Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, ch. 8:
    # 59 both, 6 only the first, 16 only the second, 80 neither -> -0.0621 (95% CI -0.1186 to -0.0046)
    lo, hi = difference_interval(59, 6, 16, 80)
    assert abs(lo + 0.1186) < 5e-5 and abs(hi + 0.0046) < 5e-5
    lo, hi = difference_interval(10, 0, 0, 0)  # no item where the two disagree: the interval holds 0
    assert -1 <= lo <= 0 <= hi <= 1
    assert compare([1, 1, 0], [1, 0, 0])["ci"] == list(difference_interval(1, 1, 0, 1))


def test_draws_table_compares_the_ffv_with_the_mean_of_complete_draws_only():
    r = row([1, 1, 0, 1], [1, 0, 0, 1], compare([1, 1], [1, 0]))
    draws = {"a": {"task": "a", "icl": {"1": [1, 1, 1, 1], "2": [1, 1, 1, 0], "3": [1, 1]}}}  # seed 3 is unfinished
    md = markdown("m", [r], "cmd", draws=draws)
    # ICL by seed 50 / 100 / 75 -> mean 75.0; per item FFV minus the fraction of draws right: 0, 1/3, -2/3, 1/3
    # (sd 0.471 -> half-width 1.96 * 0.471 / 2)
    assert "| a | 4 | 75.0% | 50.0 / 100.0 / 75.0 | 75.0% | yes | yes | +0.0 (-46.2 to +46.2) |" in md
    assert "FFV ≥ the mean of ICL's draws on 1 of 1 tasks." in md
    assert "ICL's draws" not in markdown("m", [r], "cmd")
