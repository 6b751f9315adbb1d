"""PPO's dataset: prompt rows of ``{"image": ..., "prompt": ..., <labels>}``, one per JSONL line.

Every field besides ``image`` / ``prompt`` / ``prior_image`` is kept in :attr:`PromptRow.fields`
and handed to the reward (the labels: ``answer``, ``accuracy``, a reference report...). Relative
image paths resolve against the file's folder; a missing image is a bad row, found before any model
is loaded. The labelled confidence samples (:mod:`radialog_rl.confidence.samples`) are prompt rows
with a label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
from radialog_rl.data.rows import RowErrors, jsonl_objects, require_file
from radialog_rl.errors import DataError


@dataclass(frozen=True)
class PromptRow:
    """One PPO dataset row: the image, the user message, and every other field (labels)."""

    image: Path
    prompt: str
    fields: dict
    prior_image: Path | None = None
    source: str = ""  # "<file> line N", for messages
    line: int = 0  # N: the row's 1-based line in its file (0: not from a file)


def load_prompt_jsonl(path: str | os.PathLike) -> list[PromptRow]:
    """Rows of ``{"image": ..., "prompt": ..., <labels>}``; relative image paths resolve against
    the file's folder. Bad rows raise one :class:`DataError` naming their line numbers."""
    path = require_file(path, "PPO data file")
    rows: list[PromptRow] = []
    errors = RowErrors(path)
    for row in jsonl_objects(path, errors):
        data = row.data
        if not data.get("image") or not isinstance(data.get("prompt"), str):
            errors.add(row.number, "needs 'image' and 'prompt' fields")
            continue
        image = (path.parent / data["image"]).resolve()
        prior = (path.parent / data["prior_image"]).resolve() if data.get("prior_image") else None
        missing = [str(p) for p in (image, prior) if p is not None and not p.is_file()]
        if missing:
            errors.add(row.number, f"image not found: {', '.join(missing)}")
            continue
        rows.append(PromptRow(image, data["prompt"], data, prior, row.source, row.number))
    errors.raise_if_any()
    if not rows:
        raise DataError(f"PPO data file {path} has no rows")
    with_prior = [r.source for r in rows if r.prior_image is not None]
    if with_prior and len(with_prior) != len(rows):
        without = [r.source for r in rows if r.prior_image is None]
        raise DataError(
            f"{path}: either every row has a 'prior_image' or none does (BioViL-T's temporal input is "
            f"batched); without one: {', '.join(without[:5])}"
        )
    return rows


def user_message(prompt: str) -> str:
    """The prompt with exactly one ``<image>`` (prepended when absent, as LLaVA's data does)."""
    count = prompt.count(DEFAULT_IMAGE_TOKEN)
    if count > 1:
        raise DataError(f"prompt has {count} '<image>' placeholders; one image per prompt: {prompt[:80]!r}")
    return prompt if count == 1 else f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"
