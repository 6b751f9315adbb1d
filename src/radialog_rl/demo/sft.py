"""The SFT section of ``radialog-rl demo``: a short supervised run on the tiny release.

Writes a handful of synthetic chest X-rays and yes/no + ``{"confidence": N}`` targets, trains
RaDialog's adapter on them with :func:`radialog_rl.training.sft.run_sft` for a few steps, and prints
the loss per step. The adapter is left in ``ctx.extras["sft_adapter"]`` for later sections.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from radialog_rl.data.images import ImageSizes, make_synthetic_chest_xray
from radialog_rl.loading.release import load_llava_config
from radialog_rl.training.sft import SFTConfig, run_sft

logger = logging.getLogger(__name__)

#: (finding, answer, confidence) of the demo's training rows.
DEMO_ROWS = (
    ("edema", "yes", 7),
    ("cardiomegaly", "no", 3),
    ("pleural effusion", "yes", 9),
    ("pneumothorax", "no", 8),
)
DEMO_STEPS = 10


def write_demo_sft_data(directory: str | Path, image_size: int) -> Path:
    """Write ``len(DEMO_ROWS)`` synthetic PNGs (``image_size`` px) and ``train.jsonl``; returns its path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed, (finding, answer, confidence) in enumerate(DEMO_ROWS):
        name = f"images/cxr_{seed}.png"
        make_synthetic_chest_xray(seed, size=image_size).save(directory / name)
        lines.append(json.dumps({
            "image": name,
            "prompt": f"<image>\nIs there {finding}?",
            "target": f'{answer} {{"confidence": {confidence}}}',
        }))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_demo_section(ctx: Any) -> None:
    """Demo section: ``DEMO_STEPS`` SFT steps of RaDialog's adapter; prints a step -> loss table.

    ``ctx`` is the demo's ``DemoContext`` (uses ``release``, ``device``, ``dtype``, ``table`` and
    ``extras``). Output goes to ``<release root>/demo-sft`` (replaced on each run).
    """
    crop = load_llava_config(ctx.release.model_path).image_size
    work = Path(ctx.release.root) / "demo-sft"
    if work.exists():
        shutil.rmtree(work)
    # Written at the resize size (RaDialog's 512 per 448 crop), so preprocessing only crops.
    train_file = write_demo_sft_data(work / "data", image_size=ImageSizes.for_crop(crop).resize)
    config = SFTConfig(
        entry_point="radialog_lora",
        model_path=str(ctx.release.model_path),
        model_base=str(ctx.release.model_base),
        precision="16bit",
        dtype=ctx.dtype,
        device=ctx.device,
        train_file=str(train_file),
        label_policy="assistant",
        trainer=dict(
            output_dir=str(work / "run"),
            max_steps=DEMO_STEPS,
            per_device_train_batch_size=2,
            learning_rate=1e-3,  # large on purpose: a visible drop within a few steps
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        ),
    )
    started = time.perf_counter()
    adapter = run_sft(config)
    seconds = time.perf_counter() - started
    history = json.loads((work / "run" / "trainer_state.json").read_text())["log_history"]
    rows = [[entry["step"], float(entry["loss"])] for entry in history if "loss" in entry]
    ctx.extras["sft_adapter"] = str(adapter)
    ctx.table(
        f"SFT ({len(DEMO_ROWS)} synthetic samples, batch 2, {ctx.device}, {ctx.dtype})",
        ["step", "loss"],
        rows,
        note=f"transformers.Trainer on RaDialog's tiny adapter, {seconds:.1f} s including loading; "
             f"loss {rows[0][1]:.2f} -> {rows[-1][1]:.2f}. Adapter: {adapter}",
    )


__all__ = ["DEMO_ROWS", "DEMO_STEPS", "sft_demo_section", "write_demo_sft_data"]
