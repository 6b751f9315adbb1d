"""How precisely an evaluation set measures a calibration metric: bootstrap confidence intervals.

On the synthetic task's 400 held-out images SFT is right about 94 % of the time, so the AUROC of
confidence vs correctness rests on about 25 wrong answers; its 95 % interval is about ±0.05 to
±0.1 (README, "The calibration experiment"). Recipe differences smaller than that are not resolved
by one evaluation set, which is what the interval printed beside the number says.

The resampling is SciPy's (``scipy.stats.bootstrap``, percentile method), stratified by correctness;
SciPy comes with scikit-learn, a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from radialog_rl.calibration.metrics import auroc

__all__ = ["auroc_interval"]


def auroc_interval(confidences: Sequence[float | None], correct: Sequence[bool], level: float = 0.95,
                   n_resamples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the AUROC of stated confidence vs correctness, resampling
    the right and the wrong answers separately (stratified bootstrap; Carpenter & Bithell 2000,
    as pROC's ``ci.auc``).

    Args:
        confidences: one stated confidence per row (any scale; None = no statement, left out as
            :func:`~radialog_rl.calibration.metrics.confidence_auroc` leaves it out).
        correct: one bool per row, whether the answer was right.
        level: coverage of the interval (0.95: the 2.5 and 97.5 percentiles).
        n_resamples: bootstrap resamples of the rows (with replacement, same size).
        seed: the resampling's random seed (the interval is reproducible).

    Returns:
        ``(low, high)``, or None when the rows with a statement are all right or all wrong (no
        AUROC to resample).
    """
    from scipy.stats import bootstrap

    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} correctness values")
    keep = [i for i, c in enumerate(confidences) if c is not None and not np.isnan(c)]
    scores = np.array([confidences[i] for i in keep], dtype=float)
    labels = np.array([bool(correct[i]) for i in keep])
    if labels.all() or not labels.any():
        return None

    def statistic(right: np.ndarray, wrong: np.ndarray) -> float:
        return auroc(np.concatenate([right, wrong]),
                     np.concatenate([np.ones(len(right), bool), np.zeros(len(wrong), bool)]))

    # Stratified: right and wrong answers are resampled separately (their counts kept), as pROC
    # does for AUROC, so that no resample lacks a class.
    result = bootstrap((scores[labels], scores[~labels]), statistic, vectorized=False, n_resamples=n_resamples,
                       confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
