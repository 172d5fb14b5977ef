import pytest

from qlora_kit.metrics import INVALID, classification_metrics, parse_label, rouge_scores

LABELS = ["comp.graphics", "comp.sys.mac.hardware", "comp.sys.ibm.pc.hardware", "sci.space", "sci.med"]


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("sci.space", "sci.space"),
        ("  Sci.Space \nmore text", "sci.space"),
        (" sci.space.", "sci.space"),
        ("comp.graph", "comp.graphics"),  # cut off: a prefix of exactly one label
        ("comp.sys", None),  # a prefix of two labels: ambiguous
        ("sci.space is the answer", "sci.space"),  # the label, then other words
        ("sci.spaceship", None),  # a longer word is not the label
        ("", None),
        ("\n\n", None),
        ("talk.politics", None),
    ],
)
def test_parse_label(generated, expected):
    assert parse_label(generated, LABELS) == expected


def test_classification_metrics_by_hand():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", None, "c"]
    m = classification_metrics(refs, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    # a: P=1/1 R=1/2 F=2/3 ; b: P=1/2 R=1/2 F=1/2 ; c: P=1 R=1 F=1
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["micro_precision"] == pytest.approx(3 / 4)
    assert m["micro_recall"] == pytest.approx(3 / 5)
    assert m["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["invalid"] == 1 and m["invalid_rate"] == pytest.approx(0.2)
    assert m["confusion_matrix"]["b"] == {"b": 1, INVALID: 1}


def test_micro_f1_equals_accuracy_without_invalid():
    refs, preds = ["a", "b", "b", "a"], ["a", "a", "b", "b"]
    m = classification_metrics(refs, preds, ["a", "b"])
    assert m["micro_f1"] == pytest.approx(m["accuracy"]) == pytest.approx(0.5)


def test_rouge_matches_rouge_score_package():
    from rouge_score import rouge_scorer

    refs = ["Anna is going to the park at 5 pm.", "Ben bought milk.\nHe will be late."]
    preds = ["Anna goes to the park at five.", "Ben buys milk and is late."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {
        k: 100 * sum(scorer.score(r, p)[k].fmeasure for r, p in zip(refs, preds)) / 2
        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    got = rouge_scores(refs, preds)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
    assert rouge_scores(["the cat sat"], ["the cat sat"])["rouge1"] == pytest.approx(100.0)
    assert 0 < got["rouge1"] < 100


def test_rouge_lsum_scores_sentences_on_their_own_lines():
    from qlora_kit.metrics import split_sentences

    assert (
        split_sentences("Anna is late. She'll call Ben at 5 pm! OK?") == "Anna is late.\nShe'll call Ben at 5 pm!\nOK?"
    )
    assert split_sentences("He paid 3.50 for it. e.g. tea") == "He paid 3.50 for it. e.g. tea"  # no capital: one
    refs = ["Anna is late. Ben will wait for her."]
    preds = ["Ben will wait for her. Anna is late."]
    scores = rouge_scores(refs, preds)
    assert scores["rougeLsum"] > scores["rougeL"]  # sentence-level LCS finds both sentences, the flat one only one
    assert "sentences split" in scores["rougeLsum_split"]


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_n():
    from qlora_kit.metrics import BOOTSTRAP, classification_intervals, rouge_intervals

    labels = ["a", "b", "c"]
    refs = (["a", "b", "c"] * 40)[:100]
    preds = [r if i % 4 else ("b" if r == "a" else None) for i, r in enumerate(refs)]
    m = classification_metrics(refs, preds, labels)
    ci = classification_intervals(refs, preds, labels)
    for key in ("accuracy", "macro_f1", "micro_f1", "invalid_rate"):
        low, high = ci[key]
        assert low <= m[key] <= high and high - low > 0
    assert ci == classification_intervals(refs, preds, labels)  # fixed seed: the same interval every time
    wide = classification_intervals(refs[:20], preds[:20], labels)["accuracy"]
    assert wide[1] - wide[0] > ci["accuracy"][1] - ci["accuracy"][0]
    assert BOOTSTRAP["resamples"] >= 1000 and BOOTSTRAP["level"] == 0.95
    rouge = rouge_intervals({"rouge1": [10.0, 50.0] * 30})["rouge1"]
    assert rouge[0] < 30.0 < rouge[1]


def test_paired_difference_and_mcnemar():
    from qlora_kit.metrics import mcnemar, paired_difference

    a = [1, 0, 1, 0, 1, 1, 0, 0, 1, 0] * 10
    b = [1, 1, 1, 0, 1, 1, 1, 0, 1, 1] * 10
    result = paired_difference(a, b)
    assert result["difference"] == pytest.approx(0.3) and result["ci"][0] > 0 and result["n"] == 100
    test = mcnemar([bool(x) for x in a], [bool(x) for x in b])
    assert (test["only_a_right"], test["only_b_right"]) == (0, 30) and test["p_value"] < 1e-6
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1, 0], [1])


def test_paired_differences_score_two_ways_answers_against_the_same_references():
    from qlora_kit.compare import paired_differences

    labels = paired_differences(["a", "b", "c", "d"], ["a", "x", None, "d"], ["a", "b", "c", None], True)
    assert labels["differences"]["accuracy"]["difference"] == 0.25  # B right on 3 of 4, A on 2
    assert labels["mcnemar"]["only_a_right"] == 1 and labels["mcnemar"]["only_b_right"] == 2
    references = ["the cat sat on the mat", "a dog ran"]
    same = paired_differences(references, ["the cat sat", "a dog"], ["the cat sat", "a dog"], False)
    assert set(same["differences"]) == {"rouge1", "rouge2", "rougeL"} and "mcnemar" not in same
    assert all(diff["difference"] == 0 for diff in same["differences"].values())
    better = paired_differences(references, ["the cat", None], ["the cat sat on the mat", "a dog ran"], False)
    assert better["differences"]["rouge1"]["difference"] > 0 and better["differences"]["rouge1"]["n"] == 2
