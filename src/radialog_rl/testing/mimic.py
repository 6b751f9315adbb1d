"""A synthetic MIMIC-CXR-JPG 2.0.0 tree for tests and demos: no patient data.

:func:`make_synthetic_mimic` writes the published file names, headers and value conventions
(gzipped ``mimic-cxr-2.0.0-{split,chexpert,metadata}.csv.gz``; labels ``1.0``/``0.0``/``-1.0``/
empty; 8-digit subject ids starting with 1, 8-digit study ids starting with 5, 44-character
dashed-hex dicom ids; ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``) for a few dozen invented subjects,
tiny synthetic JPEGs, and a ``mimic_cxr_sectioned.csv`` in the layout of the MIMIC-CXR code's
``create_section_files.py`` (or RaDialog's per-image variant) with invented report text.

Also a cheap report-accuracy scorer (:func:`word_overlap_accuracy`) and a reward that uses it
(:func:`report_reward_with_word_overlap`), so report-generation PPO runs without a GREEN server.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radialog_rl.calibration.rewards import get_reward
from radialog_rl.data.images import make_synthetic_chest_xray
from radialog_rl.data.mimic.tables import (
    CHEXPERT_FILE,
    METADATA_FILE,
    SECTIONED_FILE,
    SPLIT_FILE,
    image_relpath,
)
from radialog_rl.data.prompts import CHEXPERT_FINDINGS

__all__ = ["SyntheticMimic", "make_synthetic_mimic", "report_reward_with_word_overlap", "word_overlap_accuracy"]

_METADATA_HEADER = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
#: Invented sentences per finding (positive, negative): report text, not from any real report.
_SENTENCES = {
    "Cardiomegaly": ("The heart is enlarged.", "Heart size is normal."),
    "Edema": ("There is mild pulmonary vascular congestion with edema.", "No pulmonary edema."),
    "Pleural Effusion": ("A small left pleural effusion is present.", "No pleural effusion."),
    "Pneumothorax": ("There is a small apical pneumothorax.", "No pneumothorax is seen."),
    "Atelectasis": ("Bibasilar atelectasis is noted.", "No atelectasis."),
    "Consolidation": ("Patchy consolidation in the right lower lobe.", "No focal consolidation."),
}


@dataclass(frozen=True)
class SyntheticMimic:
    """Where the synthetic tree is and what it holds (``subjects``: subject id -> split)."""

    root: Path
    reports: Path
    subjects: dict[int, str]
    images: int
    missing_images: tuple[str, ...]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], gz: bool) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    if gz:
        # mtime=0 and no file name: the same rows always give the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _dicom_id(rng: random.Random) -> str:
    return "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))


def _label(rng: random.Random) -> str:
    # Sparse positives, as in the real labels, so some studies have none ("no common findings").
    return rng.choices(("1.0", "0.0", "-1.0", ""), weights=(1, 2, 0.5, 6.5))[0]


def _report(labels: Mapping[str, str], rng: random.Random) -> str:
    sentences = [_SENTENCES[name][0 if labels[name] == "1.0" else 1] for name in _SENTENCES
                 if labels[name] in ("1.0", "0.0")]
    if not sentences:
        sentences = ["The lungs are clear.", "No acute cardiopulmonary process."]
    rng.shuffle(sentences)
    # Line breaks inside a section, as in the real reports (the reader collapses them).
    return "\n ".join(" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2))


def make_synthetic_mimic(
    root: str | os.PathLike,
    n_subjects: int = 40,
    seed: int = 0,
    *,
    image_size: int = 64,
    gzip_tables: bool = True,
    reports_layout: str = "official",
    missing_images: int = 2,
) -> SyntheticMimic:
    """Write a MIMIC-CXR-JPG-shaped tree under ``root`` (module docstring).

    Args:
        n_subjects: invented patients (1-3 studies each, 1-3 images per study: a PA or AP view,
            sometimes a lateral). Subject ``i`` is in train for ``i % 5`` in 0..2, validate for 3,
            test for 4.
        image_size: side of the JPEGs in pixels.
        gzip_tables: ``.csv.gz`` as published (False: plain ``.csv``).
        reports_layout: ``official`` (header ``study,impression,findings,last_paragraph,comparison``)
            or ``radialog`` (RaDialog's per-image rows under a header without the study column).
        missing_images: this many image files are not written (alternately a lateral and a
            frontal one, so that frontal-only builds also meet a missing file).
    """
    if reports_layout not in ("official", "radialog"):
        raise ValueError(f"reports_layout must be 'official' or 'radialog', got {reports_layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    split_rows, chexpert_rows, metadata_rows, report_rows, image_rows = [], [], [], [], []
    subjects: dict[int, str] = {}
    used_subjects: set[int] = set()
    study_id = 50_000_000 + rng.randrange(1000)
    questioned = [name for name in CHEXPERT_FINDINGS if name != "No Finding"]
    study_count = dict.fromkeys(("train", "validate", "test"), 0)  # per split: the rotation covers each
    for i in range(n_subjects):
        subject = rng.randrange(10_000_000, 20_000_000)
        while subject in used_subjects:
            subject = rng.randrange(10_000_000, 20_000_000)
        used_subjects.add(subject)
        split = ("train", "train", "train", "validate", "test")[i % 5]
        subjects[subject] = split
        for _ in range(rng.randint(1, 3)):
            study_id += rng.randint(1, 5000)
            labels = {name: _label(rng) for name in questioned}
            # Four of five studies of a split get two positive and two negative findings in
            # rotation, so every finding has yes and no studies in every split. The fifth has no
            # positive finding: alternately "No Finding" 1.0, or every label empty/0/-1 (which
            # RaDialog's prompt calls "no common findings").
            j = study_count[split]
            study_count[split] += 1
            if j % 5 != 4:
                for k, value in ((0, "1.0"), (6, "1.0"), (3, "0.0"), (9, "0.0")):
                    labels[questioned[(j + k) % len(questioned)]] = value
                labels["No Finding"] = ""
            else:
                labels = {name: "" if value == "1.0" else value for name, value in labels.items()}
                labels["No Finding"] = "1.0" if j % 10 == 9 else ""
            chexpert_rows.append([subject, study_id, *(labels[n] for n in sorted(CHEXPERT_FINDINGS))])
            views = [rng.choice(("PA", "AP"))] + (["LATERAL"] if rng.random() < 0.5 else [])
            views += ["AP"] if rng.random() < 0.15 else []
            dicoms = []
            for view in views:
                dicom = _dicom_id(rng)
                dicoms.append(dicom)
                split_rows.append([dicom, study_id, subject, split])
                procedure = "CHEST (PORTABLE AP)" if views[0] == "AP" else "CHEST (PA AND LAT)"
                metadata_rows.append([dicom, subject, study_id, procedure, view, 3056, 2544,
                                      21800506 + rng.randrange(300), f"{rng.randrange(240000):06d}.000",
                                      procedure, _VIEW_MEANING[view], "Erect"])
                image_rows.append((image_relpath(subject, study_id, dicom), view))
            findings = "" if rng.random() < 0.1 else _report(labels, rng)
            impression = "No acute cardiopulmonary process." if labels["No Finding"] else "See findings."
            sections = [impression, findings, "", "None."]
            if reports_layout == "official":
                report_rows.append([f"s{study_id}", *sections])
            else:
                folder_parts = image_relpath(subject, study_id, "x").split("/")[:-1]
                for dicom in dicoms:
                    report_rows.append([f"s{study_id}", *sections, dicom, f"{dicom}.jpg",
                                        "/".join(["mimic-cxr-jpg", "2.0.0", *folder_parts]), f"s{study_id}.txt"])

    laterals = [p for p, v in image_rows if v == "LATERAL"]
    frontals = [p for p, v in image_rows if v != "LATERAL"]
    missing = [(laterals, frontals)[k % 2][k // 2] for k in range(missing_images)]
    for k, (rel, _view) in enumerate(image_rows):
        if rel in missing:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        make_synthetic_chest_xray(seed * 100_003 + k, size=image_size).save(path, format="JPEG", quality=85)

    suffix = ".gz" if gzip_tables else ""
    _write_csv(root / f"{SPLIT_FILE}{suffix}", ("dicom_id", "study_id", "subject_id", "split"), split_rows, gzip_tables)
    _write_csv(root / f"{CHEXPERT_FILE}{suffix}", ("subject_id", "study_id", *sorted(CHEXPERT_FINDINGS)),
               chexpert_rows, gzip_tables)
    _write_csv(root / f"{METADATA_FILE}{suffix}", _METADATA_HEADER, metadata_rows, gzip_tables)
    if reports_layout == "official":
        header: tuple[str, ...] = ("study", "impression", "findings", "last_paragraph", "comparison")
    else:
        header = ("impression", "findings", "last_paragraph", "comparison", "dicom_id", "Img_Filename",
                  "Img_Folder", "Note_file")
    _write_csv(root / SECTIONED_FILE, header, report_rows, gz=False)
    return SyntheticMimic(root=root, reports=root / SECTIONED_FILE, subjects=subjects, images=len(image_rows),
                          missing_images=tuple(missing))


# --------------------------------------------------------------------------------------------------
# A cheap accuracy scorer for report-generation PPO without a GREEN server
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def word_overlap_accuracy(samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[float | None]:
    """Jaccard overlap of the lower-cased word sets of each response and its row's ``reference``
    (in [0, 1]; None when the row has no reference). A stand-in for GREEN in tests, not a metric."""
    out: list[float | None] = []
    for sample, response in zip(samples, responses):
        reference = sample.get("reference")
        if not reference:
            out.append(None)
            continue
        ref, hyp = set(_WORD.findall(reference.lower())), set(_WORD.findall(response.lower()))
        out.append(len(ref & hyp) / len(ref | hyp) if ref | hyp else 0.0)
    return out


_REWARDS: dict[tuple, Any] = {}


def report_reward_with_word_overlap(
    samples: Sequence[Mapping[str, Any]], responses: Sequence[str], *, reward: str = "report_loglik", **params: Any
):
    """A ``module:function`` PPO reward: the built-in ``reward`` (``report_loglik`` or
    ``quadratic_blend``, with ``params`` such as ``shaping``, ``eps``, ``reward_scale``,
    ``explore_prob``, ``seed``) scored against :func:`word_overlap_accuracy`.

    The built-in reward is built once per parameter set and reused, so its exploration random
    stream continues from step to step as it would with ``accuracy_scorer`` passed directly.
    """
    key = (reward, tuple(sorted(params.items())))
    if key not in _REWARDS:
        _REWARDS[key] = get_reward(reward, accuracy_scorer=word_overlap_accuracy, **params)
    return _REWARDS[key](samples, responses)
