"""Parsing of model responses: the stated confidence, its character span, and yes/no answers.

Also holds the exploration trick of "Rewarding Doubt" (:func:`replace_confidences`), which rewrites
the stated confidences of a batch before scoring. Everything follows ``docs/ppo-and-calibration.md`` §B.
Pure string functions plus a numpy ``Generator`` for the exploration draws.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE_PATTERN",
    "find_confidence_span",
    "parse_confidence",
    "parse_yes_no",
    "replace_confidences",
    "strip_confidence",
]

#: One confidence statement: optional ``{``, the key ``confidence`` (any case, quotes optional,
#: a whole word so "overconfidence" does not count), a colon, a number (quotes optional), optional
#: ``}``. The number pattern takes a sign and decimals so that "7.5" or "-1" are seen whole and
#: rejected instead of being read as 7 or 1.
CONFIDENCE_PATTERN = re.compile(
    r"(?P<open>\{\s*)?"
    r"[\"']?\bconfidence\b[\"']?\s*:\s*"
    r"[\"']?(?P<value>[-+]?\d+(?:\.\d+)?)[\"']?"
    r"(?P<close>\s*\})?",
    re.IGNORECASE,
)

_YES_NO = re.compile(r"\b(yes|no)\b")
# What may stand before a leading answer: nothing but punctuation, quotes, markdown, whitespace.
_ONLY_PUNCT_BEFORE = re.compile(r"[\W_]*")
# "... answer: no", "the answer is no", "answer - no"
_AFTER_ANSWER_WORD = re.compile(r"\banswer\b\s*(?:is\b)?\s*[:\-]?\s*[\"'*(\[]*$")
# A sentence or clause start: "... . No", "...; no", a new line.
_SENTENCE_START = re.compile(r"[.!?;:\n]\s*[\"'*(\[]*$")
# Followed by punctuation or the end: "no.", "no,", "no)", "no" at the very end.
_FOLLOWED_BY_STOP = re.compile(r"\s*(?:[.,!?;:)\]\"'*}]|$)")


def _matches(text: str) -> list[re.Match[str]]:
    return list(CONFIDENCE_PATTERN.finditer(text or ""))


def _value_to_int(raw: str, scale: int) -> int | None:
    """An integral number within 0..scale, else None ("7.0" counts as 7, "7.5" does not)."""
    value = float(raw)
    if not value.is_integer():
        return None
    n = int(value)
    return n if 0 <= n <= scale else None


def parse_confidence(text: str | None, scale: int = 10) -> int | None:
    """The stated confidence of ``text`` as an integer in ``0..scale``, or None when missing (§B).

    A statement is the key ``confidence`` (case-insensitive, quotes optional), a colon and a number,
    e.g. ``{"confidence": 7}``, ``Confidence: 7``, ``'CONFIDENCE': "7"``. The text must hold exactly
    one statement, and its number must be an integer within the scale; otherwise None (two
    statements, ``7.5``, ``-1``, ``11`` on the 0..10 scale all give None). An integral decimal such
    as ``7.0`` is read as 7.
    """
    found = _matches(text or "")
    if len(found) != 1:
        return None
    return _value_to_int(found[0].group("value"), scale)


def find_confidence_span(text: str | None) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the confidence statement in ``text`` (§B).

    The span covers the whole statement, braces included when present (``{"confidence": 7}``), so
    that the PPO trainer can optimise only the tokens overlapping it. None when the text holds no
    statement or more than one (the same rule as :func:`parse_confidence`); a single statement whose
    number is out of range still has a span, since those are the tokens to blame.
    """
    found = _matches(text or "")
    if len(found) != 1:
        return None
    return found[0].span()


def strip_confidence(text: str | None) -> str:
    """``text`` without any confidence statement, whitespace tidied (for answer/report scoring)."""
    stripped = CONFIDENCE_PATTERN.sub(" ", text or "")
    # Collapse only the runs of spaces/tabs the removal created; keep line breaks of reports.
    stripped = re.sub(r"[ \t]{2,}", " ", stripped)
    return stripped.strip()


