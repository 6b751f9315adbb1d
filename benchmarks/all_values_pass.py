"""The ``all_values`` term's pass: one shared-prefix forward + KV cache vs every candidate whole.

PPO's ``confidence_objective: all_values`` needs, for every response, the log-probability of each of
the ``scale + 1`` confidence values ("0" ... "10", 1-3 tokens each with the closing brace) after the
response's prefix, and trains through them (:func:`radialog_rl.value_greedy.candidate_logprobs`).

What is compared (same model, same inputs, forward + backward of a weighted sum of the outputs):

* ``whole``: ``_full_candidate_logprobs``, the first implementation: ``B * (scale + 1)`` rows of
  ``prompt + image positions + prefix + value`` in one teacher-forced forward;
* ``cached``: ``_cached_candidate_logprobs``, what ``candidate_logprobs`` runs now: ``B`` rows of
  ``prompt + image positions + prefix`` once (``logits_to_keep=1``), the KV cache gathered per
  candidate, then only the 1-3 value tokens of each candidate on it.

The script checks that both give the same log-probabilities and the same parameter gradients (the
test suite checks it too, ``tests/test_value_greedy.py``) and prints median times (``--runs`` runs
after one warm-up, interleaved) with their ratio.

Usage::

    python benchmarks/all_values_pass.py --preset tiny --threads 1
    python benchmarks/all_values_pass.py --preset small --batch-sizes 4 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import FINDINGS, PRESETS, build_models, timed  # noqa: E402  (benchmarks/ is not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-sizes", default="8", help="comma-separated responses per pass (default 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from radialog_rl.data.prompts import build_prompt, report_prompt
    from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts, load_pretrained_llava_tokenizer_with_image_support
    from radialog_rl.modeling.llava import expand_image_tokens
    from radialog_rl.testing.tiny import make_tiny_release
    from radialog_rl.value_greedy import _cached_candidate_logprobs, _full_candidate_logprobs, value_candidate_ids

    hf_logging.set_verbosity_error()
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_pretrained_llava_tokenizer_with_image_support(make_tiny_release(tmp).model_base)
    model = build_models(preset, torch.float32, args.device)[0].requires_grad_(True)
    pad = tokenizer.pad_token_id
    rows_out = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [build_prompt(report_prompt(FINDINGS[i % len(FINDINGS)])) for i in range(batch)]
        ids, mask = batch_tokenize_image_prompts(prompts, tokenizer)
        expanded = expand_image_tokens(ids, model.num_image_tokens, mask, pad_token_id=pad)
        query, query_mask = expanded.input_ids.to(args.device), expanded.attention_mask.to(args.device)
        torch.manual_seed(1)
        features = (torch.randn(batch, model.num_image_tokens, preset["hidden_size"]) * 0.5).to(args.device)
        # Responses of the calibration recipe's shape, of different lengths.
        texts = [("yes" if i % 2 else "no, there is no " + " ".join(FINDINGS[i % len(FINDINGS)] or ["finding"]))
                 + f' {{"confidence": {i % 11}}}' for i in range(batch)]
        rows, cands, lengths = [], [], []
        for b, (prefix_length, candidates) in enumerate(value_candidate_ids(tokenizer, texts, scale=10)):
            rows += [b] * len(candidates)
            cands += candidates
            lengths += [len(c) - prefix_length for c in candidates]
        weights = torch.linspace(-1, 1, len(cands), device=args.device)

        def run(fn):
            def step():
                model.zero_grad(set_to_none=True)
                out = fn(model, query, query_mask, features, rows, cands, lengths, pad)
                (out * weights).sum().backward()
                return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return step

        t, results = timed({"whole": run(_full_candidate_logprobs), "cached": run(_cached_candidate_logprobs)},
                           args.runs, args.device)
        (whole, whole_grads), (cached, cached_grads) = results["whole"], results["cached"]
        out_diff = (whole - cached).abs().max().item()
        grad_diff = max((whole_grads[n] - cached_grads[n]).abs().max().item() for n in whole_grads)
        total = query.shape[1] + max(len(c) for c in cands)
        rows_out.append([args.preset, batch, len(cands), total, 1000 * t["whole"], 1000 * t["cached"],
                         t["whole"] / t["cached"], out_diff, grad_diff])

    cfg = (f"hidden {preset['hidden_size']}, {preset['num_hidden_layers']} layers, vocab {preset['vocab_size']}, "
           f"{model.num_image_tokens} image positions")
    print(f"\n`python benchmarks/all_values_pass.py {shlex.join(argv if argv is not None else sys.argv[1:])}`: "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), fp32, "
          f"torch {torch.__version__}; preset {args.preset}: {cfg}; forward + backward, median of {args.runs} runs.\n")
    print("| preset | responses | candidates | longest row | whole ms | cached ms | whole/cached | max |Δ log-prob| | max |Δ grad| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f}x | {r[7]:.1e} | {r[8]:.1e} |")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - t0)
    sys.exit(code)
