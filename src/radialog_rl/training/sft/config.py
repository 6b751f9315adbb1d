"""``SFTConfig``: the declared SFT configuration (pydantic schema, see
:mod:`radialog_rl.training.config_schema`), its ``trainer`` section of ``TrainingArguments`` fields,
and YAML loading with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radialog_rl.data.datasets import LABEL_POLICIES, OVERFLOW_MODES
from radialog_rl.errors import ConfigError
from radialog_rl.loading.precision import parse_dtype
from radialog_rl.training.config_files import resolve_config_path
from radialog_rl.training.config_schema import (
    ENTRY_POINTS,
    FilePath,
    LoraSection,
    ModelPath,
    ModelSection,
    PositiveInt,
    RunSection,
    format_validation_error,
    suggest,
)

__all__ = ["ENTRY_POINTS", "OVERFLOW_MODES", "TRAINER_DEFAULTS", "SFTConfig", "apply_overrides",
           "load_sft_config"]

#: ``TrainingArguments`` values used unless the config's ``trainer`` mapping sets them.
TRAINER_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,  # LLaVA-1.5's LoRA learning rate
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a fraction of the total steps
    "weight_decay": 0.0,
    "logging_steps": 10,
    "logging_first_step": True,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 3,
    "seed": 42,
    "dataloader_num_workers": 0,
    # Our batches are dicts of tensors the model takes as they are (images included); the default
    # True would drop "images" because the PEFT wrapper's forward signature does not name it.
    "remove_unused_columns": False,
    # Evaluation only needs the loss; keeping [B, T, 32000] logits per batch costs gigabytes.
    "prediction_loss_only": True,
    # Every trainable parameter is used in every forward (training/sft/trainer.py docstring); True would
    # add a graph traversal per step and a DDP warning.
    "ddp_find_unused_parameters": False,
    "label_names": ["labels"],
}

#: ``TrainingArguments`` fields the config must not set, and why.
_FORBIDDEN_TRAINER_KEYS = {
    "gradient_checkpointing": "set the top-level 'gradient_checkpointing' instead (it is enabled "
                              "while loading, before LoRA is attached, as k-bit training needs)",
    "activation_checkpointing": "set the top-level 'gradient_checkpointing' instead",
    "gradient_checkpointing_kwargs": "set the top-level 'gradient_checkpointing' instead",
    "activation_checkpointing_kwargs": "set the top-level 'gradient_checkpointing' instead",
    "resume_from_checkpoint": "pass --resume PATH|latest (run_sft(resume_from_checkpoint=...))",
}

# int | float: a count stays an int (TrainingArguments reads a float below 1 as a fraction).
Positive = Annotated[int | float, Field(gt=0)]
NonNegative = Annotated[int | float, Field(ge=0)]


class TrainerSection(BaseModel):
    """Types and ranges of the ``TrainingArguments`` fields configs commonly set (the others pass
    to ``TrainingArguments`` as written, after the name check). Only keys the config sets are kept."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    output_dir: str | None = None
    max_steps: Annotated[int, Field(ge=-1)] | None = None
    num_train_epochs: Positive | None = None
    per_device_train_batch_size: PositiveInt | None = None
    per_device_eval_batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    learning_rate: Positive | None = None
    warmup_steps: NonNegative | None = None
    weight_decay: NonNegative | None = None
    max_grad_norm: NonNegative | None = None
    logging_steps: Positive | None = None
    save_steps: Positive | None = None
    eval_steps: Positive | None = None
    save_total_limit: PositiveInt | None = None
    seed: int | None = None
    dataloader_num_workers: Annotated[int, Field(ge=0)] | None = None
    remove_unused_columns: bool | None = None
    bf16: bool | None = None
    fp16: bool | None = None
    load_best_model_at_end: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _max_steps_not_zero(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_steps") == 0:
            raise ValueError("max_steps must be a positive number of steps, or -1 to train by epochs")
        return data


class SFTConfig(RunSection, LoraSection, ModelSection):  # fields: model, LoRA, run, then below
    """Everything :func:`~radialog_rl.training.sft.run_sft` needs; YAML files hold the same keys
    (:func:`load_sft_config`); ``radialog-rl sft --print-config`` lists them with their defaults.

    entry_point ``"radialog_lora"``: the RaDialog release with its own LoRA, trainable
    (``load_pretrained_llava_model_for_sft_training``); ``"fresh_lora"``: a new adapter (PEFT's
    initialisation, B = 0, so training starts exactly at the loaded model) on the baseline
    (``model_path`` = RaDialog release, ``model_base`` = base LLaVA) or on a merged directory
    (``model_path`` = the merged dir; ``model_base`` defaults to it). ``adapter_path``:
    radialog_lora: default the one inside ``model_path``; fresh_lora: continue a saved adapter.
    """

    kind: ClassVar[str] = "SFT"

    device_map: str | None = None
    """E.g. "auto" to split one model over the visible GPUs (one process only)."""
    # data (JSONL format: radialog_rl.data.datasets)
    train_file: FilePath = None
    """JSONL of image conversations (image + prompt/target, or conversations)."""
    eval_file: FilePath = None
    """Optional JSONL evaluated every save_steps."""
    label_policy: Literal[LABEL_POLICIES] = "assistant"
    """Which tokens carry labels: assistant, all, all_but_confidence_value,
    assistant_but_confidence_value."""
    max_length: PositiveInt | None = None
    """Longest sequence in tokens, image positions included (default: the model config's
    tokenizer_model_max_length)."""
    overflow: Literal[OVERFLOW_MODES] = "truncate"
    """Rows longer than max_length: "truncate" (warn and cut from the right) or "error"."""
    # training
    train_projector: bool = False
    """Also train mm_projector (kept in fp32; saved beside the adapter as
    non_lora_trainables.safetensors)."""
    train_vision_tower: bool = False
    """Also train the whole BioViL-T tower (fp32), in train mode: its BatchNorm layers then
    re-estimate their running statistics on this data (saved with the projector in
    non_lora_trainables.safetensors, merged by merge). Needed when the tower's features do not
    separate the finding (the tiny release's random tower gives nearly the same features for every
    image)."""
    trainer: dict[str, Any] = Field(default_factory=dict)
    """transformers.TrainingArguments fields (output_dir is required); unset fields take
    TRAINER_DEFAULTS, report_to defaults to tensorboard when installed; remove_unused_columns must
    stay false."""
    # output
    merge: bool = False
    """After training, merge the adapter (and trained projector) into the 16-bit base and save a
    self-contained model to <output_dir>/merged."""
    merge_dtype: str = "bf16"
    """Dtype of the merged weights."""

    @property
    def trains_non_lora(self) -> bool:
        """Whether non-LoRA tensors (projector, vision tower) are trained and saved beside the adapter."""
        return bool(self.train_projector or self.train_vision_tower)

    @field_validator("merge_dtype")
    @classmethod
    def _known_merge_dtype(cls, value: str) -> str:
        try:
            parse_dtype(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("trainer", mode="before")
    @classmethod
    def _typed_trainer(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"'trainer' must be a mapping of TrainingArguments fields, got "
                              f"{type(value).__name__}")
        _check_trainer_keys(value)
        try:
            section = TrainerSection(**value)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "trainer")) from None
        typed = section.model_dump(exclude_unset=True)
        return {k: typed.get(k, v) for k, v in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        if self.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("device_map splits one model over GPUs in one process; it cannot be used "
                              "with several processes (torchrun / accelerate launch)")
        return self

    @classmethod
    def resolve_paths(cls, data, base_dir):
        """As :meth:`ConfigModel.resolve_paths`, plus ``trainer.output_dir`` (always resolved)."""
        out = super().resolve_paths(data, base_dir)
        trainer = out.get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("output_dir"), str):
            out["trainer"] = {**trainer, "output_dir": resolve_config_path(trainer["output_dir"], base_dir,
                                                                           always=True)}
        return out

    def to_yaml(self) -> str:
        """As :meth:`ConfigModel.to_yaml`, with the trainer defaults filled in."""
        shown = self.model_copy(update={"trainer": {**TRAINER_DEFAULTS, **self.trainer}})
        return super(SFTConfig, shown).to_yaml()


