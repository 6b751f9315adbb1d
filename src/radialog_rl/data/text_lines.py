"""Reading a data file's lines so that one bad line is a row error, not a crash.

A JSONL file with one line in another encoding (Latin-1 from a spreadsheet export) must be reported
as that line, like a line of invalid JSON, instead of a ``UnicodeDecodeError`` for the whole file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None]]:
    """``(line_number, text)`` for each line (1-based); ``text`` is None for a line that is not
    UTF-8. A UTF-8 byte-order mark at the start is dropped."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


NOT_UTF8 = "not UTF-8 text (re-save the file as UTF-8)"
