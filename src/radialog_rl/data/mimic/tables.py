"""Reading MIMIC-CXR-JPG 2.0.0 as published, and the master table (one row per image).

Inputs, under a root the user names (the folder PhysioNet's ``mimic-cxr-jpg/2.0.0`` download
unpacks to), each as ``.csv`` or ``.csv.gz``:

* ``mimic-cxr-2.0.0-split.csv``: ``dicom_id,study_id,subject_id,split`` with split in
  ``train`` / ``validate`` / ``test`` (assigned per patient by the dataset's authors);
* ``mimic-cxr-2.0.0-chexpert.csv``: ``subject_id,study_id`` and the 14 CheXpert observations
  (alphabetical in the file; any order is accepted), each ``1.0`` (positive), ``0.0`` (negative),
  ``-1.0`` (uncertain) or empty (not mentioned); one row per study;
* ``mimic-cxr-2.0.0-metadata.csv``: ``dicom_id,subject_id,study_id,...,ViewPosition,...`` (the
  DICOM view: ``PA``, ``AP``, ``LATERAL``, ``LL``, ... or empty);
* images ``files/p{first two digits of subject}/p{subject}/s{study}/{dicom_id}.jpg``;
* a sectioned-reports CSV, ``mimic_cxr_sectioned.csv`` from the MIMIC-CXR code's
  ``create_section_files.py``: header ``study,impression,findings,last_paragraph,comparison``
  with study values ``s<study_id>`` (some versions add ``indication``). RaDialog's variant of the
  script writes one row per image and a header without the leading study column
  (``impression,findings,last_paragraph,comparison,dicom_id,Img_Filename,Img_Folder,Note_file``),
  so its rows have one field more than the header; both layouts are read.

Everything here is the standard library (``csv``, ``gzip``): the tables are read once, row by row,
and reduced to the few fields the builders need.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from radialog_rl.data.prompts import CHEXPERT_FINDINGS
from radialog_rl.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CHEXPERT_FILE",
    "FRONTAL_VIEWS",
    "METADATA_FILE",
    "MasterTable",
    "MimicError",
    "MimicImage",
    "SECTIONED_FILE",
    "SPLITS",
    "SPLIT_FILE",
    "build_master_table",
    "default_reports_path",
    "find_table",
    "image_relpath",
    "read_chexpert",
    "read_metadata",
    "read_sectioned_reports",
    "read_split",
]

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SECTIONED_FILE = "mimic_cxr_sectioned.csv"
#: The official split names, in this order everywhere.
SPLITS: tuple[str, ...] = ("train", "validate", "test")
#: DICOM ViewPosition values of frontal images.
FRONTAL_VIEWS: tuple[str, ...] = ("AP", "PA")
#: CheXpert label cells -> value (1 positive, 0 negative, -1 uncertain, None not mentioned).
_LABEL_VALUES: dict[str, int | None] = {
    "1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": None,
}
_SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
_METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
_CHEXPERT_ID_COLUMNS = ("subject_id", "study_id")
# Report sections can be long; csv's default field limit (128 KiB) is for safety, not for us.
_FIELD_LIMIT = 1 << 28


class MimicError(DataError):
    """A MIMIC-CXR input is missing, unreadable or not in the published format."""


@dataclass(frozen=True)
class MimicImage:
    """One image of the master table.

    Attributes:
        dicom_id / subject_id / study_id: MIMIC identifiers (study and subject as ints).
        split: ``train`` / ``validate`` / ``test``.
        view: DICOM ViewPosition (``PA``, ``AP``, ``LATERAL``, ...) or None when empty.
        image: path relative to the root, ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``.
        exists: whether that file is on disk.
        labels: the study's 14 CheXpert labels in :data:`CHEXPERT_FINDINGS` order (1, 0, -1 or
            None); all None when the study has no CheXpert row.
        findings: the study's findings section (whitespace collapsed) or None.
    """

    dicom_id: str
    subject_id: int
    study_id: int
    split: str
    view: str | None
    image: str
    exists: bool
    labels: tuple[int | None, ...]
    findings: str | None

    @property
    def key(self) -> tuple[int, int, str]:
        """``(subject_id, study_id, dicom_id)``: what selection hashes and sorting use."""
        return (self.subject_id, self.study_id, self.dicom_id)

    def label(self, finding: str) -> int | None:
        return self.labels[CHEXPERT_FINDINGS.index(finding)]

    def positive_findings(self) -> list[str]:
        """CheXpert names labelled 1, in CheXpert order (RaDialog's "predicted findings")."""
        return [name for name, value in zip(CHEXPERT_FINDINGS, self.labels) if value == 1]


@dataclass
class MasterTable:
    """The images kept, where they came from, and what was dropped (``stats``)."""

    root: Path
    images: list[MimicImage]
    inputs: dict[str, Path]
    stats: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _check_root(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MimicError(
            f"MIMIC-CXR-JPG root not found: {root}; pass the folder that holds {SPLIT_FILE}.gz, "
            f"{CHEXPERT_FILE}.gz, {METADATA_FILE}.gz and files/ (PhysioNet's mimic-cxr-jpg/2.0.0)"
        )
    return root


def find_table(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` or ``root/name.gz`` (the published, gzipped form); a clear error otherwise."""
    root = _check_root(Path(root))
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in root.iterdir() if p.name.endswith((".csv", ".csv.gz")))
    hint = f" (CSV files there: {', '.join(present[:6])})" if present else " (it holds no CSV files)"
    raise MimicError(
        f"{root} has no {name}.gz or {name}{hint}; is this the MIMIC-CXR-JPG 2.0.0 folder?"
    )


def _open_text(path: Path):
    """A text stream of a .csv or gzip file (gzip told apart by its magic bytes, not the name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".gz":
        raise MimicError(f"{path} is not a gzip file (it does not start with the gzip magic bytes); "
                         "re-download it, or unpack it and drop the .gz")
    return open(path, encoding="utf-8", newline="")


def _suggest(missing: str, header: Sequence[str]) -> str:
    close = difflib.get_close_matches(missing, header, n=1)
    return f"{missing!r} (found {close[0]!r})" if close else repr(missing)


def _read_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """Yield ``(line, fields, column index)`` for every data row; header and gzip errors are
    :class:`MimicError` naming the file."""
    csv.field_size_limit(_FIELD_LIMIT)
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise MimicError(f"{path} is empty; expected a header with {', '.join(required)}")
            header = [h.strip().lstrip("\ufeff") for h in header]
            index = {name: i for i, name in enumerate(header)}
            missing = [c for c in required if c not in index]
            if missing:
                raise MimicError(
                    f"{path}: missing column(s) {', '.join(_suggest(m, header) for m in missing)}; "
                    f"the header is {','.join(header)}"
                )
            for fields in reader:
                if fields:
                    yield reader.line_num, fields, index
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise MimicError(f"{path} is not a readable gzip file ({exc}); re-download it "
                         "(PhysioNet's SHA256SUMS.txt lists its checksum)") from None
    except UnicodeDecodeError as exc:
        raise MimicError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); is it the "
                         "right file?") from None
    except csv.Error as exc:
        raise MimicError(f"{path} is not a readable CSV file: {exc}") from None


def _cell(path: Path, line: int, fields: list[str], index: dict[str, int], column: str) -> str:
    i = index[column]
    if i >= len(fields):
        raise MimicError(f"{path} line {line}: the row has {len(fields)} fields, no {column!r}")
    return fields[i].strip()


def _int_id(path: Path, line: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MimicError(f"{path} line {line}: {column} {value!r} is not an integer id") from None


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg``: MIMIC-CXR-JPG's layout."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg"


# --------------------------------------------------------------------------------------------------
# The four tables
# --------------------------------------------------------------------------------------------------


def read_split(path: str | os.PathLike) -> dict[str, tuple[int, int, str]]:
    """``dicom_id -> (subject_id, study_id, split)``; unknown split names are an error."""
    path = Path(path)
    out: dict[str, tuple[int, int, str]] = {}
    for line, fields, index in _read_rows(path, _SPLIT_COLUMNS):
        dicom = _cell(path, line, fields, index, "dicom_id")
        split = _cell(path, line, fields, index, "split")
        if split not in SPLITS:
            raise MimicError(f"{path} line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        subject = _int_id(path, line, "subject_id", _cell(path, line, fields, index, "subject_id"))
        study = _int_id(path, line, "study_id", _cell(path, line, fields, index, "study_id"))
        if dicom in out and out[dicom] != (subject, study, split):
            raise MimicError(f"{path} line {line}: dicom_id {dicom} appears twice with different values")
        out[dicom] = (subject, study, split)
    return out


def read_chexpert(path: str | os.PathLike) -> dict[int, tuple[int | None, ...]]:
    """``study_id -> 14 labels`` in CheXpert order; a cell outside {1.0, 0.0, -1.0, empty} is an
    error naming the line and column."""
    path = Path(path)
    out: dict[int, tuple[int | None, ...]] = {}
    for line, fields, index in _read_rows(path, (*_CHEXPERT_ID_COLUMNS, *CHEXPERT_FINDINGS)):
        study = _int_id(path, line, "study_id", _cell(path, line, fields, index, "study_id"))
        labels = []
        for name in CHEXPERT_FINDINGS:
            raw = _cell(path, line, fields, index, name) if index[name] < len(fields) else ""
            if raw not in _LABEL_VALUES:
                raise MimicError(f"{path} line {line}, column {name!r}: label {raw!r} is not one of "
                                 "1.0, 0.0, -1.0 or empty")
            labels.append(_LABEL_VALUES[raw])
        out[study] = tuple(labels)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str | None]:
    """``dicom_id -> ViewPosition`` (None when empty)."""
    path = Path(path)
    out: dict[str, str | None] = {}
    for line, fields, index in _read_rows(path, _METADATA_COLUMNS):
        view = _cell(path, line, fields, index, "ViewPosition")
        out[_cell(path, line, fields, index, "dicom_id")] = view or None
    return out


def _study_number(path: Path, line: int, value: str) -> int:
    text = value.strip()
    if text.endswith(".txt"):
        text = text[:-4]
    if text[:1] in ("s", "S"):
        text = text[1:]
    try:
        return int(text)
    except ValueError:
        raise MimicError(f"{path} line {line}: study {value!r} is not 's<study_id>'") from None


def read_sectioned_reports(path: str | os.PathLike) -> dict[int, str | None]:
    """``study_id -> findings section`` (whitespace collapsed; None when empty) from either
    ``mimic_cxr_sectioned.csv`` layout (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MimicError(f"sectioned reports not found: {path}; build it with the MIMIC-CXR code's "
                         f"create_section_files.py (it writes {SECTIONED_FILE}) or pass --reports")
    out: dict[int, str | None] = {}
    for line, fields, index in _read_rows(path, ("findings",)):
        if "study" in index:
            study_raw = fields[index["study"]]
            offset = 0
        elif len(fields) == len(index) + 1:  # RaDialog's layout: an unnamed leading study column
            study_raw = fields[0]
            offset = 1
        else:
            raise MimicError(
                f"{path} line {line}: no study column (expected a 'study' header, or rows with one "
                "more field than the header as RaDialog's create_section_files.py writes them)"
            )
        study = _study_number(path, line, study_raw)
        i = index["findings"] + offset
        text = " ".join(fields[i].split()) if i < len(fields) else ""
        if study not in out or out[study] is None:
            out[study] = text or None
    return out


# --------------------------------------------------------------------------------------------------
# Master table
# --------------------------------------------------------------------------------------------------


def default_reports_path(root: str | os.PathLike) -> Path | None:
    """``root/mimic_cxr_sectioned.csv(.gz)`` when present, else None."""
    root = Path(root)
    for candidate in (root / SECTIONED_FILE, root / f"{SECTIONED_FILE}.gz"):
        if candidate.is_file():
            return candidate
    return None


def build_master_table(
    root: str | os.PathLike,
    *,
    reports: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    frontal_only: bool = False,
    drop_missing_images: bool = False,
    require_reports: bool = False,
    read_reports: bool = True,
) -> MasterTable:
    """One :class:`MimicImage` per image of the split file, sorted by (subject, study, dicom).

    Args:
        root: the MIMIC-CXR-JPG 2.0.0 folder (tables + ``files/``).
        reports: the sectioned-reports CSV (default ``root/mimic_cxr_sectioned.csv`` when present;
            without one, ``findings`` is None everywhere unless ``require_reports``).
        splits: keep only these official splits (default all three).
        frontal_only: keep only AP/PA views (metadata ViewPosition).
        drop_missing_images: drop rows whose JPEG is not on disk (counted in ``stats``);
            otherwise they are kept with ``exists=False``.
        require_reports: fail when no sectioned-reports file is found.
        read_reports: False skips the reports entirely (the binary QA builder needs only labels).

    ``stats`` counts: ``images_in_split_file``, ``dropped_other_splits``, ``dropped_non_frontal``,
    ``images_missing``, ``dropped_missing_images``, ``studies_without_labels``,
    ``studies_without_findings``, ``subjects_in_several_splits``, ``images``.
    """
    root = _check_root(Path(root))
    wanted = tuple(splits) if splits else SPLITS
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise MimicError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    inputs = {
        "split": find_table(root, SPLIT_FILE),
        "chexpert": find_table(root, CHEXPERT_FILE),
        "metadata": find_table(root, METADATA_FILE),
    }
    reports_path = None
    if read_reports:
        reports_path = Path(reports).expanduser() if reports else default_reports_path(root)
    if reports_path is None and require_reports:
        raise MimicError(f"no {SECTIONED_FILE} in {root}; build it with the MIMIC-CXR code's "
                         "create_section_files.py and pass it with --reports")
    if reports_path is not None:
        inputs["reports"] = reports_path

    split = read_split(inputs["split"])
    chexpert = read_chexpert(inputs["chexpert"])
    views = read_metadata(inputs["metadata"])
    findings = read_sectioned_reports(reports_path) if reports_path is not None else {}

    stats = dict.fromkeys(("images_in_split_file", "dropped_other_splits", "dropped_non_frontal",
                           "images_missing", "dropped_missing_images", "studies_without_labels",
                           "studies_without_findings", "subjects_in_several_splits", "images"), 0)
    stats["images_in_split_file"] = len(split)
    subject_splits: dict[int, set[str]] = {}
    for subject, _study, name in split.values():
        subject_splits.setdefault(subject, set()).add(name)
    stats["subjects_in_several_splits"] = sum(len(v) > 1 for v in subject_splits.values())
    if stats["subjects_in_several_splits"]:
        logger.warning("%d subjects appear in more than one split of %s", stats["subjects_in_several_splits"],
                       inputs["split"])

    no_labels = (None,) * len(CHEXPERT_FINDINGS)
    images: list[MimicImage] = []
    seen_unlabelled, seen_no_findings = set(), set()
    from tqdm.auto import tqdm

    for dicom in tqdm(sorted(split, key=lambda d: (split[d][0], split[d][1], d)), desc="MIMIC images",
                      unit="img", disable=len(split) < 10000):
        subject, study, name = split[dicom]
        if name not in wanted:
            stats["dropped_other_splits"] += 1
            continue
        view = views.get(dicom)
        if frontal_only and view not in FRONTAL_VIEWS:
            stats["dropped_non_frontal"] += 1
            continue
        rel = image_relpath(subject, study, dicom)
        exists = (root / rel).is_file()
        if not exists:
            stats["images_missing"] += 1
            if drop_missing_images:
                stats["dropped_missing_images"] += 1
                continue
        labels = chexpert.get(study)
        if labels is None:
            seen_unlabelled.add(study)
        text = findings.get(study)
        if text is None:
            seen_no_findings.add(study)
        images.append(MimicImage(dicom, subject, study, name, view, rel, exists, labels or no_labels, text))
    stats["studies_without_labels"] = len(seen_unlabelled)
    if reports_path is not None:
        stats["studies_without_findings"] = len(seen_no_findings)
    else:
        del stats["studies_without_findings"]  # not read, so not counted
    stats["images"] = len(images)
    if stats["images_missing"]:
        logger.warning("%d image files are missing under %s/files%s", stats["images_missing"], root,
                       " (dropped)" if drop_missing_images else "")
    return MasterTable(root=root, images=images, inputs=inputs, stats=stats)
