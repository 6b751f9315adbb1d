"""``radialog-rl evaluate``: calibration metrics of a predictions file (JSONL or CSV).

Prints ECE, sigma_CBND, D_NCKL (``docs/ppo-and-calibration.md`` §D), Brier, AUROC, the parse-failure
rate and the per-bin table, or the same as JSON; optionally writes a reliability diagram and a
confidence histogram.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from radialog_rl.cli.arguments import positive_int

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Compute calibration metrics of stated confidences against accuracies: ECE, sigma_CBND, D_NCKL
(one bin per confidence value on the 0-10 scale; 11 bins of width 10 on 0-100), Brier score,
AUROC of confidence vs correctness (accuracy >= 0.5), the parse-failure rate and a per-bin table.
Samples with a missing confidence or accuracy are excluded from the metrics and counted as
failures.

PREDICTIONS is a .jsonl file (one object per line: "confidence" (number or null) or a raw "text"
to parse {"confidence": N} from, and "accuracy" in [0, 1] or "correct" true/false) or a .csv file
with the header confidence,accuracy (an empty confidence = parse failure). "green_score" is read as
accuracy. Plots are written in the format their name ends with (.png, .jpg, .pdf, .svg)."""

_EPILOG = """\
examples:
  radialog-rl evaluate preds.jsonl
  radialog-rl evaluate runs/ppo.csv --plot reliability.png --hist hist.png
  radialog-rl evaluate preds.jsonl --scale 100 --json > metrics.json"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="calibration metrics (ECE, sigma_CBND, D_NCKL, Brier, AUROC) of a predictions file",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("predictions", type=Path, metavar="PREDICTIONS", help="predictions .jsonl or .csv file")
    p.add_argument("--scale", type=positive_int, default=10,
                   help="top of the confidence scale: 10 (default) or 100")
    p.add_argument("--bins", type=positive_int, default=None, metavar="N",
                   help="number of confidence bins (default: scale+1 up to 10, else 11)")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="write a reliability diagram (.png, .jpg, .pdf or .svg)")
    p.add_argument("--hist", type=Path, metavar="FILE",
                   help="write a confidence histogram (.png, .jpg, .pdf or .svg)")
    p.add_argument("--dpi", type=positive_int, default=100, help="resolution of the PNGs (default 100)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop unreadable rows with a warning instead of failing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the predictions, print the report, write the requested plots; returns 0."""
    from radialog_rl.calibration.io import read_predictions
    from radialog_rl.calibration.metrics import compute_calibration
    from radialog_rl.calibration.plots import PLOT_FORMATS
    from radialog_rl.errors import ConfigError

    for flag, path in (("--plot", args.plot), ("--hist", args.hist)):
        if path is not None and path.suffix.lower() not in PLOT_FORMATS:
            raise ConfigError(f"{flag} {path}: the name must end in {', '.join(PLOT_FORMATS)} (the format "
                              "follows the extension)")
    preds = read_predictions(args.predictions, scale=args.scale, skip_bad_rows=args.skip_bad_rows)
    report = compute_calibration(preds.confidences, preds.accuracies, scale=args.scale, num_bins=args.bins)
    print(report.to_json() if args.json else report.format_table())
    if args.plot or args.hist:
        _write_plots(args, preds.confidences, preds.accuracies, report.num_bins)
    return 0


def _write_plots(args: argparse.Namespace, confidences: list, accuracies: list, num_bins: int) -> None:
    from radialog_rl.calibration.plots import confidence_histogram, reliability_diagram

    if args.plot:
        path = reliability_diagram(confidences, accuracies, args.plot, scale=args.scale,
                                   num_bins=num_bins, dpi=args.dpi)
        logger.info("wrote reliability diagram %s", path)
    if args.hist:
        path = confidence_histogram(confidences, args.hist, scale=args.scale, num_bins=num_bins, dpi=args.dpi)
        logger.info("wrote confidence histogram %s", path)
