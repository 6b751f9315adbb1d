"""``PPOConfig``: every knob of the multimodal PPO trainer, defaulting to the published RaDialog
calibration run (``shared/reference/ppo-and-calibration.md`` §A: TRL-0.5-era PPO with batch 12,
minibatch 4, gradient accumulation 3, one PPO epoch, Adam lr 1e-5, adaptive KL from 0.05 with
target 6 and horizon 10000, clip ranges 0.2, vf_coef 0.1, gamma 1, lambda 0.95, whitened
advantages, no gradient clipping; sampling top_k 0, top_p 1, temperature 1, 50 new tokens).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radialog_rl.errors import ConfigError
from radialog_rl.training.config_files import read_yaml_mapping, resolve_config_path

ENTRY_POINTS = ("radialog_lora", "fresh_lora")


@dataclass
class PPOConfig:
    """Configuration of :class:`~radialog_rl.training.ppo.trainer.PPOTrainer`.

    Model loading
        entry_point: "radialog_lora" = RaDialog + its LoRA as the starting policy, reference = a
            frozen copy of that adapter (``load_pretrained_llava_model_for_ppo_training``);
            "fresh_lora" = a merged SFT directory + fresh LoRA, reference = adapter disabled
            (``load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters``).
        model_path / model_base: RaDialog release and base LLaVA (radialog_lora).
        llava_model_path: merged SFT directory (fresh_lora).
        adapter_path / value_head_path: start from a saved adapter / value head.
        precision: "16bit", "8bit" or "4bit"; dtype: compute dtype ("bf16", "fp16", "fp32").
        device: "cpu" forces the CPU; otherwise each process uses the GPU its launcher assigns
            (one per process; pick GPUs with ``CUDA_VISIBLE_DEVICES``).
        lora_r / lora_alpha / lora_dropout / lora_target_modules: shape of a fresh adapter
            (fresh_lora without adapter_path only; default RaDialog's r 128, alpha 256, dropout
            0.05 on the seven LLaMA projections; "lm_head" may be added to the targets).
    Data
        train_file: JSONL with ``image`` (path, relative to the file), ``prompt`` (the user
            message; ``<image>`` is prepended when absent) and any label fields the reward reads.
        chat_template: wrap prompts in RaDialog's conversation template.
        image_size / image_resize: preprocessing crop and resize (default from the model config).
    Reward
        reward: a built-in name (``binary_qa_loglik``, ``report_loglik``, ``quadratic_blend``) or
            ``module:function``; reward_params: its keyword arguments.
        accuracy_scorer: "green" or "unigram_f1" (:mod:`radialog_rl.scoring`): scores each report
            against the row's reference report and gives the reward its accuracy; scorer: that
            scorer's options (green: server_url, model, api_key_env, timeout, retries,
            max_concurrency, max_failure_fraction, cache, reference_key, ...).
    """

    # model
    entry_point: str = "radialog_lora"
    model_path: str | None = None
    model_base: str | None = None
    llava_model_path: str | None = None
    adapter_path: str | None = None
    value_head_path: str | None = None
    precision: str = "16bit"
    dtype: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    # Modules a fresh adapter wraps (default RaDialog's seven LLaMA projections); add "lm_head"
    # when the output layer must learn too (the tiny release's lm_head is random and frozen).
    lora_target_modules: list[str] | None = None
    # data
    train_file: str | None = None
    chat_template: bool = True
    image_size: int | None = None
    image_resize: int | None = None
    # reward
    reward: str = "binary_qa_loglik"
    reward_params: dict[str, Any] = field(default_factory=dict)
    accuracy_scorer: str | None = None
    scorer: dict[str, Any] = field(default_factory=dict)
    # batch sizes (per process)
    batch_size: int = 12
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 3
    forward_batch_size: int | None = None  # no-grad passes; default mini_batch_size
    ppo_epochs: int = 1
    # Samples drawn per prompt: batch_size // samples_per_prompt prompts, each sampled K times
    # (needed by advantage_estimator "rloo").
    samples_per_prompt: int = 1
    # optimisation
    learning_rate: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # any transformers.get_scheduler name
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    # PPO
    steps: int = 1000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # "gae": value head + GAE (legacy TRL / the published run). "rloo": per-prompt leave-one-out
    # baseline over samples_per_prompt samples (no value head in the loss; see losses.rloo_advantages).
    advantage_estimator: str = "gae"
    # "reward": -beta*KL in the per-token rewards (legacy TRL). "loss": beta*KL as a loss term over
    # the whole sampled response, so that answer and EOS tokens stay anchored when the policy loss
    # only covers the confidence span (losses.kl_loss).
    kl_penalty: str = "reward"
    # What a sample with no confidence span is optimised on: "response" (the whole response, with
    # the format penalty as its score) or "skip" (nothing). Counted in env/span_fallback_fraction.
    span_fallback: str = "response"
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"  # k1 | abs | mse | k3
    early_stopping: bool = False
    target_kl: float = 1.0  # early stop when approx KL > 1.5 * target_kl
    score_normalization: bool = False  # divide scores by their running std
    score_clip: float | None = None
    no_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
    # sampling
    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # held-out evaluation (greedy decoding on eval_file every eval_every steps and at the end)
    eval_file: str | None = None
    eval_every: int = 0  # 0: only at the end (when eval_file is set)
    eval_batch_size: int = 16
    eval_max_new_tokens: int | None = None  # default max_new_tokens
    eval_group_by: list[str] = field(default_factory=list)  # row fields: mean confidence per group
    # Keep output_dir/best (adapter + value head + eval table) by this eval metric, e.g.
    # "auroc", "ece", "brier", "accuracy"; best_mode "auto" minimises ece/brier/sigma_cbnd/d_nckl/
    # parse_failure_rate and maximises everything else.
    best_metric: str | None = None
    best_mode: str = "auto"
    # At the end, write output_dir/final (adapter, value head, eval table); export_merged also
    # writes output_dir/final/merged (the adapter merged into the 16-bit base).
    export_final: bool = True
    export_merged: bool = False
    # run
    seed: int = 0
    output_dir: str = "runs/ppo"
    save_every: int = 50
    keep_checkpoints: int | None = 3
    resume_from: str | None = None  # a checkpoint dir, or "latest"
    log_every: int = 1
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        if self.entry_point not in ENTRY_POINTS:
            raise ConfigError(f"entry_point must be one of {ENTRY_POINTS}, got {self.entry_point!r}")
        shaping = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
                   if getattr(self, k) is not None]
        if shaping and (self.entry_point != "fresh_lora" or self.adapter_path):
            raise ConfigError(f"{', '.join(shaping)} shape a new adapter (entry_point 'fresh_lora' without "
                              "adapter_path); the radialog_lora entry point uses the released adapter's shape")
        if self.entry_point == "fresh_lora" and not self.llava_model_path:
            raise ConfigError("entry_point 'fresh_lora' needs llava_model_path (a merged SFT directory)")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                     "max_new_tokens", "steps", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0 (PPO samples from the policy)")
        if self.batch_size % self.samples_per_prompt:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                              f"({self.samples_per_prompt})")
        choices = {"advantage_estimator": ("gae", "rloo"), "kl_penalty": ("reward", "loss"),
                   "span_fallback": ("response", "skip"), "best_mode": ("auto", "min", "max")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.advantage_estimator == "rloo" and self.samples_per_prompt < 2:
            raise ConfigError("advantage_estimator 'rloo' needs samples_per_prompt >= 2")
        if self.accuracy_scorer is not None:
            from radialog_rl.scoring import SCORERS

            if self.accuracy_scorer not in SCORERS:
                raise ConfigError(f"accuracy_scorer must be one of {sorted(SCORERS)}, got {self.accuracy_scorer!r}")
        if self.kl_estimator not in ("k1", "abs", "mse", "k3"):
            raise ConfigError(f"kl_estimator must be k1, abs, mse or k3, got {self.kl_estimator!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> PPOConfig:
        """Build from a dict (e.g. YAML); unknown keys are an error; relative paths resolve
        against ``base_dir`` (the YAML file's folder)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown PPO config keys: {', '.join(unknown)}")
        data = dict(data)
        if base_dir is not None:
            for key in ("model_path", "model_base", "llava_model_path", "adapter_path", "value_head_path",
                        "train_file", "eval_file", "output_dir", "resume_from"):
                data[key] = resolve_config_path(data.get(key), base_dir, always=key == "output_dir")
            if isinstance(data.get("scorer"), dict) and data["scorer"].get("cache"):
                data["scorer"] = {**data["scorer"], "cache": resolve_config_path(data["scorer"]["cache"], base_dir, always=True)}
        return cls(**data)


def load_ppo_config(path: str | os.PathLike, **overrides) -> PPOConfig:
    """Read a YAML file (top-level keys = :class:`PPOConfig` fields); ``overrides`` win."""
    path = Path(path).expanduser()
    data = read_yaml_mapping(path, "PPO")
    config = PPOConfig.from_dict(data, base_dir=path.resolve().parent)
    # Command-line overrides are relative to the working directory, not to the YAML file.
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **changes) if changes else config
