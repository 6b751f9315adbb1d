"""Reading JSONL data files so that every bad row is reported, in one error, by line number.

One collector (:class:`RowErrors`) and one reader (:func:`jsonl_objects`) serve every JSONL input
(SFT conversations, PPO prompts, labelled confidence samples, score inputs), so that a file with
three bad rows fails once, naming all three, the same way everywhere::

    errors = RowErrors(path)
    for row in jsonl_objects(path, errors):
        try:
            examples.append(parse(row.data))
        except ValueError as exc:
            errors.add(row.number, str(exc))
    errors.raise_if_any()
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from radialog_rl.data.text_lines import NOT_UTF8, numbered_lines
from radialog_rl.errors import DataError

#: How many bad rows an error lists before "... and N more".
MAX_LISTED_ERRORS = 5


class RowErrors:
    """The bad rows of one file: ``(line number, reason)`` pairs, raised together."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[tuple[int, str]] = []

    def add(self, number: int, reason: str) -> None:
        """Record that line ``number`` (1-based) is bad because of ``reason``."""
        self.rows.append((number, reason))

    def __len__(self) -> int:
        return len(self.rows)

    def message(self, hint: str = "") -> str:
        """``"<path>: N bad row(s): line 2: ...; line 5: ...; ... and M more[; hint]"``."""
        listed = "; ".join(f"line {n}: {why}" for n, why in self.rows[:MAX_LISTED_ERRORS])
        hidden = len(self.rows) - MAX_LISTED_ERRORS
        more = f"; ... and {hidden} more" if hidden > 0 else ""
        return f"{self.path}: {len(self.rows)} bad row(s): {listed}{more}" + (f"; {hint}" if hint else "")

    def raise_if_any(self, hint: str = "") -> None:
        """Raise one :class:`DataError` listing the bad rows (the first few), if there are any."""
        if self.rows:
            raise DataError(self.message(hint))


@dataclass(frozen=True)
class JsonRow:
    """One JSON object of a JSONL file: its 1-based line number, ``"<file> line N"``, the object."""

    number: int
    source: str
    data: dict


def jsonl_objects(path: str | os.PathLike, errors: RowErrors) -> Iterator[JsonRow]:
    """The JSON objects of ``path``, one per non-blank line, in file order.

    Lines that are not UTF-8, not valid JSON, or not a JSON object are recorded in ``errors``
    (and not yielded). A UTF-8 byte-order mark is dropped.
    """
    path = Path(path)
    for number, line in numbered_lines(path):
        if line is None:
            errors.add(number, NOT_UTF8)
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.add(number, f"invalid JSON ({exc.msg}, column {exc.colno})")
            continue
        if not isinstance(data, dict):
            errors.add(number, f"expected a JSON object, got {type(data).__name__}")
            continue
        yield JsonRow(number, f"{path.name} line {number}", data)


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a ``Path`` (``~`` expanded); :class:`DataError` naming ``what`` when it is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path
