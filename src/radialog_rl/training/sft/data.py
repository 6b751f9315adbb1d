"""SFT data: the JSONL conversations read and checked, then :class:`~radialog_rl.data.datasets.SFTDataset`
sized from the model config, and the collator."""

from __future__ import annotations

import logging

from radialog_rl.data.datasets import SFTCollator, SFTDataset, load_sft_jsonl
from radialog_rl.data.images import ImageSizes
from radialog_rl.errors import ConfigError
from radialog_rl.training.preflight import check_rows
from radialog_rl.training.sft.config import SFTConfig

logger = logging.getLogger(__name__)


def read_examples(config: SFTConfig):
    """``(train_examples, eval_examples_or_None)`` from ``train_file`` / ``eval_file``, every row and
    image header checked (bad rows fail here, before minutes of model loading)."""
    if not config.train_file:
        raise ConfigError("train_file is required (a JSONL file of image conversations)")
    train = load_sft_jsonl(config.train_file)
    check_rows(train, what=f"SFT train_file {config.train_file}")  # image headers, before loading
    evaluation = load_sft_jsonl(config.eval_file) if config.eval_file else None
    if evaluation:
        check_rows(evaluation, what=f"SFT eval_file {config.eval_file}")
    return train, evaluation


def build_datasets(config: SFTConfig, tokenizer, model_config, *, examples=None):
    """``(train_dataset, eval_dataset_or_None)`` as :class:`SFTDataset` sized from the model config.

    Args:
        config: the SFT config (files, label policy, max_length, overflow).
        tokenizer: the model's (fast) tokenizer.
        model_config: the ``LlavaLlamaConfig`` (``num_image_tokens``, ``image_size``,
            ``tokenizer_model_max_length``).
        examples: ``(train_examples, eval_examples_or_None)`` already read with ``load_sft_jsonl``
            (default: read ``train_file`` / ``eval_file`` now).

    Images are resized so the shorter side is ``round(image_size * 512 / 448)`` px, then centre
    cropped to ``image_size`` px: RaDialog's 512 -> 448 ratio at any tower size.
    """
    train_examples, eval_examples = examples if examples is not None else read_examples(config)
    image_size = int(model_config.image_size)
    kwargs = dict(
        num_image_tokens=int(model_config.num_image_tokens),
        image_size=image_size,
        resize=ImageSizes.for_crop(image_size).resize,
        label_policy=config.label_policy,
        max_length=config.max_length or getattr(model_config, "tokenizer_model_max_length", None),
        overflow=config.overflow,
    )
    if config.system_prompt is not None:
        kwargs["system"] = config.system_prompt
    train = SFTDataset(train_examples, tokenizer, **kwargs)
    evaluation = SFTDataset(eval_examples, tokenizer, **kwargs) if eval_examples else None
    return train, evaluation


def sft_collator(tokenizer, model_config):
    """The right-padding collator for SFT batches (pad id from the tokenizer, else the config)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.pad_token_id
    return SFTCollator(pad, padding_side="right")
