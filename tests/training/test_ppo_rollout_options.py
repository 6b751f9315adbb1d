"""Opt-in rollout speed options give the same greedy tokens as the default rollout on CPU."""

from __future__ import annotations

import pytest
import torch

from radialog_rl.errors import ConfigError
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    from radialog_rl.testing.data import make_binary_qa_jsonl

    return make_binary_qa_jsonl(tmp_path_factory.mktemp("ppo-rollout-data"), n=8)


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
