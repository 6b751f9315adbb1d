"""``radialog-rl score``: report accuracies of a JSONL of (reference, generated) reports.

Writes every input row back with an ``accuracy`` field (a number in [0, 1], or null when the scorer
could not score that row) so ``radialog-rl evaluate`` can compute the calibration of the generated
reports' stated confidences against these accuracies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from radialog_rl.cli.arguments import positive_int

logger = logging.getLogger(__name__)

_CANDIDATE_KEYS = ("generated", "text", "candidate", "response")

_DESCRIPTION = """\
Score generated reports against reference reports and write their accuracies.

INPUT is a .jsonl file, one object per line with the reference report (field "reference", or
--reference-key) and the generated report (the first of "generated", "text", "candidate",
"response", or --candidate-key; e.g. the output of `radialog-rl generate` with a "reference" field
added). A {"confidence": N} statement in the generated report is removed before scoring. OUTPUT gets
every input row plus "accuracy" (null = could not be scored: a failed or unparsable judge answer;
such rows are skipped by `radialog-rl evaluate`, never counted as 0).

Scorers: green (the GREEN judge behind an OpenAI-compatible server: llama.cpp's llama-server,
python -m llama_cpp.server or vLLM; see the README section "Report accuracy with GREEN") and
unigram_f1 (word-overlap F1; no server)."""

_EPILOG = """\
examples:
  radialog-rl score reports.jsonl --output scored.jsonl --scorer unigram_f1
  radialog-rl score reports.jsonl --output scored.jsonl --scorer green \\
      --server-url http://127.0.0.1:8080 --cache runs/green-cache.sqlite
  radialog-rl evaluate scored.jsonl"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "score", help="accuracies of generated reports against references (GREEN, unigram F1)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="JSONL of reference and generated reports")
    p.add_argument("--output", "-o", type=Path, required=True, help="JSONL to write (input rows + accuracy)")
    p.add_argument("--scorer", default="green", help="green (default) or unigram_f1")
    p.add_argument("--reference-key", default="reference", help="field of the reference report")
    p.add_argument("--candidate-key", help=f"field of the generated report (default: first of {', '.join(_CANDIDATE_KEYS)})")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs per scoring call (default 64)")
    g = p.add_argument_group("green")
    g.add_argument("--server-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8080")
    g.add_argument("--model", help="model name sent to the server (vLLM: its served name)")
    g.add_argument("--api-key-env", help="environment variable holding the server's API key")
    g.add_argument("--endpoint", choices=("completions", "chat"), help="completions (default) or chat")
    g.add_argument("--timeout", type=float, help="seconds per request (default 120)")
    g.add_argument("--retries", type=int, help="retries per request (default 3)")
    g.add_argument("--max-concurrency", type=positive_int, help="requests in flight (default 8)")
    g.add_argument("--max-failure-fraction", type=float,
                   help="stop when more than this fraction of a batch fails (default 0.5; 1 = never stop)")
    g.add_argument("--cache", help="sqlite file caching scores across runs")
    p.set_defaults(func=run)


def _read_rows(path: Path, reference_key: str, candidate_key: str | None) -> tuple[list[dict], list[str], list[str]]:
    from radialog_rl.data.rows import RowErrors, jsonl_objects, require_file
    from radialog_rl.errors import DataError

    path = require_file(path, "input file")
    rows, references, candidates = [], [], []
    errors = RowErrors(path)
    for json_row in jsonl_objects(path, errors):
        row = json_row.data
        key = candidate_key or next((k for k in _CANDIDATE_KEYS if k in row), None)
        reference, candidate = row.get(reference_key), row.get(key) if key else None
        if not isinstance(reference, str) or not isinstance(candidate, str):
            wanted = candidate_key or " / ".join(_CANDIDATE_KEYS)
            errors.add(json_row.number, f"needs text fields {reference_key!r} and {wanted!r}")
            continue
        rows.append(row)
        references.append(reference)
        candidates.append(candidate)
    errors.raise_if_any()
    if not rows:
        raise DataError(f"{path} has no rows to score")
    return rows, references, candidates


def _scorer_options(args: argparse.Namespace) -> dict:
    names = ("server_url", "model", "api_key_env", "endpoint", "timeout", "retries", "max_concurrency",
             "max_failure_fraction", "cache")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.scorer != "green":
        options = {k: v for k, v in options.items() if k == "max_failure_fraction"}
    return options


def run(args: argparse.Namespace) -> int:
    """Score INPUT, write OUTPUT, print a one-line summary; returns 0."""
    from tqdm.auto import tqdm

    from radialog_rl.calibration.parsing import strip_confidence
    from radialog_rl.errors import ConfigError
    from radialog_rl.scoring import build_scorer

    if args.output.is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a .jsonl file path")
    rows, references, candidates = _read_rows(args.input, args.reference_key, args.candidate_key)
    scorer = build_scorer(args.scorer, **_scorer_options(args))
    candidates = [strip_confidence(c) for c in candidates]
    accuracies: list[float | None] = []
    cache_hits = 0
    scorer.check()  # a missing server is one error line, before any progress bar
    with tqdm(total=len(rows), desc=f"score ({args.scorer})", unit="report", file=sys.stderr,
              disable=len(rows) <= args.batch_size) as bar:
        for start in range(0, len(rows), args.batch_size):
            end = start + args.batch_size
            accuracies += scorer.score_pairs(references[start:end], candidates[start:end])
            cache_hits += scorer.last_stats.cache_hits
            bar.update(len(references[start:end]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    with open(partial, "w") as out:
        for row, accuracy in zip(rows, accuracies):
            out.write(json.dumps({**row, "accuracy": accuracy, "scorer": args.scorer}, ensure_ascii=False) + "\n")
    os.replace(partial, args.output)  # a reader never sees a half-written file
    scored = [a for a in accuracies if a is not None]
    mean = f"{sum(scored) / len(scored):.4f}" if scored else "n/a"
    print(f"scored {len(scored)} of {len(rows)} reports with {args.scorer} "
          f"({len(rows) - len(scored)} failed: accuracy null; {cache_hits} from the cache); "
          f"mean accuracy {mean}; wrote {args.output}")
    return 0
