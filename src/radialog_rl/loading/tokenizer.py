"""LLaVA tokenizer loading and the historical image-token layout (``docs/checkpoint-format.md`` §8).

The LLaMA tokenizer has no pad token; by RaDialog's convention pad = eos (``</s>``). Generation
pads on the left. ``tokenizer_image_token`` reproduces LLaVA's layout: split the prompt at
``<image>``, tokenize each chunk, keep only the first chunk's BOS, join with -200 placeholders; the
model expands each placeholder to one position per image feature.
"""

from __future__ import annotations

import logging
import os

import torch

from radialog_rl.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    LLAVA_BASE_HUB_ID,
)
from radialog_rl.errors import CheckpointError
from radialog_rl.loading.files import resolve_model_dir
from radialog_rl.padding import pad_rows

logger = logging.getLogger(__name__)

TOKENIZER_FILES = "tokenizer.json|tokenizer.model"


def _load_tokenizer(model_base: str | os.PathLike | None, padding_side: str):
    from transformers import AutoTokenizer


    directory = resolve_model_dir(
        model_base or LLAVA_BASE_HUB_ID,
        what="tokenizer (base LLaVA model)",
        required_files=[TOKENIZER_FILES],
        allow_patterns=["*.json", "tokenizer.model"],
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), padding_side=padding_side)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {directory}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained_text_only_llava_tokenizer(model_base: str | os.PathLike | None = None):
    """The base model's LLaMA tokenizer for text-only use: pad = eos, right padding."""
    return _load_tokenizer(model_base, padding_side="right")


def load_pretrained_llava_tokenizer_with_image_support(
    model_base: str | os.PathLike | None = None,
    mm_use_im_start_end: bool = False,
    mm_use_im_patch_token: bool = False,
):
    """Tokenizer for image prompts: left padding (generation), pad = eos, optional image tokens."""
    tokenizer = _load_tokenizer(model_base, padding_side="left")
    modify_tokenizer_for_image_input(tokenizer, mm_use_im_start_end, mm_use_im_patch_token)
    return tokenizer


def modify_tokenizer_for_image_input(
    tokenizer, mm_use_im_start_end: bool = False, mm_use_im_patch_token: bool = False
) -> int:
    """Add LLaVA's optional image tokens as special tokens; returns how many were added.

    ``<im_patch>`` with ``mm_use_im_patch_token``; ``<im_start>``/``<im_end>`` with
    ``mm_use_im_start_end``. RaDialog uses neither (vocabulary stays at 32000).
    """
    added = 0
    if mm_use_im_patch_token:
        added += tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if mm_use_im_start_end:
        added += tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    return added


def tokenizer_image_token(
    prompt: str,
    tokenizer,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids of ``prompt`` with one ``image_token_index`` per ``<image>`` (LLaVA's layout).

    Each chunk between placeholders is tokenized on its own (as LLaVA did, so ids match the
    released model's training data); the BOS that the tokenizer puts on every chunk is kept only
    for the first. Returns a list, or a ``[T]`` LongTensor with ``return_tensors="pt"``.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    if chunks and chunks[0] and chunks[0][0] == bos:
        ids.append(bos)
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[1:] if chunk and chunk[0] == bos else chunk)
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported return_tensors {return_tensors!r}; use 'pt' or None")
    return ids


def batch_tokenize_image_prompts(prompts: list[str], tokenizer, padding_side: str = "left"):
    """Tokenize prompts with ``tokenizer_image_token`` and pad them into a batch.

    Returns:
        ``(input_ids [B, T], attention_mask [B, T])``; padding with ``tokenizer.pad_token_id``.
    """
    rows = [tokenizer_image_token(p, tokenizer) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_rows(rows, pad_id, side=padding_side)
