"""Bootstrap intervals of AUROC (calibration/intervals.py) on cases whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from radialog_rl.calibration.intervals import auroc_interval
from radialog_rl.calibration.metrics import auroc


def test_a_perfect_ranking_has_the_point_interval_at_one():
    # Right and wrong answers are resampled separately, so every resample ranks all right ones above
    # all wrong ones: AUROC 1.
    assert auroc_interval([1, 2, 8, 9, 9, 10], [False, False, True, True, True, True]) == (1.0, 1.0)


def test_one_value_for_every_row_is_chance_in_every_resample():
    assert auroc_interval([7] * 10, [True] * 8 + [False] * 2) == (0.5, 0.5)


def test_rows_without_a_statement_are_left_out_and_one_class_gives_none():
    # Without the None row only right answers remain: no AUROC to resample.
    assert auroc_interval([9, 9, None], [True, True, False]) is None
    assert auroc_interval([], []) is None
    with pytest.raises(ValueError, match="2 confidences for 3"):
        auroc_interval([1, 2], [True, False, True])


def test_the_interval_holds_the_estimate_narrows_with_more_rows_and_is_reproducible():
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.8
    confidences = np.where(correct, rng.integers(5, 11, 200), rng.integers(0, 9, 200)).tolist()
    low, high = auroc_interval(confidences, correct.tolist())
    assert low < auroc(np.array(confidences, float), correct) < high
    assert auroc_interval(confidences, correct.tolist()) == (low, high)  # seeded
    low4, high4 = auroc_interval(confidences * 4, correct.tolist() * 4)
    # Four times the rows: the width shrinks by about sqrt(4) = 2.
    assert 1.5 < (high - low) / (high4 - low4) < 2.7
