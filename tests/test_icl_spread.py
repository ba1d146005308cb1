"""train.report_icl_spread's bookkeeping: processes on disjoint tasks share one file; the table counts honestly."""

import json

from train.report_icl_spread import markdown, save


def test_disjoint_processes_merge_and_the_table_counts(tmp_path):
    out = tmp_path / "icl_spread.json"
    save(out, {"task": "antonym", "n": 10, "icl": {"0": 0.6, "1": 0.7}, "ffv": 0.65})
    save(out, {"task": "capitalize", "n": 10, "icl": {"0": 0.9}, "ffv": 0.9})  # one seed short: not in the table
    save(out, {"task": "country-capital", "n": 10, "icl": {"0": 0.8, "1": 0.9}, "ffv": 0.9})
    rows = json.loads(out.read_text())
    assert set(rows) == {"antonym", "capitalize", "country-capital"}
    md = markdown("m", rows, 2, "cmd")
    assert "| antonym | 10 | 65% | 60% | 60% – 70% | 65.0% | yes | yes |" in md and "capitalize" not in md
    assert "on 2 of 2 tasks; ≥ the worst draw on 2 of 2." in md
