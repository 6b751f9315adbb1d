"""YAML config files shared by ``sft`` and ``ppo``: reading a mapping and resolving its paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from radialog_rl.errors import ConfigError


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a clear :class:`ConfigError` for anything else."""
    import yaml

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} config not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} config {path} is a directory; pass the YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {what} config keys, got {type(data).__name__}")
    return data


def resolve_config_path(value: Any, base_dir: str | os.PathLike, always: bool = False) -> Any:
    """A relative path in a config file is relative to the file's folder.

    It is resolved when ``always``, when it starts with ``./``/``../``, or when it exists there;
    anything else (a hub id such as ``owner/name``, the word ``latest``) is returned unchanged.
    """
    if not isinstance(value, str) or not value or value == "latest":
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = Path(base_dir) / path
    if always or value.startswith(("./", "../")) or candidate.exists():
        return str(candidate.resolve())
    return value
