"""The PPO section of ``radialog-rl demo``: a few steps on the tiny release with a toy reward."""

from __future__ import annotations

import shutil
from pathlib import Path

from radialog_rl.testing.data import make_binary_qa_jsonl
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.trainer import PPOTrainer


def favoured_token_reward(trainer):
    """A toy reward for the random tiny model: the share of response tokens that are one token.

    The token is the most frequent alphabetic piece (two or more characters) in one probe rollout,
    so the reward is dense from the start. Returns ``(reward_fn, piece)``.
    """
    probe = trainer.rollout()
    sampled = probe.response_ids[probe.attention_mask[:, probe.query_length:].bool()].tolist()
    pieces = {t: trainer.tokenizer.decode([t]).strip() for t in set(sampled)}
    favoured = max((t for t, p in pieces.items() if len(p) >= 2 and p.isalpha()), key=sampled.count)
    piece, new_tokens = pieces[favoured], trainer.config.max_new_tokens

    def reward(samples, responses):
        return [r.count(piece) / new_tokens for r in responses]

    return reward, piece


def ppo_demo_section(ctx) -> None:
    """Run 6 PPO steps whose toy reward favours one token and print the reward curve.

    The tiny model is random, so a calibration reward would only ever see the format penalty; a
    reward that pays for one frequent token shows the loop learning within seconds.
    """
    # Beside the tiny release (like the SFT section's demo-sft/), not left in the system temp folder.
    work = Path(ctx.release.root) / "demo-ppo"
    shutil.rmtree(work, ignore_errors=True)  # the previous demo's run: ours
    data = make_binary_qa_jsonl(work / "data", n=8)
    config = PPOConfig(
        model_path=str(ctx.release.model_path), model_base=str(ctx.release.model_base), train_file=str(data),
        device=ctx.device, dtype="fp32", batch_size=8, mini_batch_size=4, gradient_accumulation_steps=1,
        ppo_epochs=2, max_new_tokens=4, top_k=8, learning_rate=1e-2, init_kl_coef=0.01, steps=6,
        save_every=6, output_dir=str(work / "run"), tensorboard=False, seed=1,
    )
    trainer = PPOTrainer(config, reward_fn=lambda samples, responses: [0.0] * len(responses))
    trainer.reward_fn, piece = favoured_token_reward(trainer)
    history = trainer.train()
    rows = [(h["step"], h["env/score_mean"], h["objective/kl"], h["ppo/loss/policy"], h["time/step"])
            for h in history]
    ctx.table(f"PPO (toy reward: share of tokens that are {piece!r})",
              ["step", "mean reward", "KL", "policy loss", "seconds"], rows,
              note=f"checkpoints and metrics.jsonl in {config.output_dir}")
    ctx.extras["ppo_output_dir"] = config.output_dir
