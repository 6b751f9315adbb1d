"""State-dict key mapping and accounting: no tensor is lost silently.

Every load in this package goes through :func:`load_state_dict_checked`, which reports keys that are
missing from the file, unexpected in the file, or of the wrong shape, and raises a
:class:`~radialog_rl.errors.CheckpointError` naming them unless the caller allows them by pattern
(with a documented reason at the call site).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from radialog_rl.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class KeyReport:
    """What happened to each key of one state-dict load."""

    what: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"{self.what}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched, "
            f"{len(self.ignored)} ignored"
        )

    def raise_if_problems(self, hint: str = "") -> None:
        if self.ok:
            return
        parts = []
        if self.missing:
            parts.append(f"missing keys: {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {_short(self.unexpected)}")
        if self.mismatched:
            parts.append(
                "shape mismatches: "
                + _short([f"{k} (file {tuple(f)}, model {tuple(m)})" for k, f, m in self.mismatched])
            )
        raise CheckpointError(f"{self.what}: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def _short(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Glob match (``fnmatch``) of ``key`` against any pattern."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    ignore_unexpected: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    raise_on_problems: bool = True,
    hint: str = "",
) -> KeyReport:
    """Copy tensors into ``module`` by exact name, with full accounting.

    Shapes are checked before anything is copied; values are cast to each target's dtype/device.

    Args:
        module: the target; keys are those of ``module.state_dict()``.
        state_dict: ``{name: tensor}``.
        what: the file/role named in messages.
        ignore_unexpected: glob patterns of file keys to skip on purpose (e.g. rotary ``inv_freq``
            buffers that the model recomputes).
        allow_missing: glob patterns of module keys that may stay as they are.
        raise_on_problems: raise :class:`CheckpointError` listing the keys (default) or only return
            the report.

    Returns:
        The :class:`KeyReport`.
    """
    ignore_unexpected, allow_missing = list(ignore_unexpected), list(allow_missing)
    target = module.state_dict(keep_vars=True)
    report = KeyReport(what=what)
    to_copy: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in target:
            (report.ignored if matches_any(key, ignore_unexpected) else report.unexpected).append(key)
            continue
        expected = tuple(target[key].shape)
        if tuple(value.shape) != expected:
            report.mismatched.append((key, tuple(value.shape), expected))
            continue
        to_copy[key] = value
    report.missing = [k for k in target if k not in state_dict and not matches_any(k, allow_missing)]
    if raise_on_problems:
        report.raise_if_problems(hint)
    with torch.no_grad():
        for key, value in to_copy.items():
            dest = target[key]
            dest.copy_(value.to(device=dest.device, dtype=dest.dtype))
            report.loaded.append(key)
    logger.debug(report.summary())
    return report


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with ``prefix``, with it removed (others dropped)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def normalize_non_lora_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the prefix rule every known RaDialog loader uses for ``non_lora_trainables.bin`` (§4).

    Strip a leading ``base_model.``; then, if any key starts with ``model.model.``, strip one leading
    ``model.`` from every key that starts with ``model.``:
    ``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight``.
    """
    out = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in state_dict.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in out.items()}
    return out
