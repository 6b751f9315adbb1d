"""A cheap, dependency-free report scorer for quick runs and tests: unigram F1.

Both reports are lower-cased and split into word tokens (letters/digits); the score is the F1 of
their multiset overlap: precision = common / candidate tokens, recall = common / reference tokens.
Hand-written (a dozen lines) rather than taken from ``rouge-score``, whose ROUGE-1 F is the same
number up to its tokenizer and optional stemming, to keep the package free of that dependency.
"""

from __future__ import annotations

import re
from collections import Counter

from radialog_rl.scoring.base import ReportScorer, ScoreStats

__all__ = ["UnigramF1Scorer", "unigram_f1"]

_TOKEN = re.compile(r"[a-z0-9]+")


def unigram_f1(reference: str, candidate: str) -> float:
    """F1 of the word-token multisets; 1.0 when both are empty, 0.0 when only one is."""
    ref, cand = Counter(_TOKEN.findall(reference.lower())), Counter(_TOKEN.findall(candidate.lower()))
    if not ref and not cand:
        return 1.0
    common = sum((ref & cand).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(cand.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


class UnigramF1Scorer(ReportScorer):
    """:func:`unigram_f1` under the :class:`ReportScorer` interface (never fails)."""

    name = "unigram_f1"

    def _score_batch(self, references: list[str], candidates: list[str], stats: ScoreStats) -> list[float | None]:
        return [unigram_f1(r, c) for r, c in zip(references, candidates)]
