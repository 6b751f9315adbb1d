"""RaDialog release + base LLaVA -> a ready ``LlavaLlamaForCausalLM`` (``docs/checkpoint-format.md`` §1-§6).

:func:`load_release` runs these steps, each a public function (the research code's name for it,
:func:`load_baseline_llava_model_with_vision_modules`, returns the model alone):

1. :func:`load_llava_config`: RaDialog's ``config.json`` read with our config class (legacy
   ``"model_type": "llava"`` never goes through ``AutoConfig``).
2. base LLaVA weights from ``model_base`` via ``from_pretrained`` (16/8/4-bit); the base's
   CLIP-shaped projector does not fit BioViL-T's 512-d features and is reported as mismatched.
3. :func:`reset_mm_projector_to_fix_wrong_shape`: rebuild the projector from the config with a
   defined (seeded) initialisation.
4. :func:`load_non_lora_trainables`: projector + fine-tuned vision tower (+ any other trained
   non-LoRA tensors) with the documented prefix rule; rotary ``inv_freq`` buffers are skipped.
5. :func:`load_vision_tower_weights` (research name ``merge_llm_with_vision_tower``): a tower from
   a BioViL-T ``.pt`` file when the release did not carry one (or an explicit, opted-in random
   initialisation).
6. :func:`resize_embeddings_to_tokenizer` (research name ``modify_model_for_image_input``): token
   embeddings resized to the tokenizer (mean-resizing, never uninitialised memory).
7. everything frozen, eval mode; a :class:`LoadingInfo` reporting where each part came from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError as _SafetensorError
from torch import nn

from radialog_rl.constants import LLAVA_BASE_HUB_ID, RADIALOG_HUB_ID
from radialog_rl.errors import CheckpointError, ConfigError
from radialog_rl.loading.files import find_first, load_tensor_file, resolve_model_dir
from radialog_rl.loading.keys import (
    KeyReport,
    load_state_dict_checked,
    matches_any,
    normalize_non_lora_keys,
    strip_prefix,
)
from radialog_rl.loading.precision import PrecisionSpec, guard_cpu_4bit_layers, precision_spec
from radialog_rl.loading.tokenizer import load_pretrained_llava_tokenizer_with_image_support
from radialog_rl.loading.zero3 import outside_zero3_init
from radialog_rl.modeling.llava import LlavaLlamaConfig, LlavaLlamaForCausalLM
from radialog_rl.modeling.projector import build_mm_projector, projector_input_dim

logger = logging.getLogger(__name__)

NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")  # merged dirs: safetensors
BIOVIL_T_FILE = "biovil_t_image_model_proj_size_128.pt"
#: Buffers that old checkpoints carry and the model recomputes (LLaMA rotary frequencies).
RECOMPUTED_BUFFERS = ("*rotary_emb.inv_freq", "*rotary_emb.original_inv_freq")
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."


@dataclass
class LoadingInfo:
    """Where each part of a loaded model came from, and what did not fit (also logged)."""

    model_path: str = ""
    model_base: str = ""
    precision: str = "16bit"
    dtype: str = "bfloat16"
    base_missing: list[str] = field(default_factory=list)
    base_unexpected: list[str] = field(default_factory=list)
    base_mismatched: list[str] = field(default_factory=list)
    projector_source: str = ""
    vision_tower_source: str = ""
    non_lora: KeyReport | None = None
    resized_embeddings: tuple[int, int] | None = None
    guarded_4bit_layers: int = 0

    def summary(self) -> str:
        lines = [
            f"base LLM: {self.model_base} ({self.precision}, {self.dtype})",
            f"config: {self.model_path}",
            f"projector: {self.projector_source}",
            f"vision tower: {self.vision_tower_source}",
        ]
        if self.non_lora is not None:
            lines.append(self.non_lora.summary())
        if self.resized_embeddings:
            lines.append("token embeddings resized %d -> %d (mean-resizing)" % self.resized_embeddings)
        return "; ".join(lines)


def load_llava_config(model_path: str | os.PathLike, **overrides) -> LlavaLlamaConfig:
    """Read a LLaVA/RaDialog ``config.json`` with :class:`LlavaLlamaConfig`.

    ``"model_type": "llava"`` (RaDialog, LLaVA-1.5) is accepted and rewritten to ``llava_llama``:
    through ``AutoConfig`` it would silently become transformers' unrelated built-in LLaVA config.
    """
    path = Path(model_path)
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"config {path} must hold a JSON object")
    model_type = data.pop("model_type", "llava_llama")
    if model_type not in ("llava", "llava_llama", "llama"):
        raise ConfigError(f"config {path} has model_type {model_type!r}; expected a LLaVA-1.5 config")
    # transformers 5 reads "dtype"; old files say "torch_dtype".
    if "torch_dtype" in data and "dtype" not in data:
        data["dtype"] = data.pop("torch_dtype")
    data.update(overrides)
    return LlavaLlamaConfig(**data)


def reset_mm_projector_to_fix_wrong_shape(
    model: LlavaLlamaForCausalLM, seed: int = 0, force: bool = False
) -> bool:
    """Rebuild ``model.model.mm_projector`` from the config if its input size is wrong (or ``force``).

    The base LLaVA checkpoint carries a CLIP projector (``[4096, 1024]``) where BioViL-T needs
    ``[4096, 512]``. The new projector gets a seeded default initialisation (never uninitialised
    memory) and must then be loaded from ``non_lora_trainables``.

    Returns:
        True when the projector was rebuilt.
    """
    config = model.config
    current = model.model.mm_projector
    if projector_input_dim(current) == config.mm_hidden_size and not force:
        return False
    ref = next(model.model.embed_tokens.parameters())
    dtype = ref.dtype if ref.is_floating_point() else torch.bfloat16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = build_mm_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
    model.model.mm_projector = projector.to(device=ref.device, dtype=dtype)
    return True


def load_non_lora_trainables(
    model: LlavaLlamaForCausalLM,
    path_or_state: str | os.PathLike | dict[str, torch.Tensor],
) -> KeyReport:
    """Load ``non_lora_trainables`` (projector, vision tower, other trained non-LoRA tensors).

    Keys are normalised with the §4 prefix rule. Every key must land in a parameter or buffer of
    the model with the same shape; rotary ``inv_freq`` buffers are skipped (the model recomputes
    them). If the file carries vision-tower keys it must carry the whole tower.

    Raises:
        CheckpointError: unexpected keys, shape mismatches, or a partial vision tower (keys named).
    """
    what = "non_lora_trainables"
    if isinstance(path_or_state, dict):
        state = path_or_state
    else:
        what = str(path_or_state)
        state = load_tensor_file(path_or_state, what="non_lora_trainables")
    state = normalize_non_lora_keys(state)
    has_tower = any(k.startswith(VISION_PREFIX) for k in state)
    allow_missing = ["*"]  # most of the LLM is not in this file by design
    report = load_state_dict_checked(
        model, state, what=what, ignore_unexpected=RECOMPUTED_BUFFERS, allow_missing=allow_missing,
        raise_on_problems=False,
    )
    if has_tower:
        tower_keys = {VISION_PREFIX + k for k in model.model.vision_tower.state_dict()}
        report.missing = sorted(k for k in tower_keys if k not in state)
    report.raise_if_problems(
        "The file does not fit this model: check that config.json belongs to the same release"
    )
    return report


def load_biovil_t_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``biovil_t_image_model_proj_size_128.pt`` (weights_only) as tower-relative keys.

    Accepts the file's own keys (``encoder.encoder.conv1.weight``) and, for convenience, keys under
    ``model.vision_tower.`` or a ``model.`` prefix.
    """
    state = load_tensor_file(path, what="BioViL-T image weights")
    for prefix in (VISION_PREFIX, "vision_tower.", "model."):
        if any(k.startswith(prefix) for k in state):
            state = strip_prefix(state, prefix)
            break
    return state


