"""The declared config schema shared by ``sft`` and ``ppo``: base class, shared sections, YAML files,
``key=value`` overrides and ``--print-config``.

Why pydantic (v2): one declaration per field gives its type, default, range (``Field(gt=0)``),
choices (``Literal``) and documentation (the docstring under the field), and validation coerces
what YAML gets wrong (``1e-5`` without a dot is a string; ``"4"``/``4.0`` -> 4) while refusing
``4.5``, ``"four"``, ``0`` where a positive int is declared, and ``yes_please`` for a bool. It is a
well-kept library already installed with the Hugging Face stack; OmegaConf structured configs (as
torchtune uses) would add a dependency and leave ranges to hand-written checks.

A config class subclasses :class:`ConfigModel` and the sections it shares (:class:`ModelSection`,
:class:`LoraSection`); a new field is one annotated line plus its docstring. Every validation
failure becomes one :class:`~radialog_rl.errors.ConfigError` line naming the key (and, through
:meth:`ConfigModel.load`, the file).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from radialog_rl.errors import ConfigError
from radialog_rl.loading.precision import PRECISIONS, parse_dtype
from radialog_rl.training.config_files import read_yaml_mapping, resolve_config_path

#: How the starting model is loaded (see :class:`ModelSection`).
ENTRY_POINTS = ("radialog_lora", "fresh_lora")


class PathField:
    """Marks a field as a path: relative values resolve against the config file's folder.

    ``always``: a file or run directory (always resolved); otherwise a model directory that may be a
    hub id (resolved only when it exists there or starts with ``./``/``../``).
    """

    def __init__(self, always: bool):
        self.always = always


#: A file or directory we read or write (always resolved against the config's folder).
FilePath = Annotated[str | None, PathField(always=True)]
#: A local model directory or a hub id.
ModelPath = Annotated[str | None, PathField(always=False)]
PositiveInt = Annotated[int, Field(ge=1)]


class ConfigModel(BaseModel):
    """Base of every config: unknown keys refused with a suggestion, errors as one ConfigError line."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,  # the docstring under a field is its documentation
        protected_namespaces=(),  # fields named model_path / model_base
        allow_inf_nan=False,  # learning_rate: .inf is a typo, not a value
        validate_default=True,
    )
    #: "PPO" / "SFT": the word used in messages.
    kind: ClassVar[str] = ""
    _config_dir: str | None = PrivateAttr(default=None)

    @property
    def config_dir(self) -> str | None:
        """The folder of the YAML file this config was read from (None when built in code)."""
        return self._config_dir

    def __init__(self, /, **data: Any) -> None:
        unknown = [k for k in data if k not in type(self).model_fields]
        if unknown:
            known = list(type(self).model_fields)
            raise ConfigError(f"unknown {self.kind} config key(s): " + "; ".join(suggest(k, known) for k in unknown))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as saved in checkpoints and ``--print-config``."""
        return self.model_dump(mode="json")

    # -- files ---------------------------------------------------------------------------------------
    @classmethod
    def resolve_paths(cls, data: Mapping[str, Any], base_dir: str | os.PathLike) -> dict[str, Any]:
        """``data`` with the relative values of path fields (:class:`PathField`) resolved."""
        out = dict(data)
        for name, info in cls.model_fields.items():
            marks = [m for m in info.metadata if isinstance(m, PathField)]
            if marks and name in out:
                out[name] = resolve_config_path(out[name], base_dir, always=marks[0].always)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | os.PathLike | None = None):
        """Build from a mapping (e.g. parsed YAML); relative paths resolve against ``base_dir``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a {cls.kind} config must be a mapping, got {type(data).__name__}")
        return cls(**(cls.resolve_paths(data, base_dir) if base_dir is not None else dict(data)))

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Iterable[str] = (), **fields: Any):
        """Read a YAML file (top-level keys = fields), then apply ``key=value`` ``overrides`` and
        the non-None ``fields``; both are relative to the working directory, the file's paths to
        its folder. Errors name the file: ``<path>: batch_size: ...``."""
        path = Path(path).expanduser()
        data = read_yaml_mapping(path, cls.kind)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must hold a mapping of {cls.kind} config keys")
        changes = deep_merge(parse_overrides(overrides), {k: v for k, v in fields.items() if v is not None})
        try:
            data = cls.resolve_paths(data, path.resolve().parent)
            config = cls(**deep_merge(data, cls.resolve_paths(changes, Path.cwd())))
            config._config_dir = str(path.resolve().parent)
            return config
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_yaml(self) -> str:
        """The resolved config (defaults included) as YAML, each key under its documentation."""
        import textwrap

        import yaml

        lines = [f"# {self.kind} config (resolved; defaults included)"]
        values = self.to_dict()
        for name, info in type(self).model_fields.items():
            doc = " ".join((info.description or "").split())
            lines += [f"# {line}" for line in textwrap.wrap(doc, 98)]
            lines.append(yaml.safe_dump({name: values[name]}, sort_keys=False, width=100).rstrip())
        return "\n".join(lines) + "\n"


