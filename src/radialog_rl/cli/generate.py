"""``radialog-rl generate``: one RaDialog report (or answer to ``--prompt``) per chest X-ray.

Argument parsing, image collection, batching and JSONL output only; the work is done by
:func:`radialog_rl.generation.generate` on a model from
:func:`radialog_rl.loading.release.load_baseline_llava_model_with_vision_modules`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from radialog_rl.cli.arguments import positive_int
from radialog_rl.constants import RADIALOG_HUB_ID

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Generate one text per chest X-ray with RaDialog (LLaVA-1.5 + BioViL-T): by default RaDialog's
report prompt (the findings section, conditioned on --findings), or your own --prompt.

Images are read and preprocessed as RaDialog did (min-max stretch, grayscale, shorter side 512,
centre crop 448, no normalisation). --image accepts an image file (PNG, JPEG, DICOM), a folder
(searched recursively) or a text file listing one image path per line; repeat it to combine.
Output: JSON lines, one object per image in input order:
  {"image", "prompt", "text", "num_tokens", "finished_by", "seconds"}
where "seconds" is the wall time of the image's batch divided by the batch size.

--model-path is the RaDialog release directory (config.json, non_lora_trainables.bin,
adapter_model.bin) or a merged directory; --model-base the base LLaVA-1.5 directory (weights +
tokenizer). The release's LoRA adapter is applied when the release has one (merged into the
weights at 16-bit, as LLaVA's own inference did; kept separate at 8/4-bit, where merging would
re-quantize). Hub ids work when the files are in the local Hugging Face cache or the network is
reachable."""

_EPILOG = """\
examples:
  radialog-rl generate --model-path RaDialog --model-base llava-v1.5-7b \\
      --image cxr.png --findings "edema, cardiomegaly"
  radialog-rl generate --model-path RaDialog --model-base llava-v1.5-7b --image scans/ \\
      --precision 4bit --batch-size 16 --output reports.jsonl
  radialog-rl make-tiny /tmp/tiny && radialog-rl generate --model-path /tmp/tiny/RaDialog-tiny \\
      --model-base /tmp/tiny/llava-v1.5-tiny --image cxr.png --device cpu --dtype fp32"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "generate",
        help="generate a RaDialog report (or answer a prompt) for each chest X-ray",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model-path", metavar="DIR",
                       help="RaDialog release directory or hub id (default: the public RaDialog release)")
    model.add_argument("--model-base", metavar="DIR",
                       help="base LLaVA-1.5 directory or hub id (default: liuhaotian/llava-v1.5-7b)")
    model.add_argument("--vision-tower-path", metavar="PT",
                       help="BioViL-T .pt weights, when the release carries no vision tower")
    model.add_argument("--lora", metavar="PATH",
                       help="LoRA adapter (directory or adapter_model.bin) to apply instead of the "
                            "release's own (e.g. one trained with `radialog-rl sft`)")
    model.add_argument("--no-lora", action="store_true",
                       help="do not apply the release's LoRA adapter (plain LLaVA + RaDialog's "
                            "vision modules)")
    model.add_argument("--precision", choices=("16bit", "8bit", "4bit"), default="16bit",
                       help="weights of the LLaMA layers: 16-bit, or bitsandbytes 8-bit / 4-bit nf4 "
                            "(default 16bit)")
    model.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                       help="compute dtype (default bf16)")
    model.add_argument("--device", default=None,
                       help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")

    inputs = p.add_argument_group("inputs")
    inputs.add_argument("--image", action="append", required=True, metavar="PATH",
                        help="image file, folder of images, or text file of paths (repeatable)")
    inputs.add_argument("--findings", metavar="TEXT",
                        help='predicted findings for the report prompt, comma-separated, e.g. '
                             '"edema, cardiomegaly" (default: "no common findings")')
    inputs.add_argument("--prompt", metavar="TEXT",
                        help="your own user message instead of the report prompt; '<image>' marks "
                             "where the image goes (prepended when missing)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                     help="most new tokens per image (default 256; RaDialog reports are ~60-150)")
    gen.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                     help="images per batch (default 8)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, metavar="T",
                     help="sampling temperature (default 1.0)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K",
                     help="sample among the k likeliest tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0 = off)")
    gen.add_argument("--seed", type=int, default=None, metavar="N", help="random seed for sampling")
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="stop a text at this string, in addition to </s> (repeatable)")
    gen.add_argument("--confidence-decoding", choices=("token", "value"), default="token",
                     help="greedy only: 'value' re-chooses a stated {\"confidence\": N} as the most "
                          "likely whole value 0..10 (\"10\" is two tokens, which token-level greedy "
                          "decoding favours); default token")

    p.add_argument("--output", "-o", type=Path, metavar="JSONL",
                   help="write the JSON lines here instead of stdout")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images that cannot be read (listed at the end; the exit code is still 1) "
                        "instead of stopping at the first")
    p.set_defaults(func=run)


def _user_message(args: argparse.Namespace) -> str:
    from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
    from radialog_rl.data.prompts import report_prompt
    from radialog_rl.errors import ConfigError

    if args.prompt is None:
        return report_prompt(args.findings)
    if args.findings is not None:
        raise ConfigError("--findings only applies to the report prompt; put the findings into --prompt")
    if args.prompt.count(DEFAULT_IMAGE_TOKEN) > 1:
        raise ConfigError(f"--prompt must contain at most one '{DEFAULT_IMAGE_TOKEN}' (one image per prompt)")
    if DEFAULT_IMAGE_TOKEN not in args.prompt:
        return f"{DEFAULT_IMAGE_TOKEN}\n{args.prompt}"
    return args.prompt


def _collect_images(specs: list[str]) -> list[Path]:
    from radialog_rl.data.images import collect_image_paths

    paths: list[Path] = []
    for spec in specs:
        paths.extend(collect_image_paths(spec))
    return paths


def _adapter(args: argparse.Namespace, release_dir: Path) -> str | Path:
    """``--lora``, else the release's adapter when it has one, else none."""
    from radialog_rl.errors import ConfigError
    from radialog_rl.loading.adapters import ADAPTER_FILES
    from radialog_rl.loading.bundle import ADAPTER_NONE
    from radialog_rl.loading.files import find_first

    if args.lora and args.no_lora:
        raise ConfigError("--lora and --no-lora contradict each other; pass one")
    if args.lora is not None:
        return args.lora
    if not args.no_lora and release_dir.is_dir() and find_first(release_dir, ADAPTER_FILES):
        return release_dir
    return ADAPTER_NONE


