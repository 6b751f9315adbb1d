"""A merged-weights copy of the policy's LLaMA trunk that only samples PPO rollouts.

PEFT's LoRA forward computes ``W x + s * B (A x)`` per targeted linear: two extra small GEMMs and
their kernel launches per projection per decoded token, and on a 4/8-bit base a dequantisation of
``W`` per call. :class:`MergedRolloutCopy` holds ``W + s * B A`` folded into plain ``nn.Linear``
weights (in bf16, fp16 or fp32), refreshed from the live adapter before each rollout, and generates
with it. Nothing else uses it: old log-probs, values, the reference and the update still run on
the PEFT policy, so the PPO math (first ratio exactly 1) does not change; the sampler differs from
the scored policy only by rounding (the fold's, and the copy's dtype).

The vision tower and projector are the policy's own modules (shared, not copied: they are frozen
and the rollout computes image features once per batch with the policy anyway). The copy costs one
more full copy of the trunk weights (embeddings, every linear, ``lm_head``) in its dtype.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from radialog_rl.errors import ConfigError
from radialog_rl.modeling.llava import LlavaLlamaForCausalLM, unwrap_llava
from radialog_rl.modeling.value_head import remove_value_head_hooks

logger = logging.getLogger(__name__)

_QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes parameter classes


def merge_lora_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + scale * lora_b @ lora_a``, computed in float32, returned in ``dtype`` (default
    ``base``'s).

    Args:
        base: ``[out, in]`` the (dequantised) base weight.
        lora_a: ``[r, in]``; lora_b: ``[out, r]``; scale: ``lora_alpha / r`` (PEFT's ``scaling``).

    Why float32: a bf16 product of the factors rounds each of the ``r`` terms' sum before the add;
    folding in float32 and rounding once keeps the copy one rounding away from the exact sum.
    """
    if lora_a.shape[1] != base.shape[1] or lora_b.shape[0] != base.shape[0] or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"LoRA factors {tuple(lora_b.shape)} @ {tuple(lora_a.shape)} do not fit the weight "
                         f"{tuple(base.shape)}")
    merged = base.float() + scale * (lora_b.float() @ lora_a.float())
    return merged.to(dtype or base.dtype)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` holds a bitsandbytes 4/8-bit weight."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in _QUANTIZED_WEIGHTS


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` weight of a linear (bitsandbytes 4/8-bit ones dequantised; others as they are)."""
    if not is_quantized_linear(module):
        return module.weight
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear of ``model`` is bitsandbytes 4/8-bit."""
    return any(is_quantized_linear(m) for m in model.modules())


