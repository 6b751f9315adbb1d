"""LoRA adapters, value heads, and the four training entry points researchers call by name.

- :func:`radialog_lora_config`: RaDialog's LoRA (r 128, alpha 256, dropout 0.05, the seven LLaMA
  projections, bias none, causal LM), with overrides.
- :func:`read_adapter` / :func:`load_lora_weights`: RaDialog's ``adapter_model.bin`` (old PEFT key
  names) or any PEFT adapter directory, mapped explicitly onto the injected LoRA parameters; every
  file tensor must land and every LoRA parameter must receive one (``docs/checkpoint-format.md`` §3).
- :func:`attach_lora`: fresh (PEFT's standard init) or pretrained, trainable or frozen, optionally a
  frozen ``reference`` copy for PPO.
- :func:`prepare_quantized_for_training`: k-bit preparation, then the vision tower and projector cast
  back to the compute dtype (PEFT's helper upcasts every non-quantised weight to fp32).
- :func:`add_value_head_to_LlavaLlamaForCausalLM_model` / :func:`load_value_head` /
  :func:`save_value_head_model`: the scalar value head (TRL's layout).

The research code's training entry points live in :mod:`.entry_points`; the one loader behind them
is :func:`radialog_rl.loading.bundle.load_model`; merging lives in :mod:`.export`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from radialog_rl.constants import RADIALOG_HUB_ID
from radialog_rl.errors import CheckpointError
from radialog_rl.loading.files import find_first, load_tensor_file, resolve_model_dir, save_tensor_file
from radialog_rl.loading.keys import KeyReport, load_state_dict_checked
from radialog_rl.loading.precision import parse_dtype
from radialog_rl.modeling.llava import unwrap_llava
from radialog_rl.modeling.value_head import REFERENCE_ADAPTER_NAME, LlavaWithValueHead, ReferenceMode

logger = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
VALUE_HEAD_FILE = "value_head.safetensors"
TRL_VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")
# Old PEFT: "...q_proj.lora_A.weight"; current PEFT in memory: "...q_proj.lora_A.default.weight".
# A LoRA tensor in a file: "...q_proj.lora_A.weight", optionally with an adapter name before
# weight/bias ("...lora_A.default.weight").
_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+)\.(?:[A-Za-z0-9_\-]+\.)?(weight|bias)$")


def radialog_lora_config(**overrides):
    """RaDialog's LoRA configuration as a ``peft.LoraConfig`` (keyword overrides replace fields)."""
    from peft import LoraConfig

    fields = dict(
        r=128, lora_alpha=256, lora_dropout=0.05, target_modules=list(LLAMA_PROJECTIONS),
        bias="none", task_type="CAUSAL_LM",
    )
    fields.update(overrides)
    return LoraConfig(**fields)


# -- reading and mapping adapter weights --------------------------------------------------------------


def read_adapter(path: str | os.PathLike):
    """Read an adapter: a PEFT directory or an ``adapter_model.{bin,safetensors}`` file.

    Returns:
        ``(LoraConfig, state_dict)``; the config comes from ``adapter_config.json`` beside the weights
        (RaDialog's standard configuration when there is none, with a logged warning).
    """
    from peft import LoraConfig

    path = Path(path)
    if path.is_dir():
        weights = find_first(path, ADAPTER_FILES)
        if weights is None:
            raise CheckpointError(f"adapter directory {path} has no {' or '.join(ADAPTER_FILES)}")
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"adapter not found: {path}")
    config_file = weights.parent / "adapter_config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
        if raw.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not LORA")
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in raw.items() if k in known and k != "peft_type"})
    else:
        logger.warning("no adapter_config.json beside %s: assuming RaDialog's LoRA configuration", weights)
        config = radialog_lora_config()
    config.inference_mode = False
    # The adapter is attached to whatever base the caller loaded (and mapped key by key), so the
    # base path recorded at training time is only informative; PEFT records the actual one.
    config.base_model_name_or_path = None
    return config, load_tensor_file(weights, what="LoRA adapter")


def is_lora_key(key: str, adapter_name: str) -> bool:
    """True for a parameter of LoRA adapter ``adapter_name`` (``...lora_A.<name>.weight``)."""
    return re.search(rf"\.lora_[A-Za-z_]+\.{re.escape(adapter_name)}\.(weight|bias)$", key) is not None


def lora_parameter_names(llava: nn.Module, adapter_name: str) -> set[str]:
    """State-dict keys of ``llava`` that belong to LoRA adapter ``adapter_name``."""
    return {k for k in llava.state_dict() if is_lora_key(k, adapter_name)}


