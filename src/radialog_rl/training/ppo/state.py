"""PPO checkpoints: everything a resumed run needs, written atomically.

A checkpoint directory ``checkpoint-000050/`` holds the policy adapter (a PEFT directory under
``adapter/``), ``value_head.safetensors``, ``optimizer.pt``, ``scheduler.pt``, one
``rng_state_<rank>.pt`` per process, and ``trainer_state.json`` (step, KL controller, running score
moments, data order, reward RNG, config). It is written to a hidden sibling and renamed
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

from radialog_rl.atomic_dir import atomic_dir, commit_dir, staging_dir
from radialog_rl.errors import CheckpointError, RadialogError
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_numpy_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _reward_rng_state(reward_fn) -> dict | None:
    rng = getattr(reward_fn, "rng", None)
    return rng.bit_generator.state if isinstance(rng, np.random.Generator) else None


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
    torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    if acc.is_main_process:
        model = trainer.unwrapped
        model.pretrained_model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"],
                                               save_embedding_layers=False)
        _save_value_head(model, tmp)
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {
            "step": trainer.step_count,
            "kl_controller": trainer.kl_ctl.state_dict(),
            "score_moments": trainer.score_moments.state_dict(),
            "sampler": trainer.sampler.state_dict(),
            "reward_rng": _reward_rng_state(trainer.reward_fn),
            "python_numpy_rng": _python_numpy_rng(),
            "num_processes": acc.num_processes,
            "config": trainer.config.to_dict(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        commit_dir(tmp, final, replace=True)  # a checkpoint of this step from before a resume
        _rotate(out, trainer.config.keep_checkpoints)
        logger.info("saved checkpoint %s", final)
    acc.wait_for_everyone()
    return final


def _save_value_head(model, directory: Path) -> None:
    from radialog_rl.loading.adapters import VALUE_HEAD_FILE
    from radialog_rl.loading.files import save_tensor_file

    save_tensor_file(model.value_head_state_dict(), directory / VALUE_HEAD_FILE)


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
    truncated file without reading its tensors. Returns the parsed trainer state.
    """
    for name in _REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: trainer_state.json is truncated or not valid "
                              f"JSON ({' '.join(str(exc).split())})") from exc
    for file in [path / "optimizer.pt", path / "scheduler.pt", *path.glob("rng_state_*.pt")]:
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
    from radialog_rl.loading.adapters import load_lora_weights, load_value_head, read_adapter
    from radialog_rl.loading.files import load_state_file

    acc = trainer.accelerator
    if state.get("num_processes", 1) != acc.num_processes:
        logger.warning("checkpoint was written with %s processes, resuming with %s: data order and RNG "
                       "streams will differ", state.get("num_processes"), acc.num_processes)
    model = trainer.unwrapped
    _, adapter_state = read_adapter(path / "adapter")
    load_lora_weights(model.pretrained_model, adapter_state, "default", what=f"policy adapter in {path}")
    load_value_head(model, path)
    trainer.optimizer.load_state_dict(load_state_file(path / "optimizer.pt", what="optimizer state"))
    trainer.scheduler.load_state_dict(load_state_file(path / "scheduler.pt", what="scheduler state"))
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.step_count = int(state["step"])
    rng = getattr(trainer.reward_fn, "rng", None)
    if state.get("reward_rng") and isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state["reward_rng"]
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    if rng_file.is_file():
        rng_state = load_state_file(rng_file, what="RNG state")
        torch.set_rng_state(rng_state["torch"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
    pn = state.get("python_numpy_rng")
    if pn:
        import ast

        random.setstate(ast.literal_eval(pn["python"]))
        np.random.set_state((pn["numpy"][0], np.array(pn["numpy"][1], dtype=np.uint32), *pn["numpy"][2:]))


def save_policy_files(model, directory: Path, eval_metrics: dict | None = None) -> Path:
    """Write a trained policy: ``adapter/`` (PEFT), ``value_head.safetensors`` and ``eval.json``.

    Written to a hidden sibling and renamed into place (:mod:`radialog_rl.atomic_dir`); a previous
    export at ``directory`` (ours: ``best/`` or ``final/``) is replaced only once the new one is complete.
    """
    with atomic_dir(directory, replace=True) as tmp:
        model.pretrained_model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"],
                                               save_embedding_layers=False)
        _save_value_head(model, tmp)
        (tmp / "eval.json").write_text(json.dumps(eval_metrics, indent=2, default=str))
    return Path(directory)
