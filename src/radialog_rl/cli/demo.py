"""``radialog-rl demo``: the whole stack on the tiny release, in well under two minutes on a CPU.

The demo is a list of sections, :data:`DEMO_SECTIONS`; each is a function taking the shared
:class:`DemoContext` and printing its own table. Later features (SFT, PPO, merge) add a section by
appending a function to the list::

    def section_sft(ctx: DemoContext) -> None:
        ...
        ctx.table("SFT", ["step", "loss"], rows)

    DEMO_SECTIONS.append(section_sft)

Tables go to stdout (they are the command's output); progress goes to the log (stderr).
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
  radialog-rl demo calibration                 # the calibration experiment (5-8 min on a CPU)
  radialog-rl demo calibration --preset ci     # a short version"""


@dataclass
class DemoContext:
    """State shared by the demo sections.

    Attributes:
        release: the tiny release's paths (:class:`radialog_rl.testing.tiny.TinyRelease`).
        device: "cpu", "cuda", "cuda:1", ...
        dtype: compute dtype name ("bf16", "fp32", ...).
        precisions: the precisions to load ("16bit", "8bit", "4bit").
        images: ``[N, 3, crop, crop]`` preprocessed synthetic chest X-rays.
        max_new_tokens: generation length used by the sections.
        extras: free-form results a section leaves for later ones (e.g. a trained adapter's path).
    """

    release: Any
    device: str
    dtype: str
    precisions: list[str]
    images: Any
    max_new_tokens: int = 32
    extras: dict[str, Any] = field(default_factory=dict)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
              note: str | None = None) -> None:
        """Print a markdown table (floats with 2 decimals) under a ``## title`` line."""
        cells = [[_fmt(v) for v in row] for row in rows]
        widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        print(f"\n## {title}\n")
        print(line([str(h) for h in headers]))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in cells:
            print(line(row))
        if note:
            print(f"\n{note}")
        sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory growth (MB) over a ``with`` block.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (peak statistics reset at
    entry). CPU: peak resident set size minus the RSS at entry. On Linux the kernel's peak
    (``VmHWM``) is reset at entry through ``/proc/self/clear_refs``, so each block gets its own peak;
    elsewhere ``resource.getrusage`` gives the process's lifetime peak, so a block only shows growth
    beyond every earlier peak. ``method`` says which was used.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.megabytes = 0.0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self._start = _proc_status_kb("VmRSS") * 1024
            self.method = "peak RSS (VmHWM, reset via /proc/self/clear_refs)"
        else:
            self._start = _ru_maxrss_bytes()
            self.method = "peak RSS (resource.getrusage, lifetime peak)"
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif "VmHWM" in self.method:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = _ru_maxrss_bytes()
        self.megabytes = max(0.0, (peak - self._start) / 2**20)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def section_release(ctx: DemoContext) -> None:
    """Where the tiny release is and what it holds."""
    rows = []
    for name, path in (("base LLaVA", ctx.release.model_base), ("RaDialog", ctx.release.model_path),
                       ("BioViL-T", ctx.release.biovil_path)):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files) / 2**20
        rows.append([name, str(path), len(files), size])
    ctx.table("Tiny release", ["part", "path", "files", "MB"], rows)


def section_generation(ctx: DemoContext) -> None:
    """Load at every precision and generate one report per synthetic image."""
    import torch

    from radialog_rl.generation import generate_reports
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    # Warm-up, untimed: the first load pays one-time costs (lazy imports, kernel set-up) that would
    # otherwise be charged to whichever precision comes first.
    model = load_baseline_llava_model_with_vision_modules(
        ctx.release.model_path, ctx.release.model_base, device=ctx.device, dtype=ctx.dtype)
    generate_reports(model, model.tokenizer, ctx.images[:1], max_new_tokens=2)
    del model
    gc.collect()

    rows, method = [], ""
    sample = ""
    for precision in ctx.precisions:
        logger.info("demo: loading the tiny release at %s on %s", precision, ctx.device)
        with PeakMemory(ctx.device) as memory:
            started = time.perf_counter()
            model = load_baseline_llava_model_with_vision_modules(
                ctx.release.model_path, ctx.release.model_base, precision=precision,
                device=ctx.device, dtype=ctx.dtype,
            )
            load_seconds = time.perf_counter() - started
            started = time.perf_counter()
            results = generate_reports(model, model.tokenizer, ctx.images, findings=["edema"],
                                       max_new_tokens=ctx.max_new_tokens)
            if ctx.device.startswith("cuda"):
                torch.cuda.synchronize(ctx.device)
            gen_seconds = time.perf_counter() - started
        method = memory.method
        tokens = sum(r.num_tokens for r in results)
        sample = sample or results[0].text
        rows.append([precision, load_seconds, len(results), tokens, tokens / max(gen_seconds, 1e-9),
                     memory.megabytes])
        del model, results
        gc.collect()
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    ctx.table(
        f"Generation ({ctx.device}, {ctx.dtype}, greedy, up to {ctx.max_new_tokens} new tokens)",
        ["precision", "load s", "images", "new tokens", "tokens/s", "peak MB"], rows,
        note=f"peak MB: growth of {method} over load + generation. The tiny weights are random, "
             "so the text is gibberish (first report: " + repr(sample[:40]) + ")",
    )


