"""Generation throughput: our LLaVA (``LlavaLlamaForCausalLM``) vs transformers' ``LlavaForConditionalGeneration``.

Both models get the same LLaMA trunk (same sizes, *same random weights*, copied) and the same number
of image positions per prompt. Images: both receive the **same precomputed image features**
(``[B, positions, hidden]``) instead of pixels: ours through ``image_features=``, transformers'
through its ``mm_encoder_outputs=`` generate argument. Why not pixels through a CLIP tower sized to
the same count: the towers differ (BioViL-T ResNet vs CLIP ViT), so their cost would be compared
too, and it is paid once per prompt anyway; the question here is what our multimodal wrapping costs
around the same language model. Identical weights and features also make the outputs comparable:
greedy tokens must be identical, which the script checks.

Measured (greedy, fixed length: ``min_new_tokens = max_new_tokens``, median of ``--runs`` runs after
one warm-up):

* ``theirs``: ``LlavaForConditionalGeneration.generate`` on prompts holding one image token per
  position (already expanded, as transformers' processor writes them);
* ``ours``: ``LlavaLlamaForCausalLM.generate`` on prompts with RaDialog's single ``-200``
  placeholder (expanded by our model);
* ``ours (pipeline)``: :func:`radialog_rl.generation.generate` from prompt strings: tokenization,
  left padding, stop-string machinery, post-processing and decoding included;
* prefill: one forward over the whole prompt (``logits_to_keep=1``, as generate's prefill) of ours
  with ``image_features`` vs a plain ``LlamaForCausalLM`` on a text sequence of the same total
  length and the same attention mask (the vision tower is excluded in both).

Prompts are RaDialog report prompts tokenized with the tiny release's sentencepiece tokenizer (its
384 ids are valid in any larger vocabulary); rows differ in length, so batches are left-padded.

Usage::

    python benchmarks/generation.py --preset small
    python benchmarks/generation.py --preset tiny --batch-sizes 1,8 --new-tokens 32 --runs 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

PRESETS: dict[str, dict] = {
    # The tiny release's sizes (radialog_rl.testing.tiny): 16 image positions (128 px BioViL-T).
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=384, image_size=128),
    # A small LLaMA with RaDialog's real vocabulary and image positions (196 = 448 px / 32, squared).
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  vocab_size=32000, image_size=448),
}
FINDINGS = [["edema"], ["cardiomegaly", "pleural effusion"], [], ["atelectasis"], ["pneumothorax"],
            ["lung opacity", "consolidation", "pneumonia"], ["support devices"], ["fracture"]]


def build_models(preset: dict, dtype: torch.dtype, device: str):
    """(ours, theirs, plain llama) with identical LLaMA weights, eval mode, on ``device``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from radialog_rl.modeling.biovil import tiny_biovil_config
    from radialog_rl.modeling.llava import LlavaLlamaConfig, LlavaLlamaForCausalLM

    llama = dict(
        hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_attention_heads"], vocab_size=preset["vocab_size"],
        max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    # A tiny tower: image features are precomputed, only the number of positions matters.
    biovil = dataclasses.asdict(dataclasses.replace(tiny_biovil_config(), image_size=preset["image_size"]))
    torch.manual_seed(0)
    ours = LlavaLlamaForCausalLM(LlavaLlamaConfig(**llama, biovil=biovil, mm_hidden_size=2 * biovil["vit_dim"]))
    image_token_id = preset["vocab_size"] - 1  # unused by the prompts (the tokenizer has 384 ids)
    theirs = LlavaForConditionalGeneration(LlavaConfig(
        text_config=LlamaConfig(**llama),
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        image_token_id=image_token_id, tie_word_embeddings=False,
    ))
    plain = LlamaForCausalLM(LlamaConfig(**llama))
    trunk = {k: v for k, v in ours.state_dict().items()
             if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    plain.load_state_dict(trunk, strict=True)
    theirs_state = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
                    for k, v in trunk.items()}
    missing, unexpected = theirs.load_state_dict(theirs_state, strict=False)
    assert not unexpected and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
                                  for k in missing), (missing, unexpected)
    models = [m.to(device=device, dtype=dtype).eval() for m in (ours, theirs, plain)]
    for m in models:
        m.requires_grad_(False)
    return (*models, image_token_id)


