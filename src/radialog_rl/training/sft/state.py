"""What an SFT run writes and reads back: the final adapter (PEFT layout), the trained projector /
vision tower beside it, the checkpoint to resume from, and the merged model.

Files under ``output_dir``: ``checkpoint-*`` (the Trainer's), ``adapter/`` (``adapter_config.json``
+ ``adapter_model.safetensors``, plus ``non_lora_trainables.safetensors`` when the projector or tower
was trained), ``merged/`` (with ``merge``), ``trainer_state.json``, ``sft_config.json``, ``runs/``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from radialog_rl.atomic_dir import atomic_dir
from radialog_rl.errors import CheckpointError, ConfigError
from radialog_rl.loading.adapters import attach_lora, save_default_adapter
from radialog_rl.loading.bundle import merged_base
from radialog_rl.loading.export import save_lora_merged_llava_model_to_local_dir, save_merged_model
from radialog_rl.loading.files import save_tensor_file
from radialog_rl.loading.precision import precision_spec
from radialog_rl.loading.release import load_non_lora_trainables, load_release
from radialog_rl.modeling.llava import unwrap_llava
from radialog_rl.training.run_dir import resolve_checkpoint
from radialog_rl.training.sft.config import SFTConfig

logger = logging.getLogger(__name__)


#: The trained projector, beside the adapter, with RaDialog's ``base_model.model.model.*`` keys.
NON_LORA_TRAINABLES_FILE = "non_lora_trainables.safetensors"
#: Subdirectories of ``output_dir`` written at the end of :func:`~radialog_rl.training.sft.trainer.run_sft`.
ADAPTER_SUBDIR = "adapter"
MERGED_SUBDIR = "merged"
#: What an SFT run writes into ``trainer.output_dir`` (what ``overwrite`` may remove).
RUN_FILES = ("checkpoint-*", ADAPTER_SUBDIR, MERGED_SUBDIR, "trainer_state.json", "sft_config.json", "runs")


def projector_state_dict(model) -> dict[str, torch.Tensor]:
    """The projector's tensors under RaDialog's ``non_lora_trainables`` keys
    (``base_model.model.model.mm_projector.*``), and the whole vision tower's
    (``base_model.model.model.vision_tower.*``, BatchNorm statistics included) when it is trained."""
    llava = unwrap_llava(model)
    state = {f"base_model.model.model.mm_projector.{k}": v
             for k, v in llava.model.mm_projector.state_dict().items()}
    tower = llava.model.vision_tower
    if any(p.requires_grad for p in tower.parameters()):
        state.update({f"base_model.model.model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    return state


def save_projector(model, directory: str | os.PathLike) -> Path:
    """Write :func:`projector_state_dict` to ``directory/non_lora_trainables.safetensors``."""
    path = Path(directory) / NON_LORA_TRAINABLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensor_file(projector_state_dict(model), path)
    return path


def load_projector(model, directory: str | os.PathLike) -> None:
    """Load ``directory/non_lora_trainables.safetensors`` into the model's projector (strict)."""
    path = Path(directory) / NON_LORA_TRAINABLES_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {NON_LORA_TRAINABLES_FILE}, but train_projector or train_vision_tower is on: "
                              "was this checkpoint written by a run that trained the projector?")
    llava = unwrap_llava(model)
    load_non_lora_trainables(llava, path)


def save_sft_adapter(model, directory: str | os.PathLike, *, with_projector: bool = False,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adapter "default" as a PEFT directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), plus the projector when ``with_projector``. ``state_dict``: the
    model's full (gathered) state dict to take the adapter from instead of the live parameters
    (FSDP2, whose live parameters are shards).

    Written to a temporary sibling first and renamed, so an interrupted save never leaves a mix of
    old and new files (an existing ``directory`` is replaced).
    """
    directory = Path(directory)
    with atomic_dir(directory, replace=True) as tmp:
        save_default_adapter(model, tmp, state_dict=state_dict)
        if with_projector:
            save_projector(model, tmp)
    logger.info("saved the SFT adapter to %s", directory)
    return directory


def resolve_resume_checkpoint(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """``"latest"`` / ``"previous"`` -> the newest / second-newest ``checkpoint-N`` in ``output_dir``;
    a path -> itself. Checked before any model loads: a truncated ``trainer_state.json`` or torch
    state file is named (and, for ``latest``, ``--resume previous`` suggested)."""
    if resume is None:
        return None
    return str(resolve_checkpoint(resume, output_dir, _check_trainer_checkpoint, "a Trainer"))


def _check_trainer_checkpoint(path: Path) -> None:
    problem = _checkpoint_damage(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def _checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a Trainer checkpoint's files (cheap: JSON parse, zip directories), or None."""
    import zipfile

    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is missing, truncated or not JSON ({' '.join(str(exc).split())})"
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        if not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or not a torch state file"
    return None


def merge_sft_adapter(config: SFTConfig, adapter_dir: str | os.PathLike,
                      out_dir: str | os.PathLike) -> Path:
    """Merge a trained adapter (and trained projector) into the 16-bit base; save a self-contained dir.

    Always in 16-bit on the CPU, whatever the training precision: merging into 4-bit weights would
    re-quantise them. With a trained projector the baseline is loaded, the projector replaced, then
    the adapter merged (``save_lora_merged_llava_model_to_local_dir`` takes no projector).
    """
    adapter_dir = Path(adapter_dir)
    model_base = config.model_base
    if config.entry_point == "fresh_lora" and not model_base:
        model_base = require_merged_base(config.model_path)
    if not (adapter_dir / NON_LORA_TRAINABLES_FILE).is_file():
        return save_lora_merged_llava_model_to_local_dir(
            out_dir, adapter_dir, model_path=config.model_path, model_base=model_base,
            dtype=config.merge_dtype, device="cpu", overwrite=True,  # merged/ in our run dir is ours
        )
    # The trained projector / tower go into the base before the adapter is merged on top.
    model, tokenizer, _ = load_release(config.model_path, model_base, precision_spec("16bit", config.merge_dtype),
                                       device="cpu")
    load_projector(model, adapter_dir)
    merged = attach_lora(model, adapter_dir, trainable=False).merge_and_unload()
    merged.config.use_cache = True
    return save_merged_model(merged, tokenizer, out_dir, overwrite=True)


def require_merged_base(model_path: str) -> str:
    """``model_base`` for a merged directory: the directory itself when it holds LLM weights."""
    found = merged_base(model_path)
    if found is None:
        raise ConfigError(
            f"model_base is not set and {model_path} holds no LLM weights: give model_base (the base "
            "LLaVA-1.5 directory) or a merged directory as model_path"
        )
    return found
