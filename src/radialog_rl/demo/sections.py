"""The sections of ``radialog-rl demo`` and what they share.

The demo is a list of sections, :data:`DEMO_SECTIONS`; each is a function taking the shared
:class:`DemoContext` and printing its own table. A feature adds a section by appending a function::

    def section_sft(ctx: DemoContext) -> None:
        ...
        ctx.table("SFT", ["step", "loss"], rows)

    DEMO_SECTIONS.append(section_sft)

Tables go to stdout (they are the command's output); progress goes to the log (stderr). The
sections' bodies live beside this file: :mod:`.adapters`, :mod:`.sft`, :mod:`.ppo`; the calibration
experiment (``radialog-rl demo calibration``) is :mod:`.calibration`.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


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
    from radialog_rl.loading.bundle import ModelSpec, load_model

    spec = ModelSpec(model_path=ctx.release.model_path, model_base=ctx.release.model_base,
                     device=ctx.device, dtype=ctx.dtype)
    # Warm-up, untimed: the first load pays one-time costs (lazy imports, kernel set-up) that would
    # otherwise be charged to whichever precision comes first.
    bundle = load_model(spec)
    generate_reports(bundle.model, bundle.tokenizer, ctx.images[:1], max_new_tokens=2)
    del bundle
    gc.collect()

    rows, method = [], ""
    sample = ""
    for precision in ctx.precisions:
        logger.info("demo: loading the tiny release at %s on %s", precision, ctx.device)
        with PeakMemory(ctx.device) as memory:
            started = time.perf_counter()
            bundle = load_model(spec.with_(precision=precision))
            load_seconds = time.perf_counter() - started
            started = time.perf_counter()
            results = generate_reports(bundle.model, bundle.tokenizer, ctx.images, findings=["edema"],
                                       max_new_tokens=ctx.max_new_tokens)
            if ctx.device.startswith("cuda"):
                torch.cuda.synchronize(ctx.device)
            gen_seconds = time.perf_counter() - started
        method = memory.method
        tokens = sum(r.num_tokens for r in results)
        sample = sample or results[0].text
        rows.append([precision, load_seconds, len(results), tokens, tokens / max(gen_seconds, 1e-9),
                     memory.megabytes])
        del bundle, results
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
    """The four entry points, a merge, a reload, merged-vs-unmerged logits (:mod:`.adapters`)."""
    from radialog_rl.demo.adapters import adapters_demo_section

    adapters_demo_section(ctx)


def section_sft(ctx: DemoContext) -> None:
    """A short SFT run on synthetic samples, loss going down (:mod:`.sft`)."""
    from radialog_rl.demo.sft import sft_demo_section

    sft_demo_section(ctx)


def section_ppo(ctx: DemoContext) -> None:
    """A few PPO steps with a toy reward, the reward curve (:mod:`.ppo`)."""
    from radialog_rl.demo.ppo import ppo_demo_section

    ppo_demo_section(ctx)


#: The demo, in order. Append a ``Callable[[DemoContext], None]`` to add a section. Sections import
#: their heavy modules when they run, so ``radialog-rl --help`` stays fast.
DEMO_SECTIONS: list[Callable[[DemoContext], None]] = [
    section_release, section_generation, section_adapters, section_sft, section_ppo,
]


def make_demo_images(count: int, crop: int):
    """``[count, 3, crop, crop]`` synthetic chest X-rays, preprocessed like real ones."""
    import torch

    from radialog_rl.data.images import ImageSizes, make_synthetic_chest_xray, preprocess_chest_xray

    resize = ImageSizes.for_crop(crop).resize
    return torch.stack([
        preprocess_chest_xray(make_synthetic_chest_xray(seed, size=resize), resize=resize, crop=crop)
        for seed in range(count)
    ])


__all__ = ["DEMO_SECTIONS", "DemoContext", "PeakMemory", "make_demo_images", "section_adapters",
           "section_generation", "section_ppo", "section_release", "section_sft"]
