"""``radialog-rl merge``: merge a LoRA adapter into the 16-bit base and export a deployable directory."""

from __future__ import annotations

import argparse

_EPILOG = """\
The output directory is self-contained (merged LLM weights as safetensors, config.json with the
biovil fields, tokenizer, and non_lora_trainables.safetensors with the projector and vision tower):
pass it as both --model-path and --model-base, or as llava_model_path for PPO with fresh adapters.

examples:
  radialog-rl merge --model-path RaDialog/ --model-base llava-v1.5-7b/ --out radialog-merged/
  radialog-rl merge --model-path RaDialog/ --model-base llava-v1.5-7b/ --adapter runs/sft/adapter --out sft-merged/"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into the base and save a self-contained model directory",
        description="Load RaDialog in 16-bit, merge its LoRA (or --adapter) into the LLM weights and "
                    "save a directory that loads offline with no other files.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-path", required=True, help="RaDialog release directory (or hub id)")
    parser.add_argument("--model-base", required=True, help="base LLaVA-1.5 directory (or hub id)")
    parser.add_argument("--adapter", help="adapter to merge (PEFT dir or adapter_model.bin); default: the one in --model-path")
    parser.add_argument("--out", required=True,
                        help="output directory: new or empty (written beside it, then renamed into place)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export at --out (a directory holding anything else is "
                             "always refused)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the saved weights")
    parser.add_argument("--device", default="cpu", help="where to merge (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from radialog_rl.loading.export import save_lora_merged_llava_model_to_local_dir
    from radialog_rl.loading.precision import parse_dtype

    out = save_lora_merged_llava_model_to_local_dir(
        args.out, args.adapter, model_path=args.model_path, model_base=args.model_base,
        dtype=parse_dtype(args.dtype), device=args.device, overwrite=args.overwrite,
    )
    print(f"merged model written to {out}")
    return 0