def section_adapters(ctx: DemoContext) -> None:
    """The four entry points, a merge, a reload, merged-vs-unmerged logits (loading/demo.py)."""
    from radialog_rl.loading.demo import adapters_demo_section

    adapters_demo_section(ctx)


def section_sft(ctx: DemoContext) -> None:
    """A short SFT run on synthetic samples, loss going down (training/sft_demo.py)."""
    from radialog_rl.training.sft_demo import sft_demo_section

    sft_demo_section(ctx)


def section_ppo(ctx: DemoContext) -> None:
    """A few PPO steps with a toy reward, the reward curve (training/ppo/demo.py)."""
    from radialog_rl.training.ppo.demo import ppo_demo_section

    ppo_demo_section(ctx)


#: The demo, in order. Append a ``Callable[[DemoContext], None]`` to add a section. Sections import
#: their heavy modules when they run, so ``radialog-rl --help`` stays fast.
DEMO_SECTIONS: list[Callable[[DemoContext], None]] = [
    section_release, section_generation, section_adapters, section_sft, section_ppo,
]


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
                        "(build data -> SFT -> merge -> PPO with held-out eval -> table and "
                        "reliability diagrams; about 5-8 minutes on 2 CPU cores with --preset full)")
    p.add_argument("--preset", choices=("full", "ci"), default="full",
                   help="calibration: sizes of the run (full: 800/400 rows, 12 SFT epochs, 300 PPO steps; ci: a "
                        "short run for tests)")
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
    p.add_argument("--images", type=int, default=4, metavar="N", help="synthetic images (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="new tokens per report (default 32)")
    p.add_argument("--sections", default=None, metavar="LIST",
                   help="comma-separated subset of sections to run, by name: "
                        + ",".join(s.__name__.removeprefix("section_") for s in DEMO_SECTIONS)
                        + " (default: all)")
    p.set_defaults(func=run)


def make_demo_images(count: int, crop: int):
    """``[count, 3, crop, crop]`` synthetic chest X-rays, preprocessed like real ones."""
    import torch

    from radialog_rl.data.images import make_synthetic_chest_xray, preprocess_chest_xray

    resize = round(crop * 512 / 448)  # RaDialog's 512 -> 448 ratio
    return torch.stack([
        preprocess_chest_xray(make_synthetic_chest_xray(seed, size=resize), resize=resize, crop=crop)
        for seed in range(count)
    ])


def run_calibration(args: argparse.Namespace) -> int:
    """``radialog-rl demo calibration``: run the experiment and print the one-screen summary."""
    from radialog_rl.demo.calibration import format_summary, run_calibration_experiment
    from radialog_rl.errors import ConfigError

    work = args.work or Path("runs") / f"demo-calibration-{args.preset}"
    if work.exists() and any(work.iterdir()):
        raise ConfigError(f"{work} is not empty; pass --work with a new folder (nothing is overwritten)")
    device = args.device or "cpu"
    result = run_calibration_experiment(work, args.preset, seed=args.seed, device=device)
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

    if args.images < 1 or args.max_new_tokens < 1:
        raise ConfigError("--images and --max-new-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    out = args.out or default_tiny_dir()
    started = time.perf_counter()
    release = make_tiny_release(out)
    logger.info("demo: tiny release at %s (%.1f s)", out, time.perf_counter() - started)
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


__all__ = ["DEMO_SECTIONS", "DemoContext", "PeakMemory", "make_demo_images", "section_adapters",
           "section_generation", "section_ppo", "section_release", "section_sft"]
