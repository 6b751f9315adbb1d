"""The PPO trainer on the tiny release: alignment with the sampler, exact first ratio and zero KL in
both reference flows, learning, resume equivalence, bad rewards, spans, and two-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.demo.ppo import favoured_token_reward
from radialog_rl.training.ppo.rollout import EpochSampler, RewardError, span_token_mask
from radialog_rl.training.ppo.trainer import PPOTrainer

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def merged_dir(tiny_release, tmp_path_factory):
    from radialog_rl import save_lora_merged_llava_model_to_local_dir

    return save_lora_merged_llava_model_to_local_dir(
        tmp_path_factory.mktemp("ppo-merged") / "merged", model_path=tiny_release.model_path,
        model_base=tiny_release.model_base, dtype=torch.float32,
    )


def _config(release, data, tmp_path, **overrides) -> PPOConfig:
    fields = dict(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=4, steps=2,
        output_dir=str(tmp_path / "run"), dtype="fp32", save_every=1000, learning_rate=1e-3,
        tensorboard=False,
    )
    fields.update(overrides)
    return PPOConfig(**fields)


def length_reward(samples, responses):
    """A toy reward: longer decoded responses score higher (deterministic, always finite)."""
    return [len(r) / 10.0 for r in responses]


def test_logprobs_match_the_samplers_at_the_same_temperature(tiny_release, qa_data, tmp_path):
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, temperature=0.7), reward_fn=length_reward)
    model, recorded = trainer.unwrapped, {}
    generate = model.generate

    def recording_generate(**kwargs):  # keep the sampler's own (warped) scores
        out = generate(**kwargs, output_scores=True)
        recorded["scores"] = torch.stack(out.scores, dim=1).float()
        return out

    model.generate = recording_generate
    batch = trainer.rollout()
    sampler_logprobs = torch.log_softmax(recorded["scores"], -1).gather(
        -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    passes = trainer.old_policy_pass(batch, [torch.arange(4)])
    valid = batch.attention_mask[:, batch.query_length:].bool()
    assert valid.sum() > 0 and batch.image_features.shape == (4, 16, 128)
    torch.testing.assert_close(passes.logprobs[valid], sampler_logprobs[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("flow", ["radialog_lora", "fresh_lora", "radialog_lora+checkpointing"])
def test_first_ratio_is_exactly_one_and_kl_is_zero(tiny_release, qa_data, merged_dir, tmp_path, flow):
    extra = {"entry_point": "fresh_lora", "llava_model_path": str(merged_dir)} if flow == "fresh_lora" else {}
    if flow.endswith("checkpointing"):  # the update runs in train mode so checkpointing is active
        extra["gradient_checkpointing"] = True
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, steps=1, **extra), reward_fn=length_reward)
    metrics = trainer.step()
    assert metrics["ppo/policy/first_ratio_max_dev"] == 0.0
    assert metrics["objective/kl"] == 0.0
    assert metrics["objective/non_score_reward"] == 0.0
    assert metrics["vision_tower_calls"] == 1  # features computed once, reused by every pass
    llava = trainer.unwrapped.llava
    assert llava.is_gradient_checkpointing == flow.endswith("checkpointing")
    assert not any(m.p for m in trainer.unwrapped.modules() if isinstance(m, torch.nn.Dropout))
    # After the update the policy has moved away from the reference.
    batch = trainer.rollout()
    passes = trainer.old_policy_pass(batch, [torch.arange(4)])
    assert not torch.equal(passes.logprobs, passes.ref_logprobs)


def test_nan_scores_stop_the_step_naming_the_samples(tiny_release, qa_data, tmp_path):
    def nan_reward(samples, responses):
        return [float("nan") if i == 2 else 1.0 for i in range(len(responses))]

    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path), reward_fn=nan_reward)
    with pytest.raises(RewardError, match=r"non-finite scores for samples #2 \(ppo_qa.jsonl line \d+: nan\)"):
        trainer.step()


def test_skipped_samples_are_dropped_not_scored_zero(tiny_release, qa_data, tmp_path):
    def skipping_reward(samples, responses):
        return [None, 1.0, 2.0, None]

    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, mini_batch_size=1, gradient_accumulation_steps=1),
                         reward_fn=skipping_reward)
    batch = trainer.rollout()
    assert batch.valid.tolist() == [False, True, True, False]
    assert batch.mask[0].sum() == 0 and batch.mask[3].sum() == 0 and batch.mask[1].sum() > 0
    metrics = trainer.step()  # minibatches holding only a skipped sample must not poison the update
    assert metrics["env/skipped_samples"] == 2 and metrics["env/score_mean"] == 1.5
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters() if p.requires_grad)
    for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "ppo/policy/clipfrac"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_bad_ppo_rows_are_named(tmp_path):
    from radialog_rl.errors import DataError
    from radialog_rl.testing.data import write_synthetic_images
    from radialog_rl.data.prompt_rows import load_prompt_jsonl

    image = write_synthetic_images(tmp_path, 1)[0].name
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([
        json.dumps({"image": image, "prompt": "ok?"}),
        "{not json",
        json.dumps({"prompt": "no image"}),
        json.dumps({"image": "missing.png", "prompt": "?"}),
    ]))
    with pytest.raises(DataError, match=r"3 bad row\(s\).*line 2: invalid JSON.*line 3: needs 'image'.*line 4: image not found"):
        load_prompt_jsonl(path)
    path.write_text("\n".join([json.dumps({"image": image, "prompt": "a", "prior_image": image}),
                               json.dumps({"image": image, "prompt": "b"})]))
    with pytest.raises(DataError, match=r"every row has a 'prior_image' or none.*rows.jsonl line 2"):
        load_prompt_jsonl(path)


def test_rewritten_texts_are_trained_on_and_spans_follow_them(tiny_release, qa_data, tmp_path):
    """The exploration trick rewrites stated confidences; those rows are re-tokenized."""
    from radialog_rl.calibration.rewards import RewardOutput

    def rewriting_reward(samples, responses):
        texts = [r if i % 2 else 'yes {"confidence": 3}' for i, r in enumerate(responses)]
        spans = [(4, len(t)) if i % 2 == 0 else None for i, t in enumerate(texts)]
        return RewardOutput(scores=[1.0] * len(texts), spans=spans, texts=texts)

    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path), reward_fn=rewriting_reward)
    batch = trainer.rollout()
    tok = trainer.tokenizer
    for i in (0, 2):
        assert batch.texts[i] == 'yes {"confidence": 3}'
        ids = batch.response_ids[i][batch.attention_mask[i, batch.query_length:].bool()].tolist()
        assert tok.decode(ids, skip_special_tokens=True) == 'yes {"confidence": 3}'
        optimised = batch.response_ids[i][batch.mask[i].bool()].tolist()
        assert tok.decode(optimised, skip_special_tokens=True).strip() == '{"confidence": 3}'
    assert torch.equal(batch.mask[1], batch.attention_mask[1, batch.query_length:])  # untouched row
    metrics = trainer.step()
    assert metrics["ppo/policy/first_ratio_max_dev"] == 0.0


def test_reward_span_maps_to_the_sampled_tokens(tiny_tokenizer):
    text = 'yes {"confidence": 7}'
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    start = text.index("{")
    mask = span_token_mask(tiny_tokenizer, ids, (start, len(text)))
    pieces = [tiny_tokenizer.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
    selected = [tiny_tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert "".join(selected).replace("▁", " ").strip() == '{"confidence": 7}'
    assert mask[0] == 0 and pieces[-1] == text


def test_epoch_sampler_is_deterministic_and_resumable():
    a = EpochSampler(5, seed=3)
    first = a.take(3) + a.take(3) + a.take(4)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    b = EpochSampler(5, seed=3)
    b.take(3)
    c = EpochSampler(5, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(7) == first[3:]
    ranks = [EpochSampler(6, seed=0, rank=r, world=2).take(3) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(6))


def test_policy_learns_to_emit_a_favoured_token(tiny_release, qa_data, merged_dir, tmp_path):
    """Reward = share of response tokens equal to one token; its mean must rise clearly."""
    config = _config(
        tiny_release, qa_data, tmp_path, entry_point="fresh_lora", llava_model_path=str(merged_dir),
        batch_size=8, mini_batch_size=4, gradient_accumulation_steps=1, ppo_epochs=2, max_new_tokens=4,
        top_k=8, learning_rate=1e-2, lora_r=8, init_kl_coef=0.01, steps=8, seed=1,
    )
    trainer = PPOTrainer(config, reward_fn=lambda s, r: [0.0] * len(r))
    trainer.reward_fn, _ = favoured_token_reward(trainer)
    history = trainer.train()
    scores = [h["env/score_mean"] for h in history]
    early, late = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print("favoured-token scores", [round(x, 3) for x in scores])
    assert late > early + 0.25, scores


def test_resume_reproduces_the_uninterrupted_run(tiny_release, qa_data, tmp_path):
    keys = ("ppo/loss/policy", "ppo/loss/value", "env/score_mean", "objective/kl")

    straight = PPOTrainer(_config(tiny_release, qa_data, tmp_path / "a", steps=3), reward_fn=length_reward)
    full = straight.train()

    first = PPOTrainer(_config(tiny_release, qa_data, tmp_path / "b", steps=3, save_every=1), reward_fn=length_reward)
    part = first.train(steps=1)
    resumed = PPOTrainer(_config(tiny_release, qa_data, tmp_path / "b", steps=3, resume_from="latest"),
                         reward_fn=length_reward)
    assert resumed.step_count == 1
    rest = resumed.train()
    for a, b in zip(full, part + rest):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, p), (_, q) in zip(straight.unwrapped.named_parameters(), resumed.unwrapped.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    checkpoint = tmp_path / "b" / "run" / "checkpoint-000003"
    assert {"adapter", "value_head.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            "rng_state_0.pt"} <= {p.name for p in checkpoint.iterdir()}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 3 and "kl_controller" in state and "sampler" in state
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


@pytest.mark.slow
def test_two_process_ddp_run_keeps_ranks_identical(tiny_release, qa_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(HERE / "ddp_ppo_script.py"), str(tiny_release.root), str(qa_data), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert digests[0]["world"] == 2 and digests[0]["steps"] == 2
    assert digests[0]["params"] == digests[1]["params"]
    assert digests[0]["initial"] != digests[0]["params"]  # training moved the weights


def test_kl_early_stop_ends_the_epochs(tiny_release, qa_data, tmp_path):
    def updates(**overrides):
        config = _config(tiny_release, qa_data, tmp_path, ppo_epochs=3, **overrides)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        trainer.step()
        return trainer.scheduler.last_epoch  # one scheduler step per optimizer update

    assert updates() == 3  # 3 epochs x 1 accumulation group
    # The first update's minibatches still see the rollout policy (approx KL exactly 0); the
    # second epoch's group sees the moved policy, exceeds the tiny target and ends the step.
    assert updates(early_stopping=True, target_kl=1e-12) == 2


def test_no_eos_penalty_and_score_clipping_reach_the_scores(tiny_release, qa_data, tmp_path):
    # Raw scores 3 and 1: the clip (2) shows on the 3.0 rows (3 or 2.5 -> 2), the penalty on the
    # 1.0 rows without EOS (1 -> 0.5); each would be invisible if the other flattened every row.
    config = _config(tiny_release, qa_data, tmp_path, max_new_tokens=1, no_eos_penalty=0.5, score_clip=2.0)
    raw = torch.tensor([3.0, 1.0, 3.0, 1.0])
    trainer = PPOTrainer(config, reward_fn=lambda samples, responses: raw.tolist())
    batch = trainer.rollout()
    assert (~batch.has_eos[1::2]).any()  # one new token: almost never EOS
    expected = torch.where(batch.has_eos, raw, raw - 0.5).clamp(-2.0, 2.0)
    assert torch.equal(batch.scores, expected) and torch.equal(batch.raw_scores, raw)
    assert 0.5 in batch.scores.tolist() and batch.scores.max() == 2.0


def test_objective_kl_averages_the_scored_rows_only(tiny_release, qa_data, tmp_path, monkeypatch):
    """Issue 11 item 13: skipped rows (KL 0 by their mask) neither dilute objective/kl nor count as
    the adaptive controller's n_steps."""
    from radialog_rl.training.ppo import trainer as trainer_module

    real = trainer_module.L.compute_token_rewards

    def unit_kl(*args, **kwargs):
        rewards, non_score, kl = real(*args, **kwargs)
        return rewards, non_score, torch.ones_like(kl)  # per-row KL sum = number of optimised tokens

    monkeypatch.setattr(trainer_module.L, "compute_token_rewards", unit_kl)
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, mini_batch_size=1, gradient_accumulation_steps=1),
                         reward_fn=lambda samples, responses: [None, 1.0, 2.0, None])
    updates = []
    monkeypatch.setattr(trainer.kl_ctl, "update", lambda kl, n: updates.append((kl, n)))
    batch = trainer.rollout()
    monkeypatch.setattr(trainer, "rollout", lambda: batch)
    metrics = trainer.step()
    expected = float(batch.mask[1].sum() + batch.mask[2].sum()) / 2
    assert metrics["objective/kl"] == pytest.approx(expected) and updates == [(pytest.approx(expected), 2)]
