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


def sft_resume_latest_with_a_truncated_trainer_state(c: Ctx) -> list[str]:
    path = c.sft_yaml()
    for step, text in ((1, "{}"), (2, '{"global_step": 2, "log_hi')):
        (c.tmp / "sft-run" / f"checkpoint-{step}").mkdir(parents=True)
        (c.tmp / "sft-run" / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    return ["sft", "--config", str(path), "--resume", "latest"]


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


# -- bad images (items 6, 7) --------------------------------------------------------------------------


def _ppo_with_image(c: Ctx, image) -> list[str]:
    path = c.ppo_yaml()
    first = c.tmp / "data" / "images" / "xray_000.png"
    image.save(first)
    return ["ppo", "--config", str(path)]


def ppo_image_of_1_by_20000_pixels(c: Ctx) -> list[str]:
    from PIL import Image

    return _ppo_with_image(c, Image.new("L", (1, 20000)))


def ppo_image_of_one_pixel(c: Ctx) -> list[str]:
    from PIL import Image

    return _ppo_with_image(c, Image.new("L", (1, 1)))


def ppo_image_above_a_lowered_pixel_limit(c: Ctx) -> list[str]:
    c.monkeypatch.setenv("RADIALOG_MAX_IMAGE_PIXELS", "1000")
    return ["ppo", "--config", str(c.ppo_yaml())]


def ppo_image_that_is_not_an_image(c: Ctx) -> list[str]:
    path = c.ppo_yaml()
    (c.tmp / "data" / "images" / "xray_001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return ["ppo", "--config", str(path)]


# -- bad YAML values and data files (items 8, 9) --------------------------------------------------------


def _ppo_value(**values):
    def setup(c: Ctx) -> list[str]:
        return ["ppo", "--config", str(c.ppo_yaml(**values))]

    key = next(iter(values))
    setup.__name__ = f"ppo_{key}_{str(values[key]).replace(' ', '')}"
    return setup


def _sft_value(**values):
    def setup(c: Ctx) -> list[str]:
        trainer = {"output_dir": "sft-run", "max_steps": 1, "report_to": "none"}
        top = {k: v for k, v in values.items() if not k.startswith("trainer.")}
        trainer.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("trainer.")})
        return ["sft", "--config", str(c.sft_yaml(trainer=trainer, **top))]

    key = next(iter(values))
    setup.__name__ = f"sft_{key}_{values[key]}"
    return setup


def ppo_yaml_that_does_not_parse(c: Ctx) -> list[str]:
    path = c.tmp / "ppo.yaml"
    path.write_text("batch_size: [4\n")
    return ["ppo", "--config", str(path)]


def ppo_override_of_an_unknown_key(c: Ctx) -> list[str]:
    return ["ppo", "--config", str(c.ppo_yaml()), "lerning_rate=1e-4"]


def ppo_jsonl_with_a_latin1_line(c: Ctx) -> list[str]:
    path = c.ppo_yaml()
    data = c.tmp / "data" / "ppo_qa.jsonl"
    data.write_bytes(data.read_bytes() + '{"image": "images/xray_000.png", "prompt": "Pleuraerguss gr\xf6\xdfer?"}\n'
                     .encode("latin-1"))
    return ["ppo", "--config", str(path)]


def sft_jsonl_with_a_latin1_line(c: Ctx) -> list[str]:
    path = c.sft_yaml()
    data = c.tmp / "sft.jsonl"
    data.write_bytes(data.read_bytes() + '{"image": "x.png", "prompt": "gr\xf6\xdfer?", "target": "ja"}\n'
                     .encode("latin-1"))
    return ["sft", "--config", str(path)]


def ppo_label_maybe_is_found_before_the_model_loads(c: Ctx) -> list[str]:
    path = c.ppo_yaml()
    data = c.tmp / "data" / "ppo_qa.jsonl"
    lines = data.read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = "maybe"
    lines[2] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    c.monkeypatch.setattr("radialog_rl.training.ppo.trainer.build_ppo_model", no_model)
    return ["ppo", "--config", str(path)]


def _base_copy(c: Ctx) -> Path:
    base = c.tmp / "base"
    shutil.copytree(c.release.model_base, base)
    return base


def merge_with_a_zero_byte_bin_shard(c: Ctx) -> list[str]:
    base = _base_copy(c)
    (base / "pytorch_model-00002-of-00002.bin").write_bytes(b"")
    return ["merge", "--model-path", str(c.release.model_path), "--model-base", str(base), "--out",
            str(c.tmp / "out")]


