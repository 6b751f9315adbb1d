"""``radialog-rl confidence``: confidence of a model's answers by four methods, and their table.

Argument parsing, file output and the table only; the work is done by
:func:`radialog_rl.confidence.estimate.estimate_confidence` (and ``train_probe``) on a model from
:func:`radialog_rl.loading.release.load_baseline_llava_model_with_vision_modules`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from radialog_rl.cli.arguments import positive_int

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Estimate how likely each of a model's answers is correct, by one or more methods, and compare
their calibration (ECE, sigma_CBND, D_NCKL, Brier, AUROC, parse-failure rate) in one table:

  verbalized  the {"confidence": N} the model states in its response (N / scale)
  ptrue       P(True): the model is asked whether its proposed answer is correct; P(Yes) against
              P(No) from the next-token logits (template: --ptrue-template)
  seqprob     the response's geometric-mean token probability (or the product,
              --seqprob-reduction product), prompt and image positions excluded
  probe       logistic regression on a hidden state (--probe-layer, --probe-position), trained on
              --probe-train (with a held-out split) or loaded from --probe

--data is a JSONL file of labelled samples, one per line:
  {"id": "s1", "image": "cxr.png", "prompt": "Is there edema? ...", "answer": "yes"}
    binary QA: correct = the response's yes/no answer equals "answer" (no clear yes/no: no accuracy)
  {"image": "cxr.png", "prompt": "...", "accuracy": 0.7, "response": "..."}
    an accuracy (or "correct": true/false) scored elsewhere for a known response
"id" defaults to the row index; "response" (optional) is scored instead of a greedy generation;
"prior_image" is BioViL-T's previous study. Relative paths resolve against the file's folder.

Every method scores the same response of a sample; every image goes through the vision tower once.
--out gets JSON lines {"id", "method", "confidence" (0..10, the binned probability), "probability",
"accuracy", "response", ...} that `radialog-rl evaluate` reads; with several methods one file per
method: OUT with the method inserted before the suffix (preds.ptrue.jsonl, ...)."""

_EPILOG = """\
examples:
  radialog-rl confidence --method all --model-path RaDialog --model-base llava-v1.5-7b \\
      --data test.jsonl --probe-train calib.jsonl --probe-out probe.safetensors --out preds.jsonl
  radialog-rl confidence --method ptrue --model-path RaDialog --model-base llava-v1.5-7b \\
      --data test.jsonl --out ptrue.jsonl && radialog-rl evaluate ptrue.jsonl
  radialog-rl confidence --method probe --probe probe.safetensors --model-path RaDialog \\
      --model-base llava-v1.5-7b --data test.jsonl --out probe.jsonl"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``confidence`` subcommand to the ``radialog-rl`` parser."""
    p = subparsers.add_parser(
        "confidence",
        help="confidence by verbalized / P(True) / sequence probability / probe, and their calibration table",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", "--methods", dest="method", required=True, metavar="NAMES",
                   help="verbalized, ptrue, seqprob, probe, a comma-separated list of them, or all")
    p.add_argument("--data", required=True, type=Path, metavar="JSONL", help="labelled samples (see above)")
    p.add_argument("--out", "-o", type=Path, metavar="JSONL", help="write the per-sample predictions here")

    model = p.add_argument_group("model (as for `radialog-rl generate`)")
    model.add_argument("--model-path", metavar="DIR", help="RaDialog release directory or hub id")
    model.add_argument("--model-base", metavar="DIR", help="base LLaVA-1.5 directory or hub id")
    model.add_argument("--vision-tower-path", metavar="PT", help="BioViL-T .pt weights, if not in the release")
    model.add_argument("--lora", metavar="PATH", help="LoRA adapter to apply instead of the release's own")
    model.add_argument("--no-lora", action="store_true", help="do not apply the release's LoRA adapter")
    model.add_argument("--precision", choices=("16bit", "8bit", "4bit"), default="16bit",
                       help="weights of the LLaMA layers (default 16bit)")
    model.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="compute dtype (default bf16)")
    model.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")

    run_args = p.add_argument_group("responses")
    run_args.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                          help="samples per batch (default 8)")
    run_args.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                          help="most new tokens of a generated (greedy) response (default 64)")
    run_args.add_argument("--confidence-decoding", choices=("token", "value"), default="token",
                          help="how a generated response's {\"confidence\": N} is chosen: token (plain "
                               "greedy, default) or value (the most likely whole value: \"10\" is two "
                               "tokens, which token-level greedy favours)")
    run_args.add_argument("--scale", type=int, choices=(10, 100), default=10,
                          help="scale of the verbalized confidence (default 10)")
    run_args.add_argument("--no-chat-template", action="store_true",
                          help="use the prompts as they are instead of RaDialog's conversation template")
    run_args.add_argument("--system-prompt", default=None, metavar="TEXT",
                          help="the conversation template's system text (default RaDialog's); give what the "
                               "model was trained with, e.g. \"\" for the calibration demo's models")

    ptrue = p.add_argument_group("ptrue")
    ptrue.add_argument("--ptrue-template", metavar="TEXT",
                       help="self-evaluation user message with {question} and {answer} (default: adapted "
                            "from Kadavath et al. 2022, see radialog_rl.confidence.ptrue)")
    ptrue.add_argument("--yes-word", action="append", metavar="WORD", help="the Yes answer (repeatable; default Yes)")
    ptrue.add_argument("--no-word", action="append", metavar="WORD", help="the No answer (repeatable; default No)")

    seq = p.add_argument_group("seqprob")
    seq.add_argument("--seqprob-reduction", choices=("mean", "product"), default="mean",
                     help="geometric-mean token probability (default) or the sequence probability")
    seq.add_argument("--seqprob-no-eos", action="store_true", help="do not score the final </s>")

    probe = p.add_argument_group("probe")
    probe.add_argument("--probe", type=Path, metavar="SAFETENSORS", help="a trained probe to apply")
    probe.add_argument("--probe-train", type=Path, metavar="JSONL",
                       help="labelled samples to train the probe on (a held-out part selects C)")
    probe.add_argument("--probe-out", type=Path, metavar="SAFETENSORS", help="save the trained probe here")
    probe.add_argument("--probe-layer", type=int, default=-1, metavar="K",
                       help="hidden_states index: 0 embeddings, k decoder layer k, -1 final norm (default)")
    probe.add_argument("--probe-position", choices=("last_response", "last_prompt", "mean_response"),
                       default="last_response", help="token position of the features (default last_response)")
    probe.add_argument("--probe-heldout", type=float, default=0.2, metavar="F",
                       help="fraction of --probe-train held out for selection (default 0.2)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the probe's train/held-out split (default 0)")
    p.set_defaults(func=run)


