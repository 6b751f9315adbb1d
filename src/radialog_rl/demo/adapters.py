"""The adapters section of ``radialog-rl demo``: the four entry points on the tiny release, a
merge, a reload of the merged directory, and how close merged and unmerged logits are."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from radialog_rl.data.prompts import build_prompt, report_prompt
from radialog_rl.loading.adapters import trainable_parameter_report
from radialog_rl.loading.entry_points import (
    load_pretrained_llava_model_for_ppo_training,
    load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters,
    load_pretrained_llava_model_for_sft_training,
)
from radialog_rl.loading.export import save_lora_merged_llava_model_to_local_dir
from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts


def adapters_demo_section(ctx) -> None:
    """Build the SFT model and both PPO models, merge, reload, and print the max logit difference."""
    release, device = ctx.release, ctx.device
    paths = dict(model_path=release.model_path, model_base=release.model_base)
    rows = []
    t = time.perf_counter()
    sft = load_pretrained_llava_model_for_sft_training(device, dtype="fp32", **paths)
    rows.append(("SFT (RaDialog LoRA, trainable)", time.perf_counter() - t,
                 trainable_parameter_report(sft)["trainable"], "-"))
    t = time.perf_counter()
    ppo = load_pretrained_llava_model_for_ppo_training(device, dtype="fp32", **paths)
    rows.append(("PPO (RaDialog LoRA + value head)", time.perf_counter() - t,
                 trainable_parameter_report(ppo)["trainable"], ppo.reference_mode))

    # Beside the tiny release (like the SFT section's demo-sft/), not left in the system temp folder.
    merged_dir = Path(release.root) / "demo-merged"
    shutil.rmtree(merged_dir, ignore_errors=True)  # the previous demo's export: ours
    t = time.perf_counter()
    save_lora_merged_llava_model_to_local_dir(merged_dir, dtype=torch.float32, device=device, **paths)
    merge_seconds = time.perf_counter() - t
    t = time.perf_counter()
    fresh = load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters(merged_dir, device, dtype="fp32")
    rows.append(("PPO (merged SFT + fresh LoRA)", time.perf_counter() - t,
                 trainable_parameter_report(fresh)["trainable"], fresh.reference_mode))

    merged = load_baseline_llava_model_with_vision_modules(merged_dir, merged_dir, device=device, dtype="fp32")
    prompts = [build_prompt(report_prompt(["edema"]))] * len(ctx.images)
    ids, mask = batch_tokenize_image_prompts(prompts, merged.tokenizer)
    with torch.no_grad():
        a = merged(input_ids=ids.to(device), attention_mask=mask.to(device), images=ctx.images).logits
        b = sft(input_ids=ids.to(device), attention_mask=mask.to(device), images=ctx.images).logits
    diff = float((a - b).abs().max())
    ctx.table("Adapters and merge", ["model", "load s", "trainable params", "PPO reference"], rows,
              note=f"merged in {merge_seconds:.2f} s into {merged_dir}; reloaded it offline; "
                   f"max |logit(merged) - logit(unmerged)| = {diff:.2e} (fp32)")
    ctx.extras["merged_dir"] = str(merged_dir)
