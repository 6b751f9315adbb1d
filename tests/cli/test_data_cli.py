"""``radialog-rl data mimic-*`` end to end on a synthetic MIMIC tree, and their one-line errors."""

from __future__ import annotations

import gzip
import json

import pytest

from radialog_rl.cli import main
from radialog_rl.testing.mimic import make_synthetic_mimic


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_mimic(tmp_path_factory.mktemp("mimic-cli") / "mimic", n_subjects=15, seed=1).root


def test_builders_write_files_manifest_and_summary(root, tmp_path, capsys):
    assert main(["data", "mimic-binary-qa", str(root), "--out", str(tmp_path / "qa"), "--n-per-finding", "2",
                 "--split", "train", "--split", "test", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["part", "split", "finding", "answer", "rows", "studies", "repeated"]
    manifest = json.loads((tmp_path / "qa" / "binary_qa.manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 4 and manifest["parameters"]["splits"] == ["train", "test"]
    test_lines = [s for s in manifest["summary"] if s["part"] == "test"]
    assert len(test_lines) == 26 and "wrote" in out
    assert manifest["outputs"]["binary_qa_test.ppo"]["rows"] == sum(s["rows"] for s in test_lines)

    assert main(["data", "mimic-reports", str(root), "--out", str(tmp_path / "rep"), "--n", "3",
                 "--prefix", "rg"]) == 0
    assert len((tmp_path / "rep" / "rg_train.sft.jsonl").read_text().splitlines()) == 3
    assert main(["data", "mimic-table", str(root), "--out", str(tmp_path / "t.jsonl"), "--frontal-only"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows and all(r["view"] in ("AP", "PA") for r in rows)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_errors_are_one_line(root, tmp_path, capsys):
    assert main(["data", "mimic-binary-qa", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert _error(capsys).startswith("radialog-rl data: error: MIMIC-CXR-JPG root not found:")

    assert main(["data", "mimic-binary-qa", str(root), "--out", str(tmp_path / "o"), "--n-per-finding", "3"]) == 1
    assert "n_per_finding must be an even number" in _error(capsys)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "files").symlink_to(root / "files")
    for name in ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz", "mimic_cxr_sectioned.csv"):
        (bad / name).write_bytes((root / name).read_bytes())
    text = gzip.decompress((root / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes()).decode()
    lines = text.splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",yes"  # Support Devices (last column) = "yes"
    (bad / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(lines) + "\n")
    assert main(["data", "mimic-reports", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = _error(capsys)
    assert "mimic-cxr-2.0.0-chexpert.csv line 2, column 'Support Devices': label 'yes'" in err
