"""Calibration plots: reliability diagram and confidence histogram as PNG files.

matplotlib is optional (``pip install 'radialog-rl[plots]'``) and imported only when a plot is
drawn. Figures are rendered with the Agg canvas directly (no pyplot, no global backend switch),
without tight bounding boxes, so a PNG is exactly ``figsize × dpi`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radialog_rl.calibration.metrics import (
    ArrayLike,
    _float_array,
    _prepare,
    bin_indices,
    bin_table,
    default_num_bins,
    expected_calibration_error,
)
from radialog_rl.errors import ConfigError, RadialogError

__all__ = ["confidence_histogram", "reliability_diagram"]


def _new_figure(figsize: Sequence[float], dpi: int) -> tuple[Any, Any]:
    """A matplotlib Figure on an Agg canvas, or a RadialogError when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (first, so a missing package is reported as such)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RadialogError(
            "plots need matplotlib, which is not installed: pip install 'radialog-rl[plots]'"
        ) from exc
    fig = Figure(figsize=tuple(figsize), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


#: Image formats written, chosen by the file's extension (what matplotlib's Agg canvas writes).
PLOT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fmt = PLOT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot write a plot to {path}: the name must end in "
                          f"{', '.join(PLOT_FORMATS)} (the format follows the extension)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format=fmt)
    return path


def reliability_diagram(
    confidences: ArrayLike,
    accuracies: ArrayLike,
    path: str | Path,
    *,
    scale: int = 10,
    num_bins: int | None = None,
    figsize: Sequence[float] = (6.0, 6.0),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Write a reliability diagram PNG: mean accuracy per confidence bin (§D binning) as bars with
    the per-bin std as error bars and the bin count above each bar, plus the diagonal of perfect
    calibration. Samples missing confidence or accuracy are left out. Returns ``path``.
    """
    nb = num_bins or default_num_bins(scale)
    table = bin_table(confidences, accuracies, scale, nb)
    ece = expected_calibration_error(confidences, accuracies, scale, nb)
    fig, ax = _new_figure(figsize, dpi)
    width = 0.9 / (nb - 1)
    xs = [b.value for b in table]
    ys = [b.mean_accuracy for b in table]
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.bar(xs, ys, width=width, color="tab:blue", alpha=0.75, edgecolor="black", label="accuracy")
    # Clip the ±std whiskers to [0, 1]: accuracy cannot leave that range.
    yerr = [[min(b.std_accuracy, b.mean_accuracy) for b in table],
            [min(b.std_accuracy, 1.0 - b.mean_accuracy) for b in table]]
    ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor="black", capsize=3)
    for b in table:
        ax.annotate(str(b.count), (b.value, min(b.mean_accuracy + b.std_accuracy, 1.0) + 0.01),
                    ha="center", va="bottom", fontsize=7)
    half = 0.5 / (nb - 1)
    ax.set_xlim(-half, 1 + half)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel(f"stated confidence / {scale}")
    ax.set_ylabel("mean accuracy")
    ece_txt = "n/a" if np.isnan(ece) else f"{ece:.3f}"
    ax.set_title(title or f"Reliability diagram (ECE {ece_txt}, n={sum(b.count for b in table)})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, dpi)


def confidence_histogram(
    confidences: ArrayLike,
    path: str | Path,
    *,
    scale: int = 10,
    num_bins: int | None = None,
    figsize: Sequence[float] = (6.0, 4.0),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Write a histogram PNG of the stated confidences over the §D bins (missing ones are counted
    in the title). Returns ``path``."""
    nb = num_bins or default_num_bins(scale)
    conf = _float_array(confidences)
    _prepare(conf, np.zeros_like(conf), scale)  # range check: raises DataError outside 0..scale
    present = conf[~np.isnan(conf)]
    counts = np.bincount(bin_indices(present, scale, nb), minlength=nb) if present.size else np.zeros(nb)
    fig, ax = _new_figure(figsize, dpi)
    values = np.arange(nb) / (nb - 1)
    ax.bar(values, counts, width=0.9 / (nb - 1), color="tab:orange", edgecolor="black")
    ax.set_xlim(-0.5 / (nb - 1), 1 + 0.5 / (nb - 1))
    ax.set_xlabel(f"stated confidence / {scale}")
    ax.set_ylabel("count")
    missing = int(conf.size - present.size)
    ax.set_title(title or f"Confidence histogram (n={present.size}, missing={missing})")
    return _save(fig, path, dpi)
