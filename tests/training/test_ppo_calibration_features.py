"""Issue-12 behaviours of the PPO trainer on the tiny release: the loss mask vs KL mask split,
exploration tokens and KL, seeded exploration, RLOO groups, LoRA targets, the held-out eval loop,
best-checkpoint direction and the final export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radialog_rl.calibration.rewards import RewardOutput, get_reward
from radialog_rl.errors import ConfigError
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.evaluation import evaluation_table, is_better
from radialog_rl.training.ppo.rollout import span_token_mask
from radialog_rl.training.ppo.trainer import PPOTrainer


def _config(release, data, tmp_path, **overrides) -> PPOConfig:
    fields = dict(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, max_new_tokens=6, steps=1,
        output_dir=str(tmp_path / "run"), dtype="fp32", save_every=1000, learning_rate=1e-3,
        tensorboard=False, export_final=False,
    )
    fields.update(overrides)
    return PPOConfig(**fields)


def _span_reward(span_of):
    """A reward with a span per response chosen by ``span_of(text)``."""
    def reward(samples, responses):
        return RewardOutput(scores=[1.0] * len(responses), spans=[span_of(r) for r in responses])
    return reward


def test_loss_mask_is_the_span_while_the_kl_mask_is_the_whole_response(tiny_release, qa_data, tmp_path):
    # Span = the first character of each response (a one-token span); samples with no text: no span.
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path),
                         reward_fn=_span_reward(lambda t: (0, 1) if t else None))
    batch = trainer.rollout()
    response_mask = batch.attention_mask[:, batch.query_length:]
    assert torch.equal(batch.kl_mask, response_mask)  # every sampled token through EOS
    for i, text in enumerate(batch.texts):
        if text:
            expected = torch.tensor(span_token_mask(trainer.tokenizer, batch.response_ids[i].tolist(), (0, 1)))
            assert torch.equal(batch.mask[i], expected * response_mask[i])
            assert batch.mask[i].sum() < batch.kl_mask[i].sum() or batch.kl_mask[i].sum() == 1
        else:  # no span: the whole response (span_fallback "response"), counted
            assert torch.equal(batch.mask[i], response_mask[i])
    assert batch.span_fallbacks == sum(1 for t in batch.texts if not t)


def test_span_fallback_skip_optimises_nothing_for_samples_without_a_span(tiny_release, qa_data, tmp_path):
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, span_fallback="skip"),
                         reward_fn=_span_reward(lambda t: None))
    batch = trainer.rollout()
    assert batch.mask.sum() == 0 and batch.span_fallbacks == 4
    assert torch.equal(batch.kl_mask, batch.attention_mask[:, batch.query_length:])
    metrics = trainer.step()
    assert metrics["env/span_fallback_fraction"] == 1.0


def test_rewritten_confidence_tokens_carry_no_kl(tiny_release, qa_data, tmp_path):
    """Exploration rewrites: the rewritten statement is optimised (loss mask) but not KL-charged."""
    statement = '{"confidence": 7}'

    def rewriting_reward(samples, responses):
        texts = [f"yes {statement}" for _ in responses]
        spans = [(4, 4 + len(statement))] * len(responses)
        return RewardOutput(scores=[1.0] * len(responses), spans=spans, texts=texts)

    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path), reward_fn=rewriting_reward)
    batch = trainer.rollout()
    assert batch.rewritten.all()
    for i in range(4):
        span = torch.tensor(span_token_mask(trainer.tokenizer, batch.response_ids[i].tolist(),
                                            (4, 4 + len(statement))))
        response = batch.attention_mask[i, batch.query_length:]
        assert torch.equal(batch.mask[i], span * response)
        assert torch.equal(batch.kl_mask[i], (1 - span) * response)
        assert batch.mask[i].sum() > 0 and (batch.mask[i] * batch.kl_mask[i]).sum() == 0
    metrics = trainer.step()
    assert np.isfinite(metrics["objective/kl"]) and metrics["env/rewritten_fraction"] == 1.0


def test_kl_as_a_loss_term_is_zero_at_the_start_and_rewards_hold_only_the_score(tiny_release, qa_data, tmp_path):
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, kl_penalty="loss", kl_estimator="k3"),
                         reward_fn=_span_reward(lambda t: (0, 1) if t else None))
    batch = trainer.rollout()
    passes = trainer.old_policy_pass(batch, [torch.arange(2), torch.arange(2, 4)])
    adv = trainer.advantages(batch, passes)
    kl, non_score = adv.kl, adv.non_score
    assert torch.equal(non_score, torch.zeros_like(non_score))  # no KL in the rewards
    assert kl.abs().max() == 0  # the fresh policy equals the reference (RaDialog adapter copy)
    metrics = trainer.step()
    assert metrics["objective/kl_loss"] == 0.0


def test_rloo_groups_share_one_image_encoding_and_prompt(tiny_release, qa_data, tmp_path):
    config = _config(tiny_release, qa_data, tmp_path, samples_per_prompt=2, advantage_estimator="rloo")
    trainer = PPOTrainer(config, reward_fn=lambda s, r: [float(len(x)) for x in r])
    calls = trainer.vision_calls
    batch = trainer.rollout()
    assert trainer.vision_calls - calls == 1  # one tower call for the 2 distinct prompts
    assert batch.rows[0] is batch.rows[1] and batch.rows[2] is batch.rows[3]
    torch.testing.assert_close(batch.image_features[0], batch.image_features[1])
    passes = trainer.old_policy_pass(batch, [torch.arange(2), torch.arange(2, 4)])
    # Unwhitened: in each pair a sample's advantage is its score minus its sibling's.
    config.whiten_advantages = False
    raw = trainer.advantages(batch, passes).advantages
    for g in (0, 2):
        a, b = batch.raw_scores[g], batch.raw_scores[g + 1]
        row_adv = raw[g][batch.mask[g].bool()]
        assert torch.allclose(row_adv, torch.full_like(row_adv, float(a - b)), atol=1e-4)
    assert np.isfinite(trainer.step()["ppo/loss/policy"])


def test_rloo_and_groups_are_validated():
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        PPOConfig(advantage_estimator="rloo", samples_per_prompt=1)
    with pytest.raises(ConfigError, match="multiple of samples_per_prompt"):
        PPOConfig(batch_size=12, mini_batch_size=4, samples_per_prompt=5)
    with pytest.raises(ConfigError, match="kl_penalty"):
        PPOConfig(kl_penalty="nowhere")


def test_fresh_lora_targets_are_configurable_including_lm_head(tiny_release, qa_data, tmp_path):
    from radialog_rl import save_lora_merged_llava_model_to_local_dir

    merged = save_lora_merged_llava_model_to_local_dir(
        tmp_path / "merged", model_path=tiny_release.model_path, model_base=tiny_release.model_base,
        dtype=torch.float32)
    config = _config(tiny_release, qa_data, tmp_path, entry_point="fresh_lora", llava_model_path=str(merged),
                     lora_r=4, lora_target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    trainer = PPOTrainer(config, reward_fn=lambda s, r: [1.0] * len(r))
    trainable = {n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert any("lm_head.lora_A" in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj", "lm_head"}
    with pytest.raises(ConfigError, match="shape a new adapter"):
        PPOConfig(lora_target_modules=["lm_head"])  # radialog_lora: the released adapter's shape


def test_exploration_draws_follow_the_config_seed(tiny_release, qa_data, tmp_path):
    def draws(seed):
        config = _config(tiny_release, qa_data, tmp_path, seed=seed, reward_params={"explore_prob": 0.5})
        trainer = PPOTrainer(config)
        return trainer.reward_fn.rng.integers(0, 1 << 30, 4).tolist()

    assert draws(3) == draws(3) and draws(3) != draws(4)


def test_evaluation_table_hand_computed():
    rows = [{"answer": "yes", "visibility": 1.0}, {"answer": "yes", "visibility": 0.2},
            {"answer": "no", "visibility": 0.0}, {"answer": "no", "visibility": 0.0}]
    texts = ['yes {"confidence": 9}', 'no {"confidence": 4}', 'no {"confidence": 8}', "maybe"]
    metrics, per_row = evaluation_table(rows, texts, 10, ["visibility"])
    assert metrics["accuracy"] == 0.5  # rows 0 and 2 right; row 3's answer unreadable = wrong
    assert metrics["answer_parse_failure_rate"] == 0.25 and metrics["parse_failure_rate"] == 0.25
    # Brier over the 3 rows with a confidence: (0.9-1)^2 + (0.4-0)^2 + (0.8-1)^2 over 3
    assert metrics["brier"] == pytest.approx((0.01 + 0.16 + 0.04) / 3)
    assert metrics["auroc"] == pytest.approx(1.0)  # right answers have the higher confidences
    groups = metrics["groups"]["visibility"]
    assert groups["0.0"] == {"n": 2, "accuracy": 0.5, "mean_confidence": pytest.approx(0.8)}
    assert groups["1.0"]["mean_confidence"] == pytest.approx(0.9) and list(groups) == ["0.0", "0.2", "1.0"]
    assert per_row[1] == {"text": texts[1], "confidence": 4, "correct": 0.0, "visibility": 0.2}


@pytest.mark.parametrize("metric, new, best, better", [
    ("ece", 0.1, 0.2, True), ("ece", 0.3, 0.2, False), ("brier", 0.1, 0.2, True),
    ("auroc", 0.8, 0.7, True), ("eval/auroc", 0.6, 0.7, False), ("accuracy", 0.9, 0.8, True),
    ("ece", None, 0.2, False), ("auroc", 0.5, None, True),
])
def test_best_checkpoint_direction(metric, new, best, better):
    assert is_better(metric, new, best) is better
    assert is_better(metric, 0.1, 0.2, "max") is False and is_better(metric, 0.1, 0.2, "min") is True


def test_eval_loop_best_and_final_export(tiny_release, qa_data, tmp_path):
    config = _config(tiny_release, qa_data, tmp_path, steps=2, eval_file=str(qa_data), eval_every=1,
                     eval_batch_size=3, eval_group_by=["answer"], best_metric="accuracy", export_final=True,
                     reward="binary_qa_loglik")
    trainer = PPOTrainer(config)
    trainer.train()
    run = tmp_path / "run"
    evals = sorted((run / "eval").glob("step-*.json"))
    assert [p.name for p in evals] == ["step-000001.json", "step-000002.json"]
    result = json.loads(evals[-1].read_text())
    assert result["metrics"]["n"] == 8 and len(result["rows"]) == 8
    assert set(result["metrics"]["groups"]["answer"]) == {"yes", "no"}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in row for row in logged)
    for name in ("final", "best"):
        export = run / name
        assert (export / "adapter" / "adapter_config.json").is_file()
        assert (export / "value_head.safetensors").is_file()
    final_eval = json.loads((run / "final" / "eval.json").read_text())
    assert final_eval["step"] == 2 and final_eval["accuracy"] == result["metrics"]["accuracy"]
    # The exported adapter equals the trained one.
    from radialog_rl.loading.adapters import read_adapter

    _, saved = read_adapter(run / "final" / "adapter")
    live = {k: v for k, v in trainer.unwrapped.pretrained_model.state_dict().items() if "lora_" in k
            and ".default." in k}
    assert len(saved) == len(live) > 0
    for key, value in saved.items():
        match = [v for k, v in live.items() if k.replace(".default", "").endswith(key.split("base_model.model.")[-1])]
        assert match and torch.equal(match[0], value), key


def test_greedy_eval_is_deterministic(tiny_release, qa_data, tmp_path):
    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, eval_file=str(qa_data)),
                         reward_fn=get_reward("binary_qa_loglik"))
    assert trainer.evaluate(write=False) == trainer.evaluate(write=False)


@pytest.mark.parametrize("value, pieces", [(7, ["7"]), (10, ["1", "0"])])
def test_two_digit_confidences_are_optimised_and_parsed_whole(tiny_tokenizer, value, pieces):
    """LLaMA's tokenizer splits "10" into "1", "0": the span (hence the policy loss and its
    log-probs) covers both digit tokens, and parsing reads 10, not 1."""
    from radialog_rl.calibration.parsing import find_confidence_span, parse_confidence

    text = f'Yes {{"confidence": {value}}}'
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text and parse_confidence(text) == value
    mask = span_token_mask(tiny_tokenizer, ids, find_confidence_span(text))
    covered = [tiny_tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    digits = [t for t in covered if t.strip("▁").isdigit()]
    assert digits == pieces and covered[-1] == "}"


def test_system_prompt_is_configurable_and_shared_by_sft(tiny_release, qa_data, tmp_path, tiny_tokenizer):
    from radialog_rl.data.prompts import SYSTEM_PROMPT
    from radialog_rl.training.sft import SFTConfig, build_datasets

    default = PPOTrainer(_config(tiny_release, qa_data, tmp_path), reward_fn=lambda s, r: [0.0] * len(r))
    bare = PPOTrainer(_config(tiny_release, qa_data, tmp_path / "b", system_prompt=""),
                      reward_fn=lambda s, r: [0.0] * len(r))
    n_system = len(tiny_tokenizer(SYSTEM_PROMPT, add_special_tokens=False).input_ids)
    shorter = default.rollout().query_length - bare.rollout().query_length
    assert n_system - 2 <= shorter <= n_system + 2  # the system text is gone from every query
    # SFT renders its conversations with the same system text.
    sft_data = tmp_path / "sft.jsonl"
    image = json.loads(qa_data.read_text().splitlines()[0])["image"]
    sft_data.write_text(json.dumps({"image": str(qa_data.parent / image), "prompt": "hi", "target": "yes"}) + "\n")
    lengths = []
    for system in (None, ""):
        config = SFTConfig(model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
                           train_file=str(sft_data), system_prompt=system, trainer={"output_dir": str(tmp_path / "s")})
        train, _ = build_datasets(config, tiny_tokenizer, default.unwrapped.llava.config)
        lengths.append(len(train[0]["input_ids"]))
    assert n_system - 2 <= lengths[0] - lengths[1] <= n_system + 2


def test_best_metric_must_be_an_eval_metric():
    assert PPOConfig(best_metric="eval/auroc").best_metric == "eval/auroc"
    with pytest.raises(ConfigError, match="best_metric"):
        PPOConfig(best_metric="auc")  # a typo would otherwise never select a best step


def _value_reward(samples, responses):
    """Score = -(1 - v/10)^2 of the stated value v (higher is better), -6 for a statement without a
    value; a response without a statement is rewritten to 'yes {"confidence": 4}' (so the tiny
    random policy has one)."""
    import re

    texts, scores, spans = [], [], []
    for r in responses:
        if r.endswith('{"confidence": '):
            texts.append(r)
            scores.append(-6.0)  # the statement with its value removed: a failure
            spans.append(None)
            continue
        m = re.search(r'\{"confidence": (\d+)\}', r)
        if m is None:
            r = 'yes {"confidence": 4}'
            m = re.search(r'\{"confidence": (\d+)\}', r)
        texts.append(r)
        scores.append(-(1 - int(m.group(1)) / 10) ** 2)
        spans.append(m.span())
    return RewardOutput(scores=scores, spans=spans, texts=texts)


def test_all_values_objective_scores_every_value_and_raises_the_expected_reward(tiny_release, qa_data, tmp_path):
    config = _config(tiny_release, qa_data, tmp_path, confidence_objective="all_values", kl_penalty="loss",
                     kl_estimator="k3", learning_rate=3e-3)
    trainer = PPOTrainer(config, reward_fn=_value_reward)
    batch = trainer.rollout()
    assert all(c is not None and len(c[1]) == 11 for c in batch.value_candidates)
    # The reward of each value, hand-computed: -(1 - v/10)^2 for every response.
    expected = torch.tensor([-(1 - v / 10) ** 2 for v in range(11)]).expand(4, 11)
    torch.testing.assert_close(batch.value_rewards, expected)
    torch.testing.assert_close(batch.failure_rewards, torch.full((4,), -6.0))
    assert batch.mask.sum() == 0  # the statement is optimised by the all-values term, not the sampled loss
    assert batch.kl_mask.sum() > 0
    for b, (n, ids) in enumerate(batch.value_candidates):
        assert trainer.tokenizer.decode(ids[7]) == batch.texts[b][: batch.texts[b].index("}") + 1].replace("4", "7")
    with torch.no_grad():
        before = trainer._all_values_term(trainer.model, batch, torch.arange(4))[1]
    metrics = trainer.step()
    assert metrics["env/all_values_fraction"] == 1.0
    assert np.isfinite(metrics["ppo/values/expected_reward"]) and metrics["ppo/values/entropy"] > 0
    assert 0 < metrics["ppo/values/mass"] <= 1
    with torch.no_grad():
        after = trainer._all_values_term(trainer.model, batch, torch.arange(4))[1]
    assert after > before  # one update moved mass towards the higher-reward values


def test_all_values_objective_refuses_exploration(tiny_release, qa_data, tmp_path):
    # From the config's reward_params (built into the reward) and from a reward passed in: one check.
    config = _config(tiny_release, qa_data, tmp_path, confidence_objective="all_values", reward="quadratic_blend",
                     reward_params={"explore_prob": 0.3})
    with pytest.raises(ConfigError, match="explore_prob"):
        PPOTrainer(config)
    reward = get_reward("quadratic_blend", explore_prob=0.5)
    with pytest.raises(ConfigError, match="explore_prob"):
        PPOTrainer(_config(tiny_release, qa_data, tmp_path, confidence_objective="all_values"), reward_fn=reward)


def test_all_values_failure_score_falls_back_and_unscored_values_keep_the_sampled_loss(tiny_release, qa_data,
                                                                                      tmp_path):
    """A reward that skips the broken statement (None) gives the row's lowest value score as the
    failure reward; a row with an unscored value is left to the sampled loss (its mask kept)."""
    def reward(samples, responses):
        out = _value_reward(samples, responses)
        scores = [None if r.endswith('{"confidence": ') else s for r, s in zip(out.texts, out.scores)]
        # The first sample's value 5 is not scored.
        scores = [None if i == 0 and '"confidence": 5}' in r else s for i, (r, s) in enumerate(zip(out.texts, scores))]
        return RewardOutput(scores=scores, spans=out.spans, texts=out.texts)

    trainer = PPOTrainer(_config(tiny_release, qa_data, tmp_path, confidence_objective="all_values"), reward_fn=reward)
    batch = trainer.rollout()
    assert batch.value_candidates[0] is None and batch.mask[0].sum() > 0
    for b in range(1, 4):
        assert batch.value_candidates[b] is not None and batch.mask[b].sum() == 0
        assert batch.failure_rewards[b].item() == pytest.approx(-1.0)  # the lowest: value 0, -(1 - 0)^2
    assert np.isfinite(trainer.step()["ppo/values/expected_reward"])


def test_greedy_rollouts_only_with_the_all_values_objective(tiny_release, qa_data, tmp_path):
    with pytest.raises(ConfigError, match="all_values"):
        _config(tiny_release, qa_data, tmp_path, rollout_decoding="greedy")
    with pytest.raises(ConfigError, match="samples_per_prompt 1"):
        _config(tiny_release, qa_data, tmp_path, rollout_decoding="greedy", confidence_objective="all_values",
                samples_per_prompt=2, advantage_estimator="rloo")
    config = _config(tiny_release, qa_data, tmp_path, rollout_decoding="greedy", confidence_objective="all_values",
                     batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1)
    trainer = PPOTrainer(config, reward_fn=_value_reward)
    batch = trainer.rollout()
    first = trainer._sample(batch.rows, do_sample=False)[5]  # the same rows, decoded greedily
    greedy = [t if '{"confidence": ' in t else 'yes {"confidence": 4}' for t in first]
    assert batch.texts == greedy


def test_all_values_scores_the_sampled_value_as_the_policy_pass_does(tiny_release, qa_data, tmp_path):
    """The value candidates' teacher-forced forward gives the sampled value (and its closing) the
    same log-probability as the policy's ordinary pass over the sampled response."""
    config = _config(tiny_release, qa_data, tmp_path, confidence_objective="all_values")
    trainer = PPOTrainer(config, reward_fn=_value_reward)
    batch = trainer.rollout()
    from radialog_rl.value_greedy import candidate_logprobs

    with torch.no_grad():
        logprobs, _, _ = trainer._forward(trainer.unwrapped, batch, torch.arange(4))
        for b, (prefix_length, candidates) in enumerate(batch.value_candidates):
            ids = batch.response_ids[b].tolist()
            v = int(batch.texts[b].split('"confidence": ')[1].split("}")[0])
            assert ids[: len(candidates[v])] == candidates[v]  # the rewritten response starts with it
            n = len(candidates[v]) - prefix_length
            tq = batch.query_length
            got = candidate_logprobs(trainer.unwrapped, batch.input_ids[:, :tq], batch.attention_mask[:, :tq],
                                     batch.image_features, [b], [candidates[v]], [n], trainer.pad_token_id)
            expected = logprobs[b, prefix_length : prefix_length + n].sum()
            torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=1e-4)