def load_vision_tower_weights(
    model: LlavaLlamaForCausalLM,
    vision_weights: str | os.PathLike | dict[str, torch.Tensor] | None,
) -> KeyReport:
    """Load BioViL-T weights into ``model.model.vision_tower`` with strict key accounting.

    ``vision_weights`` is a BioViL-T ``.pt`` path or a tower-relative state dict. The tower is
    frozen and put in eval mode (BatchNorm running statistics; see ``modeling/biovil.py``).
    """
    tower = model.model.vision_tower
    if isinstance(vision_weights, dict):
        state, what = vision_weights, "vision tower weights"
    else:
        state, what = load_biovil_t_state_dict(vision_weights), str(vision_weights)
    report = load_state_dict_checked(tower, state, what=what)
    tower.requires_grad_(False)
    tower.eval()
    return report


def resize_embeddings_to_tokenizer(model: LlavaLlamaForCausalLM, tokenizer) -> tuple[int, int] | None:
    """Resize token embeddings (and ``lm_head``) to ``len(tokenizer)`` when they differ.

    Uses transformers' mean-resizing (new rows drawn from the old rows' statistics): a defined
    initialisation, unlike the old loaders' uninitialised reallocation. Returns ``(old, new)`` or
    None when nothing changed (RaDialog: 32000 -> 32000).
    """
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if old == new:
        return None
    model.resize_token_embeddings(new, mean_resizing=True)
    return old, new