def timed(fns: dict[str, Callable[[], object]], runs: int, device: str,
          clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict]:
    """Median seconds (of ``clock``) of ``runs`` calls of each function after one warm-up each, and
    the last results. Runs are interleaved (run r of every function, in an order rotated by r) so
    that a slow drift of the machine's load hits every contender alike."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    names = list(fns)
    results = {name: fns[name]() for name in names}
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = clock()
            results[name] = fns[name]()
            sync()
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def expand_for_theirs(ids: torch.Tensor, mask: torch.Tensor, positions: int, image_token_id: int, pad_id: int):
    """Replace each row's single -200 by ``positions`` image tokens; re-pad on the left."""
    from radialog_rl.constants import IMAGE_TOKEN_INDEX

    rows = []
    for row, m in zip(ids, mask):
        row = row[m.bool()].tolist()
        out = []
        for t in row:
            out.extend([image_token_id] * positions if t == IMAGE_TOKEN_INDEX else [t])
        rows.append(out)
    width = max(map(len, rows))
    new_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    new_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        new_ids[i, width - len(r):] = torch.tensor(r)
        new_mask[i, width - len(r):] = 1
    return new_ids, new_mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="fixed new tokens per row (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--prefill-runs", type=int, default=None,
                        help="timed runs per prefill measurement (median; default 2 x --runs)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: the process's CPU time (time.process_time), "
                             "robust to other processes sharing the cores; use it with --threads 1 on "
                             "a CPU (it is not GPU time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.utils import logging as hf_logging

    from radialog_rl.data.prompts import build_prompt, report_prompt
    from radialog_rl.generation import generate
    from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts, load_pretrained_llava_tokenizer_with_image_support
    from radialog_rl.testing.tiny import make_tiny_release

    hf_logging.set_verbosity_error()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    preset = PRESETS[args.preset]
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU time; it cannot time a GPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_pretrained_llava_tokenizer_with_image_support(make_tiny_release(tmp).model_base)
    ours, theirs, plain, image_token_id = build_models(preset, dtype, args.device)
    positions = ours.config.num_image_tokens
    n_new = args.new_tokens
    greedy = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=2, pad_token_id=2)

    gen_rows, prefill_rows, identical = [], [], []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [build_prompt(report_prompt(FINDINGS[i % len(FINDINGS)])) for i in range(batch)]
        ids, mask = batch_tokenize_image_prompts(prompts, tokenizer)
        their_ids, their_mask = expand_for_theirs(ids, mask, positions, image_token_id, pad_id=2)
        ids, mask = ids.to(args.device), mask.to(args.device)
        their_ids, their_mask = their_ids.to(args.device), their_mask.to(args.device)
        torch.manual_seed(1)
        features = (torch.randn(batch, positions, preset["hidden_size"]) * 0.5).to(args.device, dtype)
        their_features = {"image": BaseModelOutputWithPooling(pooler_output=list(features))}

        with torch.inference_mode():
            t, out = timed({
                "theirs": lambda: theirs.generate(input_ids=their_ids, attention_mask=their_mask,
                                                  mm_encoder_outputs=copy.copy(their_features), **greedy),
                "ours": lambda: ours.generate(input_ids=ids, attention_mask=mask, image_features=features,
                                              **greedy),
                "pipeline": lambda: generate(ours, tokenizer, prompts, None, image_features=features,
                                             max_new_tokens=n_new, min_new_tokens=n_new),
            }, args.runs, args.device, clock)
        out_theirs = out["theirs"][:, their_ids.shape[1]:]  # theirs returns prompt + new tokens
        identical.append(torch.equal(out["ours"].cpu(), out_theirs.cpu())
                         and [r.token_ids for r in out["pipeline"]] == out["ours"].tolist())
        tokens = batch * n_new
        gen_rows.append([args.preset, batch, n_new, tokens / t["theirs"], tokens / t["ours"],
                         t["theirs"] / t["ours"], tokens / t["pipeline"], t["theirs"] / t["pipeline"]])

        # Prefill: our multimodal forward vs a plain LLaMA forward of the same total length, with
        # the same left padding (the attention mask decides SDPA's kernel, so the plain model gets
        # the identical mask).
        total = their_ids.shape[1]
        text_ids = torch.randint(3, 384, (batch, total), device=args.device)
        with torch.inference_mode():
            t, _ = timed({
                "plain": lambda: plain(input_ids=text_ids, attention_mask=their_mask, logits_to_keep=1,
                                       use_cache=False),
                "ours": lambda: ours(input_ids=ids, attention_mask=mask, image_features=features,
                                     logits_to_keep=1, use_cache=False),
                "theirs": lambda: theirs(input_ids=their_ids, attention_mask=their_mask,
                                         mm_encoder_outputs=copy.copy(their_features), logits_to_keep=1,
                                         use_cache=False),
            }, args.prefill_runs or 2 * args.runs, args.device, clock)
        prefill_rows.append([args.preset, batch, total, 1000 * t["plain"], 1000 * t["ours"],
                             100 * (t["ours"] / t["plain"] - 1), 1000 * t["theirs"]])

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cfg = (f"hidden {preset['hidden_size']}, {preset['num_hidden_layers']} layers, vocab {preset['vocab_size']}, "
           f"{positions} image positions")
    print(f"\n`{command}`\n")
    print(f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"{args.dtype}, torch {torch.__version__}, {args.clock} clock; preset {args.preset}: {cfg}; greedy, "
          f"{n_new} new tokens per row, median of {args.runs} runs (prefill: "
          f"{args.prefill_runs or 2 * args.runs})\n")
    print("| preset | batch | new tokens | theirs tok/s | ours tok/s | ours/theirs | ours pipeline tok/s | pipeline/theirs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in gen_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.3f} | {r[6]:.1f} | {r[7]:.3f} |")
    print("\n| preset | batch | prompt length | plain LLaMA prefill ms | ours multimodal prefill ms | overhead % | theirs prefill ms |")
    print("|---|---|---|---|---|---|---|")
    for r in prefill_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:+.1f} | {r[6]:.2f} |")
    print(f"\ngreedy tokens identical (ours = theirs = pipeline): {all(identical)}")
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
