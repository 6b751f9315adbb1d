"""Report accuracy scorers for the report-generation reward and for evaluation.

* :class:`~radialog_rl.scoring.green.GreenScorer` (``green``): the GREEN judge behind an
  OpenAI-compatible server (llama.cpp, llama-cpp-python, vLLM), concurrent, cached, with failures
  skipped and counted.
* :class:`~radialog_rl.scoring.lexical.UnigramF1Scorer` (``unigram_f1``): word-overlap F1, no
  server, for quick runs and tests.

:func:`build_scorer` makes one from a config name and keyword options (PPO's ``accuracy_scorer`` /
``scorer`` keys, ``radialog-rl score``).
"""

from __future__ import annotations

import inspect
from typing import Any

from radialog_rl.errors import ConfigError
from radialog_rl.scoring.base import (
    ReportScorer,
    ScorerFailureError,
    ScorerUnavailableError,
    ScoreStats,
    scorer_metrics,
)
from radialog_rl.scoring.green import GreenScorer, green_score, parse_green_output
from radialog_rl.scoring.lexical import UnigramF1Scorer, unigram_f1

__all__ = [
    "SCORERS",
    "GreenScorer",
    "ReportScorer",
    "ScoreStats",
    "ScorerFailureError",
    "ScorerUnavailableError",
    "UnigramF1Scorer",
    "build_scorer",
    "green_score",
    "parse_green_output",
    "scorer_metrics",
    "unigram_f1",
]

#: Scorer names accepted by configs and the CLI.
SCORERS: dict[str, type[ReportScorer]] = {"green": GreenScorer, "unigram_f1": UnigramF1Scorer}


def build_scorer(name: str, **params: Any) -> ReportScorer:
    """A scorer by name with its options (unknown options are a :class:`ConfigError`)."""
    if name not in SCORERS:
        raise ConfigError(f"unknown accuracy_scorer {name!r}; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"scorer {name!r} has no option(s) {', '.join(unknown)}; it accepts "
                          f"{', '.join(sorted(accepted))}")
    return cls(**params)