#: The research code's names for the two steps above (they load tower weights / resize embeddings).
merge_llm_with_vision_tower = load_vision_tower_weights
modify_model_for_image_input = resize_embeddings_to_tokenizer


def _base_report_problems(info: dict) -> tuple[list[str], list[str], list[str], bool]:
    """Split from_pretrained's loading info into what is expected and what is not.

    Returns ``(missing, unexpected, mismatched, projector_loaded)``: the first three hold only the
    keys that are problems; ``projector_loaded`` says whether the base's projector fit the config.
    """
    later = [VISION_PREFIX + "*", PROJECTOR_PREFIX + "*"]  # filled by non_lora / tower steps
    projector = [PROJECTOR_PREFIX + "*"]
    all_missing = list(info.get("missing_keys", []))
    all_mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])]
    missing = [k for k in all_missing if not matches_any(k, later)]
    unexpected = [k for k in info.get("unexpected_keys", []) if not matches_any(k, RECOMPUTED_BUFFERS)]
    mismatched = [k for k in all_mismatched if not matches_any(k, projector)]
    projector_loaded = not any(matches_any(k, projector) for k in all_missing + all_mismatched)
    return missing, unexpected, mismatched, projector_loaded


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_baseline_llava_model_with_vision_modules(
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    precision: str = "16bit",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    vision_tower_path: str | os.PathLike | None = None,
    allow_random_init: bool = False,
    tokenizer=None,
    local_files_only: bool | None = None,
) -> LlavaLlamaForCausalLM:
    """The research code's loader: :func:`load_release`, with the tokenizer and the loading report
    attached to the model as ``model.tokenizer`` / ``model.loading_info`` (what its scripts read).

    Inside the package, :func:`radialog_rl.loading.bundle.load_model` is used instead; it returns
    them in a :class:`~radialog_rl.loading.bundle.LoadedModel`. Arguments as :func:`load_release`.
    """
    model, tokenizer, info = load_release(
        model_path, model_base, precision_spec(precision, dtype), device, device_map,
        vision_tower_path=vision_tower_path, allow_random_init=allow_random_init, tokenizer=tokenizer,
        local_files_only=local_files_only,
    )
    model.loading_info = info
    model.tokenizer = tokenizer
    return model


