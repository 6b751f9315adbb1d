"""Reference confidences to compare a trained model with: the group oracle and the best constant.

* :func:`oracle_confidences`: each row's confidence is the accuracy of the model's answers within
  the row's group (on the synthetic task: finding × visibility group, negatives a group of their
  own per finding). It is the best a model can do that knows only the group — e.g. how visible the
  finding is — and nothing else about the image; its AUROC is the discrimination to aim for.
* :func:`best_constant_confidence`: the single confidence on the ``0..scale`` grid with the lowest
  Brier score, i.e. what a collapsed policy stating one value everywhere would at best reach.
  Calibration that only matches this has learnt nothing about the image.

Pure numpy over plain rows (dicts) and correctness flags; metrics from
:mod:`radialog_rl.calibration.metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radialog_rl.calibration.metrics import CalibrationReport, brier_score, compute_calibration
from radialog_rl.errors import DataError

__all__ = [
    "ConstantBaseline",
    "best_constant_confidence",
    "group_accuracies",
    "oracle_confidences",
    "oracle_report",
]


def _check_correct(correct: Sequence[Any], n: int | None = None) -> np.ndarray:
    """Correctness flags as a bool array; None (an unparsable answer) is refused, not guessed."""
    values = list(correct)
    for i, c in enumerate(values):
        if not isinstance(c, (bool, np.bool_)) and c not in (0, 1):
            raise DataError(f"correct[{i}] is {c!r}; give True/False per row (count an answer "
                            f"that could not be parsed as False)")
    if n is not None and len(values) != n:
        raise DataError(f"{n} rows but {len(values)} correctness flags")
    return np.asarray(values, dtype=bool)


def _group_of(row: Mapping[str, Any], group_key: str, index: int) -> tuple[Hashable, Hashable]:
    """``(finding, row[group_key])``; finding None when the row has no ``finding`` field."""
    if not isinstance(row, Mapping) or group_key not in row:
        raise DataError(f"row {index} has no {group_key!r} field to group by")
    key = (row.get("finding"), row[group_key])
    try:
        hash(key)
    except TypeError:
        raise DataError(f"row {index}: {group_key!r} must be a string or number, got "
                        f"{type(row[group_key]).__name__}") from None
    return key


def group_accuracies(
    rows: Sequence[Mapping[str, Any]],
    correct: Sequence[bool],
    group_key: str = "visibility_group",
) -> dict[tuple[Hashable, Hashable], float]:
    """Accuracy per group ``(row["finding"], row[group_key])`` (finding None when absent).

    Returns:
        ``{(finding, group): fraction of correct rows}`` in first-seen order.
    """
    flags = _check_correct(correct, len(rows))
    members: dict[tuple[Hashable, Hashable], list[bool]] = defaultdict(list)
    for i, (row, flag) in enumerate(zip(rows, flags)):
        members[_group_of(row, group_key, i)].append(bool(flag))
    return {key: float(np.mean(values)) for key, values in members.items()}


def oracle_confidences(
    rows: Sequence[Mapping[str, Any]],
    correct: Sequence[bool],
    group_key: str = "visibility_group",
) -> list[float]:
    """Per row, the accuracy of the model's answers in the row's group: a probability in [0, 1].

    ``correct[i]`` says whether the model answered row ``i`` correctly. Groups are
    ``(finding, row[group_key])`` (see :func:`group_accuracies`). The accuracies are measured on
    the same rows, so this is the in-sample best confidence a model knowing only the group could
    state (multiply by the scale for :func:`~radialog_rl.calibration.metrics.compute_calibration`,
    or use :func:`oracle_report`).
    """
    accuracy = group_accuracies(rows, correct, group_key)
    return [accuracy[_group_of(row, group_key, i)] for i, row in enumerate(rows)]


def oracle_report(
    rows: Sequence[Mapping[str, Any]],
    correct: Sequence[bool],
    group_key: str = "visibility_group",
    scale: int = 10,
) -> CalibrationReport:
    """:func:`compute_calibration` of the oracle: confidences ``scale · group accuracy`` (not
    rounded to the grid, so its Brier score is the group oracle's exact one)."""
    confidences = [scale * p for p in oracle_confidences(rows, correct, group_key)]
    return compute_calibration(confidences, _check_correct(correct).astype(float), scale)


@dataclass(frozen=True)
class ConstantBaseline:
    """The best constant confidence: ``confidence`` on ``0..scale``, its ``brier`` and ``ece``, and
    the full ``report`` of stating it for every row."""

    confidence: int
    scale: int
    brier: float
    ece: float
    report: CalibrationReport


def best_constant_confidence(correct: Sequence[bool], scale: int = 10) -> ConstantBaseline:
    """The constant confidence ``c`` in ``0..scale`` minimising the Brier score of ``correct``.

    Brier(c) = mean((c/scale − y)²) is a parabola in c/scale with its minimum at the accuracy, so
    the best grid value is the one nearest the accuracy; ties (accuracy exactly between two grid
    values) go to the lower confidence. Each candidate is scored with
    :func:`~radialog_rl.calibration.metrics.brier_score` and compared after rounding to 12 decimals
    so that float noise does not break a tie.

    Raises:
        DataError: no rows, or a flag is not True/False.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise DataError(f"confidence scale must be a positive integer, got {scale!r}")
    flags = _check_correct(correct).astype(float)
    if flags.size == 0:
        raise DataError("no rows: the best constant confidence needs at least one answer")
    briers = [round(brier_score(np.full(flags.size, float(c)), flags, scale), 12)
              for c in range(scale + 1)]
    best = int(np.argmin(briers))  # argmin returns the first (lowest) of tied minima
    report = compute_calibration(np.full(flags.size, float(best)), flags, scale)
    return ConstantBaseline(confidence=best, scale=int(scale), brier=report.brier,
                            ece=report.ece, report=report)
