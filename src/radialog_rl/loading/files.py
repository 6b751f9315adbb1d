"""Safe reading of weight files, and local/hub resolution of model directories.

Model files from the internet are untrusted: safetensors are read directly, pickled ``.bin``/``.pt``
files only through ``torch.load(..., weights_only=True)`` (which refuses anything that is not a
tensor container, so a malicious pickle cannot run code). Every failure becomes a
:class:`~radialog_rl.errors.CheckpointError` that names the file.

Hub ids are resolved lazily (only when a caller passes one), and offline use gets an
:class:`~radialog_rl.errors.OfflineError` that says which files to put where.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from radialog_rl.errors import CheckpointError, OfflineError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_tensor_file(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a safetensors or weights-only pickle file (on CPU).

    Args:
        path: ``.safetensors`` or a pickled ``.bin``/``.pt`` file.
        what: a few words naming the file's role, used in error messages.

    Raises:
        CheckpointError: missing, empty, truncated/corrupt, unsafe (would run code), not a dict,
            or holding non-tensor values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes); download it again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{what} {path} is not a readable safetensors file ({exc}); it may be truncated: "
                "download it again"
            ) from exc
    else:
        state = _load_weights_only_pickle(path, what)
    return _check_tensor_dict(state, path, what)


def load_state_file(path: str | os.PathLike, *, what: str) -> object:
    """A weights-only pickle of training state (optimizer, scheduler, RNG): any container of
    tensors and plain values, refused or named like :func:`load_tensor_file` when unsafe/damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return _load_weights_only_pickle(path, what)


def _load_weights_only_pickle(path: Path, what: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_can_mmap(path))
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses globals outside torch's allow-list: this file wants to import
        # or call Python objects, which a plain weight file never does.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {what} {path}: it is not a plain tensor file (loading it would run "
            f"Python code; weights_only=True rejected it: {first}). Only load files from sources you "
            "trust, and prefer safetensors"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{what} {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); download it again"
        ) from exc


def _can_mmap(path: Path) -> bool:
    # mmap only works for the zip format (torch >= 1.6 saves); legacy pickles need a plain read.
    return zipfile.is_zipfile(path)


def _check_tensor_dict(state: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # Lightning-style wrapper (BioViL-T checkpoints may use it)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{what} {path} holds non-tensor entries: {', '.join(map(str, bad[:8]))}"
            + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        )
    return dict(state)


def save_tensor_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors as safetensors (contiguous CPU copies; shared storage is cloned)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_hub_id(value: str) -> bool:
    """``owner/name`` with no path-only characters (a heuristic; local paths are checked first)."""
    parts = value.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not value.startswith((".", "~"))
        and not any(c in value for c in "\\:")
    )


def resolve_model_dir(
    path_or_id: str | os.PathLike,
    *,
    what: str,
    required_files: Iterable[str] = (),
    local_files_only: bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local directory for a model: the path itself, or a hub snapshot.

    Args:
        path_or_id: a local directory or a hub id (``owner/name``).
        what: the role ("RaDialog release", "base LLaVA model") for messages.
        required_files: names that must exist in the directory (alternatives separated by ``|``,
            e.g. ``"non_lora_trainables.safetensors|non_lora_trainables.bin"``).
        local_files_only: only use the local hub cache; default: offline env variables.
        allow_patterns: restrict a download to these glob patterns.

    Raises:
        OfflineError: a hub id that is not cached and cannot be downloaded.
        CheckpointError: a local directory that lacks a required file.
    """
    required = list(required_files)
    text = os.fspath(path_or_id)
    local = Path(text).expanduser()
    if local.is_dir():
        _check_required(local, required, what)
        return local
    if local.exists():
        raise CheckpointError(f"{what}: {local} is a file; pass the directory that contains it")
    if not looks_like_hub_id(text):
        raise CheckpointError(f"{what} directory not found: {local}")
    if local_files_only is None:
        local_files_only = hub_offline()
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(text, local_files_only=local_files_only, allow_patterns=allow_patterns)
        )
    except Exception as exc:  # network, auth, or cache miss: all mean "not available here"
        files = ", ".join(r.replace("|", " or ") for r in required) or "its files"
        raise OfflineError(
            f"{what} '{text}' is not a local directory and could not be fetched from the Hugging "
            f"Face Hub ({type(exc).__name__}). Download it where you have network (e.g. "
            f"`hf download {text} --local-dir DIR`), copy DIR here ({files}) and pass "
            f"the local path instead"
        ) from exc
    _check_required(snapshot, required, what)
    return snapshot


def _check_required(directory: Path, required: list[str], what: str) -> None:
    missing = [r for r in required if not any((directory / alt).exists() for alt in r.split("|"))]
    if missing:
        names = ", ".join(m.replace("|", " or ") for m in missing)
        raise CheckpointError(f"{what} {directory} is missing {names}")


def find_first(directory: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that exists in ``directory`` (safetensors first by convention)."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None