def load_release(
    model_path: str | os.PathLike | None = None,
    model_base: str | os.PathLike | None = None,
    precision: PrecisionSpec | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    *,
    vision_tower_path: str | os.PathLike | None = None,
    allow_random_init: bool = False,
    tokenizer=None,
    local_files_only: bool | None = None,
) -> tuple[LlavaLlamaForCausalLM, object, LoadingInfo]:
    """Load RaDialog's network without its LoRA: base LLaVA + RaDialog config + non-LoRA weights.

    Args:
        model_path: RaDialog release directory or hub id (``config.json``, ``non_lora_trainables``);
            default ``ChantalPellegrini/RaDialog-interactive-radiology-report-generation``. A merged
            directory written by ``save_lora_merged_llava_model_to_local_dir`` also works.
        model_base: base LLaVA-1.5 directory or hub id (weights + tokenizer); default
            ``liuhaotian/llava-v1.5-7b``. May equal ``model_path`` for a merged directory.
        precision: a :class:`PrecisionSpec` (``precision_spec("4bit", "bf16")``; default 16-bit bf16):
            "16bit", "8bit" or "4bit" (bitsandbytes nf4 + double quantisation) and the compute dtype
            ("bf16" default, "fp16", "fp32"); the projector, vision tower and ``lm_head`` are never
            quantised and end up in it.
        device: where to put the model (default cuda when available, else cpu); ignored when
            ``device_map`` is given.
        device_map: passed to ``from_pretrained`` (e.g. "auto").
        vision_tower_path: BioViL-T ``.pt`` used when ``non_lora_trainables`` has no tower.
        allow_random_init: opt in to a randomly initialised projector / tower when their weights are
            missing (only sensible for new pretraining); otherwise that is an error.
        tokenizer: a tokenizer to size the embeddings against (default: the base's, image-ready).
        local_files_only: never download (default: ``HF_HUB_OFFLINE``).

    Returns:
        ``(model, tokenizer, info)``: the model frozen and in eval mode, the image-ready tokenizer its
        embeddings were sized against, and a :class:`LoadingInfo`.

    Under a DeepSpeed ZeRO-3 launch the model is loaded whole, outside ``zero.Init``
    (:func:`~radialog_rl.loading.zero3.outside_zero3_init`); DeepSpeed partitions it when the run
    prepares it.
    """
    with outside_zero3_init():
        return _load_release(model_path, model_base, precision, device, device_map, vision_tower_path,
                             allow_random_init, tokenizer, local_files_only)


def _load_release(model_path, model_base, precision, device, device_map, vision_tower_path,
                  allow_random_init, tokenizer, local_files_only):
    spec = precision if precision is not None else precision_spec()
    model_path = model_path or RADIALOG_HUB_ID
    model_base = model_base or LLAVA_BASE_HUB_ID
    release_dir = resolve_model_dir(
        model_path, what="RaDialog release", required_files=["config.json"],
        local_files_only=local_files_only,
    )
    base_dir = resolve_model_dir(
        model_base, what="base LLaVA model",
        required_files=["config.json", "model.safetensors|model.safetensors.index.json|"
                        "pytorch_model.bin|pytorch_model.bin.index.json"],
        local_files_only=local_files_only,
    )
    config = load_llava_config(release_dir)
    config.check_vision_tower()
    if tokenizer is None:
        tokenizer = load_pretrained_llava_tokenizer_with_image_support(
            base_dir, config.mm_use_im_start_end, config.mm_use_im_patch_token
        )
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if device_map is None:
        device_map = {"": str(device or _default_device())}

    info = LoadingInfo(model_path=str(release_dir), model_base=str(base_dir),
                       precision=spec.precision, dtype=str(spec.compute_dtype).removeprefix("torch."))
    model, base_info = _from_pretrained(base_dir, config, spec, device_map)
    missing, unexpected, mismatched, base_has_projector = _base_report_problems(base_info)
    info.base_missing, info.base_unexpected, info.base_mismatched = missing, unexpected, mismatched
    if missing or unexpected or mismatched:
        KeyReport(
            what=f"base LLaVA weights in {base_dir}", missing=missing, unexpected=unexpected,
            mismatched=[(k, (), ()) for k in mismatched],
        ).raise_if_problems("Is model_base a LLaVA-1.5 checkpoint with the same sizes as config.json?")
    info.guarded_4bit_layers = guard_cpu_4bit_layers(model)
    # The base had a CLIP-shaped (or no) projector: from_pretrained left it randomly initialised.
    if reset_mm_projector_to_fix_wrong_shape(model, force=not base_has_projector):
        info.projector_source = "rebuilt (base projector had the wrong shape)"
    else:
        info.projector_source = f"{base_dir} (base weights)"

    non_lora_file = find_first(release_dir, NON_LORA_FILES)
    non_lora_keys: set[str] = set()
    if non_lora_file is not None:
        info.non_lora = load_non_lora_trainables(model, non_lora_file)
        non_lora_keys = set(info.non_lora.loaded)
    if any(k.startswith(PROJECTOR_PREFIX) for k in non_lora_keys):
        info.projector_source = str(non_lora_file)
    elif not base_has_projector:
        if not allow_random_init:
            raise CheckpointError(
                f"no projector weights: {release_dir} has no non_lora_trainables with "
                "model.mm_projector.* and the base's projector does not fit. Pass the RaDialog release "
                "directory as model_path, or allow_random_init=True to start from a fresh projector"
            )
        info.projector_source = "random initialisation (allow_random_init=True)"

    if any(k.startswith(VISION_PREFIX) for k in non_lora_keys):
        info.vision_tower_source = str(non_lora_file)
    elif vision_tower_path is not None or find_first(release_dir, [BIOVIL_T_FILE]):
        path = vision_tower_path or find_first(release_dir, [BIOVIL_T_FILE])
        load_vision_tower_weights(model, path)
        info.vision_tower_source = str(path)
    elif allow_random_init:
        info.vision_tower_source = "random initialisation (allow_random_init=True)"
    else:
        raise CheckpointError(
            f"no vision tower weights: {release_dir} has no non_lora_trainables with "
            f"model.vision_tower.* and no {BIOVIL_T_FILE}. Pass vision_tower_path=<{BIOVIL_T_FILE}> "
            "or the RaDialog release directory as model_path"
        )

    _cast_unquantized_modules(model, spec.compute_dtype)
    info.resized_embeddings = resize_embeddings_to_tokenizer(model, tokenizer)
    model.requires_grad_(False)
    model.eval()
    logger.info("loaded RaDialog model: %s", info.summary())
    return model, tokenizer, info


