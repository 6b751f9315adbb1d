"""The group oracle and the best constant confidence, against hand-computed numbers."""

from __future__ import annotations

import pytest

from radialog_rl.calibration.baselines import (
    best_constant_confidence,
    group_accuracies,
    oracle_confidences,
    oracle_report,
)
from radialog_rl.errors import DataError

# Two findings; "none" marks negatives, which form their own group per finding.
ROWS = [
    {"finding": "opacity", "visibility_group": "0.15"},  # 0: wrong
    {"finding": "opacity", "visibility_group": "0.15"},  # 1: right
    {"finding": "opacity", "visibility_group": "1.00"},  # 2: right
    {"finding": "opacity", "visibility_group": "1.00"},  # 3: right
    {"finding": "opacity", "visibility_group": "none"},  # 4: right
    {"finding": "effusion", "visibility_group": "none"},  # 5: wrong
    {"finding": "effusion", "visibility_group": "0.15"},  # 6: wrong
    {"finding": "opacity", "visibility_group": "1.00"},  # 7: wrong
]
CORRECT = [False, True, True, True, True, False, False, False]


def test_group_accuracies_by_finding_and_visibility():
    assert group_accuracies(ROWS, CORRECT) == {
        ("opacity", "0.15"): 0.5,
        ("opacity", "1.00"): 2 / 3,
        ("opacity", "none"): 1.0,
        ("effusion", "none"): 0.0,
        ("effusion", "0.15"): 0.0,
    }


def test_oracle_confidences_are_the_row_groups_accuracy():
    assert oracle_confidences(ROWS, CORRECT) == pytest.approx(
        [0.5, 0.5, 2 / 3, 2 / 3, 1.0, 0.0, 0.0, 2 / 3])
    # Any field can be the group key; rows without "finding" group by the key alone.
    rows = [{"g": 1}, {"g": 1}, {"g": 2}]
    assert oracle_confidences(rows, [True, False, True], group_key="g") == [0.5, 0.5, 1.0]


def test_oracle_report_hand_computed():
    report = oracle_report(ROWS, CORRECT, scale=10)
    # Brier: rows 0,1: (0.5-y)^2 = 0.25 each; rows 2,3,7: (2/3-1)^2, (2/3-1)^2, (2/3)^2
    # = 1/9 + 1/9 + 4/9 = 6/9; rows 4,5,6: 0. Total (0.5 + 2/3) / 8.
    assert report.brier == pytest.approx((0.5 + 2 / 3) / 8)
    # AUROC: correct rows {1: .5, 2: 2/3, 3: 2/3, 4: 1} vs wrong {0: .5, 5: 0, 6: 0, 7: 2/3}.
    # Pairs (16): row 1 beats 5, 6, ties 0 -> 2.5; rows 2, 3 beat 0, 5, 6, tie 7 -> 3.5 each;
    # row 4 beats all 4 -> 4. (2.5 + 3.5 + 3.5 + 4) / 16.
    assert report.auroc == pytest.approx(13.5 / 16)
    # Bins (nearest tenth): 5 -> {0, 1} acc 0.5 vs 0.5; 6.67 -> bin 7: acc 2/3 vs 0.7;
    # 10 -> acc 1 vs 1; 0 -> acc 0 vs 0. ECE = 3/8 * |2/3 - 0.7|.
    assert report.ece == pytest.approx(3 / 8 * (0.7 - 2 / 3))


def test_best_constant_hand_computed():
    # Accuracy 7/11 = 0.636: nearest grid value 0.6. Brier = 0.36 - 2*0.6*7/11 + 7/11.
    base = best_constant_confidence([True] * 7 + [False] * 4, scale=10)
    assert base.confidence == 6
    assert base.brier == pytest.approx(0.36 - 1.2 * 7 / 11 + 7 / 11)
    assert base.ece == pytest.approx(7 / 11 - 0.6)
    assert base.report.auroc == 0.5  # one value everywhere cannot discriminate
    # 0.6 exactly: on the grid, perfectly calibrated.
    exact = best_constant_confidence([True, True, True, False, False])
    assert (exact.confidence, exact.brier, exact.ece) == (6, pytest.approx(0.24), pytest.approx(0))


def test_best_constant_tie_goes_to_the_lower_confidence_and_granular_scale():
    # Accuracy 0.75 lies between 0.7 and 0.8: Brier 0.19 for both; the lower is chosen.
    tie = best_constant_confidence([True, True, True, False])
    assert tie.confidence == 7 and tie.brier == pytest.approx(0.19)
    assert best_constant_confidence([True, True, True, False], scale=100).confidence == 75
    assert best_constant_confidence([False, False]).confidence == 0


def test_bad_inputs():
    with pytest.raises(DataError, match="correct\\[1\\] is None"):
        oracle_confidences(ROWS[:2], [True, None])
    with pytest.raises(DataError, match="2 rows but 1 correctness"):
        oracle_confidences(ROWS[:2], [True])
    with pytest.raises(DataError, match="row 0 has no 'visibility' field"):
        oracle_confidences(ROWS[:1], [True], group_key="visibility")
    with pytest.raises(DataError, match="no rows"):
        best_constant_confidence([])
