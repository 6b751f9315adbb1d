"""Run ``radialog-rl ppo`` and SIGKILL the process in the middle of writing the checkpoint of step
``sys.argv[1]`` (after the adapter and before the value head): what a power cut or the OOM killer
does. Used by tests/test_error_table.py."""

from __future__ import annotations

import os
import signal
import sys

from radialog_rl.cli import main
from radialog_rl.training.ppo import state

kill_at = int(sys.argv[1])
original = state._save_value_head


def _dies_mid_write(model, directory):
    if directory.name.endswith(f"checkpoint-{kill_at:06d}"):
        os.kill(os.getpid(), signal.SIGKILL)
    original(model, directory)


state._save_value_head = _dies_mid_write
sys.exit(main(sys.argv[2:]))
