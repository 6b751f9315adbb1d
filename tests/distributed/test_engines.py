"""PPO and SFT on two CPU processes under DeepSpeed ZeRO-2 and ZeRO-3, against DDP.

Per (kind, stage), from one straight run of 3 steps, one run resumed from its first checkpoint and
one DDP run of the same config (see conftest.py): the engine really is DeepSpeed at that stage; both
ranks hold the same trainable weights; they equal DDP's on the same rollouts / batches (within
1e-5: only the order of floating-point reductions differs); the resumed run ends where the
straight one did; the saved adapter (and PPO value head) are complete and equal the gathered weights.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

CASES = [pytest.param(kind, stage, id=f"{kind}-zero{stage}") for kind in ("ppo", "sft") for stage in (2, 3)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _saved_policy(kind: str, run) -> dict:
    """The adapter (and value head) the run wrote at its end, under the adapter file's keys."""
    from safetensors.torch import load_file

    out = run.output_dir / "out"
    if kind == "ppo":
        checkpoint = out / "checkpoint-000003"
        state = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
        state.update(load_file(str(checkpoint / "value_head.safetensors")))
        return state
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind,stage", CASES)
def test_runs_under_deepspeed_at_the_stage(runs, kind, stage):
    run = runs.get(kind, f"zero{stage}")
    for rank in (0, 1):
        assert run.info(rank) == {"distributed_type": "DEEPSPEED", "zero_stage": stage, "num_processes": 2}
    assert f"runs under DEEPSPEED (ZeRO-{stage}), 2 processes on cpu" in run.log
    ddp = runs.get(kind, "ddp")
    assert ddp.info(0) == {"distributed_type": "MULTI_CPU", "zero_stage": None, "num_processes": 2}


@pytest.mark.parametrize("kind,stage", CASES)
def test_ranks_hold_identical_trainable_weights(runs, kind, stage):
    run = runs.get(kind, f"zero{stage}")
    first, second = run.weights(0), run.weights(1)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("kind,stage", CASES)
def test_weights_equal_a_ddp_run(runs, kind, stage):
    deepspeed, ddp = runs.get(kind, f"zero{stage}").weights(), runs.get(kind, "ddp").weights()
    moved = _max_diff(ddp, _saved_first_checkpoint(kind, runs.get(kind, "ddp")))
    diff = _max_diff(deepspeed, ddp)
    print(f"{kind} ZeRO-{stage} vs DDP: max |diff| {diff:.3g} (training moved weights by up to {moved:.3g})")
    assert moved > 1e-4  # the steps trained something
    assert diff < 1e-5


def _saved_first_checkpoint(kind: str, run) -> dict:
    """The weights after step 1 (to show training moved them between steps 1 and 3)."""
    from safetensors.torch import load_file

    out = run.output_dir / "out"
    if kind == "ppo":
        state = load_file(str(out / "checkpoint-000001" / "adapter" / "adapter_model.safetensors"))
        state.update(load_file(str(out / "checkpoint-000001" / "value_head.safetensors")))
        return state
    return load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind,stage", CASES)
def test_resume_reproduces_the_uninterrupted_run(runs, kind, stage):
    straight, resumed = runs.get(kind, f"zero{stage}"), runs.get(kind, f"zero{stage}", "resumed")
    diff = _max_diff(straight.weights(), resumed.weights())
    print(f"{kind} ZeRO-{stage} resumed vs straight: max |diff| {diff:.3g}")
    assert diff < 1e-6
    if kind == "ppo":
        keys = ("ppo/loss/policy", "ppo/loss/value", "env/score_mean", "objective/kl")
        rows = lambda run: [json.loads(x) for x in (run.output_dir / "out" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
        full, rest = rows(straight), rows(resumed)
        assert [r["step"] for r in rest] == [2, 3]
        for a, b in zip(full[1:], rest):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
    else:
        history = lambda run: {e["step"]: e["loss"] for e in json.loads(  # noqa: E731
            (run.output_dir / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e}
        full, rest = history(straight), history(resumed)
        for step in (2, 3):
            assert rest[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("kind,stage", CASES)
def test_saved_adapter_is_complete_and_equals_the_gathered_weights(runs, kind, stage):
    run = runs.get(kind, f"zero{stage}")
    saved, gathered = _saved_policy(kind, run), run.weights()
    assert saved.keys() == gathered.keys()
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == gathered[key].shape, key
        assert torch.equal(tensor.float(), gathered[key]), key