def _lora_layers(llava: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: PEFT LoRA layer}`` inside ``llava``, each checked foldable (plain LoRA on a
    linear: no DoRA or other variant, no LoRA bias, not already merged)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in llava.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        what = f"rollout_merged_copy: the LoRA layer {name}"
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"{what} wraps a {type(base).__name__}, not a linear; only LoRA on linears is "
                              "folded (turn rollout_merged_copy off)")
        if getattr(module, "merged", False):
            raise ConfigError(f"{what} is merged into its base already; unmerge it first")
        for adapter in module.lora_A:
            if getattr(module, "lora_variant", {}).get(adapter) is not None or getattr(module, "use_dora", {}).get(adapter):
                raise ConfigError(f"{what} uses a LoRA variant (DoRA, ...) in adapter {adapter!r}; only plain "
                                  "LoRA is folded (turn rollout_merged_copy off)")
            if getattr(module, "lora_bias", {}).get(adapter):
                raise ConfigError(f"{what} has a LoRA bias in adapter {adapter!r}; not supported by the "
                                  "merged copy (turn rollout_merged_copy off)")
        if getattr(module, "fan_in_fan_out", False):
            raise ConfigError(f"{what} stores its weight transposed (fan_in_fan_out); not supported")
        layers[name] = module
    return layers


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` holding copies of ``weight`` ``[out, in]`` and ``bias`` in ``dtype``."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(dtype=dtype, copy=True), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype=dtype, copy=True), requires_grad=False)
    return linear


class MergedRolloutCopy:
    """The policy's trunk with its active LoRA adapter folded in (see the module docstring).

    Args:
        policy: the PEFT-wrapped LLaVA (or the value-head wrapper around it).
        dtype: the copy's weight dtype; None = the dtype of the policy's (unquantised) linears.

    Raises:
        ConfigError: a quantised policy without an explicit ``dtype``, a trainable trunk parameter
            that is not a LoRA factor (the copy could not follow it), or a LoRA form that is not folded.
    """

    def __init__(self, policy: nn.Module, dtype: torch.dtype | None = None):
        self.policy = getattr(policy, "pretrained_model", policy)  # the PeftModel
        llava = unwrap_llava(self.policy)
        layers = _lora_layers(llava)
        if not layers:
            raise ConfigError("rollout_merged_copy: the policy has no LoRA layers to fold (is it a PEFT model?)")
        quantized = is_quantized(llava)
        if dtype is None:
            if quantized:
                raise ConfigError("rollout_merged_copy on a 4/8-bit policy needs rollout_merged_dtype (bf16, fp16 "
                                  "or fp32): the copy holds dequantised weights + LoRA in that dtype")
            dtype = next(iter(layers.values())).get_base_layer().weight.dtype
        self.dtype = dtype
        shared = (llava.model.vision_tower, llava.model.mm_projector)
        shared_params = {id(p) for module in shared for p in module.parameters()}
        lora_params = {id(p) for layer in layers.values() for part in (layer.lora_A, layer.lora_B)
                       for p in part.parameters()}
        stray = [n for n, p in llava.named_parameters()
                 if p.requires_grad and id(p) not in lora_params and id(p) not in shared_params]
        if stray:
            raise ConfigError(f"rollout_merged_copy: trainable parameters outside the LoRA factors ({', '.join(stray[:3])}"
                              f"{' ...' if len(stray) > 3 else ''}); the merged copy would not follow them")
        # deepcopy with a memo that maps the shared modules to themselves, each LoRA layer to a plain
        # linear (filled by refresh) and each quantised linear to its dequantised plain twin: no
        # PEFT or bitsandbytes object is copied, and the policy's modules stay untouched.
        memo: dict[int, object] = {id(m): m for m in shared}
        self._pairs: list[tuple[nn.Module, nn.Linear]] = []
        with torch.no_grad():
            for layer in layers.values():
                base = layer.get_base_layer()
                plain = _plain_linear(dequantized_weight(base), base.bias, dtype)
                memo[id(layer)] = plain
                self._pairs.append((layer, plain))
            inside_lora = tuple(f"{name}." for name in layers)  # their base layers are replaced already
            for name, module in llava.named_modules():
                if id(module) not in memo and not name.startswith(inside_lora) and is_quantized_linear(module):
                    memo[id(module)] = _plain_linear(dequantized_weight(module), module.bias, dtype)
            quantizer = getattr(llava, "hf_quantizer", None)
            if quantizer is not None:
                memo[id(quantizer)] = None  # not copied: the copy is not quantised
            model = copy.deepcopy(llava, memo)
        # Its own config (deep-copied) and attributes say what it is: not quantised, no PEFT
        # (what transformers' remove_quantization_config does for a dequantised model).
        for attr in ("peft_config", "_hf_peft_config_loaded", "hf_quantizer", "quantization_method",
                     "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if attr in model.__dict__:
                delattr(model, attr)
        if quantized:
            model.is_quantized = False
            model.config._is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        # The trunk's own modules (not the shared tower/projector, whose dtype is the policy's) in
        # the copy's dtype; rotary inverse frequencies stay as the policy has them.
        for part in (model.model.embed_tokens, model.model.layers, model.model.norm, model.lm_head):
            part.to(dtype=dtype).requires_grad_(False)
        # The value head's capture hook came along with the trunk's final norm: the copy's outputs
        # must not feed (or be kept by) it.
        remove_value_head_hooks(model)
        model.eval()
        self.model: LlavaLlamaForCausalLM = model
        self.refresh()
        logger.info("rollout_merged_copy: %d LoRA layers folded into a %s copy of the trunk", len(self._pairs), dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold the policy's current active adapter(s) into the copy's weights (all LoRA layers)."""
        for layer, plain in self._pairs:
            if layer.disable_adapters:
                raise RuntimeError("rollout_merged_copy: refresh inside disable_adapter() would fold no adapter")
            base_layer = layer.get_base_layer()
            weight = dequantized_weight(base_layer)
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if not active:
                plain.weight.copy_(weight)
                continue
            merged = weight
            for adapter in active:
                merged = merge_lora_weight(merged, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                           layer.scaling[adapter], dtype=torch.float32)
            plain.weight.copy_(merged)  # copy_ rounds to the copy's dtype once

    def generate(self, *args, **kwargs):
        """``LlavaLlamaForCausalLM.generate`` on the merged copy (same arguments as the policy's)."""
        return self.model.generate(*args, **kwargs)