def merge_with_a_truncated_safetensors_base(c: Ctx) -> list[str]:
    from safetensors.torch import save_file

    base = _base_copy(c)
    state = {}
    for shard in sorted(base.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
        shard.unlink()
    (base / "pytorch_model.bin.index.json").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, base / "model.safetensors")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["merge", "--model-path", str(c.release.model_path), "--model-base", str(base), "--out",
            str(c.tmp / "out")]


def merge_with_a_malicious_base_shard(c: Ctx) -> list[str]:
    base = _base_copy(c)
    torch.save({"payload": _RunsCode(c.marker)}, base / "pytorch_model-00002-of-00002.bin")
    return ["merge", "--model-path", str(c.release.model_path), "--model-base", str(base), "--out",
            str(c.tmp / "out")]


# -- rewards (items 8, 10) -----------------------------------------------------------------------------


def _reward_module(c: Ctx, body: str) -> str:
    name = f"user_reward_{abs(hash(str(c.tmp))) % 10**8}"  # a fresh module name per test
    (c.tmp / f"{name}.py").write_text(body)
    return f"{name}:reward"


def ppo_custom_reward_that_raises(c: Ctx) -> list[str]:
    spec = _reward_module(c, "def reward(samples, responses):\n    raise KeyError('no grade column')\n")
    return ["ppo", "--config", str(c.ppo_yaml(reward=spec))]


def ppo_custom_reward_that_returns_strings(c: Ctx) -> list[str]:
    spec = _reward_module(c, "def reward(samples, responses):\n    return ['high'] * len(responses)\n")
    return ["ppo", "--config", str(c.ppo_yaml(reward=spec))]


def ppo_custom_reward_that_returns_nan(c: Ctx) -> list[str]:
    spec = _reward_module(c, "def reward(samples, responses):\n    return [float('nan')] * len(responses)\n")
    return ["ppo", "--config", str(c.ppo_yaml(reward=spec))]


def ppo_custom_reward_module_that_does_not_exist(c: Ctx) -> list[str]:
    return ["ppo", "--config", str(c.ppo_yaml(reward="no_such_module_here:fn"))]


# -- evaluate and generate (items 11, 12) ---------------------------------------------------------------


def evaluate_csv_with_a_short_row(c: Ctx) -> list[str]:
    path = c.tmp / "preds.csv"
    path.write_text("confidence,accuracy\n7,1\n3\n9,0\n")
    return ["evaluate", str(path)]


def evaluate_plot_with_an_unknown_extension(c: Ctx) -> list[str]:
    path = c.tmp / "preds.csv"
    path.write_text("confidence,accuracy\n7,1\n3,0\n")
    return ["evaluate", str(path), "--plot", str(c.tmp / "diagram.bmpx")]


