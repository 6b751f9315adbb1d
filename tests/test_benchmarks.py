"""The GPU benchmark's CPU smoke mode runs end to end (the full run needs a GPU and is not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_ppo_step_benchmark_smoke_mode_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ppo_step.py"), "--tiny"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| 4bit |" in out and "| bf16 |" in out and "LlavaForConditionalGeneration" in out
    for line in out.splitlines():
        if line.startswith(("| 4bit |", "| bf16 |")):
            assert line.rstrip(" |").endswith("| 0")  # the first PPO ratio is exactly 1


def test_all_values_pass_benchmark_runs_and_both_paths_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "all_values_pass.py"), "--preset", "tiny",
                           "--batch-sizes", "2", "--runs", "1", "--threads", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| tiny | 2 | 22 |"))
    out_diff, grad_diff = (float(c) for c in row.strip(" |").split("|")[-2:])
    assert out_diff < 1e-4 and grad_diff < 1e-3
