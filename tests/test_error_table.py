"""The error table of issue 11: every bad input, through the CLI, exits 1 with exactly one stderr
line naming the file/field/line and what to do; nothing that existed before is deleted or changed;
a malicious pickle's marker file never appears. Each case builds its bad input in ``tmp_path``.

The passing cases (what a refusal points to: ``--overwrite``, ``--resume previous``, truncated
metrics on resume, kill -9 resume) follow the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from radialog_rl.cli import main
from radialog_rl.training.run_dir import RunLock

MARKER_NAME = "pwned-marker"


class _RunsCode:
    """Unpickling this creates the marker directory: what a malicious pickle would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@dataclass
class Ctx:
    tmp: Path
    release: object
    monkeypatch: pytest.MonkeyPatch
    ppo_run: Path  # a finished two-step PPO run (checkpoints at steps 1 and 2), copied per case

    @property
    def marker(self) -> Path:
        return self.tmp / MARKER_NAME

    def merge_args(self, out: str | Path, *extra: str) -> list[str]:
        return ["merge", "--model-path", str(self.release.model_path), "--model-base",
                str(self.release.model_base), "--out", str(out), "--dtype", "fp32", *extra]

    def ppo_yaml(self, name: str = "ppo.yaml", **overrides) -> Path:
        return _ppo_yaml(self.tmp, self.release, name, **overrides)

    def copied_run(self) -> Path:
        run = self.tmp / "run"
        shutil.copytree(self.ppo_run, run)
        return run

    def sft_yaml(self, **overrides) -> Path:
        from radialog_rl.testing.data import write_synthetic_images

        images = write_synthetic_images(self.tmp / "images", 2, size=64)
        rows = [{"image": str(p), "prompt": "Is there edema?", "target": "yes"} for p in images]
        data = self.tmp / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = dict(model_path=str(self.release.model_path), model_base=str(self.release.model_base),
                      train_file=str(data), dtype="fp32", device="cpu",
                      trainer={"output_dir": "sft-run", "max_steps": 1, "report_to": "none"})
        config.update(overrides)
        path = self.tmp / "sft.yaml"
        path.write_text(yaml.safe_dump(config))
        return path


def _ppo_yaml(folder: Path, release, name: str = "ppo.yaml", **overrides) -> Path:
    from radialog_rl.testing.data import make_binary_qa_jsonl

    data = make_binary_qa_jsonl(folder / "data", n=4)
    config = dict(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        dtype="fp32", device="cpu", batch_size=2, mini_batch_size=1, gradient_accumulation_steps=2,
        max_new_tokens=4, steps=2, save_every=1, output_dir="run", tensorboard=False,
    )
    config.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def ppo_run(tiny_release, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ppo-run")
    assert main(["-q", "ppo", "--config", str(_ppo_yaml(folder, tiny_release))]) == 0
    return folder / "run"


# -- the cases: each returns the argv; the checks are shared ------------------------------------------


def merge_into_a_folder_of_other_files(c: Ctx) -> list[str]:
    out = c.tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    return c.merge_args(out)


def merge_into_the_working_directory(c: Ctx) -> list[str]:
    (c.tmp / "precious.txt").write_text("precious")
    c.monkeypatch.chdir(c.tmp)
    return c.merge_args(".")


def merge_over_a_previous_export_without_overwrite(c: Ctx) -> list[str]:
    out = c.tmp / "merged"
    assert main(c.merge_args(out)) == 0
    return c.merge_args(out)


def merge_overwrite_of_an_export_with_foreign_files(c: Ctx) -> list[str]:
    out = c.tmp / "merged"
    assert main(c.merge_args(out)) == 0
    (out / "my-notes.md").write_text("precious")
    return c.merge_args(out, "--overwrite")


def ppo_fresh_run_in_a_used_output_dir(c: Ctx) -> list[str]:
    c.copied_run()
    return ["ppo", "--config", str(c.ppo_yaml())]


def ppo_resume_and_overwrite_together(c: Ctx) -> list[str]:
    c.copied_run()
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "latest", "--overwrite"]


def sft_fresh_run_in_a_used_output_dir(c: Ctx) -> list[str]:
    path = c.sft_yaml()
    (c.tmp / "sft-run" / "checkpoint-5").mkdir(parents=True)
    (c.tmp / "sft-run" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    return ["sft", "--config", str(path)]


def ppo_output_dir_locked_by_a_live_run(c: Ctx) -> list[str]:
    lock = RunLock(c.tmp / "run").acquire()  # another open file: flock refuses it like another process
    c.monkeypatch.setattr(Ctx, "held_lock", lock, raising=False)
    return ["ppo", "--config", str(c.ppo_yaml())]


def ppo_resume_latest_with_truncated_trainer_state(c: Ctx) -> list[str]:
    state = c.copied_run() / "checkpoint-000002" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "latest"]


def ppo_resume_latest_with_truncated_optimizer(c: Ctx) -> list[str]:
    opt = c.copied_run() / "checkpoint-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "latest"]


