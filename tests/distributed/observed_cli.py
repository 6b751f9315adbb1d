"""``radialog-rl`` exactly as ``accelerate launch -m radialog_rl ...`` runs it, plus what the tests look at.

Launched by tests/distributed/test_engines.py as ``accelerate launch --config_file ...
tests/distributed/observed_cli.py {ppo,sft} --config ...``. Training goes through the CLI unchanged;
when it ends, every process writes to ``$RADIALOG_OBSERVE_DIR``:

* ``rank<r>.json``: the accelerator's distributed type, ZeRO stage (FSDP version under FSDP) and
  number of processes;
* ``rank<r>.safetensors``: the full trainable weights this process holds (gathered from the ZeRO-3
  or FSDP2 shards: a collective every process enters), under the adapter file's key names.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _adapter_key(name: str) -> str:
    """``pretrained_model.base_model.model.X.lora_A.default.weight`` -> the PEFT file's
    ``base_model.model.X.lora_A.weight`` (the value head keeps ``v_head.*``)."""
    return name.removeprefix("pretrained_model.").replace(".default.", ".")


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 parameters are DTensors sharded over the processes (all-gathered)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def observe(accelerator, model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    from radialog_rl.training.engines import gathered, zero_stage

    out = Path(os.environ["RADIALOG_OBSERVE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered(accelerator, [p for _, p in named]):
        weights = {_adapter_key(n): _full(p.detach()).float().cpu().clone() for n, p in named}
    rank = accelerator.process_index
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    info = {"distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "zero_stage": zero_stage(accelerator), "num_processes": accelerator.num_processes}
    if info["distributed_type"] == "FSDP":
        info["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()


def _observe_ppo() -> None:
    from radialog_rl.training.ppo import trainer as ppo

    train = ppo.PPOTrainer.train

    def train_and_observe(self, steps=None):
        history = train(self, steps)
        observe(self.accelerator, self.unwrapped)
        return history

    ppo.PPOTrainer.train = train_and_observe


def _observe_sft() -> None:
    from transformers import TrainerCallback

    from radialog_rl.training.sft import trainer as sft  # where run_sft looks the function up

    route = sft._route_logs_to_logging

    class Observer(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_end(self, args, state, control, **kwargs):
            observe(self.trainer.accelerator, self.trainer.model)

    def route_and_observe(trainer):
        route(trainer)
        trainer.add_callback(Observer(trainer))

    sft._route_logs_to_logging = route_and_observe


if __name__ == "__main__":
    from radialog_rl.cli import main

    _observe_ppo() if sys.argv[1] == "ppo" else _observe_sft()
    sys.exit(main(sys.argv[1:]))
