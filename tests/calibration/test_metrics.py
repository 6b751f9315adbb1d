"""Calibration metrics of ppo-and-calibration.md §D, extras, and the §E published table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from radialog_rl.calibration.io import read_predictions
from radialog_rl.calibration.metrics import (
    auroc,
    bin_indices,
    bin_table,
    brier_score,
    compute_calibration,
    confidence_auroc,
    d_nckl,
    expected_calibration_error,
    parse_failure_rate,
    sigma_cbnd,
)
from radialog_rl.errors import DataError

REFERENCE_DIR = Path(__file__).resolve().parent / "published"  # see its README.md for the source

# §E: file -> (ECE, sigma_CBND, D_NCKL)
PUBLISHED = {
    "original_radialog_vanilla_verbalize": (0.431, 0.548, 0.728),
    "ptrue": (0.445, 0.537, 0.544),
    "sequence_probability": (0.231, 0.502, 0.376),
    "trained_probe": (0.030, 0.441, 0.167),
    "sft_model_vanilla_verbalize": (0.102, 0.589, 0.338),
    "shifted_ppo_best_step_600": (0.029, 0.529, 0.314),
    "quadratic_blend_ppo_best_step_855": (0.034, 0.459, 0.211),
    "ablation_nonepisodice_shifted_step_270": (0.038, 0.562, 0.406),
}

# A small hand-checked sample (scale 10). Valid pairs: (2,.1) (2,.3) (8,1) (8,.7) (8,.4); the
# sixth has no confidence, the seventh no accuracy.
CONF = [2, 2, 8, 8, 8, None, 5]
ACC = [0.1, 0.3, 1.0, 0.7, 0.4, 1.0, None]
# bin 2: n=2, mu=.2, |mu-.2|=0, sigma=.1, sigma_max=sqrt(.2*.8)=.4, d=.25
# bin 8: n=3, mu=.7, |mu-.8|=.1, sigma=sqrt((.09+0+.09)/3)=sqrt(.06)=.244949,
#        sigma_max=sqrt(.21)=.458258, d=.534522
ECE = 0.06  # 2/5*0 + 3/5*.1
SIGMA_CBND = 0.420713  # 2/5*.25 + 3/5*.534522
# P = (.4 at bin 2, .6 at bin 8): KL = .4 ln(.4*11) + .6 ln(.6*11) = .592641 + 1.132242 = 1.724883;
# / ln 11 (2.397895) = 0.719332
D_NCKL = 0.719332
BRIER = 0.046  # (.01 + .01 + .04 + .01 + .16) / 5
# correct (acc >= .5): conf 8 (acc 1), conf 8 (acc .7); wrong: 2, 2, 8.
# Each positive beats both 2s and ties the wrong 8: (2 + .5) * 2 / (2*3) = 5/6
AUROC = 5 / 6


def test_hand_computed_metrics():
    assert expected_calibration_error(CONF, ACC) == pytest.approx(ECE, abs=1e-9)
    assert sigma_cbnd(CONF, ACC) == pytest.approx(SIGMA_CBND, abs=1e-6)
    assert d_nckl(CONF, ACC) == pytest.approx(D_NCKL, abs=1e-6)
    assert brier_score(CONF, ACC) == pytest.approx(BRIER, abs=1e-9)
    assert confidence_auroc(CONF, ACC) == pytest.approx(AUROC)
    assert parse_failure_rate(CONF) == pytest.approx(1 / 7)


def test_numpy_inputs_with_nan_and_object_arrays():
    conf = np.array([2, 2, 8, 8, 8, np.nan, 5], dtype=float)
    acc = np.array(ACC, dtype=object)  # None inside an object array
    assert expected_calibration_error(conf, acc) == pytest.approx(ECE, abs=1e-9)
    assert compute_calibration(conf, acc).n_valid == 5


def test_bin_table_hand_values():
    table = bin_table(CONF, ACC)
    assert [(b.index, b.count) for b in table] == [(2, 2), (8, 3)]
    b2, b8 = table
    assert b2.value == pytest.approx(0.2) and b8.value == pytest.approx(0.8)
    assert b2.mean_confidence == pytest.approx(0.2)
    assert b2.mean_accuracy == pytest.approx(0.2) and b2.std_accuracy == pytest.approx(0.1)
    assert b8.mean_accuracy == pytest.approx(0.7) and b8.std_accuracy == pytest.approx(math.sqrt(0.06))


def test_compute_calibration_report():
    report = compute_calibration(CONF, ACC, scale=10)
    assert report.n_total == 7 and report.n_valid == 5
    assert report.n_missing_confidence == 1 and report.n_missing_accuracy == 1
    assert report.parse_failure_rate == pytest.approx(1 / 7)
    assert report.missing_rate == pytest.approx(2 / 7)
    assert report.ece == pytest.approx(ECE)
    assert report.sigma_cbnd == pytest.approx(SIGMA_CBND, abs=1e-6)
    assert report.d_nckl == pytest.approx(D_NCKL, abs=1e-6)
    assert report.brier == pytest.approx(BRIER)
    assert report.auroc == pytest.approx(AUROC)
    assert report.mean_confidence == pytest.approx(0.56)  # (2+2+8+8+8)/5/10
    assert report.mean_accuracy == pytest.approx(0.5)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ece"] == pytest.approx(ECE) and len(d["bins"]) == 2
    text = report.format_table()
    for label in ("ECE", "sigma_CBND", "D_NCKL", "Brier", "AUROC", "parse failures"):
        assert label in text
    assert "0.060" in text and "0.421" in text and "0.719" in text


def test_ece_empty_bins_and_perfect_calibration():
    # conf 3 always 30% correct and conf 10 always correct: perfectly calibrated
    conf = [3] * 10 + [10] * 4
    acc = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0] + [1] * 4
    assert expected_calibration_error(conf, acc) == pytest.approx(0.0)
    # 0/1 accuracies with mu = .3 -> sigma = sigma_max -> d = 1; conf 10 bin: sigma_max = 0 -> d = 0
    assert sigma_cbnd(conf, acc) == pytest.approx(10 / 14)


def test_d_nckl_extremes():
    assert d_nckl([5] * 20, [1] * 20) == pytest.approx(1.0)  # one bin: KL = ln 11 -> 1 (capped)
    assert d_nckl(list(range(11)), [0.5] * 11) == pytest.approx(0.0, abs=1e-6)  # uniform


def test_missing_everything():
    report = compute_calibration([None, None], [0.5, 1.0])
    assert report.n_valid == 0 and report.parse_failure_rate == 1.0
    assert math.isnan(report.ece) and report.auroc is None
    assert report.to_dict()["ece"] is None
    assert "n/a" in report.format_table()


def test_auroc_rank_based_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)
    # positives 3, 3, 5 vs negatives 1, 3: wins 1 + .5 | 1 + .5 | 1 + 1 -> 5 / 6
    assert auroc([3, 3, 5, 1, 3], [1, 1, 1, 0, 0]) == pytest.approx(5 / 6)
    assert auroc([0.2, 0.9], [1, 1]) is None


def test_granular_binning():
    # bin = floor(c*10/100 + .5): 0..4 -> 0, 5..14 -> 1, 15 -> 2, 95..100 -> 10
    conf = np.array([0, 4, 5, 14, 15, 94, 95, 100])
    assert bin_indices(conf, scale=100).tolist() == [0, 0, 1, 1, 2, 9, 10, 10]
    # 0..10 scale: one bin per value
    assert bin_indices(np.arange(11), scale=10).tolist() == list(range(11))
    # granular ECE: conf 72 and 68 land in bin 7 (value .7); accuracies 1, 0, 1 -> mu 2/3
    assert expected_calibration_error([72, 68, 70], [1, 0, 1], scale=100) == pytest.approx(0.7 - 2 / 3)
    report = compute_calibration([72, 68, 70], [1, 0, 1], scale=100)
    assert report.num_bins == 11 and report.bins[0].index == 7
    assert report.bins[0].mean_confidence == pytest.approx(0.7)


def test_input_validation():
    with pytest.raises(DataError, match="outside 0..10"):
        compute_calibration([11], [0.5])
    with pytest.raises(DataError, match="outside \\[0, 1\\]"):
        compute_calibration([5], [1.5])
    with pytest.raises(DataError):
        compute_calibration([5, 6], [0.5])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_table(name):
    path = REFERENCE_DIR / f"{name}.csv"
    assert path.is_file(), f"published test data missing: {path}"
    preds = read_predictions(path, scale=10)
    report = compute_calibration(preds.confidences, preds.accuracies, scale=10)
    ece, scbnd, dnckl = PUBLISHED[name]
    assert report.ece == pytest.approx(ece, abs=1e-3)
    assert report.sigma_cbnd == pytest.approx(scbnd, abs=1e-3)
    assert report.d_nckl == pytest.approx(dnckl, abs=1e-3)
