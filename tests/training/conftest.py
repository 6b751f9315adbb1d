"""Fixtures shared by the PPO tests: one small binary-QA prompt file (8 rows, synthetic images)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory):
    """Read-only: tests must not write into its folder."""
    from radialog_rl.testing.data import make_binary_qa_jsonl

    return make_binary_qa_jsonl(tmp_path_factory.mktemp("ppo-data"), n=8)
