"""Reward-model diagnostics before PPO (rm_eval): calibration, accuracy by gold gap and in the top decile,
score range and the best-of-N curve, with the arithmetic spelled out."""

import math

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.rm_eval import accuracy_by_gold_gap, best_of_n, calibration, score_range


def test_calibration_hand_computed():
    # margins 0 and ln 3: P(winner) = 0.5 and 0.75. Both orders: (0.5, 1), (0.75, 1), (0.5, 0), (0.25, 0).
    # 10 bins: 0.25 -> bin 2 (observed 0); 0.5 -> bin 5 twice (observed 1/2); 0.75 -> bin 7 (observed 1).
    # ECE = 1/4 |0.25 - 0| + 2/4 |0.5 - 0.5| + 1/4 |0.75 - 1| = 0.0625 + 0 + 0.0625 = 0.125
    cal = calibration(torch.tensor([0.0, math.log(3.0)]))
    assert [(b["predicted"], b["observed"], b["count"]) for b in cal["bins"]] == \
        [pytest.approx((0.25, 0.0, 1)), pytest.approx((0.5, 0.5, 2)), pytest.approx((0.75, 1.0, 1))]
    assert cal["ece"] == pytest.approx(0.125)


def test_accuracy_by_gold_gap_hand_computed():
    # One prompt, 4 answers: gold [0, 0.4, 2, 3], scores [0, 1, 5, 5].
    # Pairs (gap, right?): (0,1) 0.4 yes; (0,2) 2 yes; (0,3) 3 yes; (1,2) 1.6 yes; (1,3) 2.6 yes;
    # (2,3) 1.0: equal score -> wrong.
    # Buckets: (0,0.5]: 1/1; (0.5,1]: 0/1; (1,2]: (0,2),(1,2) 2/2; (2,inf]: (0,3),(1,3) 2/2.
    # Top decile: k = max(2, ceil(0.1 * 4)) = 2 answers {2, 3}: pair (2,3) wrong -> 0/1.
    out = accuracy_by_gold_gap(torch.tensor([[0.0, 0.4, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 5.0, 5.0]]))
    assert out["(0, 0.5]"] == {"accuracy": 1.0, "pairs": 1}
    assert out["(0.5, 1]"] == {"accuracy": 0.0, "pairs": 1}
    assert out["(1, 2]"] == {"accuracy": 1.0, "pairs": 2}
    assert out["(2, inf]"] == {"accuracy": 1.0, "pairs": 2}
    assert out["top_decile"] == {"accuracy": 0.0, "pairs": 1}


def test_best_of_n_hand_computed():
    # One prompt, 4 samples: gold [1, 0, 3, 2], score [0.5, 2, 1, 0].
    # N=1: mean gold 1.5, mean score 0.875, oracle 1.5.
    # N=2: groups (1,0 | s .5,2) -> picks gold 0, score 2; (3,2 | s 1,0) -> gold 3, score 1:
    #      gold 1.5, score 1.5, oracle (1 + 3) / 2 = 2.
    # N=4: RM picks score 2 -> gold 0 (over-optimised), oracle 3. KL(N=4) = ln 4 - 3/4.
    rows = best_of_n(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), torch.tensor([[0.5, 2.0, 1.0, 0.0]]), [1, 2, 4])
    assert [(r["gold"], r["score"], r["oracle_gold"]) for r in rows] == \
        [pytest.approx((1.5, 0.875, 1.5)), pytest.approx((1.5, 1.5, 2.0)), pytest.approx((0.0, 2.0, 3.0))]
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] == pytest.approx(math.log(4) - 0.75)


def test_best_of_n_larger_than_the_samples_is_an_error():
    with pytest.raises(ConfigError, match="N=8 is larger than the 4 samples per prompt"):
        best_of_n(torch.zeros(2, 4), torch.zeros(2, 4), [1, 2, 4, 8])


def test_score_range():
    r = score_range(torch.arange(101.0))  # 0..100: percentiles are the values themselves
    assert (r["min"], r["p1"], r["p10"], r["p50"], r["p90"], r["p99"], r["max"]) == (0, 1, 10, 50, 90, 99, 100)
