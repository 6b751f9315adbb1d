"""The calibration experiment on the synthetic visual task, end to end on the tiny release.

``radialog-rl demo calibration`` runs: build the task (CXR-like images with a finding of graded
visibility, :mod:`radialog_rl.data.synthetic_task`) -> SFT (answer + uniform random confidence: the
format, not the number) -> merge -> PPO with a fresh LoRA and held-out greedy evaluation -> the
table (SFT, PPO, the oracle and the best constant) and reliability diagrams before/after.

The recipe is the YAML pair ``configs/calibration_sft.yaml`` / ``configs/calibration_ppo.yaml``; a
preset only changes sizes (rows, steps) so that CI can run a short version.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from radialog_rl.calibration.baselines import best_constant_confidence, oracle_report
from radialog_rl.data.synthetic_task import build_synthetic_task
from radialog_rl.testing.tiny import make_tiny_release

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the experiment (everything else comes from the recipe configs)."""

    n_train: int
    n_eval: int
    sft_epochs: float
    ppo_steps: int
    eval_every: int
    findings: tuple[str, ...] = ("opacity", "effusion", "pneumothorax")


PRESETS = {
    "full": Preset(n_train=800, n_eval=400, sft_epochs=3, ppo_steps=300, eval_every=50),
    "ci": Preset(n_train=192, n_eval=96, sft_epochs=3, ppo_steps=30, eval_every=15, findings=("opacity",)),
}


@dataclass
class ExperimentResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    work: Path | None = None


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / name).read_text())


def run_calibration_experiment(work: str | Path, preset: str | Preset = "full", seed: int = 0,
                               device: str = "cpu") -> ExperimentResult:
    """Run the whole experiment in ``work`` and return the table rows (see the module docstring)."""
    from radialog_rl.training.ppo.config import PPOConfig
    from radialog_rl.training.ppo.trainer import PPOTrainer
    from radialog_rl.training.sft import SFTConfig, run_sft

    p = PRESETS[preset] if isinstance(preset, str) else preset
    work = Path(work)
    result = ExperimentResult(work=work)
    t = time.perf_counter()
    release = make_tiny_release(work / "tiny")
    task = build_synthetic_task(work / "task", n_train=p.n_train, n_eval=p.n_eval, findings=p.findings, seed=seed)
    result.seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    sft = _recipe("calibration_sft.yaml")
    sft.update(model_path=str(release.model_path), model_base=str(release.model_base), device=device,
               train_file=str(task.sft_train), eval_file=None)
    sft["trainer"].update(output_dir=str(work / "sft"), num_train_epochs=p.sft_epochs, seed=seed)
    run_sft(SFTConfig(**sft))
    merged = work / "sft" / "merged"
    result.seconds["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    ppo = _recipe("calibration_ppo.yaml")
    ppo.update(llava_model_path=str(merged), train_file=str(task.ppo_train), eval_file=str(task.ppo_eval),
               output_dir=str(work / "ppo"), steps=p.ppo_steps, eval_every=p.eval_every, seed=seed,
               device=device)
    trainer = PPOTrainer(PPOConfig(**ppo))
    before = trainer.evaluate()  # step 0: the fresh adapter is zero, so this is the SFT model
    result.seconds["eval_sft"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    after = json.loads((work / "ppo" / "final" / "eval.json").read_text())
    result.seconds["ppo"] = time.perf_counter() - t
    result.rows = _table(work / "ppo" / "eval", before, after)
    return result


def _eval_rows(eval_dir: Path, step: int) -> list[dict[str, Any]]:
    return json.loads((eval_dir / f"step-{step:06d}.json").read_text())["rows"]


def _table(eval_dir: Path, before: dict, after: dict) -> list[dict[str, Any]]:
    """Rows: SFT, PPO, the oracle (SFT's accuracy per visibility group as confidence), best constant."""
    sft_rows = _eval_rows(eval_dir, before["step"])
    correct = [bool(r["correct"]) for r in sft_rows]
    keys = ("accuracy", "ece", "brier", "auroc", "parse_failure_rate", "mean_confidence")
    table = [{"model": name, **{k: m.get(k) for k in keys}} for name, m in (("SFT", before), ("PPO", after))]
    oracle = oracle_report(sft_rows, correct).to_dict()
    constant = best_constant_confidence(correct)
    for name, report in (("oracle (SFT accuracy per group)", oracle),
                         (f"best constant ({constant.confidence})", constant.report.to_dict())):
        table.append({"model": name, "accuracy": before["accuracy"],
                      **{k: report.get(k) for k in keys[1:]}, "parse_failure_rate": 0.0})
    return table
