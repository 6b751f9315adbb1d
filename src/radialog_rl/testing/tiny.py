"""A tiny, deterministic RaDialog release in the real on-disk layout.

Used by the tests, ``radialog-rl demo`` and users' own tests. The files are laid out exactly like
the real ones (``docs/checkpoint-format.md`` §1-§4), only small:

``OUT/llava-v1.5-tiny/``  base LLaVA: ``config.json`` (``"model_type": "llava"``, CLIP tower fields,
    a CLIP-shaped projector so the wrong-shape path runs), two ``pytorch_model-0000x-of-00002.bin``
    shards + ``pytorch_model.bin.index.json``, sentencepiece ``tokenizer.model`` built offline,
    ``tokenizer_config.json``, ``special_tokens_map.json``.
``OUT/RaDialog-tiny/``  RaDialog: ``config.json`` with the biovil fields, ``adapter_config.json`` +
    ``adapter_model.bin`` with old-PEFT key names, ``non_lora_trainables.bin`` with
    ``base_model.model.model.`` prefixes, BatchNorm buffers and rotary ``inv_freq`` buffers.
``OUT/biovil_t_image_model_proj_size_128.pt``  a BioViL-T image-model state dict.

Every dimension a 4-bit linear sees is a multiple of 64 (bitsandbytes' CPU repack needs it).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radialog_rl.modeling.biovil import BioViLTImageEncoder, tiny_biovil_config

logger = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the layout or values change; the demo cache is keyed on it

TINY_LLAMA = dict(
    vocab_size=384,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
TINY_CLIP_DIM = 192  # mm_hidden_size of the base's (wrong-shaped) CLIP projector
TINY_LORA_R = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant acting as an "
    "experienced radiologist. The assistant gives professional, detailed, and polite answers to "
    "the user's questions.",
    "USER: <image>. Predicted Findings: edema, cardiomegaly, pleural effusion, atelectasis, "
    "pneumothorax, consolidation, pneumonia, lung opacity, lung lesion, fracture, support devices, "
    "enlarged cardiomediastinum, pleural other, no finding, no common findings. ASSISTANT:",
    "You are to act as a radiologist and write the finding section of a chest x-ray radiology "
    "report for this X-ray image and the given predicted findings. Write in the style of a "
    "radiologist, write one fluent text without enumeration, be concise and don't provide "
    "explanations or reasons.",
    "The heart size is normal. The lungs are clear. There is no pleural effusion or pneumothorax. "
    "Mild cardiomegaly with small bilateral effusions. Is there evidence of edema in the image?",
    'Answer yes or no. yes no Yes No {"confidence": 0} {"confidence": 10} 1 2 3 4 5 6 7 8 9',
]


@dataclass(frozen=True)
class TinyRelease:
    """Paths of a tiny release (pass them where the real ones go)."""

    root: Path
    model_base: Path  # base LLaVA directory
    model_path: Path  # RaDialog release directory
    biovil_path: Path  # BioViL-T image weights

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def tiny_biovil_dict() -> dict:
    return asdict(tiny_biovil_config())


def build_tiny_tokenizer_model() -> bytes:
    """A deterministic sentencepiece BPE model (384 pieces, byte fallback, LLaMA's special ids)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=buffer,
        vocab_size=TINY_LLAMA["vocab_size"],
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0,
        num_threads=1,  # deterministic
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return buffer.getvalue()


def _write_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.model").write_bytes(build_tiny_tokenizer_model())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "pad_token": None,
        "model_max_length": 2048,
        "padding_side": "right",
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _randomize_batchnorm_buffers(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics so tests can tell loaded buffers from defaults."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(1000)
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _tower_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = BioViLTImageEncoder(tiny_biovil_config())
    with torch.no_grad():
        _randomize_batchnorm_buffers(tower, gen)
    return {k: v.clone() for k, v in tower.state_dict().items()}


def _normal(shape, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _llama_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    c = TINY_LLAMA
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    state = {"model.embed_tokens.weight": _normal((v, h), gen)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = _normal((h, h), gen)
        state[p + "mlp.gate_proj.weight"] = _normal((inter, h), gen)
        state[p + "mlp.up_proj.weight"] = _normal((inter, h), gen)
        state[p + "mlp.down_proj.weight"] = _normal((h, inter), gen)
        state[p + "input_layernorm.weight"] = 1 + _normal((h,), gen, 0.05)
        state[p + "post_attention_layernorm.weight"] = 1 + _normal((h,), gen, 0.05)
    state["model.norm.weight"] = 1 + _normal((h,), gen, 0.05)
    state["lm_head.weight"] = _normal((v, h), gen, 0.05)
    return state


def _projector_state(gen: torch.Generator, in_dim: int, prefix: str = "model.mm_projector.") -> dict:
    h = TINY_LLAMA["hidden_size"]
    return {
        prefix + "0.weight": _normal((h, in_dim), gen, 0.05),
        prefix + "0.bias": _normal((h,), gen, 0.01),
        prefix + "2.weight": _normal((h, h), gen, 0.05),
        prefix + "2.bias": _normal((h,), gen, 0.01),
    }


def _lora_in_out(name: str) -> tuple[int, int]:
    h, inter = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
    return {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.get(name, (h, h))


def _adapter_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Old-PEFT key names (no adapter name), both A and B non-zero (a trained adapter)."""
    state = {}
    for i in range(TINY_LLAMA["num_hidden_layers"]):
        for name in LORA_TARGETS:
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            p = f"base_model.model.model.layers.{i}.{block}.{name}."
            fan_in, fan_out = _lora_in_out(name)
            state[p + "lora_A.weight"] = _normal((TINY_LORA_R, fan_in), gen, 0.05)
            state[p + "lora_B.weight"] = _normal((fan_out, TINY_LORA_R), gen, 0.05)
    return state


def _base_config() -> dict:
    return {
        "_name_or_path": "llava-v1.5-tiny",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        **TINY_LLAMA,
        "torch_dtype": "float16",
        "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": TINY_CLIP_DIM,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
    }


def _radialog_config() -> dict:
    bio = tiny_biovil_config()
    config = _base_config()
    config.update(
        _name_or_path="RaDialog-tiny",
        mm_vision_tower="biovil",
        mm_hidden_size=bio.feature_dim,
        use_mm_proj=True,
        tune_mm_mlp_adapter=False,
        mv_type="concat",
        tokenizer_model_max_length=1300,
        use_cache=False,
        biovil=asdict(bio),
    )
    return config


def _adapter_config(base_name: str) -> dict:
    return {
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 2 * TINY_LORA_R,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": TINY_LORA_R,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
    }


def _save_sharded_bin(state: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json`` (LLaVA-1.5's layout)."""
    keys = list(state)
    per = (len(keys) + shards - 1) // shards
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].to(torch.float16).contiguous() for k in keys[s * per : (s + 1) * per]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_release(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> TinyRelease:
    """Write the tiny release under ``out_dir`` (reused if already complete) and return its paths.

    Deterministic: the same ``seed`` gives the same tensors. Tensors are stored as bf16/fp16 like the
    real release (``non_lora_trainables`` keeps int64 ``num_batches_tracked``).
    """
    root = Path(out_dir)
    release = TinyRelease(
        root=root,
        model_base=root / "llava-v1.5-tiny",
        model_path=root / "RaDialog-tiny",
        biovil_path=root / "biovil_t_image_model_proj_size_128.pt",
    )
    marker = root / "tiny_release.json"
    expected = {"version": TINY_VERSION, "seed": seed}
    if not overwrite and marker.is_file() and json.loads(marker.read_text()) == expected:
        return release
    release.model_base.mkdir(parents=True, exist_ok=True)
    release.model_path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    # Base LLaVA: LLaMA weights + CLIP-shaped projector; no vision tower (CLIP is loaded separately).
    base = _llama_state(gen)
    base.update(_projector_state(gen, TINY_CLIP_DIM))
    _save_sharded_bin(base, release.model_base)
    (release.model_base / "config.json").write_text(json.dumps(_base_config(), indent=2))
    (release.model_base / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2)
    )
    _write_tokenizer(release.model_base)

    # RaDialog: config, old-PEFT adapter, non-LoRA trainables (projector + fine-tuned tower).
    (release.model_path / "config.json").write_text(json.dumps(_radialog_config(), indent=2))
    (release.model_path / "adapter_config.json").write_text(
        json.dumps(_adapter_config(release.model_base.name), indent=2)
    )
    torch.save({k: v.to(torch.bfloat16) for k, v in _adapter_state(gen).items()},
               release.model_path / "adapter_model.bin")
    non_lora = {}
    for k, v in _projector_state(gen, tiny_biovil_dict()["vit_dim"] * 2).items():
        non_lora["base_model.model." + k] = v.to(torch.bfloat16)
    for k, v in _tower_state(seed + 1).items():
        non_lora["base_model.model.model.vision_tower." + k] = (
            v.to(torch.bfloat16) if v.is_floating_point() else v
        )
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(TINY_LLAMA["num_hidden_layers"]):  # old checkpoints carried these buffers
        non_lora[f"base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    torch.save(non_lora, release.model_path / "non_lora_trainables.bin")

    # BioViL-T image weights (the pretrained tower RaDialog started from).
    torch.save(_tower_state(seed + 2), release.biovil_path)
    marker.write_text(json.dumps(expected))
    logger.info("wrote tiny RaDialog release to %s", root)
    return release


def default_tiny_dir() -> Path:
    """Cache directory for the demo's tiny release (``$RADIALOG_RL_CACHE`` or ``~/.cache``)."""
    base = os.environ.get("RADIALOG_RL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radialog-rl"
    )
    return Path(base) / f"tiny-release-v{TINY_VERSION}"