def _generate_args(c: Ctx, folder: Path, *extra: str) -> list[str]:
    return ["generate", "--model-path", str(c.release.model_path), "--model-base", str(c.release.model_base),
            "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "2", "--image", str(folder), *extra]


def _images_with_one_bad(c: Ctx) -> Path:
    from radialog_rl.testing.data import write_synthetic_images

    folder = c.tmp / "scans"
    write_synthetic_images(folder, 3, size=64)
    data = (folder / "xray_001.png").read_bytes()
    (folder / "xray_001.png").write_bytes(data[: len(data) // 2])  # header fine, pixels truncated
    return folder


def generate_folder_with_a_truncated_image(c: Ctx) -> list[str]:
    return _generate_args(c, _images_with_one_bad(c), "--batch-size", "1", "--output", str(c.tmp / "out.jsonl"))


def generate_skip_bad_still_exits_1_naming_the_image(c: Ctx) -> list[str]:
    return _generate_args(c, _images_with_one_bad(c), "--skip-bad", "--output", str(c.tmp / "out.jsonl"))


def generate_folder_with_an_absurd_image_header(c: Ctx) -> list[str]:
    from PIL import Image

    folder = c.tmp / "scans"
    folder.mkdir()
    Image.new("L", (1, 20000)).save(folder / "strip.png")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the image headers were checked")

    c.monkeypatch.setattr("radialog_rl.loading.release.load_baseline_llava_model_with_vision_modules", no_model)
    return _generate_args(c, folder)


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
    Case(sft_resume_latest_with_a_truncated_trainer_state, ("checkpoint-2 is damaged", "trainer_state.json",
                                                            "--resume previous")),
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
    # items 6, 7: image sizes from the header, before decoding
    Case(ppo_image_of_1_by_20000_pixels, ("ppo_qa.jsonl line 1", "xray_000.png", "1 x 20000", "aspect ratio",
                                          "RADIALOG_MAX_IMAGE_ASPECT")),
    Case(ppo_image_of_one_pixel, ("ppo_qa.jsonl line 1", "1 x 1 px", "RADIALOG_MIN_IMAGE_SIDE")),
    Case(ppo_image_above_a_lowered_pixel_limit, ("160 x 160 px", "limit of 1000 pixels")),
    Case(ppo_image_that_is_not_an_image, ("ppo_qa.jsonl line 2", "xray_001.png", "cannot read")),
    # item 8: bad values name the key and the file
    Case(_ppo_value(batch_size="four"), ("ppo.yaml: batch_size", "valid integer", "'four'")),
    Case(_ppo_value(mini_batch_size=0), ("ppo.yaml: mini_batch_size", "greater than or equal to 1")),
    Case(_ppo_value(steps="ten"), ("ppo.yaml: steps", "'ten'")),
    Case(_ppo_value(learning_rate="fast"), ("ppo.yaml: learning_rate", "valid number", "'fast'")),
    Case(_ppo_value(learning_rate=-1), ("ppo.yaml: learning_rate", "greater than 0")),
    Case(_ppo_value(reward_params=[1, 2]), ("ppo.yaml: reward_params", "dictionary")),
    Case(_ppo_value(batch_size=4.5), ("ppo.yaml: batch_size", "fractional part")),
    Case(_ppo_value(batch_size=3, mini_batch_size=2), ("must be a multiple of mini_batch_size (2)",)),
    Case(_ppo_value(kl_estimator="k9"), ("ppo.yaml: kl_estimator must be one of", "'k3'", "'k9'")),
    Case(_sft_value(**{"trainer.per_device_train_batch_size": "two"}),
         ("sft.yaml: trainer.per_device_train_batch_size", "'two'")),
    Case(_sft_value(**{"trainer.per_device_train_batch_size": -2}),
         ("sft.yaml: trainer.per_device_train_batch_size", "greater than or equal to 1")),
    Case(_sft_value(**{"trainer.per_device_train_batch_size": 0}), ("trainer.per_device_train_batch_size",)),
    Case(_sft_value(**{"trainer.learning_rate": "fast"}), ("sft.yaml: trainer.learning_rate", "'fast'")),
    Case(_sft_value(**{"trainer.gradient_accumulation_steps": 0}), ("trainer.gradient_accumulation_steps",)),
    Case(_sft_value(merge="yes_please"), ("sft.yaml: merge", "valid boolean", "'yes_please'")),
    Case(_sft_value(label_policy="everything"), ("sft.yaml: label_policy must be one of",)),
    Case(ppo_yaml_that_does_not_parse, ("ppo.yaml is not valid YAML",)),
    Case(ppo_override_of_an_unknown_key, ("unknown PPO config key(s): 'lerning_rate' (did you mean "
                                          "'learning_rate'?)",)),
    Case(ppo_jsonl_with_a_latin1_line, ("ppo_qa.jsonl", "line 5", "not UTF-8")),
    Case(sft_jsonl_with_a_latin1_line, ("sft.jsonl", "line 3", "not UTF-8")),
    Case(merge_with_a_zero_byte_bin_shard, ("pytorch_model-00002-of-00002.bin is empty or truncated",
                                            "download it again")),
    Case(merge_with_a_truncated_safetensors_base, ("model.safetensors is empty or truncated",)),
    Case(merge_with_a_malicious_base_shard, ("not a plain tensor file",)),
    # item 9: every row checked before the model load, named by file line
    Case(ppo_label_maybe_is_found_before_the_model_loads, ("ppo_qa.jsonl line 3", "'answer' must be yes/no",
                                                           "'maybe'")),
    # items 8, 10: user rewards
    Case(ppo_custom_reward_that_raises, ("reward user_reward_", "failed on the samples", "ppo_qa.jsonl line",
                                         "KeyError", "no grade column")),
    Case(ppo_custom_reward_that_returns_strings, ("failed on the samples ppo_qa.jsonl line", "'high'")),
    Case(ppo_custom_reward_that_returns_nan, ("non-finite scores", "ppo_qa.jsonl line")),
    Case(ppo_custom_reward_module_that_does_not_exist, ("cannot import module 'no_such_module_here'",)),
    # item 11: evaluate
    Case(evaluate_csv_with_a_short_row, ("preds.csv", "line 3", "fewer cells than header columns")),
    Case(evaluate_plot_with_an_unknown_extension, ("--plot", "diagram.bmpx", ".png, .jpg")),
    # item 12: generate
    Case(generate_folder_with_a_truncated_image, ("xray_001.png",)),
    Case(generate_skip_bad_still_exits_1_naming_the_image, ("1 image(s) skipped, 2 written", "xray_001.png")),
    Case(generate_folder_with_an_absurd_image_header, ("1 of 1 image(s) cannot be used", "aspect ratio",
                                                       "--skip-bad")),
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
    assert sorted(p.name for p in run.iterdir()) == [".radialog-rl.lock", "checkpoint-000001", "final",
                                                     "metrics.jsonl", "my-notes.md"]
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


def test_a_reward_module_beside_the_config_is_importable(tmp_path, tiny_release, ppo_run, monkeypatch):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, ppo_run)
    spec = _reward_module(ctx, "def reward(samples, responses):\n    return [1.0] * len(responses)\n")
    path = ctx.ppo_yaml(reward=spec, steps=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the working directory nor sys.path holds the module
    assert main(["-q", "ppo", "--config", str(path)]) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["env/score_mean"] == 1.0


def test_kill_9_during_a_checkpoint_write_then_resume_latest_reproduces_the_run(tmp_path, tiny_release):
    import subprocess
    import sys

    keys = ("ppo/loss/policy", "ppo/loss/value", "env/score_mean", "objective/kl")
    straight = _ppo_yaml(tmp_path / "a", tiny_release, steps=3)
    assert main(["-q", "ppo", "--config", str(straight)]) == 0
    killed = _ppo_yaml(tmp_path / "b", tiny_release, steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_during_checkpoint.py"), "2",
                             "-q", "ppo", "--config", str(killed)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    run = tmp_path / "b" / "run"
    assert (run / ".tmp-checkpoint-000002").is_dir() and not (run / "checkpoint-000002").exists()
    # The dead run's lock is released by the kernel; the half-written checkpoint is never resumed.
    assert main(["-q", "ppo", "--config", str(killed), "--resume", "latest"]) == 0
    assert not (run / ".tmp-checkpoint-000002").exists()

    def rows(folder):
        return [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]

    expected, got = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in got] == [1, 2, 3]  # step 2's row from the killed run was dropped
    for a, b in zip(expected, got):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_generate_keeps_what_was_written_before_a_bad_image(tmp_path, tiny_release, monkeypatch):
    ctx = Ctx(tmp_path, tiny_release, monkeypatch, tmp_path)
    assert main(["-q", *generate_folder_with_a_truncated_image(ctx)]) == 1
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["xray_000.png"]  # the batch before the bad one
    assert main(["-q", *generate_skip_bad_still_exits_1_naming_the_image(ctx)]) == 1
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["xray_000.png", "xray_002.png"]


def test_evaluate_reads_bom_csv_green_score_and_writes_plots_in_their_format(tmp_path, capsys, caplog):
    rows = [(7, 1), (3, 0), (9, 1), (2, 0), (8, 1), (5, 0)]
    plain = tmp_path / "plain.csv"
    plain.write_text("confidence,accuracy\n" + "".join(f"{c},{a}\n" for c, a in rows))
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffconfidence,green_score\n".encode() + "".join(f"{c},{a}\n" for c, a in rows).encode())
    assert main(["evaluate", str(plain), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    jpg, pdf = tmp_path / "diagram.jpg", tmp_path / "hist.pdf"
    assert main(["evaluate", str(bom), "--json", "--plot", str(jpg), "--hist", str(pdf)]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert jpg.read_bytes()[:2] == b"\xff\xd8" and pdf.read_bytes()[:4] == b"%PDF"
    with caplog.at_level("WARNING"):
        assert main(["evaluate", str(plain), "--scale", "100"]) == 0
    assert "pass --scale 10" in caplog.text


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_resize(tmp_path):
    """Issue 11 item 6: JPEG draft mode; the decoded image still has a shorter side >= the resize."""
    import numpy as np
    from PIL import Image

    from radialog_rl.data.images import read_image_array

    pixels = (np.random.default_rng(0).random((1200, 1600)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    assert read_image_array(tmp_path / "big.jpg").shape == (1200, 1600)
    assert read_image_array(tmp_path / "big.jpg", draft_shorter_side=256).shape == (300, 400)  # 1/4 scale
    assert read_image_array(tmp_path / "big.jpg", draft_shorter_side=700).shape == (1200, 1600)  # 1/2 < 700