def suggest(key: str, known: Iterable[str]) -> str:
    """``'lerning_rate' (did you mean 'learning_rate'?)`` or just ``'key'``."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per pydantic error joined by ``; ``: ``key.sub: what is wrong (got value)``."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *error["loc"]) if p != "")
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error":
            msg = f"must be one of {error['ctx']['expected'].replace(' or ', ', ')}"
        else:
            msg = msg[:1].lower() + msg[1:]
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, Mapping) else f" (got {got!r})"
        # "key must be one of ..." reads as a sentence; other messages follow "key: ".
        parts.append(f"{loc} {msg}{shown}" if msg.startswith("must ") else f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["steps=3", "reward_params.scale=100"]`` -> ``{"steps": 3, "reward_params": {"scale": 100}}``.

    Values are read as YAML (``3`` -> int, ``[q_proj,v_proj]`` -> list, ``null``), so an override
    means what the same text means in the file.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like key=value (dotted for nested keys, "
                              "e.g. trainer.learning_rate=1e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return out


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings are merged, other values replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- sections shared by SFT and PPO --------------------------------------------------------------------


class ModelSection(ConfigModel):
    """Model loading (both trainers)."""

    entry_point: Literal[ENTRY_POINTS] = "radialog_lora"
    """"radialog_lora": the RaDialog release with its own LoRA as the starting point; "fresh_lora": a new
    adapter (see the trainer's documentation for its base)."""
    model_path: ModelPath = None
    """RaDialog release directory (or a merged directory for SFT fresh_lora); a local path or hub id."""
    model_base: ModelPath = None
    """Base LLaVA-1.5 directory (or hub id)."""
    adapter_path: ModelPath = None
    """Start from this saved adapter (PEFT directory) instead of the release's or a fresh one."""
    precision: Literal[PRECISIONS] = "16bit"
    """Weights precision: 16bit, 8bit or 4bit (QLoRA: nf4 + double quantisation)."""
    dtype: str | None = None
    """Compute dtype: bf16 (default), fp16 or fp32."""
    device: str | None = None
    """"cpu" forces the CPU; otherwise each process uses the GPU its launcher assigns (pick GPUs with
    CUDA_VISIBLE_DEVICES)."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (non-reentrant; enabled before LoRA is attached)."""
    system_prompt: str | None = None
    """System text that opens RaDialog's conversation template (default: RaDialog's own,
    radialog_rl.data.prompts.SYSTEM_PROMPT). Use the same value for SFT, PPO and evaluation: it is
    part of what the model was trained on. "" drops it (the calibration demo does: on the tiny
    release's character-level tokenizer it is ~200 tokens that dilute the 16 image positions)."""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_dtype(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class LoraSection(ConfigModel):
    """The shape of a fresh adapter (both trainers)."""

    lora_r: Annotated[int, Field(ge=1)] | None = None
    """Rank of a fresh adapter (fresh_lora only; default RaDialog's 128)."""
    lora_alpha: Annotated[int, Field(ge=1)] | None = None
    """LoRA alpha of a fresh adapter (default 2 x lora_r, RaDialog's 256)."""
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Dropout of a fresh adapter (default RaDialog's 0.05)."""
    lora_target_modules: list[str] | None = None
    """Modules a fresh adapter wraps (default RaDialog's seven LLaMA projections; add "lm_head" when
    the output layer must learn too)."""

    @model_validator(mode="after")
    def _shape_only_a_new_adapter(self):
        shaping = [k for k in LoraSection.model_fields if getattr(self, k) is not None]
        if shaping and (getattr(self, "entry_point", None) != "fresh_lora" or getattr(self, "adapter_path", None)):
            raise ConfigError(
                f"{', '.join(shaping)} shape a new adapter (entry_point 'fresh_lora' without adapter_path); "
                "a loaded adapter (the release's, or adapter_path) keeps the shape in its adapter_config.json"
            )
        return self


class RunSection(ConfigModel):
    """What a run does with its output directory (both trainers)."""

    overwrite: bool = False
    """Start again in an output directory that holds a previous run of this kind: its own files
    (checkpoints, metrics, logs) are removed when training starts, nothing else is."""
