"""radialog-rl: RaDialog (LLaVA-1.5 + BioViL-T) loading, adaptation, SFT, multimodal PPO and
confidence calibration.

Public names are exported lazily (importing this package imports neither torch nor transformers,
and nothing here touches the network): ``from radialog_rl import load_baseline_llava_model_with_vision_modules``
imports only the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors and constants
    "RadialogError": "radialog_rl.errors",
    "CheckpointError": "radialog_rl.errors",
    "OfflineError": "radialog_rl.errors",
    "ConfigError": "radialog_rl.errors",
    "DataError": "radialog_rl.errors",
    "ImageError": "radialog_rl.errors",
    "IMAGE_TOKEN_INDEX": "radialog_rl.constants",
    "IGNORE_INDEX": "radialog_rl.constants",
    # prompts
    "SYSTEM_PROMPT": "radialog_rl.data.prompts",
    "report_prompt": "radialog_rl.data.prompts",
    "build_prompt": "radialog_rl.data.prompts",
    "render_conversation": "radialog_rl.data.prompts",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radialog_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
