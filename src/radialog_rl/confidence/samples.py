"""Labelled samples for confidence estimation: a JSONL file of image + prompt + label.

One JSON object per line (relative paths resolve against the file's folder):

``{"id": "s1", "image": "cxr.png", "prompt": "<image>. Is there edema? ...", "answer": "yes"}``
    binary QA: the response's yes/no answer (:func:`~radialog_rl.calibration.parsing.parse_yes_no`)
    is compared with ``answer`` (``"yes"``/``"no"`` or true/false); correct = 1, wrong = 0, and a
    response without a clear yes/no gets no accuracy (excluded from the metrics, counted).
``{"image": ..., "prompt": ..., "accuracy": 0.7}`` (or ``"correct": true``)
    an accuracy scored elsewhere (e.g. GREEN for a report), used as given.

Optional fields: ``id`` (default: the 0-based row index), ``response`` (a fixed response to score
instead of generating one; needed when ``accuracy`` refers to a known text), ``prior_image``
(BioViL-T's previous study; all rows or none). ``prompt`` is the user message; ``<image>`` is
prepended when it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from radialog_rl.calibration.parsing import parse_truth, parse_yes_no
from radialog_rl.errors import DataError
from radialog_rl.data.prompt_rows import load_prompt_jsonl, user_message
from radialog_rl.data.rows import RowErrors, require_file

__all__ = ["LabelledSample", "load_labelled_jsonl", "sample_accuracy"]


@dataclass(frozen=True)
class LabelledSample:
    """One labelled row. Exactly one of ``answer`` / ``accuracy`` is set."""

    id: object
    image: Path
    prompt: str  # the user message, with exactly one <image>
    answer: bool | None = None
    accuracy: float | None = None
    response: str | None = None
    prior_image: Path | None = None
    source: str = ""


def _label(fields: dict) -> tuple[bool | None, float | None]:
    """``(answer, accuracy)`` of a row, or ValueError naming the problem."""
    if "answer" in fields:
        value = fields["answer"]
        truth = parse_truth(value) if isinstance(value, (bool, str)) else None  # 0/1 is an accuracy
        if truth is None:
            raise ValueError(f"'answer' must be yes/no or true/false, got {value!r}")
        return truth, None
    if "accuracy" in fields:
        value = fields["accuracy"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"'accuracy' must be a number in [0, 1], got {value!r}")
        return None, float(value)
    if "correct" in fields:
        value = fields["correct"]
        truth = parse_truth(value) if not isinstance(value, str) else None
        if truth is None:
            raise ValueError(f"'correct' must be true/false, got {value!r}")
        return None, float(truth)
    raise ValueError("needs a label: 'answer' (yes/no), 'accuracy' (0..1) or 'correct' (true/false)")


def load_labelled_jsonl(path: str | os.PathLike) -> list[LabelledSample]:
    """The labelled samples of ``path`` (format in the module docstring).

    Raises:
        DataError: the file is missing or empty, or rows are bad (one error naming their lines).
    """
    path = require_file(path, "labelled data file")
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise DataError(f"labelled data file {path} has no rows; expected one JSON object per line")
    samples = []
    errors = RowErrors(path)
    for index, row in enumerate(load_prompt_jsonl(path)):  # images resolved and checked there
        try:
            answer, accuracy = _label(row.fields)
            response = row.fields.get("response")
            if response is not None and not isinstance(response, str):
                raise ValueError(f"'response' must be a string, got {type(response).__name__}")
            prompt = user_message(row.prompt)
        except (ValueError, DataError) as exc:
            errors.add(row.line, str(exc))
            continue
        samples.append(LabelledSample(
            id=row.fields.get("id", index), image=row.image, prompt=prompt, answer=answer,
            accuracy=accuracy, response=response, prior_image=row.prior_image, source=row.source,
        ))
    errors.raise_if_any()
    return samples


def sample_accuracy(sample: LabelledSample, response: str) -> float | None:
    """Accuracy of ``response`` for ``sample``: the given accuracy, or 1/0 for a matching /
    different yes-no answer, None when the response states no clear yes or no."""
    if sample.answer is None:
        return sample.accuracy
    said = parse_yes_no(response)
    return None if said is None else float(said == sample.answer)
