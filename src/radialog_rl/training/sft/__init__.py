"""Supervised fine-tuning, shaped like :mod:`radialog_rl.training.ppo`: :mod:`.config` (the schema),
:mod:`.data` (rows -> datasets), :mod:`.trainer` (model assembly and the ``transformers.Trainer``
glue: :func:`run_sft`), :mod:`.state` (adapter / projector files, resume, merge)."""

from radialog_rl.training.sft.config import ENTRY_POINTS, TRAINER_DEFAULTS, SFTConfig, apply_overrides, load_sft_config
from radialog_rl.training.sft.data import build_datasets, read_examples, sft_collator
from radialog_rl.training.sft.state import (
    ADAPTER_SUBDIR,
    MERGED_SUBDIR,
    NON_LORA_TRAINABLES_FILE,
    RUN_FILES,
    load_projector,
    merge_sft_adapter,
    projector_state_dict,
    resolve_resume_checkpoint,
    save_projector,
    save_sft_adapter,
)
from radialog_rl.training.sft.trainer import build_sft_model, build_training_arguments, resolve_device, run_sft

__all__ = [
    "ADAPTER_SUBDIR", "ENTRY_POINTS", "MERGED_SUBDIR", "NON_LORA_TRAINABLES_FILE", "RUN_FILES", "SFTConfig",
    "TRAINER_DEFAULTS", "apply_overrides", "build_datasets", "build_sft_model", "build_training_arguments",
    "load_projector", "load_sft_config", "merge_sft_adapter", "projector_state_dict", "read_examples",
    "resolve_device", "resolve_resume_checkpoint", "run_sft", "save_projector", "save_sft_adapter",
    "sft_collator",
]
