"""LLaVA's multimodal projector (vision features -> LLM embedding space).

Parameter names match LLaVA-1.5 (``model.mm_projector.0.weight``, ``.2.weight`` for ``mlp2x_gelu``),
so RaDialog's ``non_lora_trainables.bin`` loads without renaming.
"""

from __future__ import annotations

import re

from torch import nn

from radialog_rl.errors import ConfigError

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def build_mm_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Build the projector named by ``config.mm_projector_type``.

    - ``linear``: ``Linear(mm_hidden_size, hidden_size)``
    - ``mlpNx_gelu``: ``Linear(mm_hidden_size, hidden) -> GELU -> Linear(hidden, hidden)`` repeated to
      N linears (RaDialog: ``mlp2x_gelu``, 512 -> 4096 -> 4096)
    - ``identity``: no projection (``mm_hidden_size`` must equal ``hidden_size``)

    Input ``[..., mm_hidden_size]``, output ``[..., hidden_size]``.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = _MLP_GELU.match(projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ConfigError(f"mm_projector_type {projector_type!r}: depth must be at least 1")
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ConfigError("mm_projector_type 'identity' needs mm_hidden_size == hidden_size")
        return nn.Identity()
    raise ConfigError(
        f"unknown mm_projector_type {projector_type!r}; expected 'linear', 'mlpNx_gelu' or 'identity'"
    )


def projector_input_dim(projector: nn.Module) -> int | None:
    """``in_features`` of the projector's first linear layer (None for identity)."""
    first = projector[0] if isinstance(projector, nn.Sequential) else projector
    return getattr(first, "in_features", None)
