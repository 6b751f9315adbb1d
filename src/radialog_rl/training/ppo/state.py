"""PPO checkpoints: everything a resumed run needs, written atomically.

A checkpoint directory ``checkpoint-000050/`` holds the policy adapter (a PEFT directory under
``adapter/``), ``value_head.safetensors``, ``optimizer.pt``, ``scheduler.pt``, one
``rng_state_<rank>.pt`` per process, and ``trainer_state.json`` (step, KL controller, running score
moments, data order, reward RNG, engine, config).

Under DeepSpeed and FSDP the optimizer (and ZeRO-3's parameters) are sharded over the processes:
there ``optimizer.pt`` is replaced by ``engine_state/``, written by every process through
``accelerator.save_state`` (DeepSpeed: the engine's own checkpoint, trainable parameters and every
rank's optimizer shard; FSDP: accelerate's sharded model and optimizer) and read back by
``accelerator.load_state``. The adapter and value head are gathered from the shards first (every
process takes part), so ``adapter/`` is always complete; a tensor that comes out empty is refused
rather than written. The KL controller, score moments and sampler stay in ``trainer_state.json``
(plain JSON, read without unpickling) instead of accelerate's pickled custom states.

It is written to a hidden sibling and renamed
(:mod:`radialog_rl.atomic_dir`), so a run killed mid-save resumes from the previous good checkpoint
(Huang et al. 2024, detail 13; the earlier RaDialog PPO never restored its value head).

A damaged checkpoint (a truncated ``trainer_state.json`` or ``optimizer.pt``, a file that is not a
plain tensor pickle) is named with the damaged file before any model is loaded; the run falls back
to the previous complete checkpoint only when asked (``--resume previous``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from radialog_rl.atomic_dir import commit_dir, staging_dir
from radialog_rl.errors import CheckpointError, RadialogError
from radialog_rl.loading.adapters import (
    VALUE_HEAD_FILE,
    load_lora_weights,
    load_value_head,
    read_adapter,
    save_default_adapter,
)
from radialog_rl.loading.files import load_state_file, load_tensor_file, save_tensor_file
from radialog_rl.training.engines import gathered
from radialog_rl.training.run_dir import list_checkpoints, resolve_checkpoint

logger = logging.getLogger(__name__)

#: Prefix of a checkpoint being written.
TMP_PREFIX = ".tmp-"
#: What a PPO run writes into its output directory (what ``--overwrite`` may remove).
RUN_FILES = ("checkpoint-*", f"{TMP_PREFIX}checkpoint-*", "metrics.jsonl", "tensorboard", "eval", "best", "final",
             ".best.tmp-*", ".final.tmp-*")
#: Files every checkpoint holds (``rng_state_<rank>.pt`` is optional: older checkpoints lack it).
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "value_head.safetensors",
             "adapter/adapter_config.json")
#: The sharded engines' states (``accelerator.save_state``) replace ``optimizer.pt``.
ENGINE_STATE = "engine_state"
_SHARDED = ("deepspeed", "fsdp")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_numpy_rng() -> dict:
    """Python's and NumPy's global RNG states as plain JSON (lists of ints; no ``repr``/``eval``)."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_python_numpy_rng(state: dict) -> None:
    """Inverse of :func:`_python_numpy_rng`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))


def reward_rng_state(reward_fn) -> dict | None:
    """The reward's exploration RNG state (a NumPy ``Generator`` on ``reward_fn.rng``), or None."""
    rng = getattr(reward_fn, "rng", None)
    return rng.bit_generator.state if isinstance(rng, np.random.Generator) else None


def set_reward_rng_state(reward_fn, state: dict | None) -> None:
    """Inverse of :func:`reward_rng_state` (no-op when either side has no RNG)."""
    rng = getattr(reward_fn, "rng", None)
    if state and isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state


