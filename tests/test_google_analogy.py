"""The vendored Google analogy set reads whole, and its train/test split never leaks a trained word."""

from fvpatch import google_analogy as ga


def test_reads_all_questions():
    cats = ga.load()
    assert len(cats) == 14 and sum(map(len, cats.values())) == 19544
    assert cats["capital-common-countries"][0] == ga.Question("capital-common-countries", "Athens", "Greece", "Baghdad", "Iraq")


def test_split_keeps_trained_words_out_of_test():
    for name, qs in ga.load().items():
        n_train = min(20, len(ga.pairs(qs)) - 10)  # as train.report_google splits: 10 pairs left for the test
        train, valid, test = ga.split(qs, n_train, 3)
        seen = {w for p in train + valid for w in p}
        assert len(train) == n_train >= 13 and len(valid) == 3 and test, name
        assert all(not {q.a, q.b, q.c, q.d} & seen for q in test)


def test_choices():
    qs = ga.load()["family"]
    q = qs[0]
    opts = ga.choices(q, qs, 4)
    assert len(opts) == len(set(opts)) == 4 and q.d in opts and not {q.a, q.b, q.c} & set(opts)
    assert opts == ga.choices(q, qs, 4)
