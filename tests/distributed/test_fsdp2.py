"""PPO and SFT on two CPU processes under FSDP2 (torch ``fully_shard``), against DDP.

accelerate builds FSDP only on GPU-like devices; these runs go through the test-only launcher
tests/distributed/fsdp_on_cpu.py, which lifts that single check (see its docstring). Per kind, from
one straight run of 3 steps, one run resumed from its first checkpoint and the DDP run of the same
config: the engine really is FSDP2; both ranks hold the same trainable weights; they equal DDP's on
the same rollouts / batches (within 1e-5); the resumed run ends where the straight one did; the
saved adapter (and PPO value head) are complete and equal the gathered weights.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

KINDS = ["ppo", "sft"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _ppo_policy(checkpoint) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    state.update(load_file(str(checkpoint / "value_head.safetensors")))
    return state


def _saved_policy(kind: str, run) -> dict:
    """What the run exported at its end (PPO: the last checkpoint's adapter and value head; SFT:
    ``adapter/``; FSDP's ``checkpoint-N`` of SFT hold accelerate's shards, not an adapter file)."""
    from safetensors.torch import load_file

    out = run.output_dir / "out"
    if kind == "ppo":
        return _ppo_policy(out / "checkpoint-000003")
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _ddp_after_step_one(kind: str, runs) -> dict:
    from safetensors.torch import load_file

    out = runs.get(kind, "ddp").output_dir / "out"
    if kind == "ppo":
        return _ppo_policy(out / "checkpoint-000001")
    return load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_runs_under_fsdp2(runs, kind):
    run = runs.get(kind, "fsdp2")
    for rank in (0, 1):
        assert run.info(rank) == {"distributed_type": "FSDP", "zero_stage": None, "num_processes": 2,
                                  "fsdp_version": 2}
    assert f"{kind.upper()} runs under FSDP (FSDP2), 2 processes on cpu" in run.log


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_hold_identical_trainable_weights(runs, kind):
    run = runs.get(kind, "fsdp2")
    first, second = run.weights(0), run.weights(1)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_a_ddp_run(runs, kind):
    fsdp, ddp = runs.get(kind, "fsdp2").weights(), runs.get(kind, "ddp").weights()
    moved = _max_diff(ddp, _ddp_after_step_one(kind, runs))
    diff = _max_diff(fsdp, ddp)
    print(f"{kind} FSDP2 vs DDP: max |diff| {diff:.3g} (training moved weights by up to {moved:.3g})")
    assert moved > 1e-4  # the steps trained something
    assert diff < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_resume_reproduces_the_uninterrupted_run(runs, kind):
    straight, resumed = runs.get(kind, "fsdp2"), runs.get(kind, "fsdp2", "resumed")
    diff = _max_diff(straight.weights(), resumed.weights())
    print(f"{kind} FSDP2 resumed vs straight: max |diff| {diff:.3g}")
    assert diff < 1e-6
    if kind == "ppo":
        rows = lambda run: [json.loads(x) for x in (run.output_dir / "out" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        full, rest = rows(straight), rows(resumed)
        assert [r["step"] for r in rest] == [2, 3]
        for a, b in zip(full[1:], rest):
            for key in ("ppo/loss/policy", "ppo/loss/value", "env/score_mean", "objective/kl"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
    else:
        history = lambda run: {e["step"]: e["loss"] for e in json.loads(  # noqa: E731
            (run.output_dir / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e}
        full, rest = history(straight), history(resumed)
        for step in (2, 3):
            assert rest[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_is_complete_and_equals_the_gathered_weights(runs, kind):
    run = runs.get(kind, "fsdp2")
    saved, gathered = _saved_policy(kind, run), run.weights()
    assert saved.keys() == gathered.keys()
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == gathered[key].shape, key
        assert torch.equal(tensor.float(), gathered[key]), key
