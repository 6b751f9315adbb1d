"""The report-scorer interface: a batch of (reference, candidate) reports -> accuracies.

A :class:`ReportScorer` returns one accuracy in [0, 1] per pair, or ``None`` when that pair could
not be scored (server error, timeout, unparsable judge output). ``None`` means *skip*: the PPO
reward drops the sample (``env/skipped_samples``) and the evaluation counts it as missing; it is
never turned into 0. Every call records :class:`ScoreStats` in ``last_stats`` (the trainer logs
them as ``scorer/*``), and when more than ``max_failure_fraction`` of a call's pairs fail the call
raises :class:`ScorerFailureError` naming the scorer's target and the last failure.

A scorer is also a PPO ``accuracy_scorer``: ``scorer(samples, responses)`` reads each reference
report from ``samples[i][reference_key]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from radialog_rl.calibration.rewards import AccuracyScorerError
from radialog_rl.errors import ConfigError, DataError

__all__ = [
    "ReportScorer",
    "ScoreStats",
    "ScorerFailureError",
    "ScorerUnavailableError",
    "scorer_metrics",
]

logger = logging.getLogger(__name__)


class ScorerUnavailableError(AccuracyScorerError):
    """The scorer's server cannot be reached at all (not running, wrong URL)."""


class ScorerFailureError(AccuracyScorerError):
    """Too many pairs of one batch could not be scored."""


@dataclass
class ScoreStats:
    """What one scoring call did. ``failures`` = pairs returned as None."""

    pairs: int = 0
    scored: int = 0
    failures: int = 0
    cache_hits: int = 0
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    unparsable: int = 0
    max_in_flight: int = 0
    last_failure: str | None = None

    def as_metrics(self, prefix: str = "scorer/") -> dict[str, float]:
        """Numeric fields as ``{prefix + name: value}`` (for metrics.jsonl / TensorBoard)."""
        return {prefix + k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}


class ReportScorer:
    """Base class: subclasses implement :meth:`_score_batch` (and set ``name``).

    Args:
        reference_key: the sample field holding the reference report (PPO ``accuracy_scorer`` use).
        max_failure_fraction: a call in which more than this fraction of the pairs fails raises
            :class:`ScorerFailureError` (1.0 = never raise, only skip).
    """

    name = "scorer"

    def __init__(self, *, reference_key: str = "reference", max_failure_fraction: float = 0.5) -> None:
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ConfigError(f"max_failure_fraction must be in [0, 1], got {max_failure_fraction}")
        self.reference_key = reference_key
        self.max_failure_fraction = float(max_failure_fraction)
        self.last_stats = ScoreStats()
        self.total_failures = 0
        self.__name__ = self.name  # how the reward layer names a scorer in its errors

    @property
    def target(self) -> str:
        """What the scorer talks to, for error messages (a server URL; the name for local ones)."""
        return self.name

    def check(self) -> None:
        """Raise :class:`ScorerUnavailableError` if the scorer cannot work at all (no server)."""

    def _score_batch(self, references: list[str], candidates: list[str], stats: ScoreStats) -> list[float | None]:
        raise NotImplementedError

    def score_pairs(self, references: Sequence[str], candidates: Sequence[str]) -> list[float | None]:
        """One accuracy in [0, 1] (or None = could not be scored) per (reference, candidate)."""
        references, candidates = list(references), list(candidates)
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        stats = ScoreStats(pairs=len(references))
        self.last_stats = stats
        if not references:
            return []
        scores = self._score_batch(references, candidates, stats)
        stats.failures = sum(s is None for s in scores)
        stats.scored = len(scores) - stats.failures
        self.total_failures += stats.failures
        if stats.failures:
            logger.warning("%s: %d of %d pairs could not be scored (skipped); last failure: %s",
                           self.name, stats.failures, stats.pairs, stats.last_failure)
        if stats.failures > self.max_failure_fraction * stats.pairs:
            raise ScorerFailureError(
                f"{self.name} scorer at {self.target}: {stats.failures} of {stats.pairs} pairs failed "
                f"(more than max_failure_fraction={self.max_failure_fraction}); last failure: "
                f"{stats.last_failure}"
            )
        return scores

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[float | None]:
        """The PPO ``accuracy_scorer`` interface: references come from the samples' rows."""
        references = []
        for i, sample in enumerate(samples):
            value = sample.get(self.reference_key)
            if not isinstance(value, str):
                raise DataError(
                    f"sample {i} has no text field {self.reference_key!r} (the reference report the "
                    f"{self.name} scorer compares against); set scorer.reference_key to the right field"
                )
            references.append(value)
        return self.score_pairs(references, responses)


def scorer_metrics(reward_fn: Any) -> dict[str, float]:
    """``scorer/*`` metrics of the last call of the reward's ``accuracy_scorer`` (empty if none)."""
    scorer = getattr(reward_fn, "accuracy_scorer", None)
    stats = getattr(scorer, "last_stats", None)
    return stats.as_metrics() if isinstance(stats, ScoreStats) else {}
