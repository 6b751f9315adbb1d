"""``radialog-rl merge`` end to end, and its one-line errors."""

from __future__ import annotations

from radialog_rl.cli import main


def test_merge_cli_writes_a_loadable_directory(tmp_path, tiny_release, capsys):
    out = tmp_path / "merged"
    code = main(["merge", "--model-path", str(tiny_release.model_path), "--model-base",
                 str(tiny_release.model_base), "--out", str(out), "--dtype", "fp32"])
    assert code == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "non_lora_trainables.safetensors"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".merged.tmp") for p in tmp_path.iterdir())  # temp dir renamed away


def test_merge_cli_missing_adapter_is_one_line(tmp_path, tiny_release, capsys):
    code = main(["merge", "--model-path", str(tiny_release.model_path), "--model-base",
                 str(tiny_release.model_base), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("radialog-rl merge: error: adapter not found")
    assert not (tmp_path / "o").exists()
