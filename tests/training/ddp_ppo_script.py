"""Run by tests/training/test_ppo_trainer.py under torchrun: two PPO steps on the tiny release, then
each rank writes a digest of its trainable parameters."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from radialog_rl.testing.tiny import TinyRelease
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    root, data, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    release = TinyRelease(root, root / "llava-v1.5-tiny", root / "RaDialog-tiny", root / "x.pt")
    config = PPOConfig(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=data,
        batch_size=2, mini_batch_size=1, gradient_accumulation_steps=2, max_new_tokens=4, steps=2,
        output_dir=str(out / "run"), dtype="fp32", save_every=1000, learning_rate=1e-3, tensorboard=False,
    )
    trainer = PPOTrainer(config, reward_fn=lambda samples, responses: [len(r) / 10 for r in responses])
    initial = digest(trainer.unwrapped)
    trainer.train()
    acc = trainer.accelerator
    result = {"world": acc.num_processes, "steps": trainer.step_count, "initial": initial,
              "params": digest(trainer.unwrapped)}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
