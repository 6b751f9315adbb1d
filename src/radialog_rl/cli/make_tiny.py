"""``radialog-rl make-tiny OUT_DIR``: write the tiny RaDialog release (real layout, tiny sizes)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny",
        help="write a tiny random RaDialog release in the real on-disk layout",
        description=(
            "Write a complete, deterministic, tiny RaDialog release: a base LLaVA directory "
            "(sharded .bin weights, sentencepiece tokenizer, CLIP-shaped projector), a RaDialog "
            "directory (config.json with the biovil fields, old-PEFT adapter_model.bin, "
            "non_lora_trainables.bin) and a BioViL-T .pt file. Load it with the same commands "
            "as the real release, e.g. `radialog-rl generate --model-path OUT/RaDialog-tiny "
            "--model-base OUT/llava-v1.5-tiny ...`."
        ),
    )
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even if a complete release is there")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from radialog_rl.testing.tiny import make_tiny_release

    release = make_tiny_release(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(release.as_dict(), indent=2))
    return 0
