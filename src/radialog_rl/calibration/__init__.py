"""Confidence calibration: prompts, parsing, rewards, metrics, plots (numpy only, no torch)."""
