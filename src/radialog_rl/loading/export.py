"""Merge a LoRA adapter into the base (16-bit) and save a self-contained, deployable directory.

The directory holds, in Hugging Face format: the merged LLM weights (safetensors, vision tower
removed), our ``config.json`` (with the biovil fields), the tokenizer, and
``non_lora_trainables.safetensors`` with the projector and vision tower under the same key
convention as RaDialog's ``non_lora_trainables.bin`` (``base_model.model.model.*``). The baseline
loader reads it as both ``model_base`` and ``model_path``, offline. It is written to a temporary
directory first and renamed, so an interrupted export never leaves a half-written model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from radialog_rl.errors import ConfigError
from radialog_rl.loading.files import save_tensor_file
from radialog_rl.loading.release import PROJECTOR_PREFIX, VISION_PREFIX

logger = logging.getLogger(__name__)

MERGED_NON_LORA_FILE = "non_lora_trainables.safetensors"


def save_merged_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a merged (LoRA-free) ``LlavaLlamaForCausalLM`` as a self-contained directory.

    Written to ``<out_dir>.tmp-*`` then renamed into place (an existing ``out_dir`` is replaced).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = model.state_dict()
        llm_state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
        model.save_pretrained(str(tmp), state_dict=llm_state)
        side = {
            "base_model.model." + k: v for k, v in state.items()
            if k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))
        }
        save_tensor_file(side, tmp / MERGED_NON_LORA_FILE)
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved merged model to %s", out_dir)
    return out_dir


def save_lora_merged_llava_model_to_local_dir(
    model_save_name: str | os.PathLike,
    radialog_lora_weights_path: str | os.PathLike | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    precision: str = "16bit",
    force: bool = False,
    device: str | torch.device | None = "cpu",
) -> Path:
    """Load RaDialog in 16-bit, merge its LoRA (or ``radialog_lora_weights_path``), and save it.

    Args:
        model_save_name: the output directory.
        radialog_lora_weights_path: adapter to merge (a PEFT directory or ``adapter_model.bin``);
            default the adapter inside ``model_path``.
        model_path / model_base: as for ``load_baseline_llava_model_with_vision_modules``.
        dtype: dtype of the saved weights (bf16 default).
        precision: must be "16bit": merging into 4/8-bit weights re-quantises them (rounding error
            in every merged layer). ``force=True`` allows it anyway.
        device: where to merge (cpu by default: a 7B merge fits in host memory).

    Returns:
        The output directory.
    """
    from radialog_rl.loading.adapters import _radialog_adapter_path, attach_lora
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    if precision != "16bit" and not force:
        raise ConfigError(
            f"refusing to merge into a {precision} base: that re-quantises the merged weights. Merge "
            "in 16-bit (the default) or pass force=True"
        )
    adapter = _radialog_adapter_path(radialog_lora_weights_path, model_path)  # fail before loading
    model = load_baseline_llava_model_with_vision_modules(
        model_path, model_base, precision=precision, device=device, dtype=dtype
    )
    tokenizer = model.tokenizer
    peft_model = attach_lora(model, adapter, trainable=False)
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    return save_merged_model(merged, tokenizer, model_save_name)