def save_checkpoint(trainer) -> Path:
    """Write ``output_dir/checkpoint-<step>`` (all processes call this; rank 0 writes shared files)."""
    acc = trainer.accelerator
    out = trainer.output_dir
    final = out / f"checkpoint-{trainer.step_count:06d}"
    # A fixed name: every process writes its RNG file into it. The run lock makes it ours alone.
    tmp = out / f"{TMP_PREFIX}{final.name}"
    if acc.is_main_process:
        staging_dir(final, name=tmp.name)
    acc.wait_for_everyone()
    # Each process draws from its own streams (seed + rank): all of them are kept per rank; the
    # shared trainer_state.json keeps the main process's too (older checkpoints have only those).
    rng = {**_rng_state(), "per_process": json.dumps({"reward_rng": reward_rng_state(trainer.reward_fn),
                                                       "python_numpy_rng": _python_numpy_rng()})}
    torch.save(rng, tmp / f"rng_state_{acc.process_index}.pt")
    engine = getattr(trainer, "engine", "single")
    write_policy(trainer, tmp)  # every process: gathers ZeRO-3 / FSDP shards
    if engine in _SHARDED:
        _save_engine_state(trainer, tmp / ENGINE_STATE)
    if acc.is_main_process:
        if engine not in _SHARDED:
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {
            **trainer.state_dict(),  # step, KL controller, score moments, data order, reward RNG
            "python_numpy_rng": _python_numpy_rng(),
            "num_processes": acc.num_processes,
            "engine": engine,
            "config": trainer.config.to_dict(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    acc.wait_for_everyone()  # every process's files (RNG, engine shards) are in before the rename
    if acc.is_main_process:
        commit_dir(tmp, final, replace=True)  # a checkpoint of this step from before a resume
        _rotate(out, trainer.config.keep_checkpoints)
        logger.info("saved checkpoint %s", final)
    acc.wait_for_everyone()
    return final


def _save_value_head(model, directory: Path) -> None:
    save_tensor_file(model.value_head_state_dict(), directory / VALUE_HEAD_FILE)


def write_policy(trainer, directory: Path | None) -> None:
    """``directory/adapter/`` and ``directory/value_head.safetensors`` from the full trainable weights.

    Every process calls this: under ZeRO-3 the trainable parameters are gathered around the write,
    under FSDP the full state dict is gathered to the main process; only the main process writes
    (``directory`` may be None on the others).

    Raises:
        CheckpointError: a written tensor is empty (a shard was saved instead of the full weight).
    """
    acc = trainer.accelerator
    model = trainer.unwrapped
    if getattr(trainer, "engine", "single") == "fsdp":
        full = acc.get_state_dict(trainer.model)  # a collective; the full dict on the main process
        if acc.is_main_process:
            _write_policy_from_state(model, full, directory)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        with gathered(acc, trainable):
            if acc.is_main_process:
                save_default_adapter(model.pretrained_model, directory / "adapter")
                _save_value_head(model, directory)
    if acc.is_main_process:
        check_not_empty(directory)


def _write_policy_from_state(model, full: dict, directory: Path) -> None:
    """The FSDP path: adapter and value head from a gathered state dict of the wrapped root."""
    prefix = "pretrained_model."
    policy = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    save_default_adapter(model.pretrained_model, directory / "adapter", state_dict=policy)
    head = {k: v.detach().cpu().float() for k, v in full.items() if k.startswith("v_head.")}
    save_tensor_file(head, directory / VALUE_HEAD_FILE)


def check_not_empty(directory: Path) -> None:
    """Refuse an exported adapter or value head holding an empty tensor (a ZeRO-3 placeholder)."""
    for file in [directory / VALUE_HEAD_FILE, *sorted((directory / "adapter").glob("*.safetensors"))]:
        for key, tensor in load_tensor_file(file, what="saved policy").items():
            if tensor.numel() == 0:
                raise CheckpointError(
                    f"refusing to keep {file}: tensor {key} is empty {tuple(tensor.shape)}, a partitioned "
                    "placeholder instead of the full weight (gather the parameters before saving)")


def _save_engine_state(trainer, directory: Path) -> None:
    """The sharded model/optimizer through accelerate (every process writes its shard)."""
    acc = trainer.accelerator
    # DeepSpeed: only the trainable parameters (LoRA, value head) go into the engine's model file;
    # the frozen base is the release's and would add gigabytes per checkpoint.
    kwargs = {"exclude_frozen_parameters": True} if trainer.engine == "deepspeed" else {}
    directory.mkdir(exist_ok=True)  # on every process: accelerate creates it on the main one only
    acc.save_state(str(directory), **kwargs)


def _rotate(out: Path, keep: int | None) -> None:
    if not keep:
        return
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(resume_from: str | os.PathLike, output_dir: Path) -> Path:
    """``"latest"`` / ``"previous"`` -> the newest / second-newest checkpoint in ``output_dir``;
    else the given directory. The choice is checked with :func:`check_checkpoint` (cheap: no model).

    Raises:
        CheckpointError: nothing to resume, or the checkpoint is incomplete or damaged (the message
            names the file and, for ``latest``, suggests ``--resume previous``).
    """
    return resolve_checkpoint(resume_from, output_dir, check_checkpoint, "a PPO")


def check_checkpoint(path: Path) -> dict:
    """Read ``trainer_state.json`` and check every other file is present and not truncated.

    Torch state files are zip archives whose directory sits at the end, so opening one detects a
    truncated file without reading its tensors. Returns the parsed trainer state. A DeepSpeed/FSDP
    checkpoint (``"engine"`` in the state) holds ``engine_state/`` instead of ``optimizer.pt``.
    """
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: trainer_state.json is missing")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: trainer_state.json is truncated or not valid "
                              f"JSON ({' '.join(str(exc).split())})") from exc
    sharded = state.get("engine") in _SHARDED
    required = [name for name in _REQUIRED if not (sharded and name == "optimizer.pt")]
    for name in required:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    if sharded and not (path / ENGINE_STATE).is_dir():
        raise CheckpointError(f"checkpoint {path} is incomplete: {ENGINE_STATE}/ (the {state['engine']} "
                              "model and optimizer shards) is missing")
    engine_files = sorted((path / ENGINE_STATE).rglob("*.pt")) if sharded else []
    optimizer = [] if sharded else [path / "optimizer.pt"]
    for file in [*optimizer, path / "scheduler.pt", *path.glob("rng_state_*.pt"), *engine_files]:
        try:
            with zipfile.ZipFile(file):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is damaged: {file.name} is truncated or not a torch "
                                  f"state file ({exc})") from exc
    return state


