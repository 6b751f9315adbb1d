"""Shared fixtures: one tiny RaDialog release per test session, loaded through the public API."""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    from radialog_rl.testing.tiny import make_tiny_release

    return make_tiny_release(tmp_path_factory.mktemp("tiny-release"))


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_release):
    """The tiny RaDialog (no LoRA) in fp32 on CPU: exact numerics for comparisons. Do not modify."""
    from radialog_rl import load_baseline_llava_model_with_vision_modules

    return load_baseline_llava_model_with_vision_modules(
        tiny_release.model_path, tiny_release.model_base, device="cpu", dtype=torch.float32
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_fp32):
    return tiny_model_fp32.tokenizer
