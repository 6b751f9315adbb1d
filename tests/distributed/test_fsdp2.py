"""PPO on two CPU processes under FSDP2 (torch ``fully_shard``), against DDP.

accelerate builds FSDP only on GPU-like devices; these runs go through the test-only launcher
tests/distributed/fsdp_on_cpu.py, which lifts that single check (see conftest.py). From one straight
run of 3 steps, one run resumed from its first checkpoint and the DDP run of the same config: the
engine really is FSDP2; both ranks hold the same trainable weights; they equal DDP's on the same
rollouts (within 1e-5); the resumed run ends where the straight one did; the saved adapter and value
head are complete and equal the gathered weights.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _policy_files(checkpoint) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    state.update(load_file(str(checkpoint / "value_head.safetensors")))
    return state


def test_ppo_runs_under_fsdp2(runs):
    run = runs.get("ppo", "fsdp2")
    for rank in (0, 1):
        assert run.info(rank) == {"distributed_type": "FSDP", "zero_stage": None, "num_processes": 2,
                                  "fsdp_version": 2}
    assert "runs under FSDP (FSDP2), 2 processes on cpu" in run.log


def test_ppo_ranks_hold_identical_trainable_weights(runs):
    run = runs.get("ppo", "fsdp2")
    first, second = run.weights(0), run.weights(1)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_ppo_weights_equal_a_ddp_run(runs):
    fsdp, ddp = runs.get("ppo", "fsdp2").weights(), runs.get("ppo", "ddp").weights()
    moved = _max_diff(ddp, _policy_files(runs.get("ppo", "ddp").output_dir / "out" / "checkpoint-000001"))
    diff = _max_diff(fsdp, ddp)
    print(f"ppo FSDP2 vs DDP: max |diff| {diff:.3g} (training moved weights by up to {moved:.3g})")
    assert moved > 1e-4  # the steps trained something
    assert diff < 1e-5


def test_ppo_resume_reproduces_the_uninterrupted_run(runs):
    straight, resumed = runs.get("ppo", "fsdp2"), runs.get("ppo", "fsdp2", "resumed")
    diff = _max_diff(straight.weights(), resumed.weights())
    print(f"ppo FSDP2 resumed vs straight: max |diff| {diff:.3g}")
    assert diff < 1e-6
    rows = lambda run: [json.loads(x) for x in (run.output_dir / "out" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full, rest = rows(straight), rows(resumed)
    assert [r["step"] for r in rest] == [2, 3]
    for a, b in zip(full[1:], rest):
        for key in ("ppo/loss/policy", "ppo/loss/value", "env/score_mean", "objective/kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])


def test_ppo_saved_adapter_is_complete_and_equals_the_gathered_weights(runs):
    run = runs.get("ppo", "fsdp2")
    saved, gathered = _policy_files(run.output_dir / "out" / "checkpoint-000003"), run.weights()
    assert saved.keys() == gathered.keys()
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == gathered[key].shape, key
        assert torch.equal(tensor.float(), gathered[key]), key
