"""Opt-in rollout speed options give the same greedy tokens as the default rollout on CPU."""

from __future__ import annotations

import pytest
import torch

from radialog_rl.errors import ConfigError
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer


def _greedy(release, data, tmp_path, **options):
    config = PPOConfig(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=6, steps=1,
        output_dir=str(tmp_path / "run"), overwrite=True, dtype="fp32", tensorboard=False, **options)
    trainer = PPOTrainer(config, reward_fn=lambda rows, texts: [0.0] * len(texts))
    return trainer._sample(trainer.rows[:4], do_sample=False)[3]  # response ids [4, <=6]


def test_static_cache_rollout_gives_the_default_greedy_tokens(tiny_release, qa_data, tmp_path):
    reference = _greedy(tiny_release, qa_data, tmp_path / "a")
    static = _greedy(tiny_release, qa_data, tmp_path / "b", rollout_cache="static", rollout_compile=False)
    assert reference.shape[1] > 0 and torch.equal(static, reference)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_default_greedy_tokens(tiny_release, qa_data, tmp_path):
    # torch.compile on CPU (inductor, ~30 s for the tiny model): the decode step GPUs would compile.
    reference = _greedy(tiny_release, qa_data, tmp_path / "a")
    compiled = _greedy(tiny_release, qa_data, tmp_path / "b", rollout_cache="static", rollout_compile=True)
    assert torch.equal(compiled, reference)


def test_compile_without_a_static_cache_is_refused(tiny_release, qa_data, tmp_path):
    with pytest.raises(ConfigError, match="rollout_cache: static"):
        PPOConfig(model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
                  train_file=str(qa_data), rollout_compile=True)


# -- rollout_merged_copy ---------------------------------------------------------------------------
def test_merge_lora_weight_by_hand():
    from radialog_rl.training.ppo.merged_rollout import merge_lora_weight

    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    lora_a = torch.tensor([[1.0, -1.0]])  # [r=1, in=2]
    lora_b = torch.tensor([[2.0], [0.5]])  # [out=2, r=1]
    # B @ A = [[2, -2], [0.5, -0.5]]; x 0.5 -> [[1, -1], [0.25, -0.25]]
    expected = torch.tensor([[2.0, 1.0], [3.25, 3.75]])
    assert torch.equal(merge_lora_weight(base, lora_a, lora_b, 0.5), expected)
    merged = merge_lora_weight(base, lora_a, lora_b, 0.5, dtype=torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged.float(), expected)
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora_weight(base, lora_a.T, lora_b, 0.5)


def _trainer(release, data, tmp_path, **options):
    config = PPOConfig(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=6, steps=1,
        output_dir=str(tmp_path / "run"), overwrite=True, dtype="fp32", tensorboard=False,
        learning_rate=1e-3, top_k=1, **options)  # top_k 1: the rollout itself is greedy
    return PPOTrainer(config, reward_fn=lambda rows, texts: [len(t) / 10.0 for t in texts])


def _copy_and_policy_logits(trainer):
    """Last-position logits of the merged copy and of the PEFT policy on the same image prompts."""
    _, query, features, response, _, _ = trainer._sample(trainer.rows[:4], do_sample=False, merged=True)
    ids = torch.cat([query.input_ids, response], 1)
    mask = torch.cat([query.attention_mask, torch.ones_like(response)], 1)
    with torch.no_grad():
        copy = trainer.rollout_copy.model(input_ids=ids, attention_mask=mask, image_features=features).logits
        policy = trainer.unwrapped(input_ids=ids, attention_mask=mask, image_features=features).logits
    return copy[:, -1], policy[:, -1]


def test_merged_copy_rollout_follows_the_policy(tiny_release, qa_data, tmp_path):
    on = _trainer(tiny_release, qa_data, tmp_path / "on", rollout_merged_copy=True)
    off = _trainer(tiny_release, qa_data, tmp_path / "off")
    assert off.rollout_copy is None and on.rollout_copy.dtype == torch.float32
    # step 0: the copy's greedy tokens are the policy's
    merged = on._sample(on.rows[:4], do_sample=False, merged=True)[3]
    assert merged.shape[1] > 0 and torch.equal(merged, off._sample(off.rows[:4], do_sample=False)[3])
    stale, policy = _copy_and_policy_logits(on)
    torch.testing.assert_close(stale, policy, rtol=0, atol=1e-5)

    on_metrics = on.step()
    off.step()
    assert on_metrics["ppo/policy/first_ratio_max_dev"] == 0.0  # old log-probs from the policy, not the sampler
    # the PPO math is unchanged: the same tokens gave the same update
    on_params = dict(on.unwrapped.named_parameters())
    for name, p in off.unwrapped.named_parameters():
        assert torch.equal(on_params[name], p), name
    # after the update the copy follows the policy (and the update did move the policy)
    after = on._sample(on.rows[:4], do_sample=False, merged=True)[3]
    assert torch.equal(after, off._sample(off.rows[:4], do_sample=False)[3])
    fresh, policy = _copy_and_policy_logits(on)
    torch.testing.assert_close(fresh, policy, rtol=0, atol=1e-5)
    assert (fresh - stale).abs().max() > 1e-3
    # the shared vision tower is the policy's own module; the copy holds no PEFT layer
    assert on.rollout_copy.model.model.vision_tower is on.unwrapped.llava.model.vision_tower
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in on.rollout_copy.model.modules())
    from radialog_rl.modeling.value_head import remove_value_head_hooks

    assert remove_value_head_hooks(on.rollout_copy.model) == 0  # the copied trunk feeds no value head
    assert len(on.unwrapped.llava.model.norm._forward_hooks) >= 1  # the policy's own hook stays


def test_merged_copy_refusals(tiny_release, qa_data):
    paths = dict(model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
                 train_file=str(qa_data))
    with pytest.raises(ConfigError, match="4bit policy needs rollout_merged_dtype"):
        PPOConfig(**paths, precision="4bit", rollout_merged_copy=True)
    PPOConfig(**paths, precision="4bit", rollout_merged_copy=True, rollout_merged_dtype="bf16")  # explicit: fine
    with pytest.raises(ConfigError, match="rollout_merged_copy is false"):
        PPOConfig(**paths, rollout_merged_dtype="bf16")


@pytest.mark.parametrize("kind, expected", [("DEEPSPEED", "ZeRO-3"), ("FSDP", "FSDP2")])
def test_merged_copy_is_refused_with_sharded_parameters(kind, expected):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}}),
                            fsdp_plugin=SimpleNamespace(fsdp_version=2))
    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=2,
                                  device=torch.device("cpu"), state=state)
    fake = SimpleNamespace(accelerator=accelerator, engine=kind.lower(), config=None, unwrapped=None)
    with pytest.raises(ConfigError, match=f"{expected}.*parameters are sharded"):
        PPOTrainer._build_rollout_copy(fake)


def test_merged_copy_of_a_4bit_policy_holds_dequantised_weights(tiny_release, qa_data, tmp_path):
    trainer = _trainer(tiny_release, qa_data, tmp_path, precision="4bit", rollout_merged_copy=True,
                       rollout_merged_dtype="fp32")
    from radialog_rl.training.ppo.merged_rollout import is_quantized

    assert is_quantized(trainer.unwrapped.llava) and not is_quantized(trainer.rollout_copy.model)
    copy, policy = _copy_and_policy_logits(trainer)
    torch.testing.assert_close(copy, policy, rtol=0, atol=1e-4)
