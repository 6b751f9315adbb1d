"""``observed_cli.py`` with accelerate's FSDP switched on for CPU processes: a TEST-ONLY launcher.

accelerate 1.15 turns ``ACCELERATE_USE_FSDP=true`` into ``DistributedType.FSDP`` only when the
process group's type is one of the accelerator kinds (``MULTI_GPU``, ``MULTI_NPU``, ...; see
``AcceleratorState.__init__`` in accelerate/state.py); two CPU processes on gloo are ``MULTI_CPU``
and silently train as plain DDP (which the trainer then refuses). torch's ``fully_shard`` itself
works on CPU tensors over gloo, so for the tests the one check is bypassed here: just before the
``AcceleratorState`` is first built, a ``MULTI_CPU`` process group asked for FSDP is presented as
``MULTI_GPU``; accelerate then picks FSDP and writes ``FSDP`` back as the process group's type, as
it does on GPUs. Nothing else in accelerate or in the library changes, and only this launcher
(tests/distributed/conftest.py, engine ``fsdp2``) applies it.

    accelerate launch --config_file configs/accelerate/cpu_test_fsdp2.yaml \\
        tests/distributed/fsdp_on_cpu.py ppo --config ...
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def allow_fsdp_on_cpu() -> None:
    """Patch ``AcceleratorState.__init__`` so the first build chooses FSDP for CPU processes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        shared = PartialState._shared_state
        if (not AcceleratorState._shared_state and shared.get("distributed_type") == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            shared["distributed_type"] = DistributedType.MULTI_GPU  # the branch that enables FSDP
        original(self, *args, **kwargs)

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    sys.argv[0] = str(here / "observed_cli.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
