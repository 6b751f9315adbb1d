"""The comparison table: calibration metrics of every method side by side.

Metrics come from :func:`radialog_rl.calibration.metrics.compute_calibration` on the binned
confidences (0..10) and accuracies, exactly what ``radialog-rl evaluate`` computes from the written
prediction files: ECE, σ_CBND, D_NCKL (``docs/ppo-and-calibration.md`` §D), Brier, AUROC, the
parse-failure rate (no confidence) and the excluded rate (no confidence or no accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from radialog_rl.calibration.metrics import CalibrationReport, compute_calibration
from radialog_rl.confidence.base import TABLE_SCALE, ConfidenceResult

__all__ = ["format_comparison_table", "method_reports"]


def method_reports(results: Mapping[str, Sequence[ConfidenceResult]]) -> dict[str, CalibrationReport]:
    """One :class:`CalibrationReport` per method (same order as ``results``)."""
    return {
        method: compute_calibration([r.confidence for r in rows], [r.accuracy for r in rows], scale=TABLE_SCALE)
        for method, rows in results.items()
    }


def _cell(value: float | None, width: int, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return f"{'n/a':>{width}}"
    return f"{value:>{width}.{digits}f}"


def format_comparison_table(reports: Mapping[str, CalibrationReport]) -> str:
    """A text table: one row per method, the columns of the published calibration table + extras."""
    header = (f"{'method':<11} {'n':>5} {'ECE':>7} {'sigma_CBND':>10} {'D_NCKL':>7} {'Brier':>7} "
              f"{'AUROC':>7} {'parse_fail':>10} {'excluded':>9} {'mean_conf':>9} {'mean_acc':>8}")
    lines = [header, "-" * len(header)]
    for method, r in reports.items():
        lines.append(
            f"{method:<11} {r.n_total:>5} {_cell(r.ece, 7)} {_cell(r.sigma_cbnd, 10)} {_cell(r.d_nckl, 7)} "
            f"{_cell(r.brier, 7)} {_cell(r.auroc, 7)} {_cell(100 * r.parse_failure_rate, 9, 1)}% "
            f"{_cell(100 * r.missing_rate, 8, 1)}% {_cell(r.mean_confidence, 9)} {_cell(r.mean_accuracy, 8)}"
        )
    return "\n".join(lines)
