"""Merge a LoRA adapter into the base (16-bit) and save a self-contained, deployable directory.

The directory holds, in Hugging Face format: the merged LLM weights (safetensors, vision tower
removed), our ``config.json`` (with the biovil fields), the tokenizer, and
``non_lora_trainables.safetensors`` with the projector and vision tower under the same key
convention as RaDialog's ``non_lora_trainables.bin`` (``base_model.model.model.*``). The baseline
loader reads it as both ``model_base`` and ``model_path``, offline. It is written to a hidden sibling
first and renamed (:mod:`radialog_rl.atomic_dir`), so an interrupted export never leaves a
half-written model.

What may be at the destination: nothing, an empty directory, or (with ``overwrite``) a previous
export holding only export files. Anything else is refused before the model is loaded, so an export
can never delete a folder of other files (or the working directory).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

import torch

from radialog_rl.atomic_dir import atomic_dir, is_inside
from radialog_rl.errors import ConfigError
from radialog_rl.loading.adapters import radialog_adapter_path
from radialog_rl.loading.bundle import ModelSpec, load_model
from radialog_rl.loading.files import save_tensor_file
from radialog_rl.loading.precision import precision_spec
from radialog_rl.loading.release import PROJECTOR_PREFIX, VISION_PREFIX

logger = logging.getLogger(__name__)

MERGED_NON_LORA_FILE = "non_lora_trainables.safetensors"


#: Names an export directory may hold (``save_pretrained`` of the model and the tokenizer).
_EXPORT_FILES = ("*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt")


def check_export_destination(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an export destination that holds anything but a previous export (cheap; call it
    before loading a model). Returns the resolved path.

    Raises:
        ConfigError: ``out_dir`` is a file, the working directory (or holds it), a non-empty
            directory that is not an export, or a previous export without ``overwrite``.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new directory name")
    if is_inside(Path.cwd(), out):
        raise ConfigError(f"--out {out} is the working directory or one of its parents; give a new "
                          "directory name such as ./merged")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    foreign = sorted(p.name for p in out.iterdir()
                     if not p.is_file() or not any(fnmatch.fnmatch(p.name, g) for g in _EXPORT_FILES))
    ours = (out / "config.json").is_file() and (out / MERGED_NON_LORA_FILE).is_file()
    if not ours or foreign:
        foreign = foreign if ours else sorted(p.name for p in out.iterdir())
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise ConfigError(f"--out {out} is not empty and is not a merged-model export"
                          + (f" (it holds {shown})" if foreign else "")
                          + "; nothing was written: choose a new or empty directory")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a merged-model export; pass --overwrite to "
                          "replace it, or choose another directory")
    return out


def save_merged_model(model, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a merged (LoRA-free) ``LlavaLlamaForCausalLM`` as a self-contained directory.

    Written to a hidden sibling ``.<name>.tmp-*`` then renamed into place. An existing ``out_dir``
    must be empty, or a previous export and ``overwrite`` set (:func:`check_export_destination`).
    """
    out_dir = check_export_destination(out_dir, overwrite)
    with atomic_dir(out_dir, replace=overwrite) as tmp:
        state = model.state_dict()
        llm_state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
        model.save_pretrained(str(tmp), state_dict=llm_state)
        side = {
            "base_model.model." + k: v for k, v in state.items()
            if k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))
        }
        save_tensor_file(side, tmp / MERGED_NON_LORA_FILE)
        tokenizer.save_pretrained(str(tmp))
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
    overwrite: bool = False,
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
        overwrite: replace a previous export at ``model_save_name`` (only an export is ever
            replaced; any other non-empty directory is refused).

    Returns:
        The output directory.
    """
    if precision_spec(precision, dtype).quantized and not force:
        raise ConfigError(
            f"refusing to merge into a {precision} base: that re-quantises the merged weights. Merge "
            "in 16-bit (the default) or pass force=True"
        )
    adapter = radialog_adapter_path(radialog_lora_weights_path, model_path)  # fail before loading
    check_export_destination(model_save_name, overwrite)
    bundle = load_model(ModelSpec(model_path=model_path, model_base=model_base, precision=precision,
                                  device=device, dtype=dtype, adapter=adapter))
    # force=True: merge even a quantised base (the bundle refuses that by default).
    merged = bundle.model.merge_and_unload()
    merged.config.use_cache = True
    return save_merged_model(merged, bundle.tokenizer, model_save_name, overwrite=overwrite)
