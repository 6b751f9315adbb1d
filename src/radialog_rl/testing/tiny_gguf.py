"""The tiny release's LLaMA trunk as a GGUF file, for serving with llama.cpp in tests.

Written with the ``gguf`` package (llama.cpp's own GGUF writer): architecture ``llama``, fp32
tensors under llama.cpp's tensor names, the tiny sentencepiece tokenizer as a ``llama`` (SPM)
vocabulary. Like llama.cpp's converter, the q/k projections are permuted from Hugging Face's
rotate-half RoPE layout to GGML's interleaved one. The weights are random, so the served model
answers with gibberish; tests use that (unparsable answers) or constrain it with a grammar.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from radialog_rl.testing.tiny import TINY_LLAMA, TinyRelease

__all__ = ["write_tiny_gguf"]

logger = logging.getLogger(__name__)

# Hugging Face LLaMA parameter -> llama.cpp tensor name ("{i}" = layer).
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from [first halves | second halves] to interleaved pairs."""
    out_dim = weight.shape[0]
    return weight.reshape(heads, 2, out_dim // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _load_trunk(model_base: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_base.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return {k: v for k, v in state.items() if "mm_projector" not in k}


def _vocabulary(tokenizer_model: Path) -> tuple[list[bytes], list[float], list[int]]:
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return tokens, scores, types


def write_tiny_gguf(release: TinyRelease, path: str | os.PathLike, context_length: int = 8192) -> Path:
    """Write the base LLaMA of ``release`` to ``path`` (GGUF, fp32); returns the path.

    ``context_length`` is only metadata (the weights have no trained positions); llama.cpp caps
    its context at it.
    """
    import gguf

    c = TINY_LLAMA
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _load_trunk(Path(release.model_base))
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("radialog-tiny-llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(c["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = _vocabulary(Path(release.model_base) / "tokenizer.model")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(c["bos_token_id"])
    writer.add_eos_token_id(c["eos_token_id"])
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, tensor in state.items():
        if name in _GLOBAL_NAMES:
            target = _GLOBAL_NAMES[name]
        else:
            layer, _, rest = name.removeprefix("model.layers.").partition(".")
            if rest not in _LAYER_NAMES:
                continue  # e.g. rotary inv_freq buffers: llama.cpp computes RoPE itself
            target = f"blk.{layer}.{_LAYER_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                tensor = _rope_interleave(tensor, heads)
            elif rest.startswith("self_attn.k_proj"):
                tensor = _rope_interleave(tensor, kv_heads)
        writer.add_tensor(target, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote %s (%d tensors)", path, len(state))
    return path
