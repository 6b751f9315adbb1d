"""Training: supervised fine-tuning and multimodal PPO."""
