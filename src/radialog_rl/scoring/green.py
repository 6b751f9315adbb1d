"""GREEN (Ostmeier et al. 2024, "GREEN: Generative Radiology Report Evaluation and Error Notation")
over an OpenAI-compatible server.

The judge (e.g. ``StanfordAIMI/GREEN-RadLlama2-7b`` as a GGUF under llama.cpp, or under vLLM) reads
a reference and a candidate report and answers in a fixed layout::

    [Explanation]:
    <free text>

    [Clinically Significant Errors]:
    (a) False report of a finding in the candidate: 1. <error>
    (b) Missing a finding present in the reference: 2. <error 1>; <error 2>
    ... through (f)

    [Clinically Insignificant Errors]:
    (a) ...: 0.
    ...

    [Matched Findings]:
    2. <finding 1>; <finding 2>

score = matched / (matched + sum of the six significant error counts), 0 when nothing matched;
insignificant errors do not count. What this module takes from GREEN's public code
(``Stanford-AIMI/GREEN``, ``green_score/utils.py`` and ``green_score/green.py``): the prompt, word
for word (the judge was fine-tuned on it); the truncation of each report to its first 300
whitespace-separated words, re-joined with single spaces; the ``<|user|>`` / ``<|assistant|>``
turn format of its chat template; greedy decoding. The parser is our own and stricter than GREEN's
in one respect: an answer without a ``[Clinically Significant Errors]`` or ``[Matched Findings]``
section, or whose matched-findings count cannot be read, is *unparsable* (None = skipped), where
GREEN's ``return_0_if_no_green_score`` default would score it 0.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from radialog_rl.errors import ConfigError
from radialog_rl.scoring.base import ReportScorer, ScoreStats, ScorerUnavailableError
from radialog_rl.scoring.cache import ScoreCache
from radialog_rl.scoring.openai_client import CompletionError, OpenAICompatibleClient, ServerUnreachableError

__all__ = [
    "GREEN_ERROR_CATEGORIES",
    "GREEN_MAX_WORDS",
    "GreenCounts",
    "GreenScorer",
    "build_green_prompt",
    "green_completion_prompt",
    "green_score",
    "parse_green_output",
]

logger = logging.getLogger(__name__)

#: Words kept of each report (GREEN's ``make_prompt(..., max_len=300)``).
GREEN_MAX_WORDS = 300

#: The six error categories, (a)-(f), as GREEN names them.
GREEN_ERROR_CATEGORIES = (
    "False report of a finding in the candidate",
    "Missing a finding present in the reference",
    "Misidentification of a finding's anatomic location/position",
    "Misassessment of the severity of a finding",
    "Mentioning a comparison that isn't in the reference",
    "Omitting a comparison detailing a change from a prior study",
)

# GREEN's prompt. Its exact text and layout (including the four-space indents) are what the judge
# was fine-tuned on, so it is reproduced character for character; {reference}/{candidate} are the
# truncated reports.
_PROMPT = (
    "Objective: Evaluate the accuracy of a candidate radiology report in comparison to a reference "
    "radiology report composed by expert radiologists.\n\n"
    "    Process Overview: You will be presented with:\n\n"
    "    1. The criteria for making a judgment.\n"
    "    2. The reference radiology report.\n"
    "    3. The candidate radiology report.\n"
    "    4. The desired format for your assessment.\n\n"
    "    1. Criteria for Judgment:\n\n"
    "    For each candidate report, determine:\n\n"
    "    The count of clinically significant errors.\n"
    "    The count of clinically insignificant errors.\n\n"
    "    Errors can fall into one of these categories:\n\n"
    + "".join(f"    {letter}) {text}.\n" for letter, text in zip("abcdef", GREEN_ERROR_CATEGORIES))
    + "    Note: Concentrate on the clinical findings rather than the report's writing style. "
    "Evaluate only the findings that appear in both reports.\n\n"
    "    2. Reference Report:\n    {reference}\n\n"
    "    3. Candidate Report:\n    {candidate}\n\n"
    "    4. Reporting Your Assessment:\n\n"
    "    Follow this specific format for your output, even if no errors are found:\n"
    "    ```\n"
    "    [Explanation]:\n    <Explanation>\n\n"
    "    [Clinically Significant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n\n"
    "    [Clinically Insignificant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n\n"
    "    [Matched Findings]:\n"
    "    <The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>\n"
    "    ```\n"
)

#: One user turn in GREEN's chat template (the judge's training format), for /v1/completions.
_TURN = "<|user|>\n{prompt}</s>\n<|assistant|>\n"


def _truncate_words(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def build_green_prompt(reference: str, candidate: str, max_words: int = GREEN_MAX_WORDS) -> str:
    """GREEN's user message for one pair, each report cut to its first ``max_words`` words."""
    return _PROMPT.format(reference=_truncate_words(reference, max_words),
                          candidate=_truncate_words(candidate, max_words))


