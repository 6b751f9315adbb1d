"""Loading a model while a DeepSpeed ZeRO-3 run is set up: outside ``deepspeed.zero.Init``.

Under ``accelerate launch`` with a ZeRO-3 config (and under ``transformers.TrainingArguments``
with one), a global DeepSpeed config is registered with transformers, and ``from_pretrained`` then
builds every module inside ``deepspeed.zero.Init`` (parameters partitioned as they are created) and
refuses a ``device_map``. Our loader needs both: it places the model on this process's device, and
BioViL-T's ``reset_parameters`` and the projector rebuild write into full tensors, which fail on
partitioned ones. RaDialog is LoRA-trained, so the full 16-bit (or 4-bit) base fits each process
during loading; DeepSpeed partitions the parameters at ``accelerator.prepare`` /
``Trainer.train`` instead, which gives the same sharded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Within this context transformers sees no DeepSpeed config (no ``zero.Init``, ``device_map``
    allowed); the run's config is registered again on exit. A no-op without DeepSpeed."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    # The module keeps a weak reference to the run's HfDeepSpeedConfig; hold the object itself so
    # it survives while unregistered, then register it again.
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
