"""Report generation on MIMIC-CXR: the findings section as the target, RaDialog's prompt.

The prompt is RaDialog's report instruction with "Predicted Findings": the study's CheXpert
labels equal to 1, in CheXpert order, lower-cased and comma-joined, "no common findings" when none
(as RaDialog built its training prompts), or the names a predictions file gives per image
(RaDialog's ``{dicom_id: [finding, ...]}`` JSON of its findings classifier), followed by the
request for ``{"confidence": N}``. Studies without a findings section are dropped (counted).

Rows: PPO ``{image, prompt, reference, findings, subject_id, study_id, dicom_id}`` (``reference``
is the findings text, for an accuracy scorer such as GREEN) and SFT rows with ``target`` = the
findings text + `` {"confidence": N}``, N uniform on 0..scale from the row's hash.

RaDialog removed newlines from the findings text without a space (joining words across lines); we
collapse every whitespace run to one space instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radialog_rl.calibration.prompts import format_confidence, report_confidence_prompt
from radialog_rl.data.mimic.outputs import BuildResult, image_field, write_manifest, write_part
from radialog_rl.data.mimic.selection import hash_confidence, one_per_study, parse_fractions, select, split_parts
from radialog_rl.data.mimic.tables import MimicError, build_master_table
from radialog_rl.data.prompts import CHEXPERT_FINDINGS
from radialog_rl.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["IMAGES_PER_STUDY", "build_report_generation", "read_predictions_file"]

#: ``one``: one image per study (chosen by hash); ``all``: every image of the study (RaDialog's
#: own training data had one row per image).
IMAGES_PER_STUDY = ("one", "all")


def read_predictions_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{dicom_id: [CheXpert name, ...]}`` from a JSON object (RaDialog's classifier output)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MimicError(f"predictions file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise MimicError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise MimicError(f"{path} must hold a JSON object {{dicom_id: [finding, ...]}}")
    by_lower = {name.lower(): name for name in CHEXPERT_FINDINGS}
    out: dict[str, list[str]] = {}
    for dicom, names in data.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MimicError(f"{path}: the value for {dicom} must be a list of finding names")
        unknown = [n for n in names if n.strip().lower() not in by_lower]
        if unknown:
            raise MimicError(f"{path}: {dicom} lists unknown finding(s) {', '.join(map(repr, unknown))}; "
                             f"use CheXpert names ({', '.join(CHEXPERT_FINDINGS)})")
        canonical = {by_lower[n.strip().lower()] for n in names}
        out[str(dicom)] = [n for n in CHEXPERT_FINDINGS if n in canonical]
    return out


def build_report_generation(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    reports: str | os.PathLike | None = None,
    splits: Sequence[str] = ("train",),
    n: int | None = None,
    seed: int = 0,
    subsets: str | dict[str, float] | None = None,
    predictions: str | os.PathLike | None = None,
    images_per_study: str = "one",
    frontal_only: bool = True,
    drop_missing_images: bool = True,
    scale: int = 10,
    absolute_paths: bool = False,
    prefix: str = "reports",
) -> BuildResult:
    """Build the report-generation JSONL files and their manifest from a MIMIC-CXR-JPG root.

    Args:
        root: the MIMIC-CXR-JPG 2.0.0 folder.
        out_dir: where ``<prefix>_<part>.ppo.jsonl``, ``<prefix>_<part>.sft.jsonl`` and
            ``<prefix>.manifest.json`` go.
        reports: the sectioned-reports CSV (default ``root/mimic_cxr_sectioned.csv``).
        splits / subsets / seed / frontal_only / drop_missing_images / scale / absolute_paths: as
            in :func:`~radialog_rl.data.mimic.binary_qa.build_binary_qa`.
        n: at most this many rows per part (hash-chosen, never repeated); default all.
        predictions: a ``{dicom_id: [finding, ...]}`` JSON used for the prompt's predicted
            findings instead of the CheXpert labels; every selected image must be in it.
        images_per_study: ``one`` or ``all`` (:data:`IMAGES_PER_STUDY`).
    """
    if images_per_study not in IMAGES_PER_STUDY:
        raise ConfigError(f"images_per_study must be one of {', '.join(IMAGES_PER_STUDY)}, got {images_per_study!r}")
    if n is not None and n < 1:
        raise ConfigError(f"n must be a positive number of rows, got {n}")
    fractions = parse_fractions(subsets)
    out_dir = Path(out_dir)
    table = build_master_table(root, reports=reports, splits=splits, frontal_only=frontal_only,
                               drop_missing_images=drop_missing_images, require_reports=True)
    predicted = read_predictions_file(predictions) if predictions else None
    with_text = [im for im in table.images if im.findings]
    stats = dict(table.stats, images_without_findings=len(table.images) - len(with_text))
    candidates = one_per_study(with_text, seed) if images_per_study == "one" else with_text
    inputs = dict(table.inputs, **({"predictions": Path(predictions).expanduser()} if predictions else {}))

    files: dict[str, Path] = {}
    summary: list[dict[str, Any]] = []
    for part, split, members in split_parts(candidates, splits, fractions, seed):
        count = len(members) if n is None else min(n, len(members))
        chosen, _ = select(members, count, lambda im: im.key, seed, "reports")
        if not chosen:
            raise ConfigError(f"no report rows for {part}: no image there has a findings section")
        if n is not None and n > len(members):
            logger.warning("%s: only %d images with findings (asked for %d)", part, len(members), n)
        ppo_rows, sft_rows, normal = [], [], 0
        for image, _ in chosen:
            if predicted is not None:
                if image.dicom_id not in predicted:
                    raise MimicError(f"{predictions} has no prediction for dicom_id {image.dicom_id} "
                                     f"(subject {image.subject_id}, study {image.study_id})")
                names = predicted[image.dicom_id]
            else:
                names = image.positive_findings()
            normal += not names
            ppo = {"image": image_field(table.root, image.image, out_dir, absolute_paths),
                   "prompt": report_confidence_prompt(names, scale), "reference": image.findings,
                   "findings": names, "subject_id": image.subject_id, "study_id": image.study_id,
                   "dicom_id": image.dicom_id}
            confidence = hash_confidence(seed, scale, "report", *image.key)
            ppo_rows.append(ppo)
            sft_rows.append({**ppo, "target": f"{image.findings} {format_confidence(confidence)}"})
        write_part(out_dir, prefix, part, ppo_rows, sft_rows, files)
        summary.append({"part": part, "split": split, "rows": len(chosen), "available": len(members),
                        "subjects": len({im.subject_id for im, _ in chosen}),
                        "no_common_findings": normal})
    parameters = dict(splits=list(splits), n=n, seed=seed, subsets=fractions, predictions=predictions,
                      images_per_study=images_per_study, frontal_only=frontal_only,
                      drop_missing_images=drop_missing_images, scale=scale, absolute_paths=absolute_paths,
                      prefix=prefix)
    manifest = write_manifest(out_dir, prefix, builder="radialog_rl.data.mimic.build_report_generation",
                              inputs=inputs, parameters=parameters, files=files, stats=stats, summary=summary)
    return BuildResult(files=files, manifest=manifest, stats=stats, summary=summary)
