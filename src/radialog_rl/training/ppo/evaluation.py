"""Held-out evaluation of a PPO policy: the calibration table of greedy answers on ``eval_file``.

Pure functions over (rows, generated texts); the trainer does the generation
(:meth:`~radialog_rl.training.ppo.trainer.PPOTrainer.evaluate`). Unlike the ``calibration/*``
metrics logged per step, which come from the sampled (and possibly exploration-rewritten) rollout
batch, these come from deterministic greedy decoding on rows the policy never trains on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from radialog_rl.calibration.metrics import compute_calibration
from radialog_rl.calibration.parsing import parse_confidence
from radialog_rl.calibration.rewards import row_accuracy

#: The scalar metrics of :func:`evaluation_table` (what ``best_metric`` may name).
EVAL_METRICS = ("accuracy", "answer_parse_failure_rate", "parse_failure_rate", "ece", "brier", "auroc",
                "sigma_cbnd", "d_nckl", "mean_confidence")
#: Metrics where smaller is better (``best_mode: auto``); every other metric is maximised.
MINIMISED_METRICS = frozenset({"ece", "brier", "sigma_cbnd", "d_nckl", "parse_failure_rate", "kl"})


def evaluation_table(
    fields: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    scale: int = 10,
    group_by: Sequence[str] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The held-out metrics of ``texts`` (one response per row of ``fields``).

    Returns ``(metrics, per_row)``. ``metrics``: ``accuracy`` (share of rows whose answer is right;
    an unreadable answer counts as wrong), ``answer_parse_failure_rate``, ``parse_failure_rate``
    (no confidence), ``ece``, ``brier``, ``auroc`` (confidence vs correctness), ``sigma_cbnd``,
    ``d_nckl``, ``mean_confidence`` (0..1) and, per ``group_by`` field,
    ``groups[field][value] = {"n", "accuracy", "mean_confidence"}`` (mean over rows with a
    confidence, 0..1; None when none has one). ``per_row``: ``{"text", "confidence", "correct"}``
    plus the row's group fields.
    """
    if len(fields) != len(texts):
        raise ValueError(f"{len(fields)} rows but {len(texts)} responses")
    confidences: list[int | None] = []
    accuracies: list[float | None] = []
    per_row = []
    unparsable = 0
    for i, (row, text) in enumerate(zip(fields, texts)):
        accuracy, no_answer = row_accuracy(row, text, i)
        unparsable += no_answer
        confidence = parse_confidence(text, scale)
        confidences.append(confidence)
        accuracies.append(accuracy)
        entry = {"text": text, "confidence": confidence, "correct": accuracy}
        entry.update({k: row.get(k) for k in ("id", *group_by) if k in row})
        per_row.append(entry)
    report = compute_calibration(confidences, accuracies, scale=scale).to_dict()
    correct = [a if a is not None else 0.0 for a in accuracies]
    metrics: dict[str, Any] = {
        "n": len(texts),
        "accuracy": sum(correct) / len(correct) if correct else math.nan,
        "answer_parse_failure_rate": unparsable / len(texts) if texts else math.nan,
    }
    for key in EVAL_METRICS[2:]:  # the rest come from the calibration report
        metrics[key] = report.get(key)
    metrics["groups"] = {key: _group_table(per_row, key, scale) for key in group_by}
    return metrics, per_row


def _group_table(per_row: list[dict[str, Any]], key: str, scale: int) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in per_row:
        groups.setdefault(str(row.get(key)), []).append(row)
    table = {}
    for value in sorted(groups, key=_sort_key):
        rows = groups[value]
        stated = [r["confidence"] for r in rows if r["confidence"] is not None]
        table[value] = {
            "n": len(rows),
            "accuracy": sum((r["correct"] or 0.0) for r in rows) / len(rows),
            "mean_confidence": sum(stated) / len(stated) / scale if stated else None,
        }
    return table


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def is_better(metric: str, new: float | None, best: float | None, mode: str = "auto") -> bool:
    """Whether ``new`` improves on ``best`` for ``metric`` (``mode`` "min", "max" or "auto":
    :data:`MINIMISED_METRICS` are minimised, the rest maximised). A missing ``new`` never wins; any
    value beats a missing ``best``."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return True
    minimise = mode == "min" or (mode == "auto" and metric.removeprefix("eval/") in MINIMISED_METRICS)
    return new < best if minimise else new > best
