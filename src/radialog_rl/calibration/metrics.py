"""Calibration metrics (``docs/ppo-and-calibration.md`` §D) and the :class:`CalibrationReport`.

Inputs are per-sample stated confidences on ``0..scale`` and accuracies in [0, 1]; None or NaN
marks a missing value. Samples missing either are excluded from every metric and counted in the
failure rates, which the report always shows beside the metrics.

Binning. Confidences go into ``num_bins`` bins whose nominal values are ``k/(num_bins-1)``,
``k = 0..num_bins-1``: bin index = ``floor(confidence·(num_bins-1)/scale + 1/2)`` (nearest value,
halves rounded up). The default ``num_bins`` is ``scale + 1`` for scales up to 10 (one bin per
stated value, exactly §D for the 0..10 scale) and 11 otherwise: on the 0..100 scale bin k holds
confidences ``10k-5 .. 10k+4`` (bin 0: 0..4, bin 10: 95..100) with nominal value k/10.
ECE compares a bin's mean accuracy with its nominal value; D_NCKL uses the same bins (uniform
reference 1/num_bins, normalised by ln num_bins); for 0..10 with 11 bins this equals §D's
histogram of confidence/10 over 11 equal bins on [0, 1].

Extras: Brier score (mean squared difference between confidence/scale and accuracy, i.e. the
generalised Brier score for continuous accuracy) and AUROC of confidence vs correctness, where
correctness = accuracy >= 0.5 (for 0/1 accuracies this is the answer's correctness).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from radialog_rl.errors import DataError

__all__ = [
    "CORRECTNESS_THRESHOLD",
    "BinStats",
    "CalibrationReport",
    "auroc",
    "bin_indices",
    "bin_table",
    "brier_score",
    "compute_calibration",
    "confidence_auroc",
    "d_nckl",
    "default_num_bins",
    "expected_calibration_error",
    "format_report",
    "parse_failure_rate",
    "sigma_cbnd",
]

#: Accuracy at or above which a sample counts as correct for AUROC.
CORRECTNESS_THRESHOLD = 0.5

ArrayLike = Sequence[float | None] | np.ndarray


@dataclass(frozen=True)
class BinStats:
    """One non-empty confidence bin: nominal ``value`` in [0, 1], ``count`` samples, their mean
    confidence (as confidence/scale), mean accuracy and population std of accuracy."""

    index: int
    value: float
    count: int
    mean_confidence: float
    mean_accuracy: float
    std_accuracy: float


def default_num_bins(scale: int) -> int:
    """``scale + 1`` bins (one per value) for scales up to 10, else 11 (width scale/10)."""
    return scale + 1 if scale <= 10 else 11


def _float_array(values: ArrayLike) -> np.ndarray:
    """1-d float array with NaN for None."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(float).ravel()
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _prepare(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float arrays (NaN = missing) of equal length."""
    if scale < 1:
        raise DataError(f"confidence scale must be a positive integer, got {scale}")
    conf, acc = _float_array(confidences), _float_array(accuracies)
    if conf.shape != acc.shape:
        raise DataError(f"{conf.size} confidences but {acc.size} accuracies")
    bad_c = ~np.isnan(conf) & ((conf < 0) | (conf > scale))
    if bad_c.any():
        i = int(np.flatnonzero(bad_c)[0])
        raise DataError(f"confidence {conf[i]} of sample {i} is outside 0..{scale}")
    bad_a = ~np.isnan(acc) & ((acc < 0) | (acc > 1))
    if bad_a.any():
        i = int(np.flatnonzero(bad_a)[0])
        raise DataError(f"accuracy {acc[i]} of sample {i} is outside [0, 1]")
    return conf, acc


def _valid(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int
) -> tuple[np.ndarray, np.ndarray]:
    """Confidences and accuracies of the samples having both."""
    conf, acc = _prepare(confidences, accuracies, scale)
    keep = ~np.isnan(conf) & ~np.isnan(acc)
    return conf[keep], acc[keep]


def bin_indices(confidences: np.ndarray, scale: int = 10, num_bins: int | None = None) -> np.ndarray:
    """Bin index of each (non-missing) confidence: ``floor(c·(num_bins-1)/scale + 1/2)``."""
    nb = num_bins or default_num_bins(scale)
    if nb < 2:
        raise DataError(f"num_bins must be at least 2, got {nb}")
    # c·(nb-1) is exact for integer confidences, so halves round up consistently.
    return np.floor(np.asarray(confidences, dtype=float) * (nb - 1) / scale + 0.5).astype(int)


def bin_table(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int = 10, num_bins: int | None = None
) -> list[BinStats]:
    """Per non-empty bin: count, mean confidence/scale, mean accuracy, population std (§D)."""
    conf, acc = _valid(confidences, accuracies, scale)
    nb = num_bins or default_num_bins(scale)
    idx = bin_indices(conf, scale, nb)
    table = []
    for b in range(nb):
        mask = idx == b
        if not mask.any():
            continue
        table.append(
            BinStats(
                index=b,
                value=b / (nb - 1),
                count=int(mask.sum()),
                mean_confidence=float(conf[mask].mean() / scale),
                mean_accuracy=float(acc[mask].mean()),
                std_accuracy=float(acc[mask].std()),
            )
        )
    return table


def _count_weighted_mean(table: list[BinStats], per_bin) -> float:
    """Σ_b (n_b/N)·per_bin(b) over the bins of ``table``; NaN when N = 0."""
    n = sum(b.count for b in table)
    if n == 0:
        return math.nan
    return float(sum(b.count / n * per_bin(b) for b in table))


def expected_calibration_error(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int = 10, num_bins: int | None = None
) -> float:
    """ECE = Σ_b (n_b/N)·|mean accuracy_b − value_b| over non-empty bins (§D); NaN if N = 0."""
    table = bin_table(confidences, accuracies, scale, num_bins)
    return _count_weighted_mean(table, lambda b: abs(b.mean_accuracy - b.value))


def _normalised_dispersion(b: BinStats) -> float:
    """d_b = clip(σ_b/σ_max, 0, 1), σ_max = sqrt(clip(μ_b(1−μ_b), 0, 0.25)), 0 if σ_max = 0."""
    sigma_max = math.sqrt(min(max(b.mean_accuracy * (1.0 - b.mean_accuracy), 0.0), 0.25))
    if sigma_max == 0.0:
        return 0.0
    return min(max(b.std_accuracy / sigma_max, 0.0), 1.0)


def sigma_cbnd(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int = 10, num_bins: int | None = None
) -> float:
    """σ_CBND = Σ_b (n_b/N)·d_b, the confidence-bin normalised dispersion (§D); NaN if N = 0."""
    table = bin_table(confidences, accuracies, scale, num_bins)
    return _count_weighted_mean(table, _normalised_dispersion)


def d_nckl(
    confidences: ArrayLike, accuracies: ArrayLike, scale: int = 10, num_bins: int | None = None
) -> float:
    """D_NCKL = min(KL(P ‖ uniform)/ln num_bins, 1) of the confidence histogram P (§D).

    KL = Σ_i P_i·log((P_i + 1e-8)/(1/num_bins + 1e-8)); only samples with an accuracy count, like
    the other two §D metrics. NaN if N = 0.
    """
    conf, _ = _valid(confidences, accuracies, scale)
    nb = num_bins or default_num_bins(scale)
    if conf.size == 0:
        return math.nan
    p = np.bincount(bin_indices(conf, scale, nb), minlength=nb) / conf.size
    kl = float(np.sum(p * np.log((p + 1e-8) / (1.0 / nb + 1e-8))))
    return min(kl / math.log(nb), 1.0)


def brier_score(confidences: ArrayLike, accuracies: ArrayLike, scale: int = 10) -> float:
    """Mean of (confidence/scale − accuracy)² over valid samples; NaN if there are none."""
    conf, acc = _valid(confidences, accuracies, scale)
    if conf.size == 0:
        return math.nan
    return float(np.mean((conf / scale - acc) ** 2))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(values.size, dtype=float)
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def auroc(scores: ArrayLike, labels: Sequence[bool] | np.ndarray) -> float | None:
    """Rank-based (Mann–Whitney) AUROC of ``scores`` for binary ``labels``, ties counted as 1/2.

    None when only one class is present (AUROC undefined).
    """
    s = _float_array(scores)
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise DataError(f"{s.size} scores but {y.size} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def confidence_auroc(
    confidences: ArrayLike,
    accuracies: ArrayLike,
    scale: int = 10,
    threshold: float = CORRECTNESS_THRESHOLD,
) -> float | None:
    """AUROC of confidence for telling correct (accuracy >= ``threshold``) from wrong samples."""
    conf, acc = _valid(confidences, accuracies, scale)
    return auroc(conf, acc >= threshold)


def parse_failure_rate(confidences: ArrayLike) -> float:
    """Fraction of samples whose confidence is missing (None/NaN); NaN for no samples."""
    conf = _float_array(confidences)
    return float(np.isnan(conf).mean()) if conf.size else math.nan


def _clean(value: Any) -> Any:
    """NaN -> None so that the dict is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class CalibrationReport:
    """Everything :func:`compute_calibration` measures.

    n_total: all samples; n_valid: those with both confidence and accuracy (the metrics use only
    these); parse_failure_rate: missing confidence / n_total; missing_rate: (n_total − n_valid) /
    n_total. Metrics are NaN (``to_dict``: None) when n_valid = 0; auroc is None when only one
    class (correct/wrong) is present.
    """

    scale: int
    num_bins: int
    n_total: int
    n_valid: int
    n_missing_confidence: int
    n_missing_accuracy: int
    parse_failure_rate: float
    missing_rate: float
    ece: float
    sigma_cbnd: float
    d_nckl: float
    brier: float
    auroc: float | None
    mean_confidence: float
    mean_accuracy: float
    bins: list[BinStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (NaN -> None, bins as a list of dicts)."""
        out = {k: _clean(v) for k, v in asdict(self).items() if k != "bins"}
        out["bins"] = [asdict(b) for b in self.bins]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_table(self) -> str:
        """Human-readable summary and per-bin table."""
        return format_report(self)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_report(report: CalibrationReport) -> str:
    """Text rendering of a :class:`CalibrationReport` (summary lines, then one row per bin)."""
    r = report
    lines = [
        f"Calibration (confidence scale 0..{r.scale}, {r.num_bins} bins)",
        f"samples            {r.n_total}  (valid {r.n_valid})",
        f"parse failures     {r.n_missing_confidence}  ({_fmt(100 * r.parse_failure_rate, 1)}%)",
        f"missing accuracy   {r.n_missing_accuracy}",
        f"excluded           {_fmt(100 * r.missing_rate, 1)}%",
        f"ECE                {_fmt(r.ece)}",
        f"sigma_CBND         {_fmt(r.sigma_cbnd)}",
        f"D_NCKL             {_fmt(r.d_nckl)}",
        f"Brier              {_fmt(r.brier)}",
        f"AUROC              {_fmt(r.auroc)}  (correct = accuracy >= {CORRECTNESS_THRESHOLD})",
        f"mean confidence    {_fmt(r.mean_confidence)}",
        f"mean accuracy      {_fmt(r.mean_accuracy)}",
        "",
        f"{'bin':>4} {'value':>6} {'count':>6} {'mean_conf':>10} {'mean_acc':>9} {'std_acc':>8} {'gap':>7}",
    ]
    for b in r.bins:
        lines.append(
            f"{b.index:>4} {b.value:>6.2f} {b.count:>6} {b.mean_confidence:>10.3f} "
            f"{b.mean_accuracy:>9.3f} {b.std_accuracy:>8.3f} {b.mean_accuracy - b.value:>+7.3f}"
        )
    return "\n".join(lines)


def compute_calibration(
    confidences: ArrayLike,
    accuracies: ArrayLike,
    scale: int = 10,
    num_bins: int | None = None,
) -> CalibrationReport:
    """All §D metrics plus Brier, AUROC, failure rates and the bin table in one report.

    ``confidences``: N stated confidences on 0..scale (None/NaN = missing);
    ``accuracies``: N accuracies in [0, 1] (None/NaN = missing).
    """
    conf, acc = _prepare(confidences, accuracies, scale)
    nb = num_bins or default_num_bins(scale)
    keep = ~np.isnan(conf) & ~np.isnan(acc)
    vc, va = conf[keep], acc[keep]
    n_total = int(conf.size)
    return CalibrationReport(
        scale=scale,
        num_bins=nb,
        n_total=n_total,
        n_valid=int(keep.sum()),
        n_missing_confidence=int(np.isnan(conf).sum()),
        n_missing_accuracy=int(np.isnan(acc).sum()),
        parse_failure_rate=parse_failure_rate(conf),
        missing_rate=float((~keep).mean()) if n_total else math.nan,
        ece=expected_calibration_error(vc, va, scale, nb),
        sigma_cbnd=sigma_cbnd(vc, va, scale, nb),
        d_nckl=d_nckl(vc, va, scale, nb),
        brier=brier_score(vc, va, scale),
        auroc=confidence_auroc(vc, va, scale),
        mean_confidence=float(vc.mean() / scale) if vc.size else math.nan,
        mean_accuracy=float(va.mean()) if va.size else math.nan,
        bins=bin_table(vc, va, scale, nb),
    )