def load_inference_model(args: argparse.Namespace):
    """The model the model arguments name (``--model-path``, ``--lora``/``--no-lora``, precision...),
    as a :class:`~radialog_rl.loading.bundle.LoadedModel` in eval mode.

    A 16-bit model gets the adapter merged (faster generation); a quantised one keeps it applied
    (merging would re-quantise the weights).
    """
    from radialog_rl.loading.bundle import ADAPTER_NONE, ModelSpec, load_model
    from radialog_rl.loading.files import resolve_model_dir
    from radialog_rl.loading.precision import precision_spec

    started = time.perf_counter()
    release_dir = resolve_model_dir(args.model_path or RADIALOG_HUB_ID, what="RaDialog release",
                                    required_files=["config.json"])
    adapter = _adapter(args, release_dir)
    merge = adapter != ADAPTER_NONE and not precision_spec(args.precision, args.dtype).quantized
    bundle = load_model(ModelSpec(
        model_path=release_dir, model_base=args.model_base, precision=args.precision, device=args.device,
        dtype=args.dtype, vision_tower_path=args.vision_tower_path, adapter=adapter, merge=merge,
    ))
    logger.info("LoRA adapter: %s", "none" if bundle.adapter is None else
                f"{bundle.adapter} ({'merged' if merge else 'applied'})")
    logger.info("model loaded in %.1f s", time.perf_counter() - started)
    bundle.model.eval()
    return bundle


def run(args: argparse.Namespace) -> int:
    """Collect images, load the model, generate batch by batch and write JSON lines; returns 0."""
    # Cheap checks first: a typo in an image path should not cost a model load.
    from radialog_rl.data.prompts import build_prompt

    prompt = build_prompt(_user_message(args))
    skipped: list[str] = []
    paths = _readable_images(_collect_images(args.image), args.skip_bad, skipped)
    if args.output is not None and args.output.is_dir():
        from radialog_rl.errors import ConfigError

        raise ConfigError(f"--output {args.output} is a folder; give a .jsonl file path")

    from tqdm.auto import tqdm

    from radialog_rl.generation import generate

    bundle = load_inference_model(args)
    model, tokenizer = bundle.model, bundle.tokenizer
    resize, crop = bundle.image_sizes.resize, bundle.image_sizes.crop

    if args.seed is not None:  # one stream for the whole run: reproducible for a given batch size
        import torch

        torch.manual_seed(args.seed)
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    out = args.output.open("w", encoding="utf-8") if args.output is not None else sys.stdout
    written = 0
    try:
        progress = tqdm(batches, desc="generate", unit="batch", file=sys.stderr,
                        disable=len(batches) < 2 or not logger.isEnabledFor(logging.INFO))  # -q: no bar
        for batch in progress:
            batch, images = _load_batch(batch, resize, crop, args.skip_bad, skipped)
            if not batch:
                continue
            t0 = time.perf_counter()
            results = generate(
                model, tokenizer, [prompt] * len(batch), images,
                max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                stop_strings=args.stop, confidence_decoding=args.confidence_decoding,
            )
            seconds = (time.perf_counter() - t0) / len(batch)
            for path, result in zip(batch, results):
                record = {
                    "image": str(path), "prompt": prompt, "text": result.text,
                    "num_tokens": result.num_tokens, "finished_by": result.finished_by,
                    "seconds": round(seconds, 4),
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            written += len(batch)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output is not None:
        logger.info("wrote %d result(s) to %s", written, args.output)
    if skipped:
        from radialog_rl.errors import DataError

        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise DataError(f"{len(skipped)} image(s) skipped, {written} written: " + "; ".join(skipped[:5]) + more)
    return 0


def _readable_images(paths: list[Path], skip_bad: bool, skipped: list[str]) -> list[Path]:
    """The images whose headers read and fit the size limits (checked before the model loads)."""
    from radialog_rl.data.images import image_header_size
    from radialog_rl.errors import DataError, ImageError

    good, bad = [], []
    for path in paths:
        try:
            image_header_size(path)
            good.append(path)
        except ImageError as exc:
            bad.append(str(exc))
    if bad and not skip_bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} of {len(paths)} image(s) cannot be used: " + "; ".join(bad[:3]) + more
                        + "; fix them, or pass --skip-bad to generate for the others")
    skipped += bad
    return good


def _load_batch(batch: list[Path], resize: int, crop: int, skip_bad: bool, skipped: list[str]):
    """``(paths, images [n, 3, crop, crop])`` of the batch's readable images (all, or an ImageError,
    without ``skip_bad``)."""
    import torch

    from radialog_rl.data.images import load_chest_xray
    from radialog_rl.errors import ImageError

    kept, tensors = [], []
    for path in batch:
        try:
            tensors.append(load_chest_xray(path, resize=resize, crop=crop))
            kept.append(path)
        except ImageError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    return kept, torch.stack(tensors) if tensors else None
