"""A training run's output directory: who may write to it, and what a new run may remove.

Three rules, shared by ``sft`` and ``ppo``:

* **one run per directory**: :class:`RunLock` holds an exclusive ``flock`` on
  ``<output_dir>/.radialog-rl.lock`` for the run's life. The kernel drops the lock when the holder
  exits, however it exits (``kill -9`` included), so a lock file left by a dead run is stale by
  construction and simply taken over; a live holder is named (pid, host, start time) in the error.
* **no silent mixing**: a directory that already holds a run's files is refused unless the new
  run resumes it (``--resume latest``) or replaces it (``--overwrite``): :func:`check_run_dir`.
* **only ours is removed**: ``--overwrite`` removes the entries a run of that kind writes (the
  ``patterns`` the caller names), never anything else in the directory: :func:`remove_run_files`.

``metrics.jsonl`` rows after a resumed step are dropped (:func:`truncate_metrics`), so a resumed
run's log has each step once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from radialog_rl.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".radialog-rl.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunLock:
    """Exclusive lock on an output directory (``with RunLock(dir): ...`` or acquire/release).

    Why ``fcntl.flock`` and not a pid file: the kernel releases it when the process dies, so
    there is no stale-lock guessing (pid reuse, other hosts' pids); the file's contents only name
    the holder for the error message. ``flock`` is per open file, so a second run in the same
    process is refused too.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ConfigError(
                f"{self.directory} is in use by another run ({_describe(holder)}); wait for it to "
                "finish or choose another output_dir"
            ) from None
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if previous:
            logger.debug("took over the stale lock of a finished run (%s)", _describe(previous))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a dropped lock object must not keep the directory locked
        try:
            self.release()
        except Exception:  # at interpreter exit os/fcntl may be gone; the kernel releases it anyway
            pass


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def check_not_locked(directory: str | os.PathLike) -> None:
    """Refuse now (before an expensive model load) when a live run holds ``directory``."""
    if (Path(directory) / LOCK_FILE).is_file():
        with RunLock(directory):
            pass


def existing_run_files(directory: str | os.PathLike, patterns: Sequence[str]) -> list[str]:
    """Names in ``directory`` matching ``patterns`` (glob), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted({p.name for pattern in patterns for p in directory.glob(pattern)})


def check_run_dir(directory: str | os.PathLike, patterns: Sequence[str], *, resume: bool,
                  overwrite: bool, what: str) -> None:
    """Refuse a fresh run in a directory that holds a previous ``what`` run (cheap, no writes).

    Raises:
        ConfigError: both ``resume`` and ``overwrite``; or files of a previous run and neither.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: resume continues the run in "
                          "the output directory, overwrite removes it; pass one")
    if resume or overwrite:
        return
    found = existing_run_files(directory, patterns)
    if found:
        shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
        article = "an" if what[:1] in "AEFHILMNORSX" else "a"  # acronyms: "an SFT", "a PPO"
        raise ConfigError(
            f"{directory} already holds {article} {what} run ({shown}); pass --resume latest to continue it, "
            f"--overwrite to start again (removes only those {what} files), or choose another output_dir"
        )


def remove_run_files(directory: str | os.PathLike, patterns: Sequence[str]) -> list[str]:
    """Remove the entries matching ``patterns`` (a previous run's own files); returns their names."""
    directory = Path(directory)
    removed = existing_run_files(directory, patterns)
    for name in removed:
        path = directory / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if removed:
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), directory)
    return removed


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep only the rows of a ``metrics.jsonl`` with ``step <= step`` (written atomically).

    Rows after the checkpoint a run resumes from belong to steps that will be run again. Returns
    how many rows were dropped; unreadable rows are kept (they are not ours to judge).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if isinstance(row_step, int) and row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        logger.info("%s: dropped %d rows after the resumed step %d", path, dropped, step)
    return dropped


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` directories in ``out``, oldest first (staging dirs ignored)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume: str | os.PathLike, output_dir: str | os.PathLike,
                       check: Callable[[Path], object], what: str) -> Path:
    """The checkpoint ``resume`` names: ``"latest"`` / ``"previous"`` (newest / second newest in
    ``output_dir``) or a directory; ``check(path)`` raises :class:`CheckpointError` when it is
    damaged, and for ``latest`` the message then points to ``--resume previous``."""
    which = str(resume)
    if which in ("latest", "previous"):
        found = list_checkpoints(output_dir)
        need = 1 if which == "latest" else 2
        if len(found) < need:
            raise CheckpointError(f"--resume {which}: {output_dir} has {len(found) or 'no'} checkpoint-* "
                                  f"director{'y' if len(found) == 1 else 'ies'}; nothing to resume")
        path = found[-need]
    else:
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} is not {what} checkpoint directory (no trainer_state.json)")
    try:
        check(path)
    except CheckpointError as exc:
        hint = ""
        if which == "latest":
            found = list_checkpoints(output_dir)
            hint = (f"; resume from the previous one with --resume previous ({found[-2].name})"
                    if len(found) > 1 else "; there is no earlier checkpoint: start again with --overwrite")
        raise CheckpointError(f"{exc}{hint}") from exc
    return path