def map_adapter_key(file_key: str, adapter_name: str) -> str:
    """Adapter-file key -> key in the LoRA-injected ``LlavaLlamaForCausalLM``.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``model.layers.0.self_attn.q_proj.lora_A.<adapter_name>.weight``. Keys that already carry the
    adapter name (any name) are accepted too: the name is replaced by ``adapter_name``.
    """
    key = file_key.removeprefix("base_model.model.")
    return _ADAPTER_KEY.sub(lambda m: f".{m.group(1)}.{adapter_name}.{m.group(2)}", key)


def load_lora_weights(
    model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default", what: str = "adapter"
) -> KeyReport:
    """Copy adapter tensors into adapter ``adapter_name`` of a LoRA-injected model, strictly.

    ``model`` is a ``PeftModel``, a value-head model (:class:`LlavaWithValueHead`) or the injected
    ``LlavaLlamaForCausalLM``. Raises :class:`CheckpointError` naming keys that found no parameter,
    parameters that got no tensor, and shape mismatches.
    """
    llava = unwrap_llava(model)
    targets = llava.state_dict(keep_vars=True)
    expected = lora_parameter_names(llava, adapter_name)
    report = KeyReport(what=what)
    mapped: dict[str, torch.Tensor] = {}
    for file_key, tensor in state.items():
        key = map_adapter_key(file_key, adapter_name)
        if key not in expected:
            report.unexpected.append(file_key)
        elif tuple(targets[key].shape) != tuple(tensor.shape):
            report.mismatched.append((file_key, tuple(tensor.shape), tuple(targets[key].shape)))
        else:
            mapped[key] = tensor
    report.missing = sorted(expected - set(mapped) - {map_adapter_key(k, adapter_name) for k, *_ in report.mismatched})
    report.raise_if_problems("Does the adapter belong to this base model (layers, r, target modules)?")
    with torch.no_grad():
        for key, tensor in mapped.items():
            targets[key].copy_(tensor.to(device=targets[key].device, dtype=targets[key].dtype))
            report.loaded.append(key)
    return report


# -- attaching adapters ------------------------------------------------------------------------------


def attach_lora(
    model: nn.Module,
    adapter: str | os.PathLike | None = None,
    *,
    lora_config=None,
    trainable: bool = True,
    reference_copy: bool = False,
):
    """Wrap ``model`` (an ``LlavaLlamaForCausalLM``) in a ``PeftModel`` with adapter "default".

    Args:
        adapter: adapter directory/file to load (strict key accounting); None = fresh LoRA with PEFT's
            standard initialisation (B = 0, so the policy starts equal to the base).
        lora_config: the LoRA config for a fresh adapter (default :func:`radialog_lora_config`).
        trainable: whether the adapter's parameters require grad.
        reference_copy: also add a frozen adapter named "reference" holding the same weights (PPO's
            reference when a pretrained adapter is the starting policy).
    """
    from peft import get_peft_model

    state = None
    if adapter is not None:
        lora_config, state = read_adapter(adapter)
    lora_config = lora_config or radialog_lora_config()
    peft_model = get_peft_model(model, lora_config)
    if state is not None:
        load_lora_weights(peft_model, state, "default", what=f"LoRA adapter {adapter}")
    if reference_copy:
        peft_model.add_adapter(REFERENCE_ADAPTER_NAME, lora_config)
        llava = unwrap_llava(peft_model)
        default_keys = lora_parameter_names(llava, "default")
        source = {k: v for k, v in llava.state_dict().items() if k in default_keys}
        load_lora_weights(peft_model, source, REFERENCE_ADAPTER_NAME, what="reference adapter copy")
        peft_model.set_adapter("default")
    freeze_all_non_lora_params(peft_model, trainable_adapters=["default"] if trainable else [])
    # get_peft_model leaves the model in train mode (LoRA dropout on). Like from_pretrained, return it
    # in eval mode: training code switches modes itself, and PPO keeps dropout off throughout.
    return peft_model.eval()


def freeze_all_non_lora_params(model: nn.Module, trainable_adapters: list[str] | None = None) -> dict:
    """Freeze everything except the LoRA parameters of ``trainable_adapters`` (default: "default").

    Returns and logs a report: trainable / total parameter counts and the trainable share.
    """
    trainable_adapters = ["default"] if trainable_adapters is None else trainable_adapters
    for name, param in model.named_parameters():
        param.requires_grad_(any(is_lora_key(name, adapter) for adapter in trainable_adapters))
    return trainable_parameter_report(model)


