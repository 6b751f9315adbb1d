"""``PPOConfig``: every knob of the multimodal PPO trainer, defaulting to the published RaDialog
calibration run (``shared/reference/ppo-and-calibration.md`` §A: TRL-0.5-era PPO with batch 12,
minibatch 4, gradient accumulation 3, one PPO epoch, Adam lr 1e-5, adaptive KL from 0.05 with
target 6 and horizon 10000, clip ranges 0.2, vf_coef 0.1, gamma 1, lambda 0.95, whitened
advantages, no gradient clipping; sampling top_k 0, top_p 1, temperature 1, 50 new tokens).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from radialog_rl.errors import ConfigError
from radialog_rl.training.config_schema import (
    ENTRY_POINTS,
    ConfigModel,
    FilePath,
    LoraSection,
    ModelPath,
    ModelSection,
    PositiveInt,
    RunSection,
)
from radialog_rl.training.ppo.losses import KL_KINDS

__all__ = ["ENTRY_POINTS", "PPOConfig", "load_ppo_config"]

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class PPOConfig(RunSection, LoraSection, ModelSection):  # fields: model, LoRA, run, then below
    """Configuration of :class:`~radialog_rl.training.ppo.trainer.PPOTrainer` (one YAML key per field;
    ``radialog-rl ppo --print-config`` shows them all with their documentation and defaults).

    entry_point "radialog_lora" = RaDialog + its LoRA as the starting policy, reference = a frozen
    copy of that adapter (``load_pretrained_llava_model_for_ppo_training``); "fresh_lora" = a merged
    SFT directory (``llava_model_path``) + fresh LoRA, reference = adapter disabled
    (``load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters``).
    """

    kind: ClassVar[str] = "PPO"

    # model (shared fields: ModelSection, LoraSection)
    llava_model_path: ModelPath = None
    """Merged SFT directory the fresh adapter is put on (entry_point fresh_lora)."""
    value_head_path: ModelPath = None
    """Start from a saved value head (a directory holding value_head.safetensors)."""
    # data
    train_file: FilePath = None
    """JSONL with "image" (path, relative to the file), "prompt" (the user message; <image> is
    prepended when absent) and any label fields the reward reads."""
    chat_template: bool = True
    """Wrap prompts in RaDialog's conversation template."""
    image_size: PositiveInt | None = None
    """Preprocessing crop in pixels (default from the model config)."""
    image_resize: PositiveInt | None = None
    """Shorter side before the crop (default round(image_size * 512 / 448))."""
    # reward
    reward: str = "binary_qa_loglik"
    """A built-in reward name (binary_qa_loglik, report_loglik, quadratic_blend) or module:function
    (importable from the working directory or the config's folder)."""
    reward_params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the reward."""
    # batch sizes (per process)
    batch_size: PositiveInt = 12
    """Rollout samples per PPO step and process."""
    mini_batch_size: PositiveInt = 4
    """Samples per forward/backward pass; batch_size must be a multiple of it."""
    gradient_accumulation_steps: PositiveInt = 3
    """Minibatches per optimizer step."""
    ppo_epochs: PositiveInt = 1
    """Passes over the batch per PPO step."""
    # optimisation
    learning_rate: Positive = 1e-5
    """AdamW learning rate."""
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: Positive = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    lr_scheduler: str = "constant"
    """Any transformers.get_scheduler name (constant, linear, cosine, ...)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Scheduler warm-up in optimizer steps."""
    max_grad_norm: Positive | None = None
    """Clip the gradient norm to this (none: no clipping, as the published run)."""
    # PPO
    steps: PositiveInt = 1000
    """Train until this many PPO steps are done."""
    cliprange: Positive = 0.2
    """Policy ratio clip range."""
    cliprange_value: Positive = 0.2
    """Value clip range."""
    vf_coef: NonNegative = 0.1
    """Weight of the value loss."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Discount."""
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch."""
    init_kl_coef: NonNegative = 0.05
    """Initial KL coefficient beta."""
    adaptive_kl: bool = True
    """Adapt beta towards kl_target (Ziegler et al.); fixed beta when false."""
    kl_target: Positive = 6.0
    """Target KL of the adaptive controller."""
    kl_horizon: PositiveInt = 10000
    """Horizon of the adaptive controller."""
    kl_estimator: Literal[KL_KINDS] = "k1"
    """Per-token KL estimator: k1 (log-ratio), abs, mse or k3."""
    early_stopping: bool = False
    """Stop a step's epochs when approx KL > 1.5 * target_kl."""
    target_kl: Positive = 1.0
    """Early-stop threshold (see early_stopping)."""
    score_normalization: bool = False
    """Divide scores by their running standard deviation."""
    score_clip: Positive | None = None
    """Clip (normalised) scores to [-score_clip, score_clip]."""
    no_eos_penalty: float | None = None
    """Subtracted from the score of responses without EOS."""
    # sampling
    max_new_tokens: PositiveInt = 50
    """Longest sampled response."""
    temperature: Positive = 1.0
    """Sampling temperature (> 0: PPO samples from the policy)."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Top-k sampling (0: off)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling (1: off)."""
    # run
    seed: int = 0
    """Seed (each process adds its rank)."""
    output_dir: FilePath = "runs/ppo"
    """Where metrics.jsonl, tensorboard/ and checkpoint-NNNNNN/ go."""
    save_every: PositiveInt = 50
    """Checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: PositiveInt | None = 3
    """Keep the newest this many checkpoints (none: all)."""
    resume_from: ModelPath = None
    """A checkpoint directory, "latest" or "previous" (newest / second newest in output_dir)."""
    log_every: PositiveInt = 1
    """Write metrics every this many steps."""
    tensorboard: bool = True
    """Also log to TensorBoard (when installed)."""

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.entry_point == "fresh_lora" and not self.llava_model_path:
            raise ConfigError("entry_point 'fresh_lora' needs llava_model_path (a merged SFT directory)")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        return self

    def validate(self) -> None:
        """Check the current values again (after attributes were changed in place)."""
        type(self)(**self.model_dump())


def load_ppo_config(path: str | os.PathLike, overrides=(), **fields) -> PPOConfig:
    """Read a YAML file (top-level keys = :class:`PPOConfig` fields); ``key=value`` ``overrides``
    and non-None ``fields`` win (both relative to the working directory)."""
    return PPOConfig.load(path, overrides, **fields)
