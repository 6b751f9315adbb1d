"""The research code's loading entry points, by the names its scripts call.

Each is a thin wrapper over :func:`radialog_rl.loading.bundle.load_model`: it keeps its keywords and
its return type (a model), and, for those scripts, attaches the tokenizer and the loading report
as ``model.tokenizer`` / ``model.loading_info``. New code should call ``load_model`` and use the
:class:`~radialog_rl.loading.bundle.LoadedModel` it returns.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from radialog_rl.errors import ConfigError
from radialog_rl.loading.bundle import ADAPTER_FRESH, ADAPTER_RELEASE, LoadedModel, ModelSpec, load_model
from radialog_rl.modeling.value_head import LlavaWithValueHead, ReferenceMode


def _device(device_str, device):
    if device_str is not None and device is not None and str(device_str) != str(device):
        raise ConfigError(f"device_str={device_str!r} and device={device!r} disagree; pass one")
    return device if device is not None else device_str


def _with_compat_attributes(bundle: LoadedModel) -> nn.Module:
    """The bundle's model with ``.tokenizer`` and ``.loading_info`` set (the research scripts read them)."""
    bundle.model.tokenizer = bundle.tokenizer
    bundle.model.loading_info = bundle.info
    return bundle.model


def load_pretrained_llava_model_for_sft_training(
    device_str: str | None = None,
    precision: str = "16bit",
    radialog_lora_weights_path: str | os.PathLike | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    gradient_checkpointing: bool = False,
    dtype: str | torch.dtype | None = None,
):
    """RaDialog (baseline + vision modules) with its LoRA attached and trainable, for SFT.

    ``radialog_lora_weights_path=None`` means the adapter inside ``model_path``. ``dtype`` is the
    compute dtype (bf16 default). Returns a ``PeftModel`` (``.tokenizer`` attached).
    """
    spec = ModelSpec(
        model_path=model_path, model_base=model_base, precision=precision, dtype=dtype,
        device=_device(device_str, device), device_map=device_map,
        adapter=radialog_lora_weights_path if radialog_lora_weights_path is not None else ADAPTER_RELEASE,
        trainable=True, gradient_checkpointing=gradient_checkpointing,
    )
    return _with_compat_attributes(load_model(spec))


def load_pretrained_llava_model_for_ppo_training(
    device_str: str | None = None,
    precision: str = "16bit",
    radialog_lora_weights_path: str | os.PathLike | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    gradient_checkpointing: bool = False,
    value_head_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> LlavaWithValueHead:
    """RaDialog + its LoRA (trainable) + a fresh value head + a frozen reference copy of the LoRA.

    The reference is the frozen copy because the starting policy is RaDialog's adapter on the
    original base: disabling the adapter would give plain LLaVA, not RaDialog.
    """
    spec = ModelSpec(
        model_path=model_path, model_base=model_base, precision=precision, dtype=dtype,
        device=_device(device_str, device), device_map=device_map,
        adapter=radialog_lora_weights_path if radialog_lora_weights_path is not None else ADAPTER_RELEASE,
        trainable=True, gradient_checkpointing=gradient_checkpointing,
        reference=ReferenceMode.FROZEN_COPY, value_head=True, value_head_path=value_head_path,
    )
    return _with_compat_attributes(load_model(spec))


def load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters(
    llava_model_path: str | os.PathLike | None = None,
    device_str: str | None = None,
    precision: str = "16bit",
    adapter_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    value_head_path: str | os.PathLike | None = None,
    lora_config=None,
    gradient_checkpointing: bool = False,
    dtype: str | torch.dtype | None = None,
) -> LlavaWithValueHead:
    """A merged SFT model directory + fresh LoRA (or ``adapter_path`` to resume) + value head.

    The reference is the adapter disabled, i.e. the merged SFT model: exactly the initial policy
    for a fresh adapter.
    """
    if llava_model_path is None:
        raise ConfigError(
            "llava_model_path is required: a merged model directory written by "
            "save_lora_merged_llava_model_to_local_dir (or `radialog-rl merge`)"
        )
    spec = ModelSpec(
        model_path=llava_model_path, model_base=llava_model_path, precision=precision, dtype=dtype,
        device=_device(device_str, device), device_map=device_map,
        adapter=adapter_path if adapter_path is not None else ADAPTER_FRESH, lora_config=lora_config,
        trainable=True, gradient_checkpointing=gradient_checkpointing,
        reference=ReferenceMode.DISABLE_ADAPTER, value_head=True, value_head_path=value_head_path,
    )
    return _with_compat_attributes(load_model(spec))
