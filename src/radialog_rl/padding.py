"""Padding variable-length token rows into a batch: the one place that does it.

Used for prompts (left padding, for generation), SFT batches (right padding), sampled responses
and image-expanded sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radialog_rl.errors import ConfigError

PADDING_SIDES = ("left", "right")


def pad_rows(
    rows: Sequence[torch.Tensor | Sequence[int]],
    value: int,
    *,
    side: str = "right",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D rows of different lengths into ``[B, W]`` (``W`` = the longest row).

    Args:
        rows: tensors or lists of ints, one per batch row (at least one row).
        value: what fills the padding (a pad token id, ``IGNORE_INDEX`` for labels, 0).
        side: "left" (real entries end at the last column: what batched generation needs) or
            "right".
        dtype: of the result (default: the first row's when it is a tensor, else ``torch.long``).

    Returns:
        ``(padded [B, W], mask [B, W])``; ``mask`` is 1 (long) on real entries, 0 on padding. Both
        live on the first tensor row's device.
    """
    if side not in PADDING_SIDES:
        raise ConfigError(f"padding side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ConfigError("cannot pad an empty list of rows")
    first = rows[0]
    device = first.device if isinstance(first, torch.Tensor) else None
    dtype = dtype or (first.dtype if isinstance(first, torch.Tensor) else torch.long)
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), value, dtype=dtype, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        n = len(row)
        columns = slice(width - n, width) if side == "left" else slice(0, n)
        padded[i, columns] = torch.as_tensor(row, dtype=dtype, device=device)
        mask[i, columns] = 1
    return padded, mask