def ppo_resume_with_a_malicious_optimizer_pickle(c: Ctx) -> list[str]:
    opt = c.copied_run() / "checkpoint-000002" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(c.marker)}, opt)
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "latest"]


def ppo_resume_with_a_malicious_rng_state(c: Ctx) -> list[str]:
    rng = c.copied_run() / "checkpoint-000002" / "rng_state_0.pt"
    torch.save({"torch": _RunsCode(c.marker)}, rng)
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "latest"]


def ppo_resume_previous_without_two_checkpoints(c: Ctx) -> list[str]:
    run = c.copied_run()
    shutil.rmtree(run / "checkpoint-000001")
    return ["ppo", "--config", str(c.ppo_yaml()), "--resume", "previous"]


@dataclass
class Case:
    setup: Callable[[Ctx], list[str]]
    expect: tuple[str, ...]  # substrings of the one error line

    @property
    def id(self) -> str:
        return self.setup.__name__


CASES = [
    # issue 11 item 1: merge never deletes what is not an export
    Case(merge_into_a_folder_of_other_files, ("is not empty and is not a merged-model export", "notes.txt")),
    Case(merge_into_the_working_directory, ("is the working directory",)),
    Case(merge_over_a_previous_export_without_overwrite, ("already holds a merged-model export", "--overwrite")),
    Case(merge_overwrite_of_an_export_with_foreign_files, ("my-notes.md", "is not a merged-model export")),
    # item 2: a used run dir needs --resume or --overwrite
    Case(ppo_fresh_run_in_a_used_output_dir, ("already holds a PPO run", "checkpoint-000001",
                                              "--resume latest", "--overwrite")),
    Case(ppo_resume_and_overwrite_together, ("--resume and --overwrite contradict",)),
    Case(sft_fresh_run_in_a_used_output_dir, ("already holds an SFT run", "checkpoint-5", "--resume latest")),
    # item 3: one run per output dir
    Case(ppo_output_dir_locked_by_a_live_run, ("is in use by another run", f"pid {os.getpid()}")),
    # item 5: a damaged latest checkpoint is named; previous only on request
    Case(ppo_resume_latest_with_truncated_trainer_state, ("checkpoint-000002", "trainer_state.json",
                                                          "--resume previous")),
    Case(ppo_resume_latest_with_truncated_optimizer, ("checkpoint-000002", "optimizer.pt is truncated",
                                                      "--resume previous")),
    Case(ppo_resume_with_a_malicious_optimizer_pickle, ("optimizer.pt", "not a plain tensor file")),
    Case(ppo_resume_with_a_malicious_rng_state, ("rng_state_0.pt", "not a plain tensor file")),
    Case(ppo_resume_previous_without_two_checkpoints, ("--resume previous", "nothing to resume")),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_1_and_nothing_is_lost(case, tmp_path, tiny_release, ppo_run,
                                                          monkeypatch, capsys):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, ppo_run)
    argv = case.setup(ctx)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert len(err) == 1, err
    assert err[0].startswith(f"radialog-rl {argv[0]}: error: "), err[0]
    for text in case.expect:
        assert text in err[0], (text, err[0])
    after = _snapshot(tmp_path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"deleted or changed: {changed}"
    assert not ctx.marker.exists()


# -- what the refusals point to ---------------------------------------------------------------------


def test_merge_overwrite_replaces_only_a_previous_export(tmp_path, tiny_release, monkeypatch):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, tmp_path)
    out = tmp_path / "merged"
    out.mkdir()  # an empty directory is fine
    assert main(ctx.merge_args(out)) == 0
    first = _snapshot(out)
    assert main(ctx.merge_args(out, "--overwrite")) == 0
    assert _snapshot(out).keys() == first.keys()
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # follows the umask, not mkdtemp's 0700
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging or set-aside leftovers


def test_ppo_overwrite_removes_only_the_runs_files(tmp_path, tiny_release, ppo_run, monkeypatch):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, ppo_run)
    run = ctx.copied_run()
    (run / "checkpoint-000009").mkdir()  # a later step of the old run: must not survive
    (run / "my-notes.md").write_text("precious")
    assert main(["-q", "ppo", "--config", str(ctx.ppo_yaml(steps=1)), "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [".radialog-rl.lock", "checkpoint-000001", "metrics.jsonl",
                                                     "my-notes.md"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_ppo_resume_previous_skips_a_damaged_latest_and_metrics_are_truncated(
        tmp_path, tiny_release, ppo_run, monkeypatch):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, ppo_run)
    run = ctx.copied_run()
    (run / "checkpoint-000002" / "optimizer.pt").write_bytes(b"")
    assert main(["-q", "ppo", "--config", str(ctx.ppo_yaml()), "--resume", "previous"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the old step-2 row was dropped at resume, the new one appended
    # The damaged checkpoint of step 2 was replaced by the resumed run's own.
    from radialog_rl.training.ppo.state import check_checkpoint

    assert check_checkpoint(run / "checkpoint-000002")["step"] == 2
