"""Two-CPU-process runs of ``radialog-rl ppo`` / ``sft`` under DDP, DeepSpeed ZeRO-2/3 and FSDP2.

Each configuration is launched once per module (``accelerate launch --config_file
configs/accelerate/cpu_test_*.yaml tests/distributed/observed_cli.py ...``, gloo,
``OMP_NUM_THREADS=1``) and shared by the assertions. DeepSpeed compiles its ``deepspeed_shm_comm``
op on first use (about 95 s) into ``$TORCH_EXTENSIONS_DIR``, by default ``.cache/torch_extensions``
in the checkout (git-ignored), so later runs reuse it.

FSDP2 runs go through ``fsdp_on_cpu.py`` (a test-only launcher: accelerate enables FSDP only on
GPU-like devices). Without DeepSpeed the ZeRO tests skip; with ``RADIALOG_REQUIRE_DEEPSPEED=1``
(set by .ci/run) they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
#: accelerate configs per engine (the CPU-test variants shipped in configs/accelerate).
ENGINES = {
    "ddp": REPO / "configs" / "accelerate" / "cpu_test_ddp.yaml",
    "zero2": REPO / "configs" / "accelerate" / "cpu_test_deepspeed_zero2.yaml",
    "zero3": REPO / "configs" / "accelerate" / "cpu_test_deepspeed_zero3.yaml",
    "fsdp2": REPO / "configs" / "accelerate" / "cpu_test_fsdp2.yaml",
}
#: What each engine's processes run: the CLI plus observation; FSDP2 through the test-only launcher
#: that lets accelerate build FSDP on CPU (fsdp_on_cpu.py).
SCRIPTS = {"fsdp2": HERE / "fsdp_on_cpu.py"}
STEPS = 3

REWARD = '''
def length_reward(samples, responses):
    """Longer decoded responses score higher: a reward that varies, so the policy term trains."""
    return [len(r) / 10.0 for r in responses]
'''


@dataclass
class Run:
    """One finished launch: its output directory and what each rank observed (observed_cli.py)."""

    output_dir: Path
    observed: Path
    log: str

    def info(self, rank: int) -> dict:
        return json.loads((self.observed / f"rank{rank}.json").read_text())

    def weights(self, rank: int = 0) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.observed / f"rank{rank}.safetensors"))


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        if os.environ.get("RADIALOG_REQUIRE_DEEPSPEED"):  # CI: these tests must run
            pytest.fail(f"deepspeed is required here but not importable: {exc}")
        pytest.skip(f"deepspeed is not installed ({exc}); pip install -e '.[deepspeed]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, command: list[str], workdir: Path) -> Run:
    """``accelerate launch`` 2 CPU processes of ``radialog-rl <command>``; fails the test on error."""
    observed = workdir / "observed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RADIALOG_OBSERVE_DIR": str(observed), "PYTHONPATH": os.pathsep.join(
               [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(REPO / ".cache" / "torch_extensions"))}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ENGINES[engine]),
           "--main_process_port", str(_free_port()), str(SCRIPTS.get(engine, HERE / "observed_cli.py")), *command]
    # From the repository root: the accelerate configs name their DeepSpeed JSON relative to it.
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    (workdir / "launch.log").write_text(log)
    assert result.returncode == 0, f"{engine} {' '.join(command)} failed:\n{log[-6000:]}"
    return Run(output_dir=workdir, observed=observed, log=log)


class Runs:
    """Launches each (kind, engine, phase) at most once per module, on first use."""

    def __init__(self, root: Path, configs: dict):
        self.root, self.configs, self._done = root, configs, {}

    def get(self, kind: str, engine: str, phase: str = "straight") -> Run:
        key = (kind, engine, phase)
        if key not in self._done:
            if engine.startswith("zero"):
                _require_deepspeed()
            self._done[key] = self._launch(kind, engine, phase)
        return self._done[key]

    def _launch(self, kind: str, engine: str, phase: str) -> Run:
        workdir = self.root / f"{kind}-{engine}-{phase}"
        out = workdir / "out"
        command = [kind, "--config", str(self.configs[kind]), "--output-dir", str(out)]
        if phase == "resumed":  # from the first checkpoint of the straight run, to the same end
            straight = self.get(kind, engine).output_dir / "out"
            first = "checkpoint-000001" if kind == "ppo" else "checkpoint-1"
            out.mkdir(parents=True)
            shutil.copytree(straight / first, out / first)
            command += ["--resume", "latest"]
        return launch(engine, command, workdir)


@pytest.fixture(scope="module")
def runs(tiny_release, tmp_path_factory) -> Runs:
    from radialog_rl.data.images import make_synthetic_chest_xray
    from radialog_rl.testing.data import make_binary_qa_jsonl

    root = tmp_path_factory.mktemp("distributed")
    (root / "length_reward.py").write_text(REWARD)
    common = dict(model_path=str(tiny_release.model_path), model_base=str(tiny_release.model_base),
                  dtype="fp32", device="cpu")
    ppo = dict(common, entry_point="radialog_lora", train_file=str(make_binary_qa_jsonl(root / "ppo-data", n=8)),
               reward="length_reward:length_reward", batch_size=4, mini_batch_size=1,
               gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=4, steps=STEPS, save_every=1,
               learning_rate=1e-3, tensorboard=False, output_dir="unused")
    rows = []
    data = root / "sft-data"
    data.mkdir()
    for seed, (finding, answer) in enumerate([("effusion", "Yes"), ("edema", "No"), ("pneumothorax", "No"),
                                              ("cardiomegaly", "Yes")]):
        make_synthetic_chest_xray(seed, size=146).save(data / f"cxr_{seed}.png")
        rows.append(json.dumps({"image": f"cxr_{seed}.png", "prompt": f"Is there {finding}?",
                                "target": f'{answer} {{"confidence": {3 + 2 * seed}}}'}))
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    sft = dict(common, entry_point="fresh_lora", lora_r=8, lora_alpha=16, lora_dropout=0.0,
               train_file=str(data / "train.jsonl"), label_policy="assistant", merge=False,
               trainer=dict(output_dir="unused", max_steps=STEPS, per_device_train_batch_size=1,
                            gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="constant",
                            warmup_steps=0, logging_steps=1, save_steps=1, seed=0, report_to="none"))
    configs = {}
    for kind, values in (("ppo", ppo), ("sft", sft)):
        configs[kind] = root / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(values))
    return Runs(root, configs)
