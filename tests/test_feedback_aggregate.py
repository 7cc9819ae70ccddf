"""Label aggregation, annotator scoring and agreement.

    /work/venv/bin/pytest tests/test_feedback_aggregate.py -q
"""

import math

import numpy as np
import pytest

from alignkit.builtin import make_examples
from alignkit.feedback.agreement import agreement_report, krippendorff_alpha
from alignkit.feedback.aggregate import (aggregate_examples, annotator_accuracy, bradley_terry_scores, collect_items,
                                         dawid_skene, gold_accuracy, majority_vote)
from alignkit.schema import DataError, Example, Label


def pw(c, r, ann=None, golden=False, tie=False, strength=None, aspect=None):
    return Label(kind="pairwise", chosen=c, rejected=r, annotator=ann, golden=golden, tie=tie, strength=strength,
                 aspect=aspect)


# ----------------------------------------------------------------------------- Krippendorff's alpha


def test_alpha_hand_computed_nominal():
    # units [1,1], [2,2], [1,2]: coincidences o11 = 2, o22 = 2, o12 = o21 = 1 (a unit of 2 values adds 1/(2-1)
    # per ordered pair); n_1 = n_2 = 3, n = 6.
    # D_o = (o12 + o21) / n = 2/6;  D_e = (n_1 n_2 + n_2 n_1) / (n (n-1)) = 18/30;  alpha = 1 - (1/3)/(3/5) = 4/9
    assert krippendorff_alpha([[1, 1], [2, 2], [1, 2]], "nominal") == pytest.approx(4 / 9)


def test_alpha_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units with gaps:
    # published alpha = 0.743 (nominal) and 0.849 (interval).
    N = None
    rows = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
            [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]
    units = [[v for v in col if v is not None] for col in zip(*rows)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_alpha_perfect_and_undefined():
    assert krippendorff_alpha([[1, 1], [2, 2, 2], [3]], "nominal") == 1.0
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))  # no expected disagreement
    assert math.isnan(krippendorff_alpha([[1], [2]]))  # nothing pairable


def test_agreement_report_on_examples():
    exs = [Example("p", ["a", "b"], [pw(0, 1, "x"), pw(0, 1, "y")]),
           Example("q", ["a", "b"], [pw(1, 0, "x"), pw(1, 0, "y"), pw(0, 1, golden=True)]),
           Example("r", ["a", "b"], [pw(0, 1, "x"), pw(1, 0, "y")])]
    rep = agreement_report(exs)["pairwise/overall"]
    # units: [first, first], [second, second], [first, second] -> the hand-computed 4/9 above (golden left out)
    assert rep["alpha"] == pytest.approx(4 / 9, abs=1e-4)
    assert rep["units"] == 3 and rep["pairable_units"] == 3


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_computed():
    # A (0) beats B (1) 3 times out of 4: the MLE has sigmoid(s_A - s_B) = 3/4, so s_A - s_B = log 3.
    s = bradley_terry_scores(2, [(0, 1)] * 3 + [(1, 0)], l2=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-6)
    assert s.sum() == pytest.approx(0.0, abs=1e-9)
    # one win and two ties (half a win each side): 2 : 1 -> log 2
    s = bradley_terry_scores(2, [(0, 1)], ties=[(0, 1), (1, 0)], l2=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(2), abs=1e-6)
    # a chain A > B > C scores in that order; the L2 prior keeps the unbeaten item finite
    s = bradley_terry_scores(3, [(0, 1), (1, 2)], l2=0.1)
    assert s[0] > s[1] > s[2] and np.isfinite(s).all()


def test_bradley_terry_aggregation_of_a_ranking_and_votes():
    ex = Example("p", ["a", "b", "c"], [Label(kind="ranking", order=[2, 0, 1], annotator="x"),
                                        pw(2, 0, "y"), pw(0, 1, "y")])
    out = aggregate_examples([ex], method="bradley_terry")[0]
    pairs = {(lab.chosen, lab.rejected) for lab in out.labels}
    assert pairs == {(2, 0), (0, 1), (2, 1)}
    scores = out.meta["aggregation"]["scores"]["overall"]
    assert scores[2] > scores[0] > scores[1]
    assert all(lab.margin > 0 for lab in out.labels)


# ----------------------------------------------------------------------------- majority, Dawid-Skene, golden


def test_majority_vote_and_ties():
    exs = [Example("p", ["a", "b"], [pw(0, 1, "x", strength="better"), pw(0, 1, "y", strength="slightly_better"),
                                     pw(1, 0, "z"), pw(0, 1, "w", strength="better")]),
           Example("q", ["a", "b"], [pw(0, 1, "x"), pw(1, 0, "y")]),  # a draw
           Example("r", ["a", "b"], [pw(1, 0, "x"), pw(0, 1, "y", tie=True)])]  # a tie vote does not count
    post = majority_vote(collect_items(exs))
    assert post.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    out = aggregate_examples(exs, "majority")
    assert [(lab.chosen, lab.rejected, lab.tie) for ex in out for lab in ex.labels] == \
        [(0, 1, False), (0, 1, True), (1, 0, False)]
    assert out[0].labels[0].strength == "better"  # the most common strength among the agreeing votes
    assert out[0].meta["aggregation"]["items"][0]["votes"] == 4
    assert len(exs[0].labels) == 4  # input untouched


