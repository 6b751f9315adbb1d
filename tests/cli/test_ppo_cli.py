"""``radialog-rl ppo`` end to end on the tiny release, and its error paths."""

from __future__ import annotations

import json

import yaml

from radialog_rl.cli import main


def _write_config(tmp_path, tiny_release, **overrides):
    from radialog_rl.testing.data import make_binary_qa_jsonl

    data = make_binary_qa_jsonl(tmp_path / "data", n=4)
    config = dict(
        model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
        train_file=str(data.relative_to(tmp_path)), dtype="fp32", device="cpu", batch_size=2,
        mini_batch_size=1, gradient_accumulation_steps=2, max_new_tokens=4, steps=1, save_every=1,
        output_dir="run", tensorboard=False,
    )
    config.update(overrides)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ppo_cli_trains_and_checkpoints(tmp_path, tiny_release, capsys):
    path = _write_config(tmp_path, tiny_release)
    assert main(["ppo", "--config", str(path)]) == 0
    assert "PPO finished at step 1" in capsys.readouterr().out
    run = tmp_path / "run"  # relative to the YAML's folder
    assert (run / "checkpoint-000001" / "trainer_state.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and "calibration/parse_failure_rate" in metrics[0]
    assert main(["ppo", "--config", str(path), "--resume", "latest", "--steps", "2"]) == 0
    assert (run / "checkpoint-000002").is_dir()


def test_ppo_cli_errors_are_one_line(tmp_path, tiny_release, capsys):
    path = _write_config(tmp_path, tiny_release, learning_rat=1e-3)
    assert main(["ppo", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"radialog-rl ppo: error: {path}: unknown PPO config key(s): 'learning_rat' "
                   "(did you mean 'learning_rate'?)")
    assert main(["ppo", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "PPO config not found" in capsys.readouterr().err
    path = _write_config(tmp_path, tiny_release, model_path=str(tmp_path / "nope"))
    assert main(["ppo", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "RaDialog release directory not found" in err and "Traceback" not in err
