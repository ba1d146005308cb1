"""train.report_ffv_positions chooses on valid pairs only: the shipped last-token config against the every-token runs."""

import pytest

from train.ffv import Config
from fvpatch.paired import sign_test
from train.report_ffv_positions import choose, markdown, same_choice, wins


def run(task, positions, layer, init, lr, top1, loss, steps=60, **kw):
    return {"task": task, "positions": positions, "layer": layer, "init": init, "lr": lr, "steps": steps, "every_answer_token": False,
            "valid_top1": top1, "valid_loss": loss, **kw}


RUNS = [run("a", "last", 16, "taskvec", 0.05, 0.60, 1.5), run("a", "last", 16, "taskvec", 0.1, 0.70, 1.4),  # another lr: not a candidate
        run("a", "all", 16, "zeros", 0.02, 0.62, 1.3), run("a", "all", 12, "zeros", 0.02, 0.64, 1.27), run("a", "all", 8, "zeros", 0.02, 0.64, 1.32),
        run("a", "last", 16, "taskvec", 0.05, 0.9, 0.1, targets="icl"),  # other targets: not a candidate
        run("b", "last", 16, "taskvec", 0.05, 1.0, 0.02), run("b", "all", 8, "zeros", 0.02, 1.0, 0.29),
        run("c", "last", 16, "taskvec", 0.05, 0.66, 1.5), run("c", "last", 16, "taskvec", 0.05, 0.9, 0.5, steps=150),  # last token: 60 steps only
        run("c", "all", 8, "zeros", 0.02, 0.70, 1.33), run("c", "all", 6, "zeros", 0.02, 0.72, 1.30, steps=150)]


def test_choice_is_the_best_valid_top1_then_the_lower_valid_loss():
    last = Config(layer=16)
    shipped, every = choose(RUNS, "a", last)
    assert (shipped["lr"], shipped["valid_top1"]) == (0.05, 0.60) and every["layer"] == 12 and wins(shipped, every)
    shipped, every = choose(RUNS, "b", last)
    assert every["layer"] == 8 and not wins(shipped, every)  # a tie on top-1 goes to the lower loss: the last token
    shipped, every = choose(RUNS, "c", last)
    assert (shipped["steps"], every["layer"], every["steps"]) == (60, 6, 150)  # every-token runs of any step budget compete
    with pytest.raises(SystemExit, match="no run of the shipped config"):
        choose(RUNS, "d", last)


def test_table_compares_with_both_icl_numbers():
    shipped, every = choose(RUNS, "a", Config(layer=16))
    md = markdown("m", [{"task": "a", "last": shipped, "every": every, "chosen": "every token", "test": 0.63, "icl": 0.59, "icl_mean": 0.64}], "cmd")
    assert "| a | 60% (1.50; 16) | 64% (1.27; 12, 60 steps) | every token | 63% | 59% | 64.0% | yes | no | - | - |" in md
    assert "≥ ICL (seed 0) on 1 of 1 tasks" in md
    paired = {"n": 100, "ffv": 63, "icl": 59, "only_ffv": 6, "only_icl": 2, "p": sign_test(6, 2)}
    md = markdown("m", [{"task": "a", "last": shipped, "every": every, "chosen": "every token", "test": 0.63, "icl": 0.59, "icl_mean": 0.64,
                         "paired": paired}], "cmd")
    assert "| yes | no | 6 / 2 | 0.29 |" in md


def test_a_written_result_stands_only_while_the_choice_does():
    shipped, every = choose(RUNS, "a", Config(layer=16))
    row = {"task": "a", "last": shipped, "every": every}
    assert same_choice(row, shipped, every)
    better = run("a", "all", 8, "zeros", 0.02, 0.66, 1.27, steps=150)  # a longer run added to the sweep since
    assert not same_choice(row, *choose(RUNS + [better], "a", Config(layer=16)))
    assert same_choice({"task": "b", "last": choose(RUNS, "b", Config(layer=16))[0], "every": None}, choose(RUNS, "b", Config(layer=16))[0], None)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(0, 5) == sign_test(5, 0) == 2 / 32  # both one-sided tails of 5 fair coins
    assert abs(sign_test(1, 4) - 2 * 6 / 32) < 1e-12
    assert abs(sign_test(2, 10) - 2 * (1 + 12 + 66) / 4096) < 1e-12
