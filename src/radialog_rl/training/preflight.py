"""Cheap checks that run before a training command loads its model.

With a 7B model, loading takes minutes; a typo in a reward name, a label such as
``answer: "maybe"`` on line 4000 or an unreadable image must be found first, and named by file and
line rather than by the batch that happened to sample it mid-run. Here:

* :func:`load_config_reward`: the reward of a PPO config, importable from the working directory or
  the config file's folder (``reward: myrewards:fn`` next to ``ppo.yaml``);
* :func:`check_rows`: every row's labels (as the reward will read them) and image headers (size
  limits of :func:`radialog_rl.data.images.image_limits`), all rows, one error listing the first few.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from radialog_rl.calibration.rewards import load_reward
from radialog_rl.data.images import image_header_size
from radialog_rl.errors import DataError, RadialogError

logger = logging.getLogger(__name__)

_LISTED = 5


@contextlib.contextmanager
def importable_from(folders: Iterable[str | os.PathLike | None]) -> Iterator[None]:
    """Put ``folders`` at the front of ``sys.path`` while importing a user's module.

    The console script's ``sys.path`` holds its own folder, not the working directory (``python -m``
    does), so ``reward: myrewards:fn`` would not import from where the user runs the command.
    """
    added = [str(Path(f).resolve()) for f in folders if f]
    added = [f for i, f in enumerate(added) if f not in added[:i] and f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def load_config_reward(spec: str, params: dict[str, Any], config_dir: str | os.PathLike | None = None):
    """:func:`radialog_rl.calibration.rewards.load_reward`, importing ``module:function`` rewards from
    the working directory or ``config_dir`` too."""
    with importable_from([os.getcwd(), config_dir]):
        return load_reward(spec, **params)


def check_rows(rows: Sequence[Any], reward_fn=None, *, what: str = "data file") -> None:
    """Check every row before training: its labels for ``reward_fn`` (when the reward has a
    ``check_sample(fields)`` method) and its images' headers.

    ``rows`` have ``.source`` ("file line N"), ``.fields`` (the JSON row) and image paths in
    ``.image`` / ``.prior_image`` (PPO rows) or ``.images`` (SFT examples).

    Raises:
        DataError: naming the first few bad rows by file and line, and how many there are.
    """
    check_sample = getattr(reward_fn, "check_sample", None)
    bad = []
    for row in rows:
        problems = []
        if check_sample is not None:
            try:
                check_sample(row.fields)
            except RadialogError as exc:
                problems.append(str(exc))
        images = list(getattr(row, "images", None) or [getattr(row, "image", None), getattr(row, "prior_image", None)])
        for image in (i for i in images if i is not None):
            try:
                image_header_size(image)
            except RadialogError as exc:
                problems.append(str(exc))
        if problems:
            bad.append(f"{row.source}: {'; '.join(problems)}")
    if bad:
        more = f" (and {len(bad) - _LISTED} more)" if len(bad) > _LISTED else ""
        raise DataError(f"{len(bad)} bad row(s) in the {what}: " + "; ".join(bad[:_LISTED]) + more
                        + "; fix or remove them")
