"""MIMIC-CXR-JPG builders on a synthetic MIMIC-shaped tree: counts, balance, split hygiene,
determinism (repeat builds and shuffled input rows), both sectioned-report layouts, and errors."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from radialog_rl.calibration.parsing import parse_confidence, parse_yes_no
from radialog_rl.data.mimic import (
    QA_FINDINGS,
    MimicError,
    build_binary_qa,
    build_master_table,
    build_report_generation,
    write_master_table,
)
from radialog_rl.data.mimic.selection import parse_fractions, partition_by_subject, select, selection_hash
from radialog_rl.data.mimic.tables import CHEXPERT_FILE, METADATA_FILE, SECTIONED_FILE, SPLIT_FILE
from radialog_rl.data.prompts import CHEXPERT_FINDINGS
from radialog_rl.errors import ConfigError
from radialog_rl.testing.mimic import make_synthetic_mimic

N = 6  # rows per finding: 3 yes, 3 no


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return make_synthetic_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg", n_subjects=40, seed=0)


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a (gzipped) CSV, read independently of the code under test."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _write_table(path: Path, header, rows) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    data = buffer.getvalue().encode()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _copy_tables(src: Path, dst: Path, shuffle_seed: int | None = None) -> Path:
    """``dst`` with the same images (a symlink) and the four tables, rows shuffled if asked."""
    dst.mkdir(parents=True)
    (dst / "files").symlink_to(src / "files", target_is_directory=True)
    for name in (f"{SPLIT_FILE}.gz", f"{CHEXPERT_FILE}.gz", f"{METADATA_FILE}.gz", SECTIONED_FILE):
        header, rows = _table(src / name)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(rows)
        _write_table(dst / name, header, rows)
    return dst


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _labels(root: Path) -> dict[int, dict[str, str]]:
    header, rows = _table(root / f"{CHEXPERT_FILE}.gz")
    return {int(r[1]): dict(zip(header, r)) for r in rows}


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def test_selection_hash_is_sha256_of_the_seed_and_parts():
    assert selection_hash(0, "a") == 17234191583336360940  # int(sha256(b"0\x1fa")[:8], big-endian)
    assert selection_hash(7, "qa", 1, 2, "x") == 10553983611707241149


def test_select_cycles_only_for_the_shortfall():
    items = [(1, 1, "a"), (2, 2, "b"), (3, 3, "c")]
    chosen, repeated = select(items, 5, lambda t: t, seed=0, purpose="p")
    assert repeated == 2 and len(chosen) == 5
    assert sorted(t for t, r in chosen[:3]) == items and {r for _, r in chosen[:3]} == {0}
    assert [t for t, _ in chosen[3:]] == [t for t, _ in chosen[:2]] and {r for _, r in chosen[3:]} == {1}
    order = [t for t, _ in select(list(reversed(items)), 3, lambda t: t, seed=0, purpose="p")[0]]
    assert order == [t for t, _ in chosen[:3]]  # independent of the input order
    assert select([], 4, lambda t: t, 0, "p") == ([], 0)


def test_subject_partition_and_fraction_parsing():
    assert parse_fractions("sft=0.5, ppo=0.25") == {"sft": 0.5, "ppo": 0.25}
    for bad in ("sft", "a=0.7,b=0.7", "a=0", "a=x", "a b=0.1"):
        with pytest.raises(ConfigError):
            parse_fractions(bad)
    items = [(s, k) for s in range(200) for k in range(3)]  # three studies per subject
    parts = partition_by_subject(items, {"a": 0.5, "b": 0.5}, lambda t: t[0], seed=1)
    assert len(parts["a"]) + len(parts["b"]) == 600
    assert not {s for s, _ in parts["a"]} & {s for s, _ in parts["b"]}
    assert 60 < len({s for s, _ in parts["a"]}) < 140


# --------------------------------------------------------------------------------------------------
# Master table
# --------------------------------------------------------------------------------------------------


def test_master_table_matches_the_csv_files(mimic):
    _, split_rows = _table(mimic.root / f"{SPLIT_FILE}.gz")
    meta_header, meta_rows = _table(mimic.root / f"{METADATA_FILE}.gz")
    views = {r[0]: r[meta_header.index("ViewPosition")] for r in meta_rows}
    labels = _labels(mimic.root)
    table = build_master_table(mimic.root)
    assert len(table.images) == len(split_rows) == mimic.images
    assert table.stats["images_missing"] == 2 and table.stats["dropped_missing_images"] == 0
    by_dicom = {im.dicom_id: im for im in table.images}
    for dicom, study, subject, split in split_rows:
        im = by_dicom[dicom]
        assert (im.subject_id, im.study_id, im.split, im.view) == (int(subject), int(study), split, views[dicom])
        assert im.image == f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        assert im.exists == (im.image not in mimic.missing_images)
        expected = {"1.0": 1, "0.0": 0, "-1.0": -1, "": None}
        assert im.labels == tuple(expected[labels[int(study)][n]] for n in CHEXPERT_FINDINGS)
    frontal = build_master_table(mimic.root, frontal_only=True, drop_missing_images=True, splits=["test"])
    assert all(im.view in ("AP", "PA") and im.exists and im.split == "test" for im in frontal.images)
    assert len(frontal.images) == sum(views[r[0]] in ("AP", "PA") and r[3] == "test" and
                                      by_dicom[r[0]].exists for r in split_rows)


def test_master_table_jsonl_and_manifest(mimic, tmp_path):
    result = write_master_table(mimic.root, tmp_path / "master.jsonl", drop_missing_images=True)
    rows = _jsonl(tmp_path / "master.jsonl")
    assert len(rows) == mimic.images - 2 and all((tmp_path / r["image"]).is_file() for r in rows)
    assert set(rows[0]["labels"]) == set(CHEXPERT_FINDINGS)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["master_table"]["dropped_missing_images"] == 2
    assert manifest["outputs"]["master"]["rows"] == len(rows)
    assert set(manifest["inputs"]) == {"split", "chexpert", "metadata", "reports"}
    assert "split  " in result.summary_table() and "images_missing=2" in result.summary_table()


# --------------------------------------------------------------------------------------------------
# Binary QA
# --------------------------------------------------------------------------------------------------


def test_binary_qa_counts_balance_and_labels(mimic, tmp_path):
    result = build_binary_qa(mimic.root, tmp_path, splits=("train", "validate"), n_per_finding=N, seed=3)
    labels = _labels(mimic.root)
    for part in ("train", "validate"):
        ppo = _jsonl(tmp_path / f"binary_qa_{part}.ppo.jsonl")
        sft = _jsonl(tmp_path / f"binary_qa_{part}.sft.jsonl")
        assert len(ppo) == len(sft) == N * len(QA_FINDINGS)
        assert Counter((r["finding"], r["answer"]) for r in ppo) == {
            (f, a): N // 2 for f in QA_FINDINGS for a in ("yes", "no")}
        for row, sft_row in zip(ppo, sft):
            assert set(row) == {"image", "prompt", "answer", "finding", "subject_id", "study_id", "dicom_id"}
            assert mimic.subjects[row["subject_id"]] == part
            # the answer is the study's CheXpert label: 1.0 -> yes, 0.0 -> no (never -1 or empty)
            assert labels[row["study_id"]][row["finding"]] == {"yes": "1.0", "no": "0.0"}[row["answer"]]
            assert (tmp_path / row["image"]).is_file() and row["image"].endswith(f"{row['dicom_id']}.jpg")
            assert row["prompt"].startswith("<image>. ") and '{"confidence":' in row["prompt"]
            assert {k: v for k, v in sft_row.items() if k != "target"} == row
            assert parse_yes_no(sft_row["target"]) == (row["answer"] == "yes")
            assert parse_confidence(sft_row["target"]) is not None
        # a short class is topped up by repeats, and the summary says how many
        for line in (s for s in result.summary if s["part"] == part):
            assert line["rows"] == N // 2 and line["repeated"] == max(0, N // 2 - line["studies"])
            distinct = {r["study_id"] for r in ppo if (r["finding"], r["answer"]) == (line["finding"], line["answer"])}
            assert len(distinct) == min(N // 2, line["studies"])
    confidences = Counter(parse_confidence(r["target"]) for r in _jsonl(tmp_path / "binary_qa_train.sft.jsonl"))
    assert len(confidences) >= 8  # uniform on 0..10: 78 draws cover most values


def test_binary_qa_rows_load_in_the_sft_and_ppo_readers(mimic, tmp_path):
    from radialog_rl.data.datasets import load_sft_jsonl
    from radialog_rl.data.prompt_rows import load_prompt_jsonl

    build_binary_qa(mimic.root, tmp_path, n_per_finding=2)
    assert len(load_sft_jsonl(tmp_path / "binary_qa_train.sft.jsonl")) == 2 * len(QA_FINDINGS)
    rows = load_prompt_jsonl(tmp_path / "binary_qa_train.ppo.jsonl")
    assert rows[0].fields["answer"] in ("yes", "no") and rows[0].image.is_file()


def test_no_subject_in_two_splits_or_subsets(mimic, tmp_path):
    build_binary_qa(mimic.root, tmp_path, splits=("train", "validate", "test"), n_per_finding=N,
                    subsets="sft=0.5,ppo=0.5")
    subjects = {f.name: {r["subject_id"] for r in _jsonl(f)} for f in tmp_path.glob("*.ppo.jsonl")}
    assert len(subjects) == 6
    names = sorted(subjects)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not subjects[a] & subjects[b], (a, b)
    for name, members in subjects.items():
        split = name.removeprefix("binary_qa_").split("_")[0]
        assert {mimic.subjects[s] for s in members} == {split}


def test_builds_are_byte_identical_and_ignore_input_row_order(mimic, tmp_path):
    original = _copy_tables(mimic.root, tmp_path / "original")
    shuffled = _copy_tables(mimic.root, tmp_path / "shuffled", shuffle_seed=5)
    assert (shuffled / f"{SPLIT_FILE}.gz").read_bytes() != (original / f"{SPLIT_FILE}.gz").read_bytes()
    for builder, kwargs in ((build_binary_qa, dict(n_per_finding=N)), (build_report_generation, {})):
        kwargs = dict(kwargs, splits=("train", "test"), seed=11)
        first = builder(original, original / "out1", **kwargs)
        second = builder(original, original / "out2", **kwargs)
        third = builder(shuffled, shuffled / "out1", **kwargs)
        assert first.files and [p.name for p in first.files.values()] == [p.name for p in third.files.values()]
        for a, b, c in zip(first.files.values(), second.files.values(), third.files.values()):
            assert a.read_bytes() == b.read_bytes() == c.read_bytes(), a.name
        assert first.manifest.read_bytes() == second.manifest.read_bytes()
        m1, m3 = (json.loads(p.read_text()) for p in (first.manifest, third.manifest))
        assert m1["outputs"] == m3["outputs"] and m1["inputs"]["split"]["sha256"] != m3["inputs"]["split"]["sha256"]
    build_binary_qa(original, original / "seed12", n_per_finding=N, seed=12)
    assert (original / "seed12" / "binary_qa_train.ppo.jsonl").read_bytes() != \
        (original / "out1" / "binary_qa_train.ppo.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def test_report_rows_use_findings_and_radialog_prompt(mimic, tmp_path):
    result = build_report_generation(mimic.root, tmp_path, splits=("train", "test"))
    labels = _labels(mimic.root)
    header, rows = _table(mimic.root / SECTIONED_FILE)
    findings = {int(r[0][1:]): " ".join(r[header.index("findings")].split()) for r in rows}
    table = build_master_table(mimic.root, frontal_only=True, drop_missing_images=True, splits=["train"])
    expected_studies = {im.study_id for im in table.images if findings.get(im.study_id)}
    ppo = _jsonl(tmp_path / "reports_train.ppo.jsonl")
    assert {r["study_id"] for r in ppo} == expected_studies and len(ppo) == len(expected_studies)
    normal = 0
    for row in ppo:
        positives = [n for n in CHEXPERT_FINDINGS if labels[row["study_id"]][n] == "1.0"]
        assert row["findings"] == positives and row["reference"] == findings[row["study_id"]]
        named = ", ".join(p.lower() for p in positives) or "no common findings"
        assert row["prompt"].startswith(f"<image>. Predicted Findings: {named}. You are to act as a radiologist")
        normal += not positives
    assert normal and result.summary[0]["no_common_findings"] == normal
    sft = _jsonl(tmp_path / "reports_train.sft.jsonl")
    for row, s in zip(ppo, sft):
        assert s["target"].startswith(row["reference"] + ' {"confidence": ')
        assert parse_confidence(s["target"]) is not None
    capped = build_report_generation(mimic.root, tmp_path / "capped", n=5, seed=2)
    assert capped.summary[0]["rows"] == 5
    assert {r["study_id"] for r in _jsonl(tmp_path / "capped" / "reports_train.ppo.jsonl")} <= expected_studies


def test_radialog_sectioned_layout_gives_the_same_rows(tmp_path):
    official = make_synthetic_mimic(tmp_path / "a", n_subjects=10, seed=4)
    radialog = make_synthetic_mimic(tmp_path / "b", n_subjects=10, seed=4, reports_layout="radialog")
    header = _table(radialog.reports)[0]
    assert header[0] == "impression" and "dicom_id" in header
    a = build_report_generation(official.root, tmp_path / "a" / "out", images_per_study="all")
    b = build_report_generation(radialog.root, tmp_path / "b" / "out", images_per_study="all")
    assert a.files["reports_train.ppo"].read_bytes() == b.files["reports_train.ppo"].read_bytes()


def test_predictions_file_sets_the_prompt(mimic, tmp_path):
    table = build_master_table(mimic.root, splits=["test"])
    predictions = {im.dicom_id: ["edema", "Cardiomegaly"] for im in table.images}
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(predictions))
    build_report_generation(mimic.root, tmp_path / "out", splits=("test",), predictions=path)
    rows = _jsonl(tmp_path / "out" / "reports_test.ppo.jsonl")
    assert all(r["findings"] == ["Cardiomegaly", "Edema"] for r in rows)  # CheXpert order
    assert "Predicted Findings: cardiomegaly, edema." in rows[0]["prompt"]
    path.write_text(json.dumps(dict(list(predictions.items())[:1])))
    with pytest.raises(MimicError, match="has no prediction for dicom_id"):
        build_report_generation(mimic.root, tmp_path / "out", splits=("test",), predictions=path)
    path.write_text(json.dumps({"x": ["Edemaa"]}))
    with pytest.raises(MimicError, match="unknown finding"):
        build_report_generation(mimic.root, tmp_path / "out", splits=("test",), predictions=path)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(mimic, tmp_path):
    return _copy_tables(mimic.root, tmp_path / "broken")


def test_wrong_root_and_missing_table(broken, tmp_path):
    with pytest.raises(MimicError, match=r"MIMIC-CXR-JPG root not found: .*nowhere; pass the folder"):
        build_master_table(tmp_path / "nowhere")
    (broken / f"{METADATA_FILE}.gz").unlink()
    with pytest.raises(MimicError, match=r"has no mimic-cxr-2.0.0-metadata.csv.gz or mimic-cxr-2.0.0-metadata.csv"):
        build_master_table(broken)


def test_renamed_column_is_named(broken):
    header, rows = _table(broken / f"{SPLIT_FILE}.gz")
    _write_table(broken / f"{SPLIT_FILE}.gz", [h.replace("split", "Split") for h in header], rows)
    with pytest.raises(MimicError, match=r"missing column\(s\) 'split' \(found 'Split'\)"):
        build_master_table(broken)


def test_unreadable_gzip(broken):
    data = (broken / f"{CHEXPERT_FILE}.gz").read_bytes()
    (broken / f"{CHEXPERT_FILE}.gz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(MimicError, match=r"chexpert.csv.gz is not a readable gzip file"):
        build_master_table(broken)
    (broken / f"{CHEXPERT_FILE}.gz").write_bytes(b"subject_id,study_id\n")
    with pytest.raises(MimicError, match=r"is not a gzip file"):
        build_master_table(broken)


def test_label_outside_the_set(broken):
    header, rows = _table(broken / f"{CHEXPERT_FILE}.gz")
    rows[3][header.index("Edema")] = "2.0"
    _write_table(broken / f"{CHEXPERT_FILE}.gz", header, rows)
    with pytest.raises(MimicError, match=r"line 5, column 'Edema': label '2.0' is not one of 1.0, 0.0, -1.0 or empty"):
        build_master_table(broken)


def test_bad_split_name_and_ids(broken):
    header, rows = _table(broken / f"{SPLIT_FILE}.gz")
    rows[0][3] = "val"
    _write_table(broken / f"{SPLIT_FILE}.gz", header, rows)
    with pytest.raises(MimicError, match=r"line 2: split 'val' is not one of train, validate, test"):
        build_master_table(broken)
    rows[0][3], rows[1][2] = "train", "p1000"
    _write_table(broken / f"{SPLIT_FILE}.gz", header, rows)
    with pytest.raises(MimicError, match=r"line 3: subject_id 'p1000' is not an integer id"):
        build_master_table(broken)


def test_reports_errors(broken, tmp_path):
    with pytest.raises(MimicError, match="sectioned reports not found"):
        build_report_generation(broken, tmp_path / "o", reports=tmp_path / "none.csv")
    (broken / SECTIONED_FILE).unlink()
    with pytest.raises(MimicError, match="no mimic_cxr_sectioned.csv in"):
        build_report_generation(broken, tmp_path / "o")
    _write_table(broken / SECTIONED_FILE, ["id", "findings"], [["s1", "x"]])
    with pytest.raises(MimicError, match="line 2: no study column"):
        build_report_generation(broken, tmp_path / "o")


def test_parameter_errors(mimic, tmp_path):
    with pytest.raises(ConfigError, match="even"):
        build_binary_qa(mimic.root, tmp_path, n_per_finding=3)
    with pytest.raises(ConfigError, match="unknown finding"):
        build_binary_qa(mimic.root, tmp_path, findings=["No Finding"])
    with pytest.raises(MimicError, match="unknown split"):
        build_master_table(mimic.root, splits=["val"])
    with pytest.raises(ConfigError, match="images_per_study"):
        build_report_generation(mimic.root, tmp_path, images_per_study="some")


def test_absolute_image_paths(mimic, tmp_path):
    build_binary_qa(mimic.root, tmp_path, n_per_finding=2, absolute_paths=True, findings=["Edema"])
    rows = _jsonl(tmp_path / "binary_qa_train.ppo.jsonl")
    assert len(rows) == 2 and all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
    assert rows[0]["image"].startswith(str(mimic.root) + "/files/p")
