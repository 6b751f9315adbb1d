"""End-to-end: ``radialog-rl confidence`` on the tiny release, four methods, table and files."""

from __future__ import annotations

import json

import pytest

from radialog_rl.cli import main

METHODS = ("verbalized", "ptrue", "seqprob", "probe")


def _model_args(release) -> list[str]:
    return ["--model-path", str(release.model_path), "--model-base", str(release.model_base),
            "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6"]


def _table_rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    assert lines[0].split() == ["method", "n", "ECE", "sigma_CBND", "D_NCKL", "Brier", "AUROC", "parse_fail",
                                "excluded", "mean_conf", "mean_acc"]
    return {line.split()[0]: line.split() for line in lines[2:2 + len(METHODS)]}


def test_four_method_table_end_to_end(tiny_release, labelled_path, tmp_path, capsys):
    out, probe = tmp_path / "preds.jsonl", tmp_path / "probe.safetensors"
    code = main(["confidence", "--method", "all", *_model_args(tiny_release), "--data", labelled_path,
                 "--probe-train", labelled_path, "--probe-heldout", "0.34", "--probe-out", str(probe),
                 "--batch-size", "3", "--out", str(out), "--no-word", "no"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = _table_rows(printed)
    assert list(rows) == list(METHODS)
    assert all(r[1] == "8" for r in rows.values())
    assert rows["verbalized"][7] == "37.5%"  # 3 of 8 responses state no confidence
    assert "probe (C=" in printed and "heldout: n 3" in printed  # ceil(0.34 * 6 labelled)
    assert probe.is_file()

    # One file per method; `evaluate` reads each and finds the table's numbers.
    for method in METHODS:
        path = tmp_path / f"preds.{method}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in records] == [f"s{i}" for i in range(8)]
        assert {r["method"] for r in records} == {method}
        assert all({"confidence", "probability", "accuracy", "response"} <= set(r) for r in records)
        assert main(["evaluate", str(path), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert f"{report['ece']:.3f}" == rows[method][2]
        assert f"{report['brier']:.3f}" == rows[method][5]

    # The saved probe applies to new data and gives the same predictions.
    single = tmp_path / "probe-only.jsonl"
    assert main(["confidence", "--method", "probe", "--probe", str(probe), *_model_args(tiny_release),
                 "--data", labelled_path, "--out", str(single)]) == 0
    capsys.readouterr()
    again = [json.loads(line)["probability"] for line in single.read_text().splitlines()]
    before = [json.loads(line)["probability"] for line in (tmp_path / "preds.probe.jsonl").read_text().splitlines()]
    assert again == pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--method", "probe"], "needs either --probe"),
    (["--method", "entropy"], "unknown confidence method"),
    (["--method", "ptrue", "--ptrue-template", "no fields"], "must contain {question}"),
    (["--method", "probe", "--probe-train", "x.jsonl", "--probe-heldout", "1"], "--probe-heldout"),
])
def test_bad_arguments_exit_1_with_one_line(tiny_release, labelled_path, capsys, extra, message):
    code = main(["confidence", *extra, *_model_args(tiny_release), "--data", labelled_path])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("radialog-rl confidence: error:")
