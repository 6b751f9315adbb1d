"""Verbalized confidence: the ``{"confidence": N}`` statement the model writes in its response.

Parsing is :func:`radialog_rl.calibration.parsing.parse_confidence` (``docs/ppo-and-calibration.md``
§B): exactly one statement, an integer on ``0..scale``; anything else is a parse failure (None).
The probability is ``N / scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

from radialog_rl.calibration.parsing import parse_confidence

__all__ = ["verbalized_confidence"]


def verbalized_confidence(texts: Sequence[str], scale: int = 10) -> list[float | None]:
    """Stated confidence / ``scale`` of each response text, None where it does not parse."""
    values = [parse_confidence(t, scale) for t in texts]
    return [None if v is None else v / scale for v in values]
