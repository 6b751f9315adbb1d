"""The PPO scoring forward: only the response positions go through the LM head, and what it computes
equals the full-sequence logits sliced by hand."""

from __future__ import annotations

import pytest
import torch

from radialog_rl.training.ppo import losses as L
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer, response_logit_positions


def _trainer(release, data, tmp_path, **overrides) -> PPOTrainer:
    fields = dict(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=5, steps=1,
        output_dir=str(tmp_path / "run"), dtype="fp32", save_every=1000, tensorboard=False, temperature=0.7,
    )
    fields.update(overrides)
    return PPOTrainer(PPOConfig(**fields), reward_fn=lambda rows, texts: [len(t) / 10.0 for t in texts])


def test_response_logit_positions_are_the_ones_predicting_the_response():
    # query of 7 positions, response of 3: logits 6, 7, 8 predict tokens 7, 8, 9
    assert response_logit_positions(10, 3).tolist() == [6, 7, 8]
    assert response_logit_positions(5, 1).tolist() == [3]


def test_sliced_logit_logprobs_equal_the_full_sequence_ones(tiny_release, qa_data, tmp_path):
    trainer = _trainer(tiny_release, qa_data, tmp_path)
    batch = trainer.rollout()
    model, idx = trainer.unwrapped, torch.tensor([2, 0])
    tr, total = batch.response_ids.shape[1], batch.input_ids.shape[1]
    with torch.no_grad():
        logprobs, values, entropy = trainer._forward(model, batch, idx, with_entropy=True)
        full = model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                     image_features=batch.image_features[idx])
    assert full.logits.shape[1] == total  # every position, for the reference computation
    logits = full.logits[:, total - tr - 1 : total - 1]
    expected = L.gather_logprobs(logits, batch.response_ids[idx], 0.7)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, L.entropy_from_logits(logits, 0.7), rtol=0, atol=1e-5)
    torch.testing.assert_close(values, full.values[:, total - tr - 1 : total - 1], rtol=0, atol=0)
    assert logprobs.shape == values.shape == (2, tr)


@pytest.mark.parametrize("flow", ["radialog_lora", "fresh_lora"])
def test_mixed_adapter_scoring_equals_the_separate_passes(tiny_release, qa_data, tmp_path, flow):
    extra = {}
    if flow == "fresh_lora":
        from radialog_rl import save_lora_merged_llava_model_to_local_dir

        merged = save_lora_merged_llava_model_to_local_dir(
            tmp_path / "merged", model_path=tiny_release.model_path, model_base=tiny_release.model_base,
            dtype=torch.float32)
        extra = {"entry_point": "fresh_lora", "llava_model_path": str(merged)}
    trainer = _trainer(tiny_release, qa_data, tmp_path, **extra)
    # Move the policy away from its reference, so that mixing up the adapters would show.
    with torch.no_grad():
        for name, p in trainer.unwrapped.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    batch = trainer.rollout()
    epoch = [torch.tensor([3, 1]), torch.tensor([0, 2])]
    separate = trainer.old_policy_pass(batch, epoch)
    trainer.config.mixed_adapter_scoring = True
    mixed = trainer.old_policy_pass(batch, epoch)
    assert not torch.allclose(separate.logprobs, separate.ref_logprobs)
    for key in ("logprobs", "values", "entropy", "ref_logprobs"):
        torch.testing.assert_close(getattr(mixed, key), getattr(separate, key), rtol=0, atol=1e-5)


def test_mixed_adapter_scoring_keeps_the_first_ratio_and_kl(tiny_release, qa_data, tmp_path):
    trainer = _trainer(tiny_release, qa_data, tmp_path, mixed_adapter_scoring=True)
    metrics = trainer.step()
    assert metrics["ppo/policy/first_ratio_max_dev"] < 1e-6  # exactly 0 where GEMMs are row-independent
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)
