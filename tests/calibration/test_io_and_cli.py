"""Prediction files (JSONL/CSV), bad-row reporting, and ``radialog-rl evaluate`` end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from radialog_rl.calibration.io import read_predictions
from radialog_rl.cli import main
from radialog_rl.errors import DataError

REFERENCE_DIR = Path(__file__).resolve().parent / "published"  # published results, see its README.md


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def good_jsonl(tmp_path: Path) -> Path:
    rows = [
        {"confidence": 2, "accuracy": 0.1},
        {"confidence": 2, "accuracy": 0.3},
        {"text": 'Cardiomegaly. {"confidence": 8}', "accuracy": 1.0},
        {"confidence": 8, "correct": True},  # correct=true -> accuracy 1
        {"confidence": 8, "accuracy": 0.4},
        {"text": "Normal chest, no confidence stated.", "accuracy": 1.0},
        {"confidence": None, "accuracy": 0.2},
    ]
    return _write(tmp_path / "preds.jsonl", [json.dumps(r) for r in rows])


def test_read_jsonl(good_jsonl):
    preds = read_predictions(good_jsonl)
    assert preds.confidences == [2, 2, 8, 8, 8, None, None]
    assert preds.accuracies == [0.1, 0.3, 1.0, 1.0, 0.4, 1.0, 0.2]
    assert preds.line_numbers == [1, 2, 3, 4, 5, 6, 7]


def test_read_csv_with_missing_confidence(tmp_path):
    path = _write(tmp_path / "p.csv", ["confidence,accuracy", "3,0.5", ",0.25", "10,1.0", "", "7,"])
    preds = read_predictions(path)
    # blank lines are skipped; an empty accuracy is missing
    assert preds.confidences == [3, None, 10, 7]
    assert preds.accuracies == [0.5, 0.25, 1.0, None]
    assert preds.line_numbers == [2, 3, 4, 6]


BAD_JSONL = [
    '{"confidence": 5, "accuracy": 0.5}',  # 1 ok
    '{"confidence": "high", "accuracy": 0.5}',  # 2 non-numeric
    '{"confidence": 5, "accuracy": 0.5',  # 3 invalid JSON
    '{"confidence": 12, "accuracy": 0.5}',  # 4 out of range
    '{"confidence": 5, "accuracy": 1.5}',  # 5 accuracy outside [0, 1]
    '{"confidence": 5}',  # 6 no accuracy
    '{"confidence": 6, "accuracy": 0.9}',  # 7 ok
]


def test_bad_jsonl_rows_listed_with_line_numbers(tmp_path):
    path = _write(tmp_path / "bad.jsonl", BAD_JSONL)
    with pytest.raises(DataError) as info:
        read_predictions(path)
    msg = str(info.value)
    assert "5 bad row(s)" in msg
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}:" in msg
    assert "line 1:" not in msg and "line 7:" not in msg
    assert "invalid JSON" in msg and "outside 0..10" in msg and "outside [0, 1]" in msg


def test_bad_rows_skipped_with_warning(tmp_path, caplog):
    path = _write(tmp_path / "bad.jsonl", BAD_JSONL)
    with caplog.at_level(logging.WARNING, logger="radialog_rl.calibration.io"):
        preds = read_predictions(path, skip_bad_rows=True)
    assert preds.confidences == [5, 6]
    assert [n for n, _ in preds.bad_rows] == [2, 3, 4, 5, 6]
    assert "skipped 5 bad row(s) at line(s) 2, 3, 4, 5, 6" in caplog.text


def test_bad_csv_rows(tmp_path):
    lines = ["confidence,accuracy"] + [f"{i % 11},0.5" for i in range(8)] + ["x,0.5", "4,-0.1", "4,0.5,9"]
    path = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(DataError) as info:
        read_predictions(path)
    msg = str(info.value)
    assert "3 bad row(s)" in msg
    assert "line 10:" in msg and "line 11:" in msg and "line 12:" in msg


def test_many_bad_rows_are_truncated(tmp_path):
    path = _write(tmp_path / "bad.csv", ["confidence,accuracy"] + ["nope,0.5"] * 9)
    with pytest.raises(DataError, match="and 4 more"):
        read_predictions(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_predictions(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="header"):
        read_predictions(_write(tmp_path / "h.csv", ["conf,acc", "1,1"]))
    with pytest.raises(DataError, match="unknown predictions format"):
        read_predictions(_write(tmp_path / "p.txt", ["1"]))
    with pytest.raises(DataError, match="no predictions"):
        read_predictions(_write(tmp_path / "e.jsonl", [""]))


# ------------------------------------------------------------------------------------ CLI


def test_cli_table(good_jsonl, capsys):
    assert main(["evaluate", str(good_jsonl)]) == 0
    out = capsys.readouterr().out
    assert "ECE" in out and "sigma_CBND" in out and "D_NCKL" in out
    assert "parse failures     2" in out


def test_cli_json(good_jsonl, capsys):
    assert main(["evaluate", str(good_jsonl), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # valid: (2,.1) (2,.3) (8,1) (8,1) (8,.4): bin 8 mean .8 -> ECE = 2/5*0 + 3/5*0 = 0
    assert data["n_total"] == 7 and data["n_valid"] == 5
    assert data["ece"] == pytest.approx(0.0, abs=1e-12)
    assert data["parse_failure_rate"] == pytest.approx(2 / 7)


def test_cli_bad_rows_exit_code(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", BAD_JSONL)
    assert main(["evaluate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("radialog-rl evaluate: error:")
    assert "line 2:" in err and "--skip-bad-rows" in err
    assert main(["evaluate", str(path), "--skip-bad-rows", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_total"] == 2


def test_cli_missing_file(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.csv")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_plots(good_jsonl, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot, hist = tmp_path / "out" / "rel.png", tmp_path / "hist.png"
    assert main(["evaluate", str(good_jsonl), "--plot", str(plot), "--hist", str(hist), "--dpi", "50"]) == 0
    for path in (plot, hist):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_lists_evaluate(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--skip-bad-rows" in out and "confidence,accuracy" in out


def test_cli_reference_file(capsys):
    path = REFERENCE_DIR / "shifted_ppo_best_step_600.csv"
    assert main(["evaluate", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ece"] == pytest.approx(0.029, abs=1e-3)
    assert data["n_missing_confidence"] == 5