def load_checkpoint(trainer, path: Path) -> None:
    """Restore adapter, value head, optimizer, scheduler, KL controller, moments, data order, RNGs."""
    try:
        _restore(trainer, path, check_checkpoint(path))
    except RadialogError as exc:
        raise CheckpointError(f"cannot resume from {path}: {exc}") from exc
    logger.info("resumed from %s at step %d", path, trainer.step_count)


def _restore(trainer, path: Path, state: dict) -> None:
    acc = trainer.accelerator
    written, running = state.get("engine", "single"), getattr(trainer, "engine", "single")
    if (written in _SHARDED or running in _SHARDED) and written != running:
        raise CheckpointError(f"the checkpoint was written under {written} and this run is under {running}; "
                              f"resume it with the same engine (the {written} optimizer state is stored "
                              "in its own layout)")
    if state.get("num_processes", 1) != acc.num_processes:
        if written in _SHARDED:
            raise CheckpointError(f"the checkpoint's {written} shards were written by {state.get('num_processes')} "
                                  f"processes; resume with that many (this run has {acc.num_processes})")
        logger.warning("checkpoint was written with %s processes, resuming with %s: data order and RNG "
                       "streams will differ", state.get("num_processes"), acc.num_processes)
    if written in _SHARDED:
        # The engine restores the trainable parameters from its own shards (exact fp32 master weights).
        kwargs = {"load_module_strict": False} if written == "deepspeed" else {}
        acc.load_state(str(path / ENGINE_STATE), **kwargs)
    else:
        model = trainer.unwrapped
        _, adapter_state = read_adapter(path / "adapter")
        load_lora_weights(model.pretrained_model, adapter_state, "default", what=f"policy adapter in {path}")
        load_value_head(model, path)
        trainer.optimizer.load_state_dict(load_state_file(path / "optimizer.pt", what="optimizer state"))
    trainer.scheduler.load_state_dict(load_state_file(path / "scheduler.pt", what="scheduler state"))
    trainer.load_state_dict(state)
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    own = {}
    if rng_file.is_file():
        rng_state = load_state_file(rng_file, what="RNG state")
        torch.set_rng_state(rng_state["torch"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
        own = json.loads(rng_state.get("per_process", "{}"))
    set_reward_rng_state(trainer.reward_fn, own.get("reward_rng"))  # this process's stream (main's: above)
    pn = own.get("python_numpy_rng") or state.get("python_numpy_rng")
    if pn:
        _set_python_numpy_rng(pn)


def save_policy_files(trainer, directory: Path, eval_metrics: dict | None = None) -> Path:
    """Write a trained policy: ``adapter/`` (PEFT), ``value_head.safetensors`` and ``eval.json``.

    Every process calls this (ZeRO-3 / FSDP gather the weights); the main process writes, into a
    hidden sibling renamed into place (:mod:`radialog_rl.atomic_dir`): a previous export at
    ``directory`` (ours: ``best/`` or ``final/``) is replaced only once the new one is complete.
    """
    directory = Path(directory)
    main = trainer.accelerator.is_main_process
    tmp = staging_dir(directory) if main else None
    try:
        write_policy(trainer, tmp)
        if main:
            (tmp / "eval.json").write_text(json.dumps(eval_metrics, indent=2, default=str))
            commit_dir(tmp, directory, replace=True)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
