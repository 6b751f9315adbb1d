"""What every confidence method returns: :class:`ConfidenceResult`, and the 0..10 binning.

A method gives each sample a probability ``p`` in [0, 1] that its response is correct (None when it
cannot: an unparsable verbalized confidence, an empty response). The table and the prediction
files use the binned value ``round(10·p)`` (halves up), the scale of the published calibration
table, so that ``radialog-rl evaluate`` on a written file reproduces the printed numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from radialog_rl.errors import ConfigError

__all__ = ["METHODS", "TABLE_SCALE", "ConfidenceResult", "bin_confidence", "check_methods"]

#: The four methods, in the order the comparison table lists them.
METHODS: tuple[str, ...] = ("verbalized", "ptrue", "seqprob", "probe")

#: The binned confidence lives on 0..TABLE_SCALE (one bin per value, ``docs/ppo-and-calibration.md`` §D).
TABLE_SCALE = 10


def bin_confidence(probability: float | None, scale: int = TABLE_SCALE) -> int | None:
    """``floor(p·scale + 1/2)``: the nearest value on ``0..scale`` (halves up); None stays None.

    The same nearest-value rule as :func:`radialog_rl.calibration.metrics.bin_indices`.
    """
    if probability is None or (isinstance(probability, float) and math.isnan(probability)):
        return None
    p = min(max(float(probability), 0.0), 1.0)
    return int(math.floor(p * scale + 0.5))


def check_methods(methods: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``"all"``, ``"ptrue,seqprob"`` or a list into known method names (table order)."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip().lower() for n in names if n and n.strip()]
    if "all" in names:
        return METHODS
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown confidence method(s) {', '.join(unknown) or '(none)'}; "
                          f"choose from {', '.join(METHODS)} or all")
    return tuple(m for m in METHODS if m in names)


@dataclass
class ConfidenceResult:
    """One sample's confidence from one method.

    Attributes:
        id: the sample id (the data row's ``id``, else its 0-based row index).
        method: one of :data:`METHODS`.
        probability: P(correct) in [0, 1], or None when the method gave none (counted as a parse
            failure in the table).
        confidence: ``probability`` binned to 0..10 (:func:`bin_confidence`), or None.
        accuracy: correctness in [0, 1] of the response (1/0 for binary QA), None when it could not
            be decided (no yes/no answer in the response).
        response: the scored response text.
        extra: method-specific details (e.g. the stated confidence for ``verbalized``).
    """

    id: Any
    method: str
    probability: float | None
    confidence: int | None
    accuracy: float | None
    response: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The JSONL row ``radialog-rl evaluate`` reads: ``confidence`` on 0..10, ``accuracy``."""
        record = {"id": self.id, "method": self.method, "confidence": self.confidence,
                  "probability": self.probability, "accuracy": self.accuracy,
                  "response": self.response}
        record.update(self.extra)
        return record
