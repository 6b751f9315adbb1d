"""Atomic directory writes: build a directory beside its destination, then rename it into place.

The one owner of "write a directory so that an interrupted write never leaves a half-written one"
(merged-model export, SFT adapter, PPO checkpoints). The staging directory is a hidden sibling of
the destination (same filesystem, so the final ``rename`` is atomic); a replaced destination is
first renamed aside and removed only after the new one is in place, so a crash at any moment leaves
either the old or the new directory under the final name, never a mix.

Nothing here decides *whether* a destination may be replaced: callers check that the destination
is theirs (see :func:`radialog_rl.loading.export.save_merged_model` and
:mod:`radialog_rl.training.run_dir`) before passing ``replace=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from radialog_rl.errors import ConfigError

#: Prefix of staging and set-aside siblings (``.<name>.tmp-*``, ``.<name>.old-*``).
STAGING_MARK = ".tmp-"
_ASIDE_MARK = ".old-"


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(final: str | os.PathLike, *, name: str | None = None) -> Path:
    """Create and return an empty hidden sibling of ``final`` to write into.

    ``name`` fixes the sibling's name (several processes that write into one staging directory must
    agree on it; the caller then holds the run lock, so the name cannot collide); by default it is
    unique. Its mode follows the umask like ``mkdir`` (``tempfile.mkdtemp`` alone gives 0700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if name is not None:
        tmp = final.parent / name
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run: never complete, never ours to keep
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING_MARK}", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, replace: bool = False) -> Path:
    """Rename the finished ``tmp`` to ``final``.

    An existing empty ``final`` is replaced. A non-empty one is replaced only with ``replace=True``
    (renamed aside, then removed once ``tmp`` is in place); otherwise :class:`ConfigError`.
    """
    tmp, final = Path(tmp), Path(final)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.rename(tmp, final)
        return final
    if not replace:
        raise ConfigError(f"{final} already exists; refusing to replace it")
    aside = final.with_name(f".{final.name}{_ASIDE_MARK}{uuid.uuid4().hex[:8]}")
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)  # put the old one back: the write failed, nothing is lost
        raise
    shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
    return final


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: write files into tmp`` -> ``out`` appears complete or not at all.

    On an exception the staging directory is removed and ``out`` is left as it was.
    """
    tmp = staging_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """True when ``path`` is ``directory`` or lies inside it (both resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents
