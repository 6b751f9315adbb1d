"""What every MIMIC builder writes: JSONL rows, a manifest beside them, and a summary table.

The manifest (``<prefix>.manifest.json``) records the builder and its version, every input file
with its size and sha256, the parameters, each output file with its row count and sha256, the
master-table counts (images missing, views dropped, ...) and the summary rows. It holds no
timestamps, so building twice from the same files gives byte-identical outputs and manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radialog_rl import __version__

__all__ = ["BUILDER_VERSION", "BuildResult", "format_table", "image_field", "sha256_file", "write_jsonl",
           "write_manifest", "write_part"]

#: Bumped whenever a builder's output for the same inputs and parameters changes.
BUILDER_VERSION = "1"


@dataclass
class BuildResult:
    """Files a builder wrote (name -> path), its manifest, the master-table counts and the summary
    rows (one dict per line of :meth:`summary_table`)."""

    files: dict[str, Path]
    manifest: Path
    stats: dict[str, int]
    summary: list[dict[str, Any]] = field(default_factory=list)

    def summary_table(self) -> str:
        """The summary rows as an aligned text table, then the master-table counts."""
        lines = [format_table(self.summary)] if self.summary else []
        lines.append("  ".join(f"{k}={v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_field(root: Path, relpath: str, out_dir: Path, absolute: bool) -> str:
    """The ``image`` value of a row: relative to the output folder (the loaders resolve it against
    the JSONL file's folder), or absolute. Symlinks are kept as they are (a linked MIMIC mount stays
    addressed through its link)."""
    path = os.path.abspath(root / relpath)
    return path if absolute else Path(os.path.relpath(path, os.path.abspath(out_dir))).as_posix()


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """One compact JSON object per line (UTF-8, ``\\n``); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)  # a half-written file never carries the final name
    return count


def write_part(out_dir: Path, prefix: str, part: str, ppo_rows: Iterable[Mapping[str, Any]],
               sft_rows: Iterable[Mapping[str, Any]], files: dict[str, Path]) -> None:
    """Write ``<prefix>_<part>.ppo.jsonl`` and ``.sft.jsonl``, recording both in ``files``."""
    for kind, rows in (("ppo", ppo_rows), ("sft", sft_rows)):
        name = f"{prefix}_{part}.{kind}"
        files[name] = out_dir / f"{name}.jsonl"
        write_jsonl(files[name], rows)


def write_manifest(
    out_dir: Path,
    prefix: str,
    *,
    builder: str,
    inputs: Mapping[str, Path],
    parameters: Mapping[str, Any],
    files: Mapping[str, Path],
    stats: Mapping[str, int],
    summary: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``out_dir/<prefix>.manifest.json`` (module docstring) and return its path."""
    manifest = {
        "builder": builder,
        "builder_version": BUILDER_VERSION,
        "package_version": __version__,
        "inputs": {name: {"path": os.path.abspath(p), "bytes": Path(p).stat().st_size,
                          "sha256": sha256_file(p)} for name, p in inputs.items()},
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in parameters.items()},
        "outputs": {name: {"file": p.name, "rows": _count_lines(p), "sha256": sha256_file(p)}
                    for name, p in files.items()},
        "master_table": dict(stats),
        "summary": list(summary),
    }
    path = out_dir / f"{prefix}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of equal keys as a left-aligned text table with a header line."""
    columns = list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)
