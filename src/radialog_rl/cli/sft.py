"""``radialog-rl sft``: supervised fine-tuning from a YAML config (argument parsing only).

The work is done by :func:`radialog_rl.training.sft.run_sft`; the config schema is
:class:`radialog_rl.training.sft.SFTConfig`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from radialog_rl.cli.arguments import add_config_overrides, positive_int

_DESCRIPTION = """\
Supervised fine-tuning of RaDialog (LLaVA-1.5 + BioViL-T) on image + text conversations with
transformers.Trainer: LoRA (RaDialog's own adapter, or a fresh one), optionally the projector,
16/8/4-bit (QLoRA). Gradient accumulation, evaluation, checkpoints, resume, best-checkpoint
selection and TensorBoard come from the Trainer; several processes work through torchrun or
accelerate launch (one model replica per process, DDP).

The config is a YAML file (see configs/sft_tiny.yaml, configs/sft_radialog.yaml): model loading
(entry_point radialog_lora | fresh_lora, model_path, model_base, adapter_path, precision, dtype),
data (train_file, eval_file: JSONL rows with image + prompt/target or conversations; label_policy,
max_length, overflow), training (train_projector, gradient_checkpointing, lora_r/alpha/dropout) and
`trainer:`, a mapping of transformers.TrainingArguments fields (output_dir, max_steps,
learning_rate, per_device_train_batch_size, gradient_accumulation_steps, save_steps, eval_steps,
report_to, ...). Relative paths in the file resolve against the file's folder. Any key can be
overridden on the command line as key=value (dotted for trainer.*; values read as YAML, paths
relative to the working directory); --print-config shows the resolved config with every default.

Output in trainer.output_dir: checkpoint-N/ (resumable), adapter/ (the final PEFT adapter:
adapter_config.json + adapter_model.safetensors, plus non_lora_trainables.safetensors when the
projector was trained), merged/ (with --merge), trainer_state.json (log history), sft_config.json,
and TensorBoard logs under runs/."""

_EPILOG = """\
examples:
  radialog-rl make-tiny .cache/tiny && radialog-rl sft --config configs/sft_tiny.yaml
  radialog-rl sft --config configs/sft_radialog.yaml --resume latest
  radialog-rl sft --config configs/sft_tiny.yaml --max-steps 2 --output-dir /tmp/sft-smoke
  radialog-rl sft --config configs/sft_tiny.yaml trainer.learning_rate=1e-4 lora_r=8 --print-config
  torchrun --nproc_per_node 2 -m radialog_rl sft --config configs/sft_tiny.yaml
  accelerate launch --multi_gpu --num_processes 4 -m radialog_rl sft --config configs/sft_radialog.yaml"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sft`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning (LoRA / QLoRA) on image + text conversations",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, type=Path, metavar="YAML",
                   help="the SFT config file (keys: radialog_rl.training.sft.SFTConfig)")
    add_config_overrides(p, "trainer.learning_rate=1e-4 label_policy=all")
    p.add_argument("--resume", metavar="PATH|latest|previous",
                   help="continue from a checkpoint-N directory, or 'latest' / 'previous' for the newest / "
                        "second newest one in the output directory (optimiser, scheduler, RNG and data "
                        "position included)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an output directory that holds a previous SFT run (removes only "
                        "its checkpoints, adapter/, merged/, runs/ and state files)")
    p.add_argument("--merge", action="store_true",
                   help="after training, also merge the adapter into the 16-bit base and write a "
                        "self-contained model to OUTPUT_DIR/merged (same as merge: true)")
    p.add_argument("--max-steps", type=positive_int, metavar="N",
                   help="stop after N optimiser steps (overrides trainer.max_steps and epochs)")
    p.add_argument("--output-dir", type=Path, metavar="DIR",
                   help="overrides trainer.output_dir (relative to the working directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, apply the command-line overrides, train; prints the output paths (JSON)."""
    from radialog_rl.training.sft import MERGED_SUBDIR, load_sft_config, run_sft

    trainer_overrides = {}
    if args.max_steps is not None:
        trainer_overrides["max_steps"] = args.max_steps
    if args.output_dir is not None:
        trainer_overrides["output_dir"] = str(args.output_dir.expanduser().resolve())
    config = load_sft_config(args.config, args.overrides, merge=True if args.merge else None,
                             overwrite=True if args.overwrite else None, trainer=trainer_overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    adapter = run_sft(config, resume_from_checkpoint=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one line of output, not one per process
        result = {"adapter": str(adapter)}
        if config.merge:
            result["merged"] = str(adapter.parent / MERGED_SUBDIR)
        print(json.dumps(result))
    return 0
