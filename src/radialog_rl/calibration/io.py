"""Reading prediction files for calibration evaluation (JSONL and CSV).

* JSONL (``.jsonl``/``.ndjson``/``.json``): one object per line with ``confidence`` (a number on
  0..scale or null = missing) or, instead, a raw ``text`` / ``response`` to parse with
  :func:`~radialog_rl.calibration.parsing.parse_confidence` (unparsable = missing); and
  ``accuracy`` (a number in [0, 1] or null = not scored) or ``correct`` (true/false, 0/1,
  "yes"/"no"). Blank lines are ignored.
* CSV (``.csv``/``.tsv``): header with ``confidence`` and ``accuracy`` columns; an empty cell is
  missing (an empty confidence is a parse failure, as in ``tests/calibration/published``); a
  row with fewer cells than the header is a bad row, not a missing accuracy.

``green_score`` is read as ``accuracy`` (the earlier RaDialog calibration work wrote its GREEN
scores under that name). A UTF-8 byte-order mark (Excel's "CSV UTF-8") is ignored. With scale 100,
confidences that all lie within 0..10 draw a warning (the file is probably on the 0-10 scale, and
its ECE on 0-100 bins would be wrong).

Bad rows (invalid JSON, a non-numeric value, a confidence outside 0..scale, an accuracy outside
[0, 1], a row without an accuracy field) are collected with their 1-based line numbers; one
:class:`~radialog_rl.errors.DataError` lists them, unless ``skip_bad_rows=True``, which drops them
with a warning naming the lines.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radialog_rl.calibration.parsing import parse_confidence, parse_truth
from radialog_rl.data.rows import RowErrors
from radialog_rl.errors import DataError

__all__ = ["PredictionSet", "read_predictions", "read_predictions_csv", "read_predictions_jsonl"]

logger = logging.getLogger(__name__)

#: How many bad lines an error/warning message names before "and N more".
MAX_LINES_SHOWN = 5

#: Column / field names read as the accuracy, first found wins.
ACCURACY_KEYS = ("accuracy", "green_score")

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
_CSV_SUFFIXES = frozenset({".csv", ".tsv"})


class _BadRow(ValueError):
    """One row is unusable (message says why); collected with its line number."""


@dataclass
class PredictionSet:
    """Confidences (0..scale, None = missing) and accuracies ([0, 1], None = missing) of a file.

    ``line_numbers[i]`` is the 1-based line of sample i; ``bad_rows`` the (line, reason) pairs that
    were skipped (only non-empty with ``skip_bad_rows=True``).
    """

    path: Path
    confidences: list[float | None] = field(default_factory=list)
    accuracies: list[float | None] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.confidences)

    def add(self, line: int, confidence: float | None, accuracy: float | None) -> None:
        self.line_numbers.append(line)
        self.confidences.append(confidence)
        self.accuracies.append(accuracy)


def _number(value: Any, what: str) -> float:
    """A finite float from a JSON number or a numeric string, else :class:`_BadRow`."""
    if isinstance(value, bool):
        raise _BadRow(f"{what} must be a number, got {json.dumps(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _BadRow(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _BadRow(f"{what} must be finite, got {value!r}")
    return number


def _confidence(value: Any, scale: int) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number(value, "confidence")
    if not 0 <= number <= scale:
        raise _BadRow(f"confidence {value!r} is outside 0..{scale}")
    return number


def _accuracy(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number(value, "accuracy")
    if not 0.0 <= number <= 1.0:
        raise _BadRow(f"accuracy {value!r} is outside [0, 1]")
    return number


def _correct(value: Any) -> float | None:
    if value is None:
        return None
    truth = parse_truth(value)
    if truth is None:
        raise _BadRow(f"correct must be true/false or 0/1, got {value!r}")
    return float(truth)


def _jsonl_row(line: str, scale: int) -> tuple[float | None, float | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadRow(f"invalid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    if "confidence" in row:
        confidence = _confidence(row["confidence"], scale)
    elif isinstance(row.get("text", row.get("response")), str):
        confidence = parse_confidence(row.get("text", row.get("response")), scale)
    else:
        raise _BadRow("no 'confidence' and no 'text'/'response' to parse it from")
    for key in ACCURACY_KEYS:
        if key in row:
            return confidence, _accuracy(row[key])
    if "correct" in row:
        return confidence, _correct(row["correct"])
    raise _BadRow("no 'accuracy' or 'correct' field")


def _report_bad(path: Path, bad: list[tuple[int, str]], skip: bool) -> None:
    errors = RowErrors(path)
    for number, why in bad:
        errors.add(number, why)
    if not skip:
        errors.raise_if_any("fix them or skip them with skip_bad_rows=True (CLI: --skip-bad-rows)")
        return
    lines = ", ".join(str(n) for n, _ in bad[:MAX_LINES_SHOWN])
    more = f" and {len(bad) - MAX_LINES_SHOWN} more" if len(bad) > MAX_LINES_SHOWN else ""
    logger.warning("%s: skipped %d bad row(s) at line(s) %s%s", path, len(bad), lines, more)


def read_predictions_jsonl(path: str | Path, scale: int = 10, skip_bad_rows: bool = False) -> PredictionSet:
    """Predictions from a JSONL file (see the module docstring for the fields)."""
    path = Path(path)
    out = PredictionSet(path=path)
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.add(number, *_jsonl_row(line, scale))
            except _BadRow as exc:
                out.bad_rows.append((number, str(exc)))
    return _finish(out, skip_bad_rows, scale)


def _csv_row(row: dict[str, str | None], scale: int) -> tuple[float | None, float | None]:
    if None in row:  # DictReader puts surplus cells under the key None
        raise _BadRow("more cells than header columns")
    if None in row.values():  # ... and None under the columns a short row lacks
        raise _BadRow(f"fewer cells than header columns (missing {', '.join(k for k, v in row.items() if v is None)})")
    return _confidence(row.get("confidence"), scale), _accuracy(row.get("accuracy"))


def read_predictions_csv(path: str | Path, scale: int = 10, skip_bad_rows: bool = False) -> PredictionSet:
    """Predictions from a CSV/TSV file with ``confidence`` and ``accuracy`` columns."""
    path = Path(path)
    out = PredictionSet(path=path)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "accuracy" not in header and "green_score" in header:
            header = ["accuracy" if h == "green_score" else h for h in header]
        missing = {"confidence", "accuracy"} - set(header)  # green_score was renamed above
        if missing:
            raise DataError(
                f"{path}: the header must name the columns confidence and accuracy; "
                f"missing {', '.join(sorted(missing))} (header: {reader.fieldnames})"
            )
        reader.fieldnames = header
        for row in reader:
            try:
                out.add(reader.line_num, *_csv_row(row, scale))
            except _BadRow as exc:
                out.bad_rows.append((reader.line_num, str(exc)))
    return _finish(out, skip_bad_rows, scale)


def _finish(out: PredictionSet, skip_bad_rows: bool, scale: int) -> PredictionSet:
    if out.bad_rows:
        _report_bad(out.path, out.bad_rows, skip_bad_rows)
    if not out.confidences:
        raise DataError(f"{out.path}: no predictions found")
    stated = [c for c in out.confidences if c is not None]
    if scale == 100 and len(stated) >= 5 and max(stated) <= 10:
        logger.warning("%s: every confidence is within 0..10 but the scale is 100; if the file is on the "
                       "0-10 scale, pass --scale 10 (its ECE on 0-100 bins would be wrong)", out.path)
    return out


def read_predictions(path: str | Path, scale: int = 10, skip_bad_rows: bool = False) -> PredictionSet:
    """Predictions from a ``.jsonl`` / ``.csv`` file (format chosen by the suffix).

    Raises :class:`DataError` listing the line numbers of bad rows unless ``skip_bad_rows``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        reader = read_predictions_jsonl
    elif suffix in _CSV_SUFFIXES:
        reader = read_predictions_csv
    else:
        raise DataError(f"{path}: unknown predictions format {suffix!r}; use .jsonl or .csv")
    try:
        return reader(path, scale, skip_bad_rows)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