def green_completion_prompt(reference: str, candidate: str, max_words: int = GREEN_MAX_WORDS) -> str:
    """The raw prompt for a completions endpoint: GREEN's message wrapped in its chat turn."""
    return _TURN.format(prompt=build_green_prompt(reference, candidate, max_words))


# -- parsing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GreenCounts:
    """Counts read from one GREEN answer: (a)-(f) significant and insignificant errors, matches."""

    significant: tuple[int, ...]
    insignificant: tuple[int, ...]
    matched: int


def _section(text: str, header: str) -> str | None:
    """The body of ``[header]:`` up to the next blank line (or the end); None if absent."""
    match = re.search(rf"\[{re.escape(header)}\]:[ \t]*\n?(.*?)(?:\n[ \t]*\n|\Z)", text, re.DOTALL)
    return match.group(1).strip() if match else None


# "(b) Missing a finding ...: 2. ..." -> ("b", "2"); GPT-4-style answers number them (1)-(6).
_ERROR_LINE = re.compile(r"^\s*\(([a-f1-6])\)[^\n:]*:\s*(\d+)\s*\.", re.MULTILINE)
_LETTER_INDEX = {c: i for i, c in enumerate("abcdef")} | {str(i + 1): i for i in range(6)}


def _error_counts(body: str) -> tuple[int, ...]:
    """Six counts from an error section; a section saying "No..."/"None." has none."""
    counts = [0] * 6
    if body.lower().startswith("no"):
        return tuple(counts)
    seen = set()
    for key, number in _ERROR_LINE.findall(body):
        index = _LETTER_INDEX[key]
        if index not in seen:  # a repeated category line keeps its first count
            seen.add(index)
            counts[index] = int(number)
    return tuple(counts)


def parse_green_output(text: str) -> GreenCounts | None:
    """The counts in a GREEN answer, or None when it does not have GREEN's layout.

    Needs a ``[Clinically Significant Errors]`` and a ``[Matched Findings]`` section; the matched
    count is the number that starts the matched section ("No ..."/"None" = 0). A missing
    insignificant section reads as zeros (it does not enter the score).
    """
    significant = _section(text, "Clinically Significant Errors")
    matched_body = _section(text, "Matched Findings")
    if significant is None or matched_body is None:
        return None
    number = re.match(r"(\d+)\s*\.", matched_body)
    if number:
        matched = int(number.group(1))
    elif matched_body.lower().startswith("no"):
        matched = 0
    else:
        return None
    insignificant = _section(text, "Clinically Insignificant Errors")
    return GreenCounts(
        significant=_error_counts(significant),
        insignificant=_error_counts(insignificant) if insignificant is not None else (0,) * 6,
        matched=matched,
    )


def green_score(counts: GreenCounts) -> float:
    """matched / (matched + sum of significant errors); 0 when nothing matched."""
    if counts.matched == 0:
        return 0.0
    return counts.matched / (counts.matched + sum(counts.significant))


# -- the scorer ----------------------------------------------------------------------------------

