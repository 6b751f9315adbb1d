"""Multimodal PPO: config, rollout, pure loss math, trainer, checkpoints."""
