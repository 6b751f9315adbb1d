"""``radialog-rl demo``: the whole stack on the tiny release, in well under two minutes on a CPU.

This module is the command line only; the demo itself (sections, context, the calibration
experiment) is the :mod:`radialog_rl.demo` package.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from radialog_rl.cli.arguments import positive_int
from radialog_rl.demo.sections import DEMO_SECTIONS

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Build the tiny RaDialog release (real on-disk layout, random tiny weights; reused when already
there), load it at each precision and generate reports for a few synthetic chest X-rays. Prints,
per precision: load time, generation throughput and peak memory growth (CUDA: torch's peak
allocated memory; CPU: the process's peak resident set size). Needs no downloads and no GPU."""

_EPILOG = """\
examples:
  radialog-rl demo
  radialog-rl demo --precisions 16bit,4bit --out /tmp/tiny-release
  radialog-rl demo --device cuda
  radialog-rl demo calibration                 # the calibration experiment (~14 min, one thread)
  radialog-rl demo calibration --preset ci     # the same task, 150 PPO steps (CI runs it)"""


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def _precisions(text: str) -> list[str]:
    from radialog_rl.loading.precision import PRECISIONS

    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(PRECISIONS)}, got {text!r}"
        )
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "demo",
        help="run the stack on a tiny random release (no downloads, CPU is fine)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", choices=("calibration",),
                   help="'calibration': the calibration experiment on the synthetic visual task "
                        "(build data -> SFT -> merge -> PPO with a validation curve -> held-out table "
                        "and reliability diagrams; about 14 minutes on one CPU thread with --preset full)")
    p.add_argument("--preset", choices=("full", "ci"), default="full",
                   help="calibration: sizes of the run (full: 1600/400/400 train/validation/held-out rows, 12 SFT epochs, 300 PPO steps; ci: "
                        "the same with 150 PPO steps)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="calibration: torch CPU threads (default 1; the table reproduces exactly only at the "
                        "same thread count and on the same CPU type, since both change float rounding)")
    p.add_argument("--work", type=Path, metavar="DIR",
                   help="calibration: working folder for data, runs, plots and summary.json "
                        "(default: runs/demo-calibration-<preset>; refused when not empty)")
    p.add_argument("--seed", type=int, default=0, help="calibration: seed of data and training (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where to build (or reuse) the tiny release (default: the user cache, "
                        "$RADIALOG_RL_CACHE or ~/.cache/radialog-rl)")
    p.add_argument("--precisions", type=_precisions, default=["16bit", "8bit", "4bit"], metavar="LIST",
                   help="comma-separated precisions to load (default 16bit,8bit,4bit)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU, where bf16 matmuls of "
                        "tiny shapes are slower)")
    p.add_argument("--images", type=positive_int, default=4, metavar="N", help="synthetic images (default 4)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="new tokens per report (default 32)")
    p.add_argument("--sections", default=None, metavar="LIST",
                   help="comma-separated subset of sections to run, by name: "
                        + ",".join(s.__name__.removeprefix("section_") for s in DEMO_SECTIONS)
                        + " (default: all)")
    p.set_defaults(func=run)


def run_calibration(args: argparse.Namespace) -> int:
    """``radialog-rl demo calibration``: run the experiment and print the one-screen summary."""
    from radialog_rl.demo.calibration import format_summary, run_calibration_experiment
    from radialog_rl.errors import ConfigError

    work = args.work or Path("runs") / f"demo-calibration-{args.preset}"
    if work.exists() and any(work.iterdir()):
        raise ConfigError(f"{work} is not empty; pass --work with a new folder (nothing is overwritten)")
    device = args.device or "cpu"
    result = run_calibration_experiment(work, args.preset, seed=args.seed, device=device, threads=args.threads)
    print(f"\n## Calibration on the synthetic visual task (held-out, greedy; preset {args.preset})\n")
    print(format_summary(result))
    print(f"\neverything is in {work} (summary.json, sft/, ppo/, task/)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Build/reuse the tiny release and run every section of :data:`DEMO_SECTIONS`; returns 0."""
    import torch

    from radialog_rl.cli import hide_library_progress_bars

    hide_library_progress_bars()  # the sections load many tiny models: one bar each is noise
    if args.experiment == "calibration":
        return run_calibration(args)

    from radialog_rl.errors import ConfigError
    from radialog_rl.loading.release import load_llava_config
    from radialog_rl.testing.tiny import default_tiny_dir, make_tiny_release

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    out = args.out or default_tiny_dir()
    started = time.perf_counter()
    release = make_tiny_release(out)
    logger.info("demo: tiny release at %s (%.1f s)", out, time.perf_counter() - started)
    from radialog_rl.demo.sections import DemoContext, make_demo_images

    crop = load_llava_config(release.model_path).image_size
    ctx = DemoContext(release=release, device=device, dtype=dtype, precisions=list(args.precisions),
                      images=make_demo_images(args.images, crop), max_new_tokens=args.max_new_tokens)
    sections = DEMO_SECTIONS
    if args.sections:
        wanted = {name.strip() for name in args.sections.split(",") if name.strip()}
        known = {s.__name__.removeprefix("section_") for s in DEMO_SECTIONS}
        if wanted - known:
            raise ConfigError(f"unknown demo section(s) {', '.join(sorted(wanted - known))}; "
                              f"choose from {', '.join(sorted(known))}")
        sections = [s for s in DEMO_SECTIONS if s.__name__.removeprefix("section_") in wanted]
    for section in sections:
        t0 = time.perf_counter()
        section(ctx)
        logger.info("demo: %s done in %.1f s", section.__name__, time.perf_counter() - t0)
    logger.info("demo finished in %.1f s", time.perf_counter() - started)
    return 0


__all__ = ["register", "run"]
