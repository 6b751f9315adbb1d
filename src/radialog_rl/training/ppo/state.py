"""PPO checkpoints: everything a resumed run needs, written atomically.

A checkpoint directory ``checkpoint-000050/`` holds the policy adapter (a PEFT directory under
``adapter/``), ``value_head.safetensors``, ``optimizer.pt``, ``scheduler.pt``, one
``rng_state_<rank>.pt`` per process, and ``trainer_state.json`` (step, KL controller, running score
moments, data order, reward RNG, config). It is written to a temporary directory and renamed, so
a run killed mid-save resumes from the previous good checkpoint (Huang et al. 2024, detail 13;
the earlier RaDialog PPO never restored its value head).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from radialog_rl.errors import CheckpointError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
    tmp = out / f".tmp-checkpoint-{trainer.step_count:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first (temporary directories are ignored)."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume_from: str | os.PathLike, output_dir: Path) -> Path:
    """``"latest"`` -> the newest checkpoint in ``output_dir``; else the given directory."""
    if str(resume_from) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest but {output_dir} has no checkpoint-* directory")
        return found[-1]
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path} is not a PPO checkpoint (no trainer_state.json)")
    return path


def load_checkpoint(trainer, path: Path) -> None:
    """Restore adapter, value head, optimizer, scheduler, KL controller, moments, data order, RNGs."""
    from radialog_rl.loading.adapters import load_lora_weights, load_value_head, read_adapter

    acc = trainer.accelerator
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("num_processes", 1) != acc.num_processes:
        logger.warning("checkpoint was written with %s processes, resuming with %s: data order and RNG "
                       "streams will differ", state.get("num_processes"), acc.num_processes)
    model = trainer.unwrapped
    _, adapter_state = read_adapter(path / "adapter")
    load_lora_weights(model.pretrained_model, adapter_state, "default", what=f"policy adapter in {path}")
    load_value_head(model, path)
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.step_count = int(state["step"])
    rng = getattr(trainer.reward_fn, "rng", None)
    if state.get("reward_rng") and isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state["reward_rng"]
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    if rng_file.is_file():
        rng_state = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng_state["torch"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
    pn = state.get("python_numpy_rng")
    if pn:
        import ast

        random.setstate(ast.literal_eval(pn["python"]))
        np.random.set_state((pn["numpy"][0], np.array(pn["numpy"][1], dtype=np.uint32), *pn["numpy"][2:]))
    logger.info("resumed from %s at step %d", path, trainer.step_count)


def save_policy_files(model, directory: Path, eval_metrics: dict | None = None) -> Path:
    """Write a trained policy: ``adapter/`` (PEFT), ``value_head.safetensors`` and ``eval.json``.

    Written to a temporary sibling and renamed into place; a previous export at ``directory``
    (ours: ``best/`` or ``final/``) is replaced only after the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.pretrained_model.save_pretrained(str(tmp / "adapter"), selected_adapters=["default"],
                                           save_embedding_layers=False)
    _save_value_head(model, tmp)
    (tmp / "eval.json").write_text(json.dumps(eval_metrics, indent=2, default=str))
    old = directory.parent / f".old-{directory.name}"
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
