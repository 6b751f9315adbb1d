"""The four published RaDialog calibration recipes (configs/mimic/*.yaml) run end to end on the tiny
release against a synthetic MIMIC tree, through their tiny twins (configs/mimic/tiny/), which may
differ from the real configs only in paths, precision/device, sizes and step counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from radialog_rl.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "mimic"
RECIPES = ("binary_qa_sft", "binary_qa_ppo", "report_sft", "report_ppo_shifted", "report_ppo_quadratic")

#: What a tiny twin may change: where things are, how big, how long; never the recipe.
SFT_MAY_DIFFER = {"model_path", "model_base", "precision", "dtype", "device", "train_file", "eval_file",
                  "max_length", "gradient_checkpointing", "merge_dtype"}
TRAINER_MAY_DIFFER = {"output_dir", "per_device_train_batch_size", "per_device_eval_batch_size",
                      "gradient_accumulation_steps", "max_steps", "bf16", "optim", "logging_steps",
                      "save_steps", "eval_steps", "report_to"}
PPO_MAY_DIFFER = {"llava_model_path", "precision", "dtype", "device", "tensorboard", "gradient_checkpointing",
                  "train_file", "eval_file", "batch_size", "mini_batch_size", "gradient_accumulation_steps",
                  "max_new_tokens", "steps", "save_every", "output_dir"}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_twin_differs_only_in_paths_and_sizes(recipe):
    real, tiny = _yaml(CONFIGS / f"{recipe}.yaml"), _yaml(CONFIGS / "tiny" / f"{recipe}.yaml")
    allowed = SFT_MAY_DIFFER if "sft" in recipe else PPO_MAY_DIFFER
    if recipe.startswith("report_ppo"):
        # the same built-in reward and parameters, with a word-overlap accuracy instead of GREEN
        assert tiny["reward"] == "radialog_rl.testing.mimic:report_reward_with_word_overlap"
        params = dict(tiny["reward_params"])
        assert params.pop("reward") == real["reward"] and params == real["reward_params"]
        allowed = allowed | {"reward", "reward_params"}
    for key in set(real) | set(tiny):
        if key == "trainer":
            for tkey in set(real[key]) | set(tiny[key]):
                if tkey not in TRAINER_MAY_DIFFER:
                    assert real[key].get(tkey) == tiny[key].get(tkey), f"trainer.{tkey}"
        elif key not in allowed:
            assert real.get(key) == tiny.get(key), key


def test_real_configs_hold_the_published_numbers():
    from radialog_rl.training.ppo.config import load_ppo_config
    from radialog_rl.training.sft import build_training_arguments, load_sft_config

    for recipe in ("binary_qa_sft", "report_sft"):
        config = load_sft_config(CONFIGS / f"{recipe}.yaml")
        assert config.precision == "4bit" and config.merge and config.trainer["learning_rate"] == 5e-5
        assert config.trainer["num_train_epochs"] == 1
        # every trainer key is a valid TrainingArguments field (bf16 needs a GPU, which CI lacks)
        args = build_training_arguments(load_sft_config(CONFIGS / f"{recipe}.yaml", trainer={"bf16": False}))
        assert (args.learning_rate, args.num_train_epochs, args.optim.value) == (5e-5, 1, "paged_adamw_8bit")
    for recipe, lr, tokens, explore in (("binary_qa_ppo", 1e-5, 50, 0.4), ("report_ppo_shifted", 6e-6, 300, 0.25),
                                        ("report_ppo_quadratic", 6e-6, 300, 0.25)):
        c = load_ppo_config(CONFIGS / f"{recipe}.yaml")
        assert (c.batch_size, c.mini_batch_size, c.gradient_accumulation_steps, c.ppo_epochs) == (12, 4, 3, 1)
        assert (c.learning_rate, c.max_new_tokens, c.reward_params["explore_prob"]) == (lr, tokens, explore)
        assert (c.init_kl_coef, c.adaptive_kl, c.top_k, c.top_p, c.temperature) == (0.05, True, 0, 1.0, 1.0)
        assert c.entry_point == "fresh_lora" and c.precision == "4bit" and c.max_grad_norm is None
    shifted = load_ppo_config(CONFIGS / "report_ppo_shifted.yaml")
    assert shifted.reward == "report_loglik"
    assert {k: shifted.reward_params[k] for k in ("shaping", "eps", "reward_scale")} == \
        {"shaping": "shifted", "eps": 0.01, "reward_scale": 2.0}
    quadratic = load_ppo_config(CONFIGS / "report_ppo_quadratic.yaml")
    assert quadratic.reward == "quadratic_blend"
    assert {k: quadratic.reward_params[k] for k in ("beta", "reward_scale", "r_max")} == \
        {"beta": 0.0, "reward_scale": 2.0, "r_max": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The README's tiny data commands, run against a synthetic MIMIC tree."""
    base = tmp_path_factory.mktemp("mimic-recipes")
    root = base / "mimic-cxr-jpg"
    commands = [
        ["mimic-synthetic", str(root), "--subjects", "20"],
        ["mimic-binary-qa", str(root), "--out", str(base / "qa"), "--prefix", "qa", "--split", "train",
         "--n-per-finding", "2", "--subsets", "sft=0.5,ppo=0.5"],
        ["mimic-binary-qa", str(root), "--out", str(base / "qa"), "--prefix", "qa_eval", "--split", "validate",
         "--n-per-finding", "2", "--finding", "Edema"],
        ["mimic-reports", str(root), "--out", str(base / "reports"), "--prefix", "reports", "--split", "train",
         "--subsets", "sft=0.5,ppo=0.5"],
        ["mimic-reports", str(root), "--out", str(base / "reports"), "--prefix", "reports_eval", "--split",
         "validate", "--n", "2"],
    ]
    for command in commands:
        assert main(["-q", "data", *command]) == 0, command
    return base


