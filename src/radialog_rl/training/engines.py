"""Which distributed engine a run is under (DDP, DeepSpeed ZeRO-2/3, FSDP2), and what each needs.

``accelerate launch`` tells the processes which engine to use through environment variables
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``); ``accelerate`` then enables it only when the
``Accelerator`` is built without ``cpu=True``, and quietly trains plain DDP otherwise. This module
builds the accelerator the way that works on CPU and GPU (:func:`make_accelerator`), refuses a run
whose engine differs from what the launcher asked for (:func:`check_engine`), names the engine for
the logs (:func:`describe_engine`), and fills or checks the DeepSpeed config keys that a loop without
a dataloader must set itself (:func:`set_deepspeed_batch_keys`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import torch

from radialog_rl.errors import ConfigError

logger = logging.getLogger(__name__)


def make_accelerator(cpu: bool):
    """An ``accelerate.Accelerator`` for this process, with the engine the launcher chose.

    ``cpu`` (no CUDA, or ``device: cpu``) is given to ``PartialState`` (the process group: gloo on
    CPU), not to the ``Accelerator``: ``Accelerator(cpu=True)`` would switch DeepSpeed and FSDP off.
    This is what ``transformers.Trainer`` does too.
    """
    from accelerate import Accelerator, PartialState

    PartialState(cpu=cpu)
    return Accelerator()


def engine_name(accelerator) -> str:
    """``"ddp"``, ``"deepspeed"``, ``"fsdp"`` or ``"single"`` (one process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of the run (None when not under DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if engine_name(accelerator) != "deepspeed" or plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def describe_engine(accelerator) -> str:
    """E.g. ``"DEEPSPEED (ZeRO-3), 2 processes on cpu"`` or ``"a single process (no distributed
    engine), 1 process on cpu"`` for the logs."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "NO":  # accelerate's name for "not distributed"
        kind = "a single process (no distributed engine)"
    stage = zero_stage(accelerator)
    if stage is not None:
        kind += f" (ZeRO-{stage})"
    elif engine_name(accelerator) == "fsdp":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        kind += f" (FSDP{version})"
    n = accelerator.num_processes
    return f"{kind}, {n} process{'es' if n > 1 else ''} on {accelerator.device.type}"


def check_engine(accelerator) -> None:
    """Refuse a run whose engine is not the one the launcher configured.

    Raises:
        ConfigError: ``accelerate launch`` asked for DeepSpeed or FSDP but the accelerator runs
            something else (e.g. ``use_cpu: true`` in the accelerate config switches both off), or
            the launcher started more processes than the accelerator sees.
    """
    name = engine_name(accelerator)
    for variable, wanted in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp")):
        if os.environ.get(variable, "false").lower() == "true" and name != wanted:
            raise ConfigError(
                f"the launcher asked for {wanted} ({variable}=true) but the run would train under "
                f"{describe_engine(accelerator)}; remove use_cpu: true from the accelerate config (on a "
                "CPU-only machine DeepSpeed runs on CPU by itself) or launch without the engine"
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise ConfigError(f"the launcher started {world} processes but the accelerator sees "
                          f"{accelerator.num_processes}; launch with torchrun or accelerate launch only")


def set_deepspeed_batch_keys(accelerator, micro_batch_size: int, gradient_accumulation_steps: int,
                             max_grad_norm: float | None) -> None:
    """Fill (``auto`` / missing) or check the DeepSpeed config's batch keys before ``prepare``.

    A training loop without a dataloader gives accelerate nothing to read the micro-batch size
    from, and accelerate's default for an ``auto`` ``gradient_clipping`` is 1.0 whatever the run
    asked for. The loop's own values win: ``train_micro_batch_size_per_gpu`` = ``micro_batch_size``,
    ``gradient_accumulation_steps``, ``gradient_clipping`` = ``max_grad_norm`` (0: no clipping),
    ``train_batch_size`` = their product times the number of processes.

    Raises:
        ConfigError: a key is set to a different number; the message names the key and both values.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    world = accelerator.num_processes
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world,
    }
    ours = {"train_micro_batch_size_per_gpu": "mini_batch_size",
            "gradient_accumulation_steps": "gradient_accumulation_steps",
            "gradient_clipping": "max_grad_norm (unset = 0, no clipping)",
            "train_batch_size": "mini_batch_size x gradient_accumulation_steps x processes"}
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif float(current) != float(value):
            raise ConfigError(f"DeepSpeed config key {key} is {current} but the run's {ours[key]} is {value}; "
                              f"set {key} to \"auto\" (or to {value}) in the DeepSpeed config")
    # accelerate reads its accumulation count from the plugin; keep both in step.
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps


@contextlib.contextmanager
def gathered(accelerator, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within this context, ``params`` hold their full values on every process.

    ZeRO-3 partitions each parameter (a local ``(0,)`` placeholder outside its forward); reading
    one for a checkpoint needs ``deepspeed.zero.GatheredParameters``. ZeRO-2, DDP and one process:
    nothing to do. Every process must enter (a collective).
    """
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def unsharded(accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Full parameters for calls that bypass the wrapped root (FSDP2; a no-op elsewhere).

    Generation, the image encoder and the no-grad scoring passes call submodules of the unwrapped
    model directly; FSDP2 gathers parameters only in the hooks of its own wrapped modules (the
    decoder layers and the root, whose group holds everything else: embeddings, vision tower,
    projector, value head), so every group is unsharded here. The layers' hooks still run on such
    calls; they are told not to reshard after each forward inside the context (one all-gather per
    context, not one per generated token) and resharded on exit. ZeRO-3 needs nothing: DeepSpeed
    gathers in hooks on every submodule. Every process must enter (a collective).
    """
    if engine_name(accelerator) != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if isinstance(model, FSDPModule):
        # FSDP2 makes the first FSDP module whose forward runs the root; a direct call into a decoder
        # layer (generation) before any root forward would make that layer a root of its own and
        # the next root forward fail ("requires running forward through the root module first").
        # torch has no public call for this lazy initialisation (idempotent).
        model._get_fsdp_state()._lazy_init()
    reshard = bool(accelerator.state.fsdp_plugin.reshard_after_forward)
    inner = [m for m in modules if m is not model]
    for module in inner:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in inner:
            module.set_reshard_after_forward(reshard, recurse=False)
        for module in modules:
            module.reshard()
