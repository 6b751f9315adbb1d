"""The master table (one row per image) written as JSONL with its manifest."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from radialog_rl.data.mimic.outputs import BuildResult, image_field, write_jsonl, write_manifest
from radialog_rl.data.mimic.tables import FRONTAL_VIEWS, SPLITS, build_master_table
from radialog_rl.data.prompts import CHEXPERT_FINDINGS

__all__ = ["write_master_table"]


def write_master_table(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reports: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    frontal_only: bool = False,
    drop_missing_images: bool = False,
    absolute_paths: bool = False,
) -> BuildResult:
    """Write ``out`` (JSONL, one image per line: ids, split, view, ``image`` path, ``image_exists``,
    ``labels`` {name: 1/0/-1/null}, ``findings``) and ``<stem>.manifest.json`` beside it.

    Options as in :func:`~radialog_rl.data.mimic.tables.build_master_table`; the summary has
    one line per split (images, studies, subjects, frontal images, images with findings).
    """
    out = Path(out)
    table = build_master_table(root, reports=reports, splits=splits, frontal_only=frontal_only,
                               drop_missing_images=drop_missing_images)
    rows = (
        {"dicom_id": im.dicom_id, "subject_id": im.subject_id, "study_id": im.study_id, "split": im.split,
         "view": im.view, "image": image_field(table.root, im.image, out.parent, absolute_paths),
         "image_exists": im.exists, "labels": dict(zip(CHEXPERT_FINDINGS, im.labels)), "findings": im.findings}
        for im in table.images
    )
    write_jsonl(out, rows)
    counts = Counter(im.split for im in table.images)
    summary = [
        {"split": name, "images": counts[name],
         "studies": len({im.study_id for im in table.images if im.split == name}),
         "subjects": len({im.subject_id for im in table.images if im.split == name}),
         "frontal": sum(im.split == name and im.view in FRONTAL_VIEWS for im in table.images),
         "with_findings": sum(im.split == name and bool(im.findings) for im in table.images)}
        for name in SPLITS if name in counts
    ]
    prefix = out.name.removesuffix(".jsonl")
    files = {prefix: out}
    parameters = dict(reports=str(reports) if reports else None, splits=list(splits) if splits else None,
                      frontal_only=frontal_only, drop_missing_images=drop_missing_images,
                      absolute_paths=absolute_paths)
    manifest = write_manifest(out.parent, prefix, builder="radialog_rl.data.mimic.write_master_table",
                              inputs=table.inputs, parameters=parameters, files=files, stats=table.stats,
                              summary=summary)
    return BuildResult(files=files, manifest=manifest, stats=table.stats, summary=summary)
