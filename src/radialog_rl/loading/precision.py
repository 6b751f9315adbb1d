"""Precision settings: 16-bit, 8-bit and 4-bit (bitsandbytes) loading.

What is never quantised: the projector, the vision tower and ``lm_head`` (they stay in the compute
dtype). transformers 5 matches ``llm_int8_skip_modules`` from the start of the module name and a
custom list replaces its defaults, so we give full prefixes and name ``lm_head`` ourselves
(``docs/stack-notes.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from radialog_rl.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("16bit", "8bit", "4bit")
#: Module-name prefixes that bitsandbytes must leave alone.
NEVER_QUANTIZED = ["lm_head", "model.mm_projector", "model.vision_tower"]

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype) -> torch dtype."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {value!r}; use bf16, fp16 or fp32") from None


@dataclass(frozen=True)
class PrecisionSpec:
    """How to load: the bits of the LLaMA linears and the dtype of everything else."""

    precision: str
    compute_dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.precision in ("8bit", "4bit")

    def quantization_config(self):
        """A ``BitsAndBytesConfig`` for 8/4-bit, None for 16-bit."""
        if not self.quantized:
            return None
        from transformers import BitsAndBytesConfig

        if self.precision == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(NEVER_QUANTIZED))
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=self.compute_dtype,
            llm_int8_skip_modules=list(NEVER_QUANTIZED),
        )


def precision_spec(precision: str = "16bit", dtype: str | torch.dtype | None = None) -> PrecisionSpec:
    """Validate ``precision`` ("16bit", "8bit", "4bit") and pick the compute dtype (default bf16)."""
    name = str(precision).lower()
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PrecisionSpec(name, parse_dtype(dtype))


def guard_cpu_4bit_layers(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with avx512_bf16.

    On such CPUs an eval-mode, no-grad forward repacks ``Linear4bit`` weights into a layout whose
    kernel has no autograd; afterwards LoRA gradients are wrong and merges produce garbage
    (stack notes). Turning the fast path off keeps gradients and merges exact. Harmless elsewhere.

    Returns:
        The number of 4-bit layers guarded.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bnb: nothing can be 4-bit
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of bitsandbytes linear layers in ``model`` (for reports and tests)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]