def _outputs(out: Path | None, methods: tuple[str, ...]) -> dict[str, Path]:
    """Prediction file of each method: ``out`` itself for one method, else ``stem.method.suffix``."""
    if out is None:
        return {}
    from radialog_rl.errors import ConfigError

    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a .jsonl file path")
    if len(methods) == 1:
        return {methods[0]: out}
    return {m: out.with_name(f"{out.stem}.{m}{out.suffix or '.jsonl'}") for m in methods}


def _config(args: argparse.Namespace):
    from radialog_rl.confidence.estimate import EstimateConfig
    from radialog_rl.confidence.probe import ProbeFeatureConfig
    from radialog_rl.confidence.ptrue import DEFAULT_TEMPLATE, PTrueConfig
    from radialog_rl.confidence.seqprob import SeqProbConfig

    ptrue = PTrueConfig(template=args.ptrue_template or DEFAULT_TEMPLATE,
                        yes_words=tuple(args.yes_word or ("Yes",)), no_words=tuple(args.no_word or ("No",)))
    return EstimateConfig(
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, scale=args.scale,
        chat_template=not args.no_chat_template, system_prompt=args.system_prompt, ptrue=ptrue,
        seqprob=SeqProbConfig(reduction=args.seqprob_reduction, include_eos=not args.seqprob_no_eos),
        probe_features=ProbeFeatureConfig(layer=args.probe_layer, position=args.probe_position),
        confidence_decoding=args.confidence_decoding,
    )


def _format_probe_metrics(probe) -> str:
    def split(name: str) -> str:
        m = probe.metrics.get(name)
        if not m:
            return f"{name}: none"
        vals = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in m.items() if v is not None)
        return f"{name}: {vals}"

    return f"probe (C={probe.C:g}) {split('train')}; {split('heldout')}"


def run(args: argparse.Namespace) -> int:
    """Check the inputs, load the model, train/load the probe, estimate, write, print the table."""
    from radialog_rl.confidence.base import check_methods
    from radialog_rl.errors import ConfigError

    methods = check_methods(args.method)
    config = _config(args)  # bad settings fail before the model loads
    outputs = _outputs(args.out, methods)
    if "probe" in methods and (args.probe is None) == (args.probe_train is None):
        raise ConfigError("the probe method needs either --probe (a trained probe) or --probe-train "
                          "(labelled samples to train one on), not both")
    if args.probe_out is not None and args.probe_train is None:
        raise ConfigError("--probe-out saves a probe trained with --probe-train; pass --probe-train")
    if not 0.0 <= args.probe_heldout < 1.0:
        raise ConfigError(f"--probe-heldout must be in [0, 1), got {args.probe_heldout}")
    if args.probe_train is not None and "probe" not in methods and args.probe_out is None:
        logger.warning("--probe-train is ignored: the probe method is not selected and there is no --probe-out")
        args.probe_train = None

    from radialog_rl.cli.generate import load_inference_model
    from radialog_rl.confidence.estimate import estimate_confidence, train_probe
    from radialog_rl.confidence.probe import ConfidenceProbe
    from radialog_rl.confidence.samples import load_labelled_jsonl
    from radialog_rl.confidence.table import format_comparison_table, method_reports

    samples = load_labelled_jsonl(args.data)
    train_samples = load_labelled_jsonl(args.probe_train) if args.probe_train is not None else None
    probe = ConfidenceProbe.load(args.probe) if args.probe is not None and "probe" in methods else None

    bundle = load_inference_model(args)
    model, tokenizer = bundle.model, bundle.tokenizer

    if train_samples is not None:
        probe = train_probe(model, tokenizer, train_samples, feature_config=config.probe_features,
                            config=config, heldout_fraction=args.probe_heldout, seed=args.seed)
        if args.probe_out is not None:
            logger.info("saved the probe to %s", probe.save(args.probe_out))

    results = estimate_confidence(model, tokenizer, samples, methods, probe=probe, config=config)
    for method, path in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in results[method]:
                fh.write(json.dumps(r.to_record(), ensure_ascii=False) + "\n")
        logger.info("wrote %d %s prediction(s) to %s", len(results[method]), method, path)

    print(format_comparison_table(method_reports(results)))
    if probe is not None and "probe" in methods and probe.metrics:
        print(_format_probe_metrics(probe))
    return 0
