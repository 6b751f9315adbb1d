"""One loading entry point: :func:`load_model` turns a :class:`ModelSpec` into a :class:`LoadedModel`.

Every consumer (SFT, PPO, generate, merge, confidence estimation, the demos, the benchmarks) loads
through here and gets the same small typed bundle: the network to run, its tokenizer, the
``LlavaLlamaForCausalLM`` inside it, the parsed precision, the image preprocessing sizes and the
loading report. Nothing is glued onto the ``nn.Module``.

The research code's entry points (``load_pretrained_llava_model_for_sft_training`` and friends in
:mod:`radialog_rl.loading.adapters`) are thin wrappers over :func:`load_model` that keep their
keywords and return types.

Steps, top to bottom:
1. the baseline: base LLaVA + RaDialog config + non-LoRA weights (:mod:`.release`);
2. k-bit preparation / gradient checkpointing when the model is for training;
3. a LoRA adapter: none, the release's, a given directory, or a fresh one (:mod:`.adapters`);
   optionally a frozen ``reference`` copy (PPO from a pretrained adapter);
4. optionally merged into the base (16-bit only);
5. optionally a value head (PPO), with its reference mode.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radialog_rl.data.images import ImageSizes
from radialog_rl.errors import ConfigError
from radialog_rl.loading.adapters import (
    attach_lora,
    load_value_head,
    prepare_quantized_for_training,
    radialog_adapter_path,
)
from radialog_rl.loading.precision import PrecisionSpec, precision_spec
from radialog_rl.loading.release import LoadingInfo, load_release
from radialog_rl.loading.zero3 import outside_zero3_init
from radialog_rl.modeling.llava import LlavaLlamaForCausalLM, unwrap_llava
from radialog_rl.modeling.value_head import LlavaWithValueHead, ReferenceMode

logger = logging.getLogger(__name__)

#: ``ModelSpec.adapter`` values that are not paths.
ADAPTER_NONE = "none"
ADAPTER_RELEASE = "release"
ADAPTER_FRESH = "fresh"


@dataclass(frozen=True)
class ModelSpec:
    """What to load. Paths may be local directories or hub ids (downloads only when online).

    Attributes:
        model_path: RaDialog release directory (``config.json``, ``non_lora_trainables``, adapter) or
            a merged directory written by ``radialog-rl merge``; None = RaDialog's hub id.
        model_base: base LLaVA-1.5 weights; None = LLaVA-1.5-7B's hub id, or ``model_path`` itself
            when it is a merged directory (see :func:`merged_base`).
        precision: "16bit", "8bit" or "4bit".
        dtype: compute dtype ("bf16" default, "fp16", "fp32").
        device: where to put the model (default cuda if available, else cpu); ignored with
            ``device_map``.
        device_map: ``from_pretrained``'s device map (e.g. "auto").
        vision_tower_path: BioViL-T ``.pt`` when the release carries no tower.
        adapter: "none", "release" (the adapter inside ``model_path``), "fresh" (a new LoRA from
            ``lora_config``), or the path of an adapter directory / ``adapter_model.bin``.
        lora_config: ``peft.LoraConfig`` for a fresh adapter (default RaDialog's).
        trainable: the adapter's parameters require grad (training) or not (inference).
        reference: PPO's reference policy: a frozen copy of the adapter, or the adapter disabled.
        merge: merge the adapter into the base weights (16-bit only; re-quantising is refused).
        value_head: wrap the policy with a scalar value head (PPO).
        value_head_path: a saved value head to load (ours or TRL's layout).
        gradient_checkpointing: enable it on the trunk (training).
        prepare_for_training: k-bit preparation (PEFT) before the adapter; on for trainable adapters.
    """

    model_path: str | os.PathLike | None = None
    model_base: str | os.PathLike | None = None
    precision: str = "16bit"
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    device_map: str | dict | None = None
    vision_tower_path: str | os.PathLike | None = None
    adapter: str | os.PathLike = ADAPTER_NONE
    lora_config: Any = None
    trainable: bool = False
    reference: ReferenceMode | str | None = None
    merge: bool = False
    value_head: bool = False
    value_head_path: str | os.PathLike | None = None
    gradient_checkpointing: bool = False
    prepare_for_training: bool | None = None

    def with_(self, **changes: Any) -> "ModelSpec":
        """A copy with some fields replaced."""
        return replace(self, **changes)


@dataclass
class LoadedModel:
    """A loaded model and what it takes to feed it.

    Attributes:
        model: what to run: an ``LlavaLlamaForCausalLM``, a ``PeftModel`` of it, or an
            :class:`~radialog_rl.modeling.value_head.LlavaWithValueHead` around either.
        tokenizer: the image-ready tokenizer the embeddings were sized against.
        llava: the ``LlavaLlamaForCausalLM`` inside ``model`` (encode images, config).
        precision: the parsed precision and compute dtype.
        image_sizes: resize / crop in pixels for this model's vision tower.
        info: where each part came from, and what did not fit.
        adapter: the adapter that was attached ("fresh", a path, or None).
    """

    model: nn.Module
    tokenizer: Any
    llava: LlavaLlamaForCausalLM
    precision: PrecisionSpec
    image_sizes: ImageSizes
    info: LoadingInfo
    adapter: str | None = None

    @property
    def is_peft(self) -> bool:
        """Whether ``model`` (or the policy inside a value head) carries a PEFT adapter."""
        policy = getattr(self.model, "pretrained_model", self.model)
        return hasattr(policy, "peft_config")

    def merge_adapter(self) -> "LoadedModel":
        """Merge the adapter into the base weights (16-bit only) and drop the PEFT wrapper.

        Returns a new bundle whose ``model`` is the merged ``LlavaLlamaForCausalLM``; the tokenizer
        and everything else carry over.
        """
        if not self.is_peft:
            return self
        if self.precision.quantized:
            raise ConfigError(f"refusing to merge into a {self.precision.precision} base: that re-quantises "
                              "the merged weights; load in 16bit to merge")
        policy = getattr(self.model, "pretrained_model", self.model)
        merged = policy.merge_and_unload()
        return replace(self, model=merged, llava=unwrap_llava(merged))


def merged_base(model_path: str | os.PathLike) -> str | None:
    """``model_path`` when it is a directory holding LLM weights (a merged export), else None."""
    path = Path(model_path)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
    if path.is_dir() and any((path / name).is_file() for name in weights):
        return str(path)
    return None


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model ``spec`` describes (module docstring: the steps).

    Under a DeepSpeed ZeRO-3 launch everything (base, adapter, value head) is built whole on each
    process, outside ``zero.Init`` (:mod:`.zero3`); DeepSpeed partitions it at ``prepare``.

    Raises:
        CheckpointError: a file is missing, damaged or does not fit (keys named).
        ConfigError: contradictory settings (a merge into 4-bit, a reference without an adapter...).
        OfflineError: a hub id while offline (the message names the local path to use).
    """
    with outside_zero3_init():
        return _load_model(spec)


def _load_model(spec: ModelSpec) -> LoadedModel:
    adapter_kind = str(spec.adapter) if spec.adapter is not None else ADAPTER_NONE
    _check_spec(spec, adapter_kind)
    precision = precision_spec(spec.precision, spec.dtype)
    # Resolve the adapter before minutes of loading, so a wrong path fails at once.
    adapter_path = None
    if adapter_kind == ADAPTER_RELEASE:
        adapter_path = radialog_adapter_path(None, spec.model_path)
    elif adapter_kind not in (ADAPTER_NONE, ADAPTER_FRESH):
        adapter_path = radialog_adapter_path(spec.adapter, spec.model_path)

    model, tokenizer, info = load_release(
        spec.model_path, spec.model_base, precision=precision, device=spec.device,
        device_map=spec.device_map, vision_tower_path=spec.vision_tower_path,
    )
    prepare = spec.trainable if spec.prepare_for_training is None else spec.prepare_for_training
    if prepare:
        model = prepare_quantized_for_training(model, spec.gradient_checkpointing)

    attached: str | None = None
    if adapter_kind != ADAPTER_NONE:
        model = attach_lora(
            model, adapter_path, lora_config=spec.lora_config if adapter_path is None else None,
            trainable=spec.trainable, reference_copy=spec.reference == ReferenceMode.FROZEN_COPY,
        )
        attached = str(adapter_path) if adapter_path is not None else ADAPTER_FRESH
    llava = unwrap_llava(model)
    bundle = LoadedModel(model=model, tokenizer=tokenizer, llava=llava, precision=precision,
                         image_sizes=ImageSizes.for_crop(llava.config.image_size), info=info, adapter=attached)
    if spec.merge:
        bundle = bundle.merge_adapter()
        bundle.llava.config.use_cache = True
        logger.info("LoRA adapter %s merged into the base", attached)
    if spec.value_head:
        wrapped = LlavaWithValueHead(bundle.model, reference_mode=spec.reference)
        if spec.value_head_path is not None:
            load_value_head(wrapped, spec.value_head_path)
        bundle = replace(bundle, model=wrapped)
        if spec.reference is not None:
            logger.info("PPO reference policy: %s", _REFERENCE_WORDS[ReferenceMode(spec.reference)])
    return bundle


_REFERENCE_WORDS = {
    ReferenceMode.FROZEN_COPY: "frozen copy of the starting adapter (the pretrained adapter is the start)",
    ReferenceMode.DISABLE_ADAPTER: "adapter disabled (the merged SFT base is the start)",
}


def _check_spec(spec: ModelSpec, adapter_kind: str) -> None:
    """Contradictions that would otherwise surface after the model is loaded."""
    if spec.reference is not None:
        try:
            mode = ReferenceMode(spec.reference)
        except ValueError:
            choices = ", ".join(m.value for m in ReferenceMode)
            raise ConfigError(f"unknown reference mode {spec.reference!r}; choose one of {choices}") from None
        if adapter_kind == ADAPTER_NONE:
            raise ConfigError("a PPO reference policy needs an adapter (adapter='release', 'fresh' or a path)")
        if not spec.value_head:
            raise ConfigError("a reference policy is only used by PPO: set value_head=True too")
        if mode == ReferenceMode.DISABLE_ADAPTER and adapter_kind == ADAPTER_RELEASE:
            # Disabling RaDialog's own adapter gives plain LLaVA, not the starting policy.
            raise ConfigError("reference 'disable_adapter' with the release's adapter would compare "
                              "against plain LLaVA; use 'frozen_adapter_copy'")
    if spec.merge:
        if adapter_kind == ADAPTER_NONE:
            raise ConfigError("merge=True needs an adapter to merge")
        if spec.trainable or spec.value_head:
            raise ConfigError("merge=True gives an inference model: it cannot be trainable or carry a value head")
        if precision_spec(spec.precision, spec.dtype).quantized:
            raise ConfigError(f"refusing to merge into a {spec.precision} base: that re-quantises the "
                              "merged weights; load in 16bit to merge")
    if spec.value_head_path is not None and not spec.value_head:
        raise ConfigError("value_head_path is set but value_head is False")
