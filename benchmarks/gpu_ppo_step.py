"""A RaDialog-scale PPO step on one GPU: LLaMA-7B dimensions, full-size BioViL-T, 4-bit and bf16.

What is measured, per precision (``--precisions``, default ``4bit,bf16``)
    * one full :class:`~radialog_rl.training.ppo.trainer.PPOTrainer` step of batch ``--batch-size``
      (default 12) with ``--new-tokens`` (default 300) sampled tokens, minibatch ``--mini-batch-size``,
      RaDialog's LoRA (r 128, alpha 256, all projections) plus its frozen reference copy and the value
      head: rollout time and rollout tokens/s (the trainer's own ``tokens_per_second``: image loading,
      the vision tower, sampling and decoding included), scoring passes, training, the whole step;
      median over ``--steps`` measured steps after one warm-up;
    * peak GPU memory (``torch.cuda.max_memory_allocated``) of the whole run of that precision.
    * for comparison: greedy fixed-length generation (``min_new_tokens = max_new_tokens``) of the same
      prompts with the same precomputed image features, ours (``LlavaLlamaForCausalLM.generate``) vs
      transformers' ``LlavaForConditionalGeneration.generate`` on a trunk of the same dimensions and
      dtype (bf16 rows only; random weights each).

The model is RaDialog-shaped with RANDOM weights created directly on the device (no download, no
checkpoint on disk): LLaMA-7B sizes (hidden 4096, 11008 MLP, 32 layers, 32 heads, vocab 32000) and
BioViL-T at its released size (ResNet-50 + temporal pooler, 448 px -> 196 image positions). 4-bit:
every decoder-layer linear is replaced by a bitsandbytes NF4 ``Linear4bit`` with double quantisation
and bf16 compute (what the loaders' ``precision: 4bit`` gives; the LM head, tower and projector stay
bf16). Random weights sample almost uniformly over the vocabulary, so EOS is rare and responses run
to ``--new-tokens``: the longest (worst) case. Prompts come from the tiny release's 384-piece
tokenizer (valid ids in any vocabulary); with LLaMA's real tokenizer they would be a little shorter.

The published RaDialog PPO took ~180 s per step (4-bit 7B, batch 12, 300 new tokens, one GPU); the
issue's target for this package is <= 60 s.

Usage
    python benchmarks/gpu_ppo_step.py                      # a GPU, a few minutes
    python benchmarks/gpu_ppo_step.py --precisions 4bit --gradient-checkpointing
    python benchmarks/gpu_ppo_step.py --tiny               # smoke test: tiny sizes, CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000)
LLAMA_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=384)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_fields(sizes: dict) -> dict:
    return dict(**sizes, num_key_value_heads=sizes["num_attention_heads"], max_position_embeddings=2048,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quantize_decoder_linears(llava: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` in the decoder layers by an NF4 ``bnb.nn.Linear4bit`` (double
    quantisation), quantising the existing (random) weights in place, layer by layer."""
    import bitsandbytes as bnb

    replaced = 0
    for layer in llava.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device=torch.device("meta"))
                weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)
                q.weight = weight._quantize(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                replaced += 1
    return replaced


def build_llava(args, precision: str):
    """A RaDialog-shaped ``LlavaLlamaForCausalLM`` with random weights, created on ``args.device``."""
    from radialog_rl.loading.precision import guard_cpu_4bit_layers
    from radialog_rl.modeling.biovil import BioViLConfig, tiny_biovil_config
    from radialog_rl.modeling.llava import LlavaLlamaConfig, LlavaLlamaForCausalLM

    biovil = dataclasses.asdict(tiny_biovil_config() if args.tiny else BioViLConfig())
    config = LlavaLlamaConfig(**llama_fields(args.sizes), biovil=biovil, mm_hidden_size=2 * biovil["vit_dim"])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # created in the compute dtype, directly on the device
    try:
        with torch.device(args.device):
            torch.manual_seed(0)
            llava = LlavaLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    llava.eval()
    if precision == "4bit":
        quantize_decoder_linears(llava, args.dtype)
        if not args.device.startswith("cuda"):
            guard_cpu_4bit_layers(llava)
    return llava


def build_policy(args, precision: str, tokenizer):
    """The RaDialog-shaped PPO model (LoRA + frozen reference copy + value head) on ``args.device``."""
    from radialog_rl.loading.adapters import (
        add_value_head_to_LlavaLlamaForCausalLM_model,
        attach_lora,
        radialog_lora_config,
    )
    from radialog_rl.modeling.value_head import REFERENCE_FROZEN_COPY

    llava = build_llava(args, precision)
    if args.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llava.enable_input_require_grads()
    lora = radialog_lora_config(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                target_modules=LORA_TARGETS)
    model = add_value_head_to_LlavaLlamaForCausalLM_model(
        attach_lora(llava, None, lora_config=lora, reference_copy=True), reference_mode=REFERENCE_FROZEN_COPY)
    model.tokenizer = tokenizer
    return model


def run_ppo(args, precision: str, release, data: Path, tokenizer, workdir: Path) -> dict:
    from radialog_rl.training.ppo.config import PPOConfig
    from radialog_rl.training.ppo.trainer import PPOTrainer

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_policy(args, precision, tokenizer)
    sync(args.device)
    build_s = time.perf_counter() - t0
    config = PPOConfig(
        model_path=str(release.model_path), model_base=str(release.model_base), train_file=str(data),
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        gradient_accumulation_steps=args.batch_size // args.mini_batch_size, ppo_epochs=1,
        max_new_tokens=args.new_tokens, steps=10**6, learning_rate=1e-5,
        precision="4bit" if precision == "4bit" else "16bit",
        dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[args.dtype], device=args.device,
        tensorboard=False, save_every=10**9, output_dir=str(workdir / f"run-{precision}"), overwrite=True,
        gradient_checkpointing=args.gradient_checkpointing, **args.options,
    )
    trainer = PPOTrainer(config, model=model, reward_fn=lambda rows, texts: [len(t) / 100.0 for t in texts])
    records = []
    for i in range(1 + args.steps):
        m = trainer.step()
        sync(args.device)
        print(f"[{precision}] step {i} ({'warm-up' if i == 0 else 'measured'}): {m['time/step']:.2f} s, "
              f"{m['tokens_per_second']:.1f} tok/s", file=sys.stderr, flush=True)
        if i:
            records.append(m)
    med = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    row = {"precision": precision, "build_s": build_s, "rollout_s": med("time/rollout"),
           "tokens_per_s": med("tokens_per_second"), "score_s": med("time/forward"), "train_s": med("time/train"),
           "step_s": med("time/step"), "response_len": med("env/response_length"),
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "first_ratio_max_dev": max(r["ppo/policy/first_ratio_max_dev"] for r in records)}
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_generation(args, release, tokenizer) -> dict:
    """Greedy fixed-length tokens/s: ours vs transformers' LLaVA, same dims/dtype/prompts/features."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from generation import FINDINGS, expand_for_theirs
    from radialog_rl.data.prompts import build_prompt, report_prompt
    from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts

    ours = build_llava(args, "bf16")
    positions = ours.config.num_image_tokens
    prompts = [build_prompt(report_prompt(FINDINGS[i % len(FINDINGS)])) for i in range(args.batch_size)]
    ids, mask = batch_tokenize_image_prompts(prompts, tokenizer)
    image_token_id = args.sizes["vocab_size"] - 1
    their_ids, their_mask = expand_for_theirs(ids, mask, positions, image_token_id, pad_id=2)
    ids, mask, their_ids, their_mask = (t.to(args.device) for t in (ids, mask, their_ids, their_mask))
    torch.manual_seed(1)
    features = (torch.randn(args.batch_size, positions, args.sizes["hidden_size"]) * 0.5).to(args.device, args.dtype)
    n = args.new_tokens
    greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=2)

    def timed(fn) -> float:
        fn()  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        ours_s = timed(lambda: ours.generate(input_ids=ids, attention_mask=mask, image_features=features, **greedy))
    del ours
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.device):
            theirs = LlavaForConditionalGeneration(LlavaConfig(
                text_config=LlamaConfig(**llama_fields(args.sizes)),
                vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14),
                image_token_id=image_token_id, tie_word_embeddings=False)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    their_features = {"image": BaseModelOutputWithPooling(pooler_output=list(features))}
    with torch.inference_mode():
        theirs_s = timed(lambda: theirs.generate(input_ids=their_ids, attention_mask=their_mask,
                                                 mm_encoder_outputs=copy.copy(their_features), **greedy))
    del theirs
    gc.collect()
    tokens = args.batch_size * n
    return {"ours_tok_s": tokens / ours_s, "theirs_tok_s": tokens / theirs_s, "prompt_len": int(their_mask.sum(1).max())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny sizes, batch 2, 4 new tokens, CPU")
    p.add_argument("--precisions", default="4bit,bf16")
    p.add_argument("--batch-size", type=int, default=None, help="default 12 (tiny: 2)")
    p.add_argument("--mini-batch-size", type=int, default=None, help="default 4 (tiny: 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 300 (tiny: 4)")
    p.add_argument("--steps", type=int, default=1, help="measured PPO steps per precision after 1 warm-up")
    p.add_argument("--lora-r", type=int, default=None, help="default 128, RaDialog's (tiny: 8)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-generation", action="store_true", help="skip the ours-vs-transformers generation rows")
    p.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    p.add_argument("--options", default="{}", help="JSON of extra PPOConfig fields (e.g. rollout options)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch_size = args.batch_size or (2 if tiny else 12)
    args.mini_batch_size = args.mini_batch_size or (1 if tiny else 4)
    args.new_tokens = args.new_tokens or (4 if tiny else 300)
    args.lora_r = args.lora_r or (8 if tiny else 128)
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.sizes = LLAMA_TINY if tiny else LLAMA_7B
    args.dtype = torch.bfloat16
    import json

    args.options = json.loads(args.options)
    if args.batch_size % args.mini_batch_size:
        p.error("--batch-size must be a multiple of --mini-batch-size")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark is for a GPU (use --tiny for the CPU smoke test)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    from radialog_rl.loading.tokenizer import load_pretrained_llava_tokenizer_with_image_support
    from radialog_rl.testing.data import make_binary_qa_jsonl
    from radialog_rl.testing.tiny import make_tiny_release

    hf_logging.set_verbosity_error()
    rows, gen = [], None
    with tempfile.TemporaryDirectory(prefix="gpu-ppo-") as tmp:
        work = Path(tmp)
        release = make_tiny_release(work / "release")  # only its tokenizer and paths are used
        tokenizer = load_pretrained_llava_tokenizer_with_image_support(release.model_base)
        data = make_binary_qa_jsonl(work / "data", n=args.batch_size)
        for precision in args.precisions.split(","):
            rows.append(run_ppo(args, precision, release, data, tokenizer, work))
        if not args.no_generation:
            gen = run_generation(args, release, tokenizer)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    s = args.sizes
    print(f"\n`{command}`\n")
    print(f"{device}, torch {torch.__version__}; LLaMA hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, "
          f"vocab {s['vocab_size']}, LoRA r {args.lora_r} + frozen reference copy, "
          f"{'tiny' if args.tiny else 'full-size'} BioViL-T; batch {args.batch_size}, minibatch "
          f"{args.mini_batch_size}, {args.new_tokens} new tokens, bf16 compute, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} step(s) after 1 warm-up\n")
    print("| precision | rollout s | rollout tok/s | scoring passes s | training s | PPO step s | peak GPU GiB | "
          "mean response length | first ratio max dev |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.1f}"  # NaN off CUDA
        print(f"| {r['precision']} | {r['rollout_s']:.2f} | {r['tokens_per_s']:.1f} | {r['score_s']:.2f} | "
              f"{r['train_s']:.2f} | {r['step_s']:.2f} | {peak} | {r['response_len']:.0f} | "
              f"{r['first_ratio_max_dev']:.2g} |")
    if gen is not None:
        print(f"\ngreedy generation, bf16, batch {args.batch_size}, {args.new_tokens} new tokens, prompt "
              f"{gen['prompt_len']} positions: ours {gen['ours_tok_s']:.1f} tok/s, transformers' "
              f"LlavaForConditionalGeneration {gen['theirs_tok_s']:.1f} tok/s "
              f"(ours/theirs {gen['ours_tok_s'] / gen['theirs_tok_s']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