def _sft(recipe: str, release, train: Path, eval_: Path, out: Path) -> Path:
    from radialog_rl.training.sft import load_sft_config, run_sft

    config = load_sft_config(
        CONFIGS / "tiny" / f"{recipe}.yaml", model_path=str(release.model_path), model_base=str(release.model_base),
        train_file=str(train), eval_file=str(eval_),
        trainer={"output_dir": str(out), "save_strategy": "no", "disable_tqdm": True},
    )
    adapter = run_sft(config)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("eval_loss" in h for h in history)  # the eval file (validate split) was used
    merged = adapter.parent / "merged"
    assert (merged / "config.json").is_file()
    return merged


def _ppo(recipe: str, merged: Path, train: Path, out: Path, eval_file: Path | None = None) -> list[dict]:
    from radialog_rl.training.ppo.config import load_ppo_config
    from radialog_rl.training.ppo.trainer import PPOTrainer

    config = load_ppo_config(CONFIGS / "tiny" / f"{recipe}.yaml", llava_model_path=str(merged),
                             train_file=str(train), output_dir=str(out),
                             eval_file=str(eval_file) if eval_file else None)
    history = PPOTrainer(config).train()
    assert len(history) == config.steps == 2
    for step in history:
        assert math.isfinite(step["env/score_mean"]) and math.isfinite(step["objective/kl"])
    assert (out / "checkpoint-000002").is_dir()
    return history


@pytest.fixture(scope="module")
def qa_sft(tiny_release, data, tmp_path_factory) -> Path:
    return _sft("binary_qa_sft", tiny_release, data / "qa" / "qa_train_sft.sft.jsonl",
                data / "qa" / "qa_eval_validate.sft.jsonl", tmp_path_factory.mktemp("qa-sft"))


@pytest.fixture(scope="module")
def report_sft(tiny_release, data, tmp_path_factory) -> Path:
    return _sft("report_sft", tiny_release, data / "reports" / "reports_train_sft.sft.jsonl",
                data / "reports" / "reports_eval_validate.sft.jsonl", tmp_path_factory.mktemp("report-sft"))


def test_binary_qa_recipes_run_on_the_tiny_release(qa_sft, data, tmp_path):
    history = _ppo("binary_qa_ppo", qa_sft, data / "qa" / "qa_train_ppo.ppo.jsonl", tmp_path / "ppo",
                   eval_file=data / "qa" / "qa_eval_validate.ppo.jsonl")
    assert "calibration/parse_failure_rate" in history[0]
    assert list((tmp_path / "ppo" / "eval").glob("step-*.json"))  # the held-out evaluation ran


@pytest.mark.parametrize("recipe", ["report_ppo_shifted", "report_ppo_quadratic"])
def test_report_recipes_run_on_the_tiny_release(report_sft, data, tmp_path, recipe):
    _ppo(recipe, report_sft, data / "reports" / "reports_train_ppo.ppo.jsonl", tmp_path / "ppo")


def test_word_overlap_reward_by_hand():
    from radialog_rl.testing.mimic import report_reward_with_word_overlap, word_overlap_accuracy

    rows = [{"reference": "A b c d."}, {"reference": "x"}, {}]
    assert word_overlap_accuracy(rows, ["a b x", "y", "z"]) == [pytest.approx(2 / 5), 0.0, None]
    # confidence 8 -> p = 0.8; accuracy = |{a,b}| / |{a,b,c,d,x}| = 0.4 (the JSON is stripped first)
    # R = 0.4 ln 0.8 + 0.6 ln 0.2 = -1.054920; shifted: 2 * (2 * 3.550250 / 4.605170 - 1) = 1.083708
    out = report_reward_with_word_overlap(rows[:1], ['a b x {"confidence": 8}'], reward="report_loglik",
                                          shaping="shifted", eps=0.01, reward_scale=2.0)
    assert out.scores == [pytest.approx(1.083708, abs=1e-6)] and out.accuracies == [pytest.approx(0.4)]
    # quadratic blend, beta 0: 2 * (0 - (0.8 - 0.4)^2) = -0.32
    out = report_reward_with_word_overlap(rows[:1], ['a b x {"confidence": 8}'], reward="quadratic_blend",
                                          beta=0.0, reward_scale=2.0, r_max=0.0)
    assert out.scores == [pytest.approx(-0.32)]