def test_annotator_accuracy_from_golden_items():
    exs = [Example("p", ["a", "b"], [pw(0, 1, "x"), pw(1, 0, "y"), pw(0, 1, golden=True)]),
           Example("q", ["a", "b"], [pw(1, 0, "x"), pw(0, 1, "y", tie=True), pw(1, 0, golden=True)]),
           Example("r", ["a", "b"], [pw(1, 0, "x"), pw(1, 0, "z")])]
    acc = annotator_accuracy(exs)
    assert acc["x"] == {"accuracy": 1.0, "golden_items": 2, "labels": 3}
    assert acc["y"]["accuracy"] == pytest.approx(0.25)  # wrong (0) + tie (0.5), over 2
    assert acc["z"] == {"accuracy": None, "golden_items": 0, "labels": 1}
    # golden items keep their golden label, never the vote
    out = aggregate_examples(exs[:1], "majority")
    assert [lab.golden for lab in out[0].labels] == [True]


def test_golden_filtering_needs_golden_items_for_every_annotator():
    exs = [Example("p", ["a", "b"], [pw(0, 1, "x"), pw(0, 1, golden=True)]),
           Example("r", ["a", "b"], [pw(1, 0, "x"), pw(1, 0, "newbie")])]
    with pytest.raises(DataError, match="annotator 'newbie': golden: labelled 0 golden item"):
        aggregate_examples(exs, "majority", drop_below=0.6)
    out = aggregate_examples(exs, "majority")  # without filtering it is fine
    assert len(out[1].labels) == 1


def test_dawid_skene_learns_who_to_trust():
    # Three annotators on 40 items whose truth alternates. "good1" and "good2" are always right on even items,
    # "bad" always wrong; on odd items good1 is right, good2 and bad wrong. Majority gets the odd items wrong
    # (1 vs 2); Dawid-Skene learns bad's confusion matrix (it flips the label) and recovers every item.
    # Without supervision "good1 right, bad wrong" and its mirror image fit equally well: the 4 golden
    # items (rows 0-3, left out of the accuracy) pick the right one.
    exs = []
    for n in range(40):
        truth = n % 2
        right, wrong = ((0, 1), (1, 0)) if truth == 0 else ((1, 0), (0, 1))
        if n % 4 < 2:
            labs = [pw(*right, "good1"), pw(*right, "good2"), pw(*wrong, "bad")]
        else:
            labs = [pw(*right, "good1"), pw(*wrong, "good2"), pw(*wrong, "bad")]
        if n < 4:
            labs.append(pw(*right, golden=True))
        exs.append(Example(f"p{n}", ["a", "b"], labs, meta={"gold": [1.0, 0.0] if truth == 0 else [0.0, 1.0]}))
    assert gold_accuracy(aggregate_examples(exs, "majority"))["accuracy"] == 0.5
    assert gold_accuracy(aggregate_examples(exs, "dawid_skene"))["accuracy"] == 1.0
    res = dawid_skene(collect_items(exs), 3)
    acc = res.annotator_accuracy()
    assert acc["good1"] > 0.95 and acc["bad"] < 0.05


def test_builtin_task_dawid_skene_beats_majority_and_golden_flags_the_spammer():
    exs = make_examples("pairs", 2000, seed=0)  # builtin defaults: 3 of the 4 annotators per item, 5% golden
    mv = gold_accuracy(aggregate_examples(exs, "majority"))
    ds = gold_accuracy(aggregate_examples(exs, "dawid_skene"))
    assert mv["pairs"] == ds["pairs"] > 1500
    # measured (seed 0, 2000 rows): majority 0.94, Dawid-Skene 0.97
    assert ds["accuracy"] > mv["accuracy"] + 0.01
    acc = annotator_accuracy(exs)
    assert acc["spammer"]["accuracy"] < 0.6 < min(a["accuracy"] for n, a in acc.items() if n != "spammer")
    assert aggregate_examples(exs[:400], "majority", drop_below=0.6) is not None
    from alignkit.feedback.aggregate import annotators_to_drop
    assert annotators_to_drop(exs, 0.6) == ["spammer"]


def test_binary_aggregation():
    exs = [Example("p", ["a"], [Label(kind="binary", answer=0, good=g, annotator=a)
                                for g, a in [(True, "x"), (True, "y"), (False, "z")]])]
    for method in ("majority", "dawid_skene"):
        (lab,) = aggregate_examples(exs, method)[0].labels
        assert lab.kind == "binary" and lab.good is True and lab.annotator == f"aggregate:{method}"


def test_mean_ratings():
    exs = [Example("p", ["a"], [Label(kind="rating", answer=0, value=v, annotator=a, aspect="helpfulness")
                                for v, a in [(4, "x"), (2, "y")]])]
    assert len(aggregate_examples(exs)[0].labels) == 2  # kept by default
    (lab,) = aggregate_examples(exs, ratings="mean")[0].labels
    assert lab.value == 3.0 and lab.aspect == "helpfulness"


def test_rating_agreement_is_interval_and_crowdkit_frame():
    exs = make_examples("ratings", 300, seed=0)
    rep = agreement_report(exs)
    assert rep["rating/helpfulness"]["level"] == "interval"
    # three of four annotators (one a spammer) per answer: agreement well above chance, below "reliable"
    assert 0.2 < rep["rating/helpfulness"]["alpha"] < 0.8
    pd = pytest.importorskip("pandas")
    from alignkit.feedback.aggregate import to_crowdkit_frame

    frame = to_crowdkit_frame([Example("p", ["a", "b"], [pw(1, 0, "x"), pw(0, 1, golden=True)], id="r1")])
    assert isinstance(frame, pd.DataFrame)
    assert frame.to_dict("records") == [{"worker": "x", "left": "r1/1", "right": "r1/0", "label": "r1/1"}]
