"""The depth report's table: one row per layer, a task's `last / all / query` cell, means only over complete rows."""

from train.report_ffv_depth import markdown


def test_table_rows_and_means():
    runs = {f"{t}@{layer}": {"task": t, "layer": layer, "n": 50, "last": last, "all": every, "query": query, "norm_ratio": 0.5}
            for t, layer, last, every, query in [("antonym", 4, 0.4, 0.0, 0.1), ("capitalize", 4, 0.9, 0.1, 0.2), ("antonym", 12, 0.2, 0.2, 0.2)]}
    md = markdown({"model": "m", "n_test": 50, "command": "cmd", "runs": runs})
    assert "| layer | antonym | capitalize | mean last / all / query | mean norm |" in md
    assert "| 4 | 40 / 0 / 10 | 90 / 10 / 20 | 65.0 / 5.0 / 15.0 | 0.50 |" in md
    assert "| 12 | 20 / 20 / 20 | – | – | – |" in md  # capitalize has no run at layer 12: no mean


def test_query_positions_are_the_querys_own_tokens(gemma):
    from fvpatch.prompts import template
    from train.report_ffv_depth import query_positions

    tokens = gemma.tokenize("Q: hot air balloon\nA:")
    positions = query_positions(gemma, template("qa"), tokens)
    assert gemma.detokenize([tokens[p] for p in positions]) == " hot air balloon"
