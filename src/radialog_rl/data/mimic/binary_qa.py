"""The Rewarding-Doubt binary QA task on MIMIC-CXR: yes/no questions about CheXpert findings.

For each of the 13 findings other than "No Finding", every study whose label is 1 (yes) or 0 (no)
is a candidate (uncertain -1 and empty labels are dropped), one image per study (chosen by hash).
Each finding gets ``n_per_finding`` rows per part, half positive and half negative, picked in
seeded-hash order; only a class with too few studies is sampled with replacement (reported in the
summary as ``repeated``). Official splits are per patient, and custom ``subsets`` split subjects by
hash, so no subject is in two output files.

Rows: PPO ``{image, prompt, answer, finding, subject_id, study_id, dicom_id}`` (the built-in
``binary_qa_loglik`` reward reads ``answer``) and SFT rows with ``target`` =
``Yes {"confidence": N}`` / ``No {"confidence": N}``, N uniform on 0..scale from the row's hash
(format-learning SFT: the stated number carries no information).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radialog_rl.calibration.prompts import format_confidence, qa_prompt, qa_questions
from radialog_rl.data.mimic.outputs import BuildResult, image_field, write_manifest, write_part
from radialog_rl.data.mimic.selection import (
    hash_confidence,
    one_per_study,
    parse_fractions,
    select,
    selection_hash,
    split_parts,
)
from radialog_rl.data.mimic.tables import MimicImage, build_master_table
from radialog_rl.data.prompts import CHEXPERT_FINDINGS
from radialog_rl.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["QA_FINDINGS", "build_binary_qa"]

#: The findings asked about: every CheXpert observation except "No Finding", in CheXpert order.
QA_FINDINGS: tuple[str, ...] = tuple(f for f in CHEXPERT_FINDINGS if f != "No Finding")


def _rows_for(
    image: MimicImage, finding: str, answer: str, repeat: int, *, seed: int, scale: int, image_path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The PPO row and the SFT row of one (image, finding) pair; ``repeat`` > 0 for a resampled copy
    (it gets its own question template and confidence)."""
    h = selection_hash(seed, "qa-row", finding, *image.key, repeat)
    prompt = qa_prompt(finding, scale, template=h % len(qa_questions(finding)))
    ppo = {"image": image_path, "prompt": prompt, "answer": answer, "finding": finding,
           "subject_id": image.subject_id, "study_id": image.study_id, "dicom_id": image.dicom_id}
    confidence = hash_confidence(seed, scale, "qa", finding, *image.key, repeat)
    sft = {**ppo, "target": f"{answer.capitalize()} {format_confidence(confidence)}"}
    return ppo, sft


def build_binary_qa(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train",),
    n_per_finding: int = 1000,
    seed: int = 0,
    subsets: str | dict[str, float] | None = None,
    findings: Sequence[str] | None = None,
    frontal_only: bool = True,
    drop_missing_images: bool = True,
    scale: int = 10,
    absolute_paths: bool = False,
    prefix: str = "binary_qa",
) -> BuildResult:
    """Build the binary QA JSONL files and their manifest from a MIMIC-CXR-JPG root.

    Args:
        root: the MIMIC-CXR-JPG 2.0.0 folder.
        out_dir: where ``<prefix>_<part>.ppo.jsonl``, ``<prefix>_<part>.sft.jsonl`` and
            ``<prefix>.manifest.json`` are written (``part`` = split, or split_subset).
        splits: official splits to build (``train``, ``validate``, ``test``).
        n_per_finding: rows per finding per part, half yes / half no (must be even).
        seed: seeds every hash-based choice (images, rows, templates, confidences, subsets).
        subsets: e.g. ``"sft=0.5,ppo=0.5"``: split each split's subjects into named parts.
        findings: ask only about these (default :data:`QA_FINDINGS`).
        frontal_only: keep only AP/PA images.
        drop_missing_images: skip rows whose JPEG is absent (otherwise the loaders will fail on them).
        scale: confidence scale of prompts and SFT targets (10 or 100).
        absolute_paths: write absolute image paths instead of paths relative to ``out_dir``.

    Returns:
        A :class:`BuildResult`; its summary has one line per (part, finding, answer).
    """
    if n_per_finding < 2 or n_per_finding % 2:
        raise ConfigError(f"n_per_finding must be an even number >= 2 (half yes, half no), got {n_per_finding}")
    wanted = tuple(findings) if findings else QA_FINDINGS
    bad = [f for f in wanted if f not in QA_FINDINGS]
    if bad:
        raise ConfigError(f"unknown finding(s) {', '.join(map(repr, bad))}; choose from {', '.join(QA_FINDINGS)}")
    fractions = parse_fractions(subsets)
    out_dir = Path(out_dir)
    table = build_master_table(root, splits=splits, frontal_only=frontal_only,
                               drop_missing_images=drop_missing_images, read_reports=False)
    studies = one_per_study(table.images, seed)
    files: dict[str, Path] = {}
    summary: list[dict[str, Any]] = []
    for part, split, members in split_parts(studies, splits, fractions, seed):
        ppo_rows, sft_rows = [], []
        for finding in wanted:
            for answer, value in (("yes", 1), ("no", 0)):
                pool = [im for im in members if im.label(finding) == value]
                chosen, repeated = select(pool, n_per_finding // 2, lambda im: im.key, seed,
                                          f"qa/{finding}/{value}")
                if not pool:
                    logger.warning("%s: no %s study for %s; it gets no %s rows", part, answer, finding, answer)
                elif repeated:
                    logger.warning("%s: only %d %s studies for %s; %d rows are repeats", part, len(pool),
                                   answer, finding, repeated)
                for image, repeat in chosen:
                    path = image_field(table.root, image.image, out_dir, absolute_paths)
                    order = selection_hash(seed, "qa-order", finding, value, *image.key, repeat)
                    ppo, sft = _rows_for(image, finding, answer, repeat, seed=seed, scale=scale, image_path=path)
                    ppo_rows.append((order, ppo))
                    sft_rows.append((order, sft))
                summary.append({"part": part, "split": split, "finding": finding, "answer": answer,
                                "rows": len(chosen), "studies": len(pool), "repeated": repeated})
        if not ppo_rows:
            raise ConfigError(f"no binary QA rows for {part}: no study there has a 1/0 label for "
                              f"{', '.join(wanted)} (check --split and the label file)")
        write_part(out_dir, prefix, part, [row for _, row in sorted(ppo_rows, key=lambda r: r[0])],
                   [row for _, row in sorted(sft_rows, key=lambda r: r[0])], files)
    parameters = dict(splits=list(splits), n_per_finding=n_per_finding, seed=seed, subsets=fractions,
                      findings=list(wanted), frontal_only=frontal_only, drop_missing_images=drop_missing_images,
                      scale=scale, absolute_paths=absolute_paths, prefix=prefix)
    manifest = write_manifest(out_dir, prefix, builder="radialog_rl.data.mimic.build_binary_qa",
                              inputs=table.inputs, parameters=parameters, files=files, stats=table.stats,
                              summary=summary)
    return BuildResult(files=files, manifest=manifest, stats=table.stats, summary=summary)