def _is_answer_position(body: str, start: int, end: int) -> bool:
    """Whether a "no" at ``body[start:end]`` stands as an answer rather than a determiner.

    "No, ..." / "No." / "The answer is no" / "... . No" are answers; "there is no effusion" is not.
    """
    before, after = body[:start], body[end:]
    return bool(
        _ONLY_PUNCT_BEFORE.fullmatch(before)
        or _AFTER_ANSWER_WORD.search(before)
        or _SENTENCE_START.search(before)
        or _FOLLOWED_BY_STOP.match(after)
    )


_TRUE_WORDS = frozenset({"yes", "true", "1", "1.0"})
_FALSE_WORDS = frozenset({"no", "false", "0", "0.0"})


def parse_truth(value: Any) -> bool | None:
    """A ground-truth label from a data field: a bool, 0/1, or "yes"/"no"/"true"/"false"/"1"/"0"
    (any case, surrounding spaces ignored); None when ``value`` is none of these.

    For labels written by people or tables (a JSONL ``answer``, a CSV ``correct`` column), not for
    model output (that is :func:`parse_yes_no`).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value) if value in (0, 1) else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
    return None


def parse_yes_no(text: str | None) -> bool | None:
    """The yes/no answer of a binary QA response: True, False, or None when absent or ambiguous.

    Decides by whole words only ("no" never matches "nodule", "not", "know", "yesterday"). A "yes"
    anywhere counts as an answer; a "no" counts when it stands as an answer: leading the response
    (after punctuation/markdown, or after "answer:" / "the answer is"), starting a sentence, or
    followed by punctuation or the end. "No, there is no effusion" is False; "There is no effusion"
    holds no answer word and gives None; "Yes and no" / "Yes. No." give None (both answers). The
    confidence statement is removed first.
    """
    body = strip_confidence(text).lower()
    answers: set[bool] = set()
    for m in _YES_NO.finditer(body):
        is_yes = m.group(1) == "yes"
        if is_yes or _is_answer_position(body, m.start(), m.end()):
            answers.add(is_yes)
    return answers.pop() if len(answers) == 1 else None


def _draw_other(rng: np.random.Generator, current: int, scale: int) -> int:
    """A value uniform over ``0..scale`` except ``current``."""
    new = int(rng.integers(0, scale))  # scale choices: 0..scale-1
    return new + 1 if new >= current else new


def replace_confidences(
    texts: Sequence[str],
    prob: float,
    rng: np.random.Generator,
    scale: int = 10,
) -> tuple[list[str], list[int | None]]:
    """The exploration trick of "Rewarding Doubt" (§B): rewrite a batch's stated confidences.

    With probability ``prob`` for the whole batch (one draw), every text whose confidence parses
    gets its number replaced by a value drawn uniformly from ``0..scale`` *other than* the stated
    one; otherwise the texts are returned unchanged. The batch decision is always drawn, so the
    generator's stream does not depend on the texts.

    Returns ``(new_texts, values)``: ``values[i]`` is the confidence now stated in ``new_texts[i]``
    (the replacement, or the original when not replaced), None when the text has no parsable
    confidence. The §B probabilities were q = 0.4 for QA and 0.25 for reports.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"exploration probability must be in [0, 1], got {prob}")
    explore = bool(rng.random() < prob)
    new_texts: list[str] = []
    values: list[int | None] = []
    for text in texts:
        current = parse_confidence(text, scale)
        if current is None or not explore:
            new_texts.append(text)
            values.append(current)
            continue
        new = _draw_other(rng, current, scale)
        start, end = _matches(text)[0].span("value")
        new_texts.append(f"{text[:start]}{new}{text[end:]}")
        values.append(new)
    return new_texts, values
