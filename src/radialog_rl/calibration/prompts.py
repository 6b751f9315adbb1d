"""Prompts and SFT targets that ask RaDialog for an answer plus a stated confidence (§B).

* Binary QA: several yes/no question templates for each of the 14 CheXpert findings, followed by
  the instruction to answer and then state ``{"confidence": N}`` on a 0..10 or 0..100 scale.
* Report generation: RaDialog's report prompt (:func:`radialog_rl.data.prompts.report_prompt`)
  followed by the confidence request.
* SFT targets: the answer or report text + `` {"confidence": N}`` with N drawn uniformly from the
  scale by a seeded numpy ``Generator`` (the SFT stage teaches the format, not a calibration).

The functions return the *user message*; wrap it with
:func:`radialog_rl.data.prompts.build_prompt` for the full vicuna-v1 conversation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
from radialog_rl.data.prompts import CHEXPERT_FINDINGS, report_prompt
from radialog_rl.errors import DataError

__all__ = [
    "CONFIDENCE_SCALES",
    "FINDING_PHRASES",
    "QA_TEMPLATES",
    "confidence_instruction",
    "draw_confidence",
    "format_confidence",
    "qa_prompt",
    "qa_questions",
    "qa_sft_target",
    "report_confidence_prompt",
    "report_sft_target",
]

#: Supported confidence scales: 0..10 (default) and 0..100 ("granular" mode, §B).
CONFIDENCE_SCALES: tuple[int, ...] = (10, 100)

#: How each CheXpert finding reads inside a question ("evidence of {phrase}").
FINDING_PHRASES: dict[str, str] = {
    "Enlarged Cardiomediastinum": "an enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "a lung opacity",
    "Lung Lesion": "a lung lesion",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "a pneumothorax",
    "Pleural Effusion": "a pleural effusion",
    "Pleural Other": "a pleural abnormality other than effusion",
    "Fracture": "a fracture",
    "Support Devices": "support devices such as lines, tubes or pacemakers",
}

#: Question templates for every finding except "No Finding" (``{phrase}`` from FINDING_PHRASES).
_FINDING_TEMPLATES: tuple[str, ...] = (
    "Is there evidence of {phrase} in this chest X-ray?",
    "Does the image show {phrase}?",
    "Can you see signs of {phrase} on this X-ray?",
    "Based on this radiograph, does the patient have {phrase}?",
)

#: "No Finding" asks whether the study is normal; a yes means no abnormality.
_NO_FINDING_QUESTIONS: tuple[str, ...] = (
    "Is this chest X-ray free of any abnormal findings?",
    "Would you describe this chest X-ray as normal?",
    "Is the image without any pathological finding?",
    "Does this radiograph show a normal chest without findings?",
)

#: Every CheXpert finding -> its yes/no questions (CheXpert's order).
QA_TEMPLATES: dict[str, tuple[str, ...]] = {
    name: (
        _NO_FINDING_QUESTIONS
        if name == "No Finding"
        else tuple(t.format(phrase=FINDING_PHRASES[name]) for t in _FINDING_TEMPLATES)
    )
    for name in CHEXPERT_FINDINGS
}

_QA_INSTRUCTION = (
    'Answer with "Yes" or "No", then state how confident you are that your answer is correct, '
    "as JSON on a scale from 0 (certainly wrong) to {scale} (certainly correct): "
    '{{"confidence": <integer from 0 to {scale}>}}.'
)
_REPORT_INSTRUCTION = (
    "After the report, state how confident you are that the report is correct and complete, "
    "as JSON on a scale from 0 (not at all) to {scale} (completely): "
    '{{"confidence": <integer from 0 to {scale}>}}.'
)


def _check_scale(scale: int) -> int:
    if scale not in CONFIDENCE_SCALES:
        raise DataError(f"confidence scale must be one of {CONFIDENCE_SCALES}, got {scale!r}")
    return scale


def _canonical_finding(finding: str) -> str:
    by_lower = {name.lower(): name for name in CHEXPERT_FINDINGS}
    name = by_lower.get(finding.strip().lower())
    if name is None:
        raise DataError(
            f"unknown CheXpert finding {finding!r}; expected one of: {', '.join(CHEXPERT_FINDINGS)}"
        )
    return name


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    """A numpy Generator; an int is taken as its seed (SFT targets must be reproducible)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def confidence_instruction(scale: int = 10, task: str = "qa") -> str:
    """The sentence asking for ``{"confidence": N}`` on ``0..scale`` (``task``: "qa" or "report")."""
    _check_scale(scale)
    if task == "qa":
        return _QA_INSTRUCTION.format(scale=scale)
    if task == "report":
        return _REPORT_INSTRUCTION.format(scale=scale)
    raise ValueError(f"task must be 'qa' or 'report', got {task!r}")


def qa_questions(finding: str) -> tuple[str, ...]:
    """The yes/no question templates of one CheXpert finding (name matched case-insensitively)."""
    return QA_TEMPLATES[_canonical_finding(finding)]


def qa_prompt(finding: str, scale: int = 10, template: int = 0) -> str:
    """User message of a binary QA sample: ``<image>. {question} {confidence instruction}`` (§B).

    ``template`` indexes :func:`qa_questions` (modulo their number, so a running index can be
    passed).
    """
    questions = qa_questions(finding)
    question = questions[template % len(questions)]
    return f"{DEFAULT_IMAGE_TOKEN}. {question} {confidence_instruction(scale, 'qa')}"


def report_confidence_prompt(findings: Iterable[str] | str | None = None, scale: int = 10) -> str:
    """RaDialog's report prompt followed by the confidence request (§B)."""
    return f"{report_prompt(findings)} {confidence_instruction(scale, 'report')}"


def format_confidence(value: int) -> str:
    """The confidence statement ``{"confidence": N}``."""
    return f'{{"confidence": {int(value)}}}'


def draw_confidence(rng: np.random.Generator | int, scale: int = 10) -> int:
    """An integer drawn uniformly from ``0..scale`` (inclusive)."""
    return int(_as_rng(rng).integers(0, _check_scale(scale) + 1))


def qa_sft_target(answer: bool | str, rng: np.random.Generator | int, scale: int = 10) -> str:
    """SFT target of a binary QA sample: ``Yes {"confidence": N}`` / ``No {"confidence": N}``.

    ``answer`` is a bool or "yes"/"no" (any case); N is uniform on ``0..scale``.
    """
    if isinstance(answer, str):
        key = answer.strip().lower()
        if key not in ("yes", "no"):
            raise DataError(f"binary QA answer must be 'yes' or 'no', got {answer!r}")
        answer = key == "yes"
    text = "Yes" if answer else "No"
    return f"{text} {format_confidence(draw_confidence(rng, scale))}"


def report_sft_target(report: str, rng: np.random.Generator | int, scale: int = 10) -> str:
    """SFT target of a report sample: the report + `` {"confidence": N}``, N uniform on ``0..scale``."""
    if not report or not report.strip():
        raise DataError("report SFT target needs a non-empty report text")
    return f"{report.strip()} {format_confidence(draw_confidence(rng, scale))}"
