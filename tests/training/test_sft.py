"""SFT with transformers.Trainer on the tiny release: the loss goes down, QLoRA gradients are exact,
resuming reproduces the uninterrupted losses, two processes train, bad rows are named, the CLI and
the projector / merge outputs work, and the YAML config is strict.

Everything runs in fp32 on the CPU with short prompts (a few hundred milliseconds per step).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from radialog_rl.errors import ConfigError, DataError
from radialog_rl.training.sft import (
    NON_LORA_TRAINABLES_FILE,
    SFTConfig,
    build_datasets,
    build_sft_model,
    load_sft_config,
    run_sft,
)

ROWS = (("edema", "yes", 7), ("cardiomegaly", "no", 3), ("effusion", "yes", 9), ("pneumothorax", "no", 8))
QUIET = dict(report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two OpenMP threads
    that wait on each other while another process holds a core made steps 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """``train.jsonl`` with four short yes/no rows and their synthetic 146 px PNGs."""
    from radialog_rl.data.images import make_synthetic_chest_xray

    root = tmp_path_factory.mktemp("sft-data")
    lines = []
    for seed, (finding, answer, confidence) in enumerate(ROWS):
        make_synthetic_chest_xray(seed, size=146).save(root / f"cxr_{seed}.png")
        lines.append(json.dumps({"image": f"cxr_{seed}.png", "prompt": f"Is there {finding}?",
                                 "target": f'{answer} {{"confidence": {confidence}}}'}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def make_config(release, train_file, output_dir, *, trainer=None, **fields) -> SFTConfig:
    values = dict(entry_point="radialog_lora", model_path=str(release.model_path),
                  model_base=str(release.model_base), dtype="fp32", device="cpu", train_file=str(train_file))
    values.update(fields)
    return SFTConfig(**values, trainer={"output_dir": str(output_dir), **QUIET, **(trainer or {})})


def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


class ModeProbe(TrainerCallback):
    """Records (model.training, tower.training) per step and the tower's BatchNorm statistics."""

    def __init__(self):
        self.modes, self.before, self.after = [], {}, {}

    @staticmethod
    def _tower(model):
        return model.get_base_model().model.vision_tower

    def _statistics(self, model):
        return {k: v.clone() for k, v in self._tower(model).state_dict().items() if "running" in k}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = self._statistics(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append((model.training, self._tower(model).training))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self._statistics(model)


def test_loss_decreases_on_a_tiny_overfit_set(tiny_release, sft_data, tmp_path):
    config = make_config(
        tiny_release, sft_data, tmp_path / "run", entry_point="fresh_lora", lora_r=8, lora_alpha=16,
        lora_dropout=0.0, trainer=dict(max_steps=20, per_device_train_batch_size=2, learning_rate=3e-3,
                                       lr_scheduler_type="constant", warmup_steps=0),
    )
    probe = ModeProbe()
    adapter = run_sft(config, callbacks=[probe])
    # Train mode (LoRA dropout) for the LLM at every step, eval mode for the frozen tower, and its
    # BatchNorm running statistics untouched.
    assert probe.modes == [(True, False)] * 20
    for key, value in probe.before.items():
        assert torch.equal(probe.after[key], value), key
    loss = losses(tmp_path / "run")
    assert sorted(loss) == list(range(1, 21))
    first, last = sum(loss[s] for s in (1, 2)) / 2, sum(loss[s] for s in (19, 20)) / 2
    assert last < 0.5 * first, loss
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16


def test_qlora_gradients_match_a_dequantized_fp32_reference(tiny_release, sft_data, tmp_path):
    """4-bit base + RaDialog's LoRA vs the same LoRA on an fp32 base holding the dequantized weights."""
    import bitsandbytes as bnb

    from radialog_rl.data.datasets import SFTCollator

    q_bundle = build_sft_model(make_config(tiny_release, sft_data, tmp_path, precision="4bit"))
    q_model = q_bundle.model
    dequantized = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in q_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    assert len(dequantized) == 2 * 7
    ref_model = build_sft_model(make_config(tiny_release, sft_data, tmp_path, precision="16bit")).model
    with torch.no_grad():
        for name, weight in dequantized.items():
            ref_model.get_submodule(name).weight.copy_(weight)

    dataset, _ = build_datasets(make_config(tiny_release, sft_data, tmp_path), q_bundle.tokenizer,
                                q_bundle.llava.config)
    batch = SFTCollator(q_bundle.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    with torch.no_grad():  # the eval forward that used to repack 4-bit weights in place on CPU
        q_model.eval()(**batch)
    grads = []
    for model in (q_model, ref_model):
        model.train()  # LoRA dropout on: same seed -> same masks in both models
        torch.manual_seed(0)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_resume_continues_with_identical_losses(tiny_release, sft_data, tmp_path):
    """6 steps straight vs 3 steps + resume to 6: same losses (dropout on, data order across epochs)."""
    trainer = dict(per_device_train_batch_size=2, learning_rate=2e-3, lr_scheduler_type="constant",
                   warmup_steps=0, save_strategy="steps", save_steps=3)
    fresh = dict(entry_point="fresh_lora", lora_r=8, lora_alpha=16, lora_dropout=0.2)
    straight = make_config(tiny_release, sft_data, tmp_path / "a", trainer={**trainer, "max_steps": 6}, **fresh)
    run_sft(straight)
    first = make_config(tiny_release, sft_data, tmp_path / "b", trainer={**trainer, "max_steps": 3}, **fresh)
    run_sft(first)
    assert (tmp_path / "b" / "checkpoint-3").is_dir()
    resumed = make_config(tiny_release, sft_data, tmp_path / "b", trainer={**trainer, "max_steps": 6}, **fresh)
    run_sft(resumed, resume_from_checkpoint="latest")
    expected, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)
    assert expected[6] != pytest.approx(expected[3])  # the steps trained something


def test_gradient_accumulation_weights_tokens_like_one_large_batch(tiny_release, sft_data, tmp_path):
    """Batch 2 vs batch 1 x 2 accumulation steps: the same update (SGD, so its size shows) although
    the rows supervise different numbers of tokens (the Trainer passes num_items_in_batch through)."""
    from safetensors.torch import load_file

    fresh = dict(entry_point="fresh_lora", lora_r=8, lora_alpha=16, lora_dropout=0.0)
    common = dict(max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0)
    adapters = []
    for name, batch, accumulation in (("big", 2, 1), ("accumulated", 1, 2)):
        config = make_config(tiny_release, sft_data, tmp_path / name, **fresh, trainer=dict(
            common, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation))
        adapters.append(load_file(run_sft(config) / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    moved = 0
    for key, value in adapters[0].items():
        torch.testing.assert_close(value, adapters[1][key], rtol=1e-4, atol=1e-6, msg=key)
        moved += int(value.abs().sum() > 0 and "lora_B" in key)
    assert moved > 0  # B starts at zero: the step changed it


def _write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_end_to_end_with_max_steps(tiny_release, sft_data, tmp_path, capsys):
    from radialog_rl.cli import main
    from radialog_rl.loading.adapters import attach_lora
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    # Relative paths resolve against the YAML's folder: put the YAML next to the data.
    config = {
        "entry_point": "radialog_lora", "model_path": str(tiny_release.model_path),
        "model_base": str(tiny_release.model_base), "dtype": "fp32", "device": "cpu",
        "train_file": sft_data.name, "eval_file": sft_data.name,
        "trainer": {"output_dir": "unused", "per_device_train_batch_size": 2, "learning_rate": "1e-3",
                    "disable_tqdm": True, "logging_steps": 1, "eval_steps": 2},
    }
    yaml_path = _write_yaml(sft_data.parent / "cli.yaml", config)
    out = tmp_path / "cli-run"
    code = main(["sft", "--config", str(yaml_path), "--max-steps", "2", "--output-dir", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    adapter = Path(result["adapter"])
    assert adapter == out / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (adapter / NON_LORA_TRAINABLES_FILE).exists()
    assert (out / "checkpoint-2").is_dir() and (out / "sft_config.json").is_file()
    assert sorted(losses(out)) == [1, 2]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in entry for entry in history)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:  # report_to defaults to tensorboard when it is installed
        assert list((out / "runs").rglob("events.out.tfevents.*"))
    saved_config = json.loads((out / "sft_config.json").read_text())
    assert saved_config["trainer"]["learning_rate"] == 1e-3  # "1e-3" from YAML became a number
    # The saved adapter loads back with strict key accounting.
    model = load_baseline_llava_model_with_vision_modules(tiny_release.model_path, tiny_release.model_base,
                                                          device="cpu", dtype=torch.float32)
    attach_lora(model, adapter, trainable=False)


def test_bad_rows_are_named_through_run_sft_and_the_cli(tiny_release, sft_data, tmp_path, capsys):
    from radialog_rl.cli import main

    good = {"image": str(sft_data.parent / "cxr_0.png"), "prompt": "Is there edema?", "target": "yes"}
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join([
        json.dumps(good),
        json.dumps({"image": str(sft_data.parent / "cxr_0.png"), "prompt": "Is there edema?"}),
        json.dumps({"image": "missing.png", "prompt": "Is there edema?", "target": "yes"}),
    ]) + "\n")
    config = make_config(tiny_release, bad_file, tmp_path / "run")
    with pytest.raises(DataError, match=r"bad\.jsonl: 2 bad row\(s\): line 2: missing or empty 'target'.*"
                                        r"line 3: image file not found"):
        run_sft(config)
    yaml_path = _write_yaml(tmp_path / "bad.yaml", {**config.to_dict(), "trainer": {"output_dir": "run"}})
    assert main(["sft", "--config", str(yaml_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("radialog-rl sft: error: ") and "line 2: missing or empty 'target'" in err[-1]
    assert not (tmp_path / "run").exists()  # failed before training started


def test_train_projector_saves_it_in_checkpoints_and_adapter_and_merges_it(tiny_release, sft_data, tmp_path):
    from safetensors.torch import load_file

    config = make_config(tiny_release, sft_data, tmp_path / "run", train_projector=True, merge=True,
                         merge_dtype="fp32",
                         trainer=dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                                      save_strategy="steps", save_steps=2))
    adapter = run_sft(config)
    expected_keys = {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    trained = load_file(adapter / NON_LORA_TRAINABLES_FILE)
    assert set(trained) == expected_keys
    assert set(load_file(tmp_path / "run" / "checkpoint-2" / NON_LORA_TRAINABLES_FILE)) == expected_keys
    released = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    for key, value in trained.items():
        assert value.dtype == torch.float32
        assert not torch.allclose(value, released[key].float()), f"{key} did not train"
    merged = load_file(tmp_path / "run" / "merged" / "non_lora_trainables.safetensors")
    for key, value in trained.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0)


def test_train_vision_tower_trains_weights_and_batchnorm_statistics_and_merges_them(tiny_release, sft_data,
                                                                                    tmp_path):
    from safetensors.torch import load_file

    config = make_config(tiny_release, sft_data, tmp_path / "run", train_vision_tower=True, merge=True,
                         merge_dtype="fp32", trainer=dict(max_steps=2, per_device_train_batch_size=2,
                                                          learning_rate=1e-2))
    adapter = run_sft(config)
    trained = load_file(adapter / NON_LORA_TRAINABLES_FILE)
    released = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    tower = {k: v for k, v in trained.items() if k.startswith("base_model.model.model.vision_tower.")}
    assert tower and any(k.startswith("base_model.model.model.mm_projector.") for k in trained)
    weight = "base_model.model.model.vision_tower.encoder.encoder.conv1.weight"
    stats = "base_model.model.model.vision_tower.encoder.encoder.bn1.running_mean"
    assert not torch.allclose(trained[weight], released[weight].float()), "the tower's weights did not train"
    assert not torch.allclose(trained[stats], released[stats].float()), "BatchNorm statistics were not updated"
    # The merged directory carries the trained tower; the baseline loader reads it back whole.
    from radialog_rl import load_baseline_llava_model_with_vision_modules

    merged = load_baseline_llava_model_with_vision_modules(tmp_path / "run" / "merged", tmp_path / "run" / "merged",
                                                           device="cpu", dtype=torch.float32)
    torch.testing.assert_close(merged.model.vision_tower.state_dict()["encoder.encoder.bn1.running_mean"],
                               trained[stats], rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_completes(tiny_release, sft_data, tmp_path):
    """torchrun with two gloo processes on the CPU: DDP trains and rank 0 writes the adapter."""
    out = tmp_path / "ddp"
    config = make_config(tiny_release, sft_data, out, trainer=dict(per_device_train_batch_size=1,
                                                                   save_strategy="steps", save_steps=2))
    yaml_path = _write_yaml(tmp_path / "ddp.yaml", config.to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: no oversubscription
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "radialog_rl", "-q", "sft", "--config", str(yaml_path), "--max-steps", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith('{"adapter"')]
    assert len(results) == 1  # printed by rank 0 only
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert sorted(losses(out)) == [1, 2]


# -- configuration -----------------------------------------------------------------------------------


def test_config_unknown_keys_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown SFT config key\(s\): 'train_fille' \(did you mean 'train_file'\?\)"):
        SFTConfig.from_dict({"train_fille": "x.jsonl"})
    with pytest.raises(ConfigError, match=r"'learnin_rate' \(did you mean 'learning_rate'\?\) is not a "
                                          r"transformers.TrainingArguments field"):
        SFTConfig(trainer={"learnin_rate": 1e-3})
    with pytest.raises(ConfigError, match="remove_unused_columns"):
        SFTConfig(trainer={"remove_unused_columns": True})
    with pytest.raises(ConfigError, match="top-level 'gradient_checkpointing'"):
        SFTConfig(trainer={"gradient_checkpointing": True})
    with pytest.raises(ConfigError, match="entry_point must be one of"):
        SFTConfig(entry_point="lora")
    with pytest.raises(ConfigError, match="label_policy"):
        SFTConfig(label_policy="everything")
    with pytest.raises(ConfigError, match="new adapter"):
        SFTConfig(entry_point="radialog_lora", lora_r=8)
    yaml_path = tmp_path / "broken.yaml"
    yaml_path.write_text("entry_point: [radialog_lora\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sft_config(yaml_path)
    with pytest.raises(ConfigError, match="not found"):
        load_sft_config(tmp_path / "missing.yaml")


def test_config_paths_resolve_against_the_yaml_folder_and_hub_ids_stay(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "models" / "radialog").mkdir(parents=True)
    yaml_path = _write_yaml(folder / "sft.yaml", {
        "model_path": "models/radialog", "model_base": "liuhaotian/llava-v1.5-7b",
        "train_file": "data/train.jsonl", "trainer": {"output_dir": "../runs/x", "learning_rate": "2e-4"},
    })
    monkeypatch.chdir(tmp_path)
    config = load_sft_config(yaml_path, trainer={"max_steps": 3})
    assert config.model_path == str((folder / "models" / "radialog").resolve())
    assert config.model_base == "liuhaotian/llava-v1.5-7b"
    assert config.train_file == str((folder / "data" / "train.jsonl").resolve())
    assert config.trainer == {"output_dir": str((tmp_path / "runs" / "x").resolve()), "learning_rate": 2e-4,
                              "max_steps": 3}


def test_training_arguments_defaults(tmp_path):
    from radialog_rl.training.sft import build_training_arguments

    args = build_training_arguments(SFTConfig(device="cpu", eval_file="eval.jsonl",
                                              trainer={"output_dir": str(tmp_path), "save_steps": 7}))
    assert args.remove_unused_columns is False and args.prediction_loss_only is True
    assert args.ddp_find_unused_parameters is False and args.use_cpu is True
    assert args.eval_strategy == "steps" and args.eval_steps == 7
    with pytest.raises(ConfigError, match="output_dir is required"):
        build_training_arguments(SFTConfig())
    with pytest.raises(ConfigError, match="no eval_file"):
        build_training_arguments(SFTConfig(trainer={"output_dir": str(tmp_path), "eval_strategy": "steps"}))


def test_example_configs_parse():
    configs = Path(__file__).resolve().parents[2] / "configs"
    tiny = load_sft_config(configs / "sft_tiny.yaml")
    assert Path(tiny.train_file).is_file() and tiny.trainer["output_dir"].endswith("runs/sft-tiny")
    from radialog_rl.data.datasets import load_sft_jsonl

    assert len(load_sft_jsonl(tiny.train_file)) >= 4
    real = load_sft_config(configs / "sft_radialog.yaml")
    assert real.precision == "4bit" and real.entry_point == "radialog_lora" and real.merge


def test_demo_section_prints_a_falling_loss_table(tiny_release, tmp_path):
    import shutil
    from types import SimpleNamespace

    from radialog_rl.testing.tiny import TinyRelease
    from radialog_rl.demo.sft import DEMO_STEPS, sft_demo_section

    # The section writes under the release root: give it a private copy of the release.
    root = tmp_path / "release"
    shutil.copytree(tiny_release.root, root)
    release = TinyRelease(root, root / tiny_release.model_base.name, root / tiny_release.model_path.name,
                          root / tiny_release.biovil_path.name)
    tables = []
    ctx = SimpleNamespace(release=release, device="cpu", dtype="fp32", extras={},
                          table=lambda title, headers, rows, note=None: tables.append((headers, rows)))
    sft_demo_section(ctx)
    (headers, rows), = tables
    assert headers == ["step", "loss"] and [r[0] for r in rows] == list(range(1, DEMO_STEPS + 1))
    assert rows[-1][1] < rows[0][1] - 1.0
    assert (Path(ctx.extras["sft_adapter"]) / "adapter_model.safetensors").is_file()