def trainable_parameter_report(model: nn.Module) -> dict:
    """``{"trainable": n, "total": n, "percent": x}`` (parameters, not bytes); also logged."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
    logger.info("trainable parameters: %(trainable)d of %(total)d (%(percent).4f%%)", report)
    return report


def prepare_quantized_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """k-bit preparation for a bitsandbytes base (no-op for 16-bit), before LoRA is attached.

    PEFT's ``prepare_model_for_kbit_training`` enables input gradients (needed for LoRA under
    gradient checkpointing) but upcasts every non-quantised weight to fp32; the vision tower and
    projector are cast back to the compute dtype, as the research code did by hand.
    """
    if not getattr(model, "is_quantized", False):
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model
    from peft import prepare_model_for_kbit_training

    compute_dtype = model.model.embed_tokens.weight.dtype
    quant = getattr(model.config, "quantization_config", None)
    compute_dtype = parse_dtype(getattr(quant, "bnb_4bit_compute_dtype", None) or compute_dtype)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model.model.vision_tower.to(dtype=compute_dtype)
    model.model.mm_projector.to(dtype=compute_dtype)
    return model


# -- value heads -------------------------------------------------------------------------------------


def add_value_head_to_LlavaLlamaForCausalLM_model(  # noqa: N802 (the research code's name)
    model: nn.Module,
    value_head_path: str | os.PathLike | None = None,
    *,
    dropout: float = 0.0,
    reference_mode: ReferenceMode | str | None = None,
) -> LlavaWithValueHead:
    """Wrap a (PEFT) LLaVA model with a zero-initialised scalar value head, or load a saved one.

    ``value_head_path``: our ``value_head.safetensors`` (or a directory holding it), TRL's
    ``pytorch_model.bin`` with ``v_head.summary.*``, or a full model file containing those keys.
    """
    wrapped = LlavaWithValueHead(model, dropout=dropout, reference_mode=reference_mode)
    if value_head_path is not None:
        load_value_head(wrapped, value_head_path)
    return wrapped


def load_value_head(model: LlavaWithValueHead, path: str | os.PathLike) -> None:
    """Load ``v_head.summary.{weight,bias}`` from our file, TRL's file, or a full model file."""
    path = Path(path)
    if path.is_dir():
        found = find_first(path, (VALUE_HEAD_FILE, "pytorch_model.bin", "model.safetensors"))
        if found is None:
            raise CheckpointError(f"{path} has no {VALUE_HEAD_FILE} (or TRL's pytorch_model.bin)")
        path = found
    state = load_tensor_file(path, what="value head")
    head = {k: v for k, v in state.items() if k.removeprefix("base_model.model.") in TRL_VALUE_HEAD_KEYS}
    head = {k.removeprefix("base_model.model."): v for k, v in head.items()}
    missing = [k for k in TRL_VALUE_HEAD_KEYS if k not in head]
    if missing:
        raise CheckpointError(f"value head file {path} lacks {', '.join(missing)}")
    extra = [k for k in state if k.removeprefix("base_model.model.") not in TRL_VALUE_HEAD_KEYS]
    if extra and path.name == VALUE_HEAD_FILE:
        raise CheckpointError(f"value head file {path} has unexpected keys: {', '.join(extra[:6])}")
    load_state_dict_checked(
        model.v_head, {k.removeprefix("v_head."): v for k, v in head.items()}, what=f"value head {path}"
    )


def save_default_adapter(peft_model: nn.Module, directory: str | os.PathLike,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adapter "default" of a ``PeftModel`` as a PEFT directory (``adapter_config.json`` +
    ``adapter_model.safetensors``); ``state_dict``: the (gathered) weights to write instead of the
    live ones. The PPO ``reference`` copy is never saved.

    ``save_embedding_layers=False``: the embeddings are frozen, and PEFT's "auto" reloads the base
    config (a hub lookup when the base is a hub id) only to compare vocabulary sizes.
    """
    directory = Path(directory)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    peft_model.save_pretrained(str(directory), selected_adapters=["default"], save_embedding_layers=False, **extra)
    return directory


def save_value_head_model(model: LlavaWithValueHead, directory: str | os.PathLike) -> Path:
    """Save the policy adapter (PEFT directory, adapter "default" only) plus ``value_head.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    policy = model.pretrained_model
    if hasattr(policy, "save_pretrained") and hasattr(policy, "peft_config"):
        save_default_adapter(policy, directory)
    save_tensor_file(model.value_head_state_dict(), directory / VALUE_HEAD_FILE)
    return directory


# -- adapter location --------------------------------------------------------------------------------


def radialog_adapter_path(radialog_lora_weights_path, model_path) -> Path:
    """The adapter to load: ``radialog_lora_weights_path`` when given (it must exist), else the one
    inside the RaDialog release ``model_path`` (default RaDialog's hub id)."""
    if radialog_lora_weights_path is not None:
        path = Path(radialog_lora_weights_path)
        if not path.exists():
            raise CheckpointError(f"adapter not found: {path}")
        return path
    return resolve_model_dir(
        model_path or RADIALOG_HUB_ID, what="RaDialog release",
        required_files=["adapter_model.safetensors|adapter_model.bin"],
    )
