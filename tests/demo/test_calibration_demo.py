"""The calibration experiment (``radialog-rl demo calibration``) end to end on a very short preset,
and its target checks on hand-made tables."""

from __future__ import annotations

import json

import pytest
import torch

from radialog_rl.cli import main
from radialog_rl.data.synthetic_task import build_synthetic_task
from radialog_rl.demo.calibration import (Preset, check_targets, format_summary, oracle_positive_groups,
                                          run_calibration_experiment, run_ppo_phase)
from radialog_rl.errors import ConfigError

TINY = Preset(n_train=64, n_eval=32, sft_epochs=10, ppo_steps=4, eval_every=2, n_val=16, findings=("opacity",))


def test_the_whole_experiment_runs_and_writes_its_table(tmp_path):
    threads_before = torch.get_num_threads()
    # A few seconds of SFT: a high learning rate so that the format is learnt within 40 steps.
    torch.set_num_threads(2)
    try:
        result = run_calibration_experiment(tmp_path / "work", TINY, threads=1,
                                            sft_overrides={"trainer": {"learning_rate": 5e-3}})
        assert torch.get_num_threads() == 2  # pinned for the run only
    finally:
        torch.set_num_threads(threads_before)
    assert result.rows[0]["parse_failure_rate"] < 0.5
    models = [row["model"].split(" ")[0] for row in result.rows]
    assert models == ["SFT", "PPO", "oracle", "best"]
    for row in result.rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["brier"] is not None
    assert len(result.targets) == 7 and set(result.groups) == {"SFT", "PPO", "oracle"}
    work = tmp_path / "work"
    summary = json.loads((work / "summary.json").read_text())
    assert summary["rows"] == result.rows and summary["threads"] == 1
    assert (work / "sft" / "merged" / "config.json").is_file()
    # The curve (and best checkpoint) on the validation split; the table's two evaluations on the held-out one.
    assert sorted(p.name for p in (work / "ppo" / "eval").glob("step-*.json")) == [
        "step-000000.json", "step-000002.json", "step-000004.json"]
    assert [e["step"] for e in result.validation] == [0, 2, 4] and summary["validation"] == result.validation
    val_ids = {r["id"] for r in json.loads((work / "ppo" / "eval" / "step-000004.json").read_text())["rows"]}
    test = json.loads((work / "ppo" / "test" / "step-000004.json").read_text())
    assert sorted(p.name for p in (work / "ppo" / "test").glob("step-*.json")) == [
        "step-000000.json", "step-000004.json"]
    assert len(val_ids) == 16 and len(test["rows"]) == 32 and not val_ids & {r["id"] for r in test["rows"]}
    assert result.rows[1]["auroc"] == test["metrics"]["auroc"]  # the PPO row is the held-out split's
    for row in result.rows[:2]:  # SFT and PPO carry the AUROC's bootstrap interval (None: one class)
        assert row["auroc_ci"] is None or row["auroc_ci"][0] <= row["auroc"] <= row["auroc_ci"][1]
    assert (work / "ppo" / "final" / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in result.plots] == ["reliability_sft.png", "reliability_ppo.png"]
    text = format_summary(result)
    assert "| SFT |" in text and "targets:" in text and "validation split" in text


@pytest.mark.experiment
def test_ci_preset_states_a_confidence_that_separates_right_from_wrong(tmp_path):
    # The CI check: discrimination, not only ECE (a constant confidence can have a low ECE).
    # Measured with this preset (one thread, transformers 5.24): AUROC 0.794 at step 150 (bootstrap
    # 95 % interval 0.73-0.86), ECE 0.023, accuracy 0.943; the thresholds leave room for another
    # stack's float differences, not for a constant.
    result = run_calibration_experiment(tmp_path / "work", "ci")
    by = {row["model"].split(" ")[0]: row for row in result.rows}
    sft, ppo, constant = by["SFT"], by["PPO"], by["best"]
    assert sft["accuracy"] >= 0.8  # SFT learnt to look (the task's premise)
    assert sft["auroc"] < 0.6  # SFT's confidence is the random format recipe's: no information
    assert ppo["auroc"] >= 0.7 and ppo["auroc"] > constant["auroc"] + 0.1
    assert ppo["parse_failure_rate"] <= 0.02 and ppo["ece"] <= 0.1
    assert ppo["accuracy"] >= sft["accuracy"] - 0.02
    values = [v for _, v in sorted(result.groups["PPO"].items(), key=lambda kv: float(kv[0]))]
    assert values[-1] > values[0]  # clear findings get a higher confidence than faint ones


def _rows(ppo, sft_accuracy=0.8, oracle_auroc=0.8, constant_brier=0.2):
    base = {"parse_failure_rate": 0.0, "mean_confidence": 0.5, "ece": 0.0}
    return [
        {**base, "model": "SFT", "accuracy": sft_accuracy, "auroc": 0.5, "brier": 0.5},
        {**base, "model": "PPO", **ppo},
        {**base, "model": "oracle (SFT accuracy per group)", "accuracy": sft_accuracy, "auroc": oracle_auroc,
         "brier": 0.1},
        {**base, "model": "best constant (8)", "accuracy": sft_accuracy, "auroc": 0.5, "brier": constant_brier},
    ]


def test_targets_hand_computed():
    good = {"accuracy": 0.79, "auroc": 0.76, "brier": 0.16, "ece": 0.05, "parse_failure_rate": 0.02}
    groups = {"0.05": 0.2, "0.10": 0.3, "0.20": 0.5, "0.60": 0.9}
    assert all(met for _, _, met in check_targets(_rows(good), groups))
    bad = {"accuracy": 0.77, "auroc": 0.71, "brier": 0.171, "ece": 0.061, "parse_failure_rate": 0.03}
    results = check_targets(_rows(bad), {"0.05": 0.2, "0.10": 0.2, "0.20": 0.5, "0.60": 0.9})
    assert [met for _, _, met in results] == [False] * 7  # 0.71 < 0.75 and < 0.9 x 0.8 = 0.72; ...
    assert not check_targets(_rows(good), {"0.05": 0.2, "0.10": 0.3, "0.20": 0.5})[5][2]  # < 4 groups


def test_the_ppo_phase_refuses_a_task_without_a_validation_split(tmp_path):
    # The table must not be chosen on: without a validation split there is nothing else to choose on.
    task = build_synthetic_task(tmp_path / "task", n_train=2, n_eval=2, size=32)
    with pytest.raises(ConfigError, match="needs a task with a validation split"):
        run_ppo_phase(tmp_path / "work", tmp_path / "no-model", task, TINY)
    assert not (tmp_path / "work").exists()


def test_cli_refuses_a_thread_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "calibration", "--threads", "0", "--work", str(tmp_path / "new")])
    assert exit_info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cli_refuses_a_used_work_folder(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("keep me")
    assert main(["demo", "calibration", "--preset", "ci", "--work", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "old.txt").read_text() == "keep me"


def test_oracle_groups_average_each_findings_accuracy_over_its_positives():
    def row(finding, group, correct):
        return {"finding": finding, "visibility_group": group, "correct": correct, "confidence": 5}

    rows = ([row("opacity", "0.10", c) for c in (True, False, False, False)]  # accuracy 0.25
            + [row("effusion", "0.10", c) for c in (True, True)]  # accuracy 1.0
            + [row("opacity", "1.00", True)] * 3 + [row("opacity", "none", False)] * 2)
    # 0.10: (4 x 0.25 + 2 x 1.0) / 6 = 0.5; 1.00: 1.0; negatives ("none") are not a positive group
    assert oracle_positive_groups(rows) == {"0.10": 0.5, "1.00": 1.0}