def _check_trainer_keys(trainer: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    known = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    problems = []
    for key in trainer:
        if key in _FORBIDDEN_TRAINER_KEYS:
            problems.append(f"{key!r}: {_FORBIDDEN_TRAINER_KEYS[key]}")
        elif key not in known:
            problems.append(f"{suggest(key, known)} is not a transformers.TrainingArguments field")
    if trainer.get("remove_unused_columns", False) not in (False, "false", "False", "no", 0):
        problems.append("'remove_unused_columns' must be false: it would drop 'images' from the batches")
    if problems:
        raise ConfigError("trainer: " + "; ".join(problems))


def load_sft_config(path: str | os.PathLike, overrides=(), *, trainer: dict[str, Any] | None = None,
                    **fields: Any) -> SFTConfig:
    """Read an SFT YAML file (top-level keys = :class:`SFTConfig` fields).

    Relative paths in the file (``model_path``, ``model_base``, ``adapter_path``, ``train_file``,
    ``eval_file``, ``trainer.output_dir``) are resolved against the file's folder, not the working
    directory; a model path that does not exist there and does not start with ``./``/``../`` is
    kept as a hub id. ``overrides`` (``key=value`` strings, dotted for ``trainer.*``) and non-None
    ``fields`` replace keys after resolution; ``trainer`` entries are merged into the file's
    ``trainer`` mapping.

    Raises:
        ConfigError: missing file, invalid YAML, unknown keys (with a suggestion), bad values (the
            message starts with the file and names the key).
    """
    extra = {k: v for k, v in (trainer or {}).items() if v is not None}
    return SFTConfig.load(path, overrides, **fields, **({"trainer": extra} if extra else {}))


def apply_overrides(config: SFTConfig, *, trainer: dict[str, Any] | None = None, **fields: Any) -> SFTConfig:
    """A copy of ``config`` with top-level ``fields`` replaced (None values ignored) and ``trainer``
    entries merged in; validated again."""
    data = config.model_dump()
    data.update({k: v for k, v in fields.items() if v is not None})
    data["trainer"] = {**data["trainer"], **{k: v for k, v in (trainer or {}).items() if v is not None}}
    return SFTConfig(**data)
