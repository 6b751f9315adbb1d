"""``PPOConfig``: every knob of the multimodal PPO trainer, defaulting to the published RaDialog
calibration run (``docs/ppo-and-calibration.md`` §A: TRL-0.5-era PPO with batch 12,
minibatch 4, gradient accumulation 3, one PPO epoch, Adam lr 1e-5, adaptive KL from 0.05 with
target 6 and horizon 10000, clip ranges 0.2, vf_coef 0.1, gamma 1, lambda 0.95, whitened
advantages, no gradient clipping; sampling top_k 0, top_p 1, temperature 1, 50 new tokens).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from radialog_rl.errors import ConfigError
from radialog_rl.scoring import SCORERS
from radialog_rl.training.config_files import resolve_config_path
from radialog_rl.training.config_schema import (
    ENTRY_POINTS,
    FilePath,
    LoraSection,
    ModelPath,
    ModelSection,
    PositiveInt,
    RunSection,
)
from radialog_rl.training.ppo.evaluation import EVAL_METRICS
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
    accuracy_scorer: str | None = None
    """"green" or "unigram_f1" (radialog_rl.scoring): scores each report against the row's reference
    report and gives the reward its accuracy."""
    scorer: dict[str, Any] = Field(default_factory=dict)
    """The accuracy scorer's options (green: server_url, model, api_key_env, timeout, retries,
    max_concurrency, max_failure_fraction, cache, reference_key, ...)."""
    # batch sizes (per process)
    batch_size: PositiveInt = 12
    """Rollout samples per PPO step and process."""
    mini_batch_size: PositiveInt = 4
    """Samples per forward/backward pass; batch_size must be a multiple of it."""
    gradient_accumulation_steps: PositiveInt = 3
    """Minibatches per optimizer step."""
    forward_batch_size: PositiveInt | None = None
    """Rows per no-grad pass (default mini_batch_size)."""
    ppo_epochs: PositiveInt = 1
    """Passes over the batch per PPO step."""
    samples_per_prompt: PositiveInt = 1
    """Samples drawn per prompt: batch_size // samples_per_prompt prompts, each sampled K times
    (advantage_estimator rloo needs K >= 2)."""
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
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """"gae": value head + GAE (legacy TRL / the published run); "rloo": per-prompt leave-one-out
    baseline over samples_per_prompt samples (no value head in the loss)."""
    confidence_objective: Literal["sampled", "all_values"] = "sampled"
    """How the confidence statement is optimised. "sampled": the policy loss on the sampled value's
    tokens with the advantage_estimator's advantage (PPO's clipped surrogate). "all_values": the
    exact expected reward over every value 0..scale (reward_params scale, default 10), each value
    scored by the reward on the response with that value (the all-action policy gradient,
    losses.all_values_loss); no sampling noise in the value, one extra teacher-forced forward of
    scale + 1 rows per sample (each the whole prompt plus the statement) and scale + 2 reward calls
    per batch. Samples without a statement keep the sampled loss
    (span_fallback). Needs a reward whose score is a function of the text (exploration off)."""
    values_entropy_coef: NonNegative = 0.0
    """confidence_objective all_values: weight of an entropy bonus on the distribution over the
    values (reward units per nat). Without one the exact gradient settles every image on the
    batch's best single value, where no gradient is left (losses.all_values_loss)."""
    rollout_decoding: Literal["sample", "greedy"] = "sample"
    """How rollouts are decoded. "sample": ancestral sampling (PPO). "greedy": the answer the model
    would give at deployment, so that confidence_objective all_values learns how likely THAT
    answer is right (only with all_values, which enumerates the values instead of sampling them,
    and samples_per_prompt 1). Sampled answers are wrong more often than greedy ones (a sampled
    "Yes" on a clear negative), and a confidence learnt on them does not transfer to greedy
    answers: measured on the synthetic task, "Yes" answers got the lower confidence although every
    greedy "Yes" was right (held-out AUROC 0.42). With greedy rollouts the KL term anchors the
    decoded tokens (an anchor, not an estimate of the KL)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """"reward": -beta*KL in the per-token rewards (legacy TRL); "loss": beta*KL as a loss term over the
    whole sampled response (answer and EOS stay anchored when the policy loss covers only a span)."""
    span_fallback: Literal["response", "skip"] = "response"
    """What a sample without a confidence span is optimised on: the whole "response" (with the format
    penalty as its score) or nothing but the KL term ("skip"); counted in env/span_fallback_fraction.
    "response" keeps the published recipe's behaviour; with greedy rollouts it can cascade (one such
    sample pushes the greedy tokens down, the next batch has more: 100 % parse failures within 20
    steps on the synthetic task), so configs/calibration_ppo.yaml uses "skip"."""
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
    mixed_adapter_scoring: bool = False
    """Score the policy and the reference in ONE forward per minibatch (2x the rows; PEFT mixed
    adapter batches: each row names its adapter, the reference's being the frozen copy or the base).
    Fewer, larger GEMMs: a gain where a minibatch does not fill the accelerator. The policy's old
    log-probs then come from a 2b-row forward while the update runs b rows: the first ratio is 1 to
    rounding (exactly 1 only where the GEMMs are row-independent, as on CPU)."""
    # sampling
    max_new_tokens: PositiveInt = 50
    """Longest sampled response."""
    temperature: Positive = 1.0
    """Sampling temperature (> 0: PPO samples from the policy)."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Top-k sampling (0: off)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling (1: off)."""
    rollout_cache: Literal["dynamic", "static"] = "dynamic"
    """KV cache of the rollout's generate: "static" preallocates it (prompt + max_new_tokens), the
    shape a compiled decode step needs; on CUDA transformers then compiles the decode step itself
    (see rollout_compile). Greedy tokens are identical to "dynamic"."""
    rollout_compile: bool | None = None
    """Compile the decode step with torch.compile (needs rollout_cache "static"): None = transformers'
    default (compiled on CUDA/XPU with a static cache), True = also on CPU, False = never. Each new
    prompt length is a new cache shape, so expect recompiles while lengths vary."""
    rollout_merged_copy: bool = False
    """Sample rollouts with a merged-weights copy of the policy's LLaMA trunk (the active LoRA folded
    into plain linears, refreshed from the adapter before every rollout): no LoRA GEMMs and, on a
    4/8-bit base, no dequantisation per decoded token. Old log-probs, values, the reference and the
    update still run on the PEFT policy (first ratio exactly 1); the sampler differs from the scored
    policy by rounding only. Memory: one more full copy of the trunk weights (embeddings, linears,
    lm_head) in rollout_merged_dtype; the vision tower and projector are shared. Not with ZeRO-3 or
    FSDP (sharded parameters)."""
    rollout_merged_dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """Weight dtype of the rollout_merged_copy (None: the policy's compute dtype; required for a 4/8-bit
    policy, whose copy then holds dequantised weights + LoRA)."""
    # held-out evaluation
    eval_file: FilePath = None
    """JSONL like train_file, evaluated with greedy decoding every eval_every steps and at the end."""
    eval_every: Annotated[int, Field(ge=0)] = 0
    """Evaluate every this many steps (0: only at the end, when eval_file is set)."""
    eval_batch_size: PositiveInt = 16
    """Rows per evaluation batch."""
    eval_max_new_tokens: PositiveInt | None = None
    """Longest evaluation response (default max_new_tokens)."""
    eval_confidence_decoding: Literal["value", "token"] = "value"
    """How greedy evaluation picks the stated confidence: "value" scores every value 0..scale as a
    whole (the tokenizer spells "10" as "1" "0", so token-level greedy compares p(1)+p(10) with
    p(7); radialog_rl/value_greedy.py), "token" keeps plain token-level greedy decoding."""
    eval_group_by: list[str] = Field(default_factory=list)
    """Row fields to report the mean confidence per group of."""
    best_metric: str | None = None
    """Keep output_dir/best (adapter + value head + eval table) by this eval metric, e.g. auroc, ece,
    brier, accuracy."""
    best_mode: Literal["auto", "min", "max"] = "auto"
    """"auto" minimises ece/brier/sigma_cbnd/d_nckl/parse_failure_rate and maximises the others."""
    export_final: bool = True
    """At the end, write output_dir/final (adapter, value head, eval table)."""
    export_merged: bool = False
    """Also write output_dir/final/merged (the adapter merged into the 16-bit base)."""
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

    @field_validator("best_metric")
    @classmethod
    def _known_eval_metric(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("eval/") not in EVAL_METRICS:
            raise ValueError(f"must be one of {', '.join(EVAL_METRICS)} (the held-out eval metrics)")
        return value

    @field_validator("accuracy_scorer")
    @classmethod
    def _known_scorer(cls, value: str | None) -> str | None:
        if value is not None:

            if value not in SCORERS:
                raise ValueError(f"must be one of {sorted(SCORERS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.entry_point == "fresh_lora" and not self.llava_model_path:
            raise ConfigError("entry_point 'fresh_lora' needs llava_model_path (a merged SFT directory)")
        for divisor in ("mini_batch_size", "samples_per_prompt"):
            if self.batch_size % getattr(self, divisor):
                raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of {divisor} "
                                  f"({getattr(self, divisor)})")
        if self.rollout_compile and self.rollout_cache != "static":
            raise ConfigError("rollout_compile needs rollout_cache: static (a compiled decode step needs "
                              "a fixed-shape cache)")
        if self.rollout_merged_dtype is not None and not self.rollout_merged_copy:
            raise ConfigError("rollout_merged_dtype is set but rollout_merged_copy is false: set "
                              "rollout_merged_copy: true (or drop rollout_merged_dtype)")
        if self.rollout_merged_copy and self.precision != "16bit" and self.rollout_merged_dtype is None:
            raise ConfigError(f"rollout_merged_copy on a {self.precision} policy needs rollout_merged_dtype "
                              "(bf16, fp16 or fp32): the copy holds dequantised weights + LoRA in that dtype "
                              "(one more full copy of the trunk)")
        if self.advantage_estimator == "rloo" and self.samples_per_prompt < 2:
            raise ConfigError("advantage_estimator 'rloo' needs samples_per_prompt >= 2")
        if self.rollout_decoding == "greedy" and (self.confidence_objective != "all_values"
                                                  or self.samples_per_prompt != 1):
            raise ConfigError("rollout_decoding 'greedy' needs confidence_objective 'all_values' and "
                              "samples_per_prompt 1 (a sampled objective cannot learn from tokens it never samples)")
        return self

    @classmethod
    def resolve_paths(cls, data, base_dir):
        """As :meth:`ConfigModel.resolve_paths`, plus ``scorer.cache`` (always resolved)."""
        out = super().resolve_paths(data, base_dir)
        scorer = out.get("scorer")
        if isinstance(scorer, dict) and isinstance(scorer.get("cache"), str) and scorer["cache"]:
            out["scorer"] = {**scorer, "cache": resolve_config_path(scorer["cache"], base_dir, always=True)}
        return out

    def validate(self) -> None:
        """Check the current values again (after attributes were changed in place)."""
        type(self)(**self.model_dump())


def load_ppo_config(path: str | os.PathLike, overrides=(), **fields) -> PPOConfig:
    """Read a YAML file (top-level keys = :class:`PPOConfig` fields); ``key=value`` ``overrides``
    and non-None ``fields`` win (both relative to the working directory)."""
    return PPOConfig.load(path, overrides, **fields)