class GreenScorer(ReportScorer):
    """GREEN accuracies from a judge behind an OpenAI-compatible server.

    Each uncached pair becomes one request; requests run concurrently (at most
    ``max_concurrency`` at a time) with a per-request ``timeout`` and ``retries`` with exponential
    backoff. A pair whose request fails for good, or whose answer cannot be parsed, gets None
    (skipped, counted in ``last_stats``); see :class:`~radialog_rl.scoring.base.ReportScorer` for
    the failure-fraction stop. Before the first request the server is checked once: if nothing
    listens at ``server_url`` the call raises one :class:`ScorerUnavailableError` naming the URL.

    Args:
        server_url: the server's base URL, e.g. ``http://127.0.0.1:8080`` (``/v1`` is added when
            missing).
        model: the model name sent in requests (llama.cpp ignores it; vLLM needs its served name).
        api_key_env: name of the environment variable holding the API key (None = no key).
        endpoint: ``"completions"`` (default: the prompt in GREEN's own chat format, exact for any
            server) or ``"chat"`` (the server applies the model's chat template).
        max_words: words kept per report (GREEN: 300).
        max_tokens: answer length limit.
        request_params: extra JSON fields for every request (e.g. ``{"seed": 0}``, or a llama.cpp
            ``grammar``).
        cache: path of an on-disk cache (sqlite) or None.
        timeout, retries, backoff, max_concurrency: see :class:`OpenAICompatibleClient`.
    """

    name = "green"

    def __init__(
        self,
        server_url: str = "http://127.0.0.1:8080",
        *,
        model: str = "GREEN-RadLlama2-7b",
        api_key_env: str | None = None,
        endpoint: str = "completions",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        max_words: int = GREEN_MAX_WORDS,
        max_tokens: int = 1024,
        request_params: Mapping[str, Any] | None = None,
        cache: str | None = None,
        reference_key: str = "reference",
        max_failure_fraction: float = 0.5,
    ) -> None:
        super().__init__(reference_key=reference_key, max_failure_fraction=max_failure_fraction)
        if endpoint not in ("completions", "chat"):
            raise ConfigError(f"GREEN endpoint must be 'completions' or 'chat', got {endpoint!r}")
        if max_words < 1:
            raise ConfigError("max_words must be at least 1")
        self.endpoint = endpoint
        self.max_words = int(max_words)
        self.client = OpenAICompatibleClient(
            server_url, model=model, api_key_env=api_key_env, timeout=timeout, retries=retries,
            backoff=backoff, max_concurrency=max_concurrency, max_tokens=max_tokens,
            request_params=request_params,
        )
        self.cache = ScoreCache(cache) if cache else None
        self._checked = False
        # What makes two scores comparable: the judge, the prompt format and the request options.
        identity = repr((self.name, model, endpoint, self.max_words, max_tokens,
                         sorted((request_params or {}).items())))
        self.cache_namespace = "green:" + hashlib.sha256(identity.encode()).hexdigest()[:16]

    @property
    def target(self) -> str:
        return self.client.base_url

    def check(self) -> None:
        """Once per scorer: is anything listening at ``server_url``? (ScorerUnavailableError if not.)"""
        if not self._checked:
            self.client.check_reachable()
            self._checked = True

    def _prompt(self, reference: str, candidate: str) -> str | list[dict[str, str]]:
        if self.endpoint == "chat":
            return [{"role": "user", "content": build_green_prompt(reference, candidate, self.max_words)}]
        return green_completion_prompt(reference, candidate, self.max_words)

    def _score_batch(self, references: list[str], candidates: list[str], stats: ScoreStats) -> list[float | None]:
        scores: list[float | None] = [None] * len(references)
        keys = [ScoreCache.key(self.cache_namespace, r, c) for r, c in zip(references, candidates)]
        cached = self.cache.get_many(keys) if self.cache is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in cached]
        for i, k in enumerate(keys):
            if k in cached:
                scores[i] = cached[k]
        stats.cache_hits = len(references) - len(todo)
        if not todo:
            return scores
        self.check()
        prompts = [self._prompt(references[i], candidates[i]) for i in todo]
        results = self.client.complete_many(prompts, chat=self.endpoint == "chat", stats=stats)
        fresh = {}
        unreachable = 0
        for i, result in zip(todo, results):
            if isinstance(result, CompletionError):
                stats.last_failure = str(result)
                unreachable += isinstance(result, ServerUnreachableError)
                continue
            counts = parse_green_output(result)
            if counts is None:
                stats.unparsable += 1
                stats.last_failure = f"unparsable GREEN answer: {result[:120]!r}"
                continue
            scores[i] = fresh[keys[i]] = green_score(counts)
        if self.cache is not None and fresh:  # (an empty cache is falsy: it has __len__)
            self.cache.put_many(fresh)
        if unreachable == len(todo):
            # Not one request got through: the server is gone, not just flaky.
            raise ScorerUnavailableError(
                f"GREEN server at {self.client.base_url} is not reachable ({stats.last_failure}); "
                "start it (see README 'Report accuracy with GREEN') or fix scorer.server_url"
            )
        return scores

    def score_texts(self, references: Sequence[str], candidates: Sequence[str]) -> list[str | None]:
        """The judge's raw answers (None = failed), uncached: for inspecting what GREEN said."""
        stats = ScoreStats(pairs=len(references))
        results = self.client.complete_many(
            [self._prompt(r, c) for r, c in zip(references, candidates)],
            chat=self.endpoint == "chat", stats=stats,
        )
        return [None if isinstance(r, CompletionError) else r for r in results]