def _from_pretrained(base_dir: Path, config: LlavaLlamaConfig, spec, device_map):
    quantization = spec.quantization_config()
    kwargs = dict(
        config=config,
        dtype=spec.compute_dtype,
        device_map=device_map,
        output_loading_info=True,
        # The base's projector is CLIP-shaped; mismatches are reported and checked by the caller.
        ignore_mismatched_sizes=True,
        # transformers 5.24/5.25 kernelize every load unless told not to (use_kernels None -> True).
        # On CUDA that fetches compiled layers from the hub (kernels-community/rotary for LLaMA's
        # rotary embedding) at load time: a download and foreign binary code nobody asked for, and
        # offline the load fails. Seen on an H200 (docs/stack-notes.md). Always off here.
        use_kernels=False,
    )
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        # transformers prints its own table of missing/mismatched keys; ours (LoadingInfo, KeyReport)
        # accounts for every key and explains the expected ones, so silence the duplicate.
        with _transformers_verbosity_error():
            return LlavaLlamaForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"cannot load base LLaVA weights from {base_dir}: a weight file is not a plain tensor "
            "file (loading it would run Python code; weights_only=True refused it). Only use files "
            "from sources you trust, and prefer safetensors"
        ) from exc
    except (OSError, RuntimeError, ValueError, EOFError, _SafetensorError) as exc:
        damaged = _damaged_weight_file(base_dir)
        if damaged is not None:
            raise CheckpointError(f"cannot load base LLaVA weights: {damaged} is empty or truncated "
                                  f"({type(exc).__name__}); download it again") from exc
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load base LLaVA weights from {base_dir}: {message}") from exc


def _damaged_weight_file(directory: Path) -> Path | None:
    """The first empty or truncated weight file in ``directory`` (to name it in the error), or None.

    A safetensors file is truncated when it is shorter than its header says; a torch zip file when
    its central directory (at the end) is missing.
    """
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        size = path.stat().st_size
        if size == 0:
            return path
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                head = f.read(8)
                try:
                    header = json.loads(f.read(struct.unpack("<Q", head)[0])) if len(head) == 8 else None
                except ValueError:
                    return path
            if header is None:
                return path
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size < 8 + struct.unpack("<Q", head)[0] + end:
                return path
        elif not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                if f.read(2) != b"\x80\x02":  # not a legacy (protocol 2) torch pickle either
                    return path
    return None


@contextlib.contextmanager
def _transformers_verbosity_error():
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _cast_unquantized_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Projector, vision tower and ``lm_head`` in the compute dtype (BatchNorm buffers included)."""
    for module in (model.model.mm_projector, model.model.vision_tower, model.lm_head):
        module.to(dtype=dtype)
