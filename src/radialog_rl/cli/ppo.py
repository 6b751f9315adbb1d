"""``radialog-rl ppo --config ppo.yaml``: multimodal PPO for confidence calibration."""

from __future__ import annotations

import argparse

from radialog_rl.cli.arguments import add_config_overrides

_EPILOG = """\
The YAML's top-level keys are radialog_rl.training.ppo.PPOConfig fields: model loading
(entry_point radialog_lora | fresh_lora, model_path, model_base, llava_model_path, precision),
data (train_file: JSONL of {"image", "prompt", <labels>}), reward (a built-in name such as
binary_qa_loglik, report_loglik, quadratic_blend, or module:function) and hyperparameters
(defaults = the published RaDialog calibration run). Report rewards can take their accuracy from
accuracy_scorer: green (a GREEN server; options under scorer:) or unigram_f1, see
configs/ppo_radialog_reports_green.yaml. Metrics go to OUTPUT_DIR/metrics.jsonl and
TensorBoard; checkpoints to OUTPUT_DIR/checkpoint-NNNNNN.

Any key can be overridden on the command line as key=value (dotted for nested keys, values read as
YAML, paths relative to the working directory); --print-config shows the resolved config with every
default and its documentation, and exits.

examples:
  radialog-rl make-tiny .cache/tiny && radialog-rl ppo --config configs/ppo_tiny.yaml
  radialog-rl ppo --config configs/ppo_tiny.yaml steps=20 learning_rate=5e-5 reward_params.scale=100
  radialog-rl ppo --config configs/ppo_tiny.yaml --print-config
  radialog-rl ppo --config configs/ppo_radialog.yaml --resume latest
  accelerate launch --num_processes 4 -m radialog_rl ppo --config configs/ppo_radialog.yaml
  accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m radialog_rl ppo --config configs/ppo_radialog.yaml
  torchrun --nproc_per_node 2 -m radialog_rl ppo --config configs/ppo_tiny.yaml   # CPU, two processes"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ppo",
        help="multimodal PPO (image + text prompts) with calibration rewards",
        description="Train a RaDialog policy with PPO on image+text prompts, with a LoRA policy, a "
                    "shared-trunk value head and the reference policy on the same network.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="PPO YAML config (see below)")
    add_config_overrides(parser, "steps=20 reward_params.scale=100")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="checkpoint directory, or 'latest' / 'previous' (newest / second newest in the "
                             "output dir; 'previous' skips a damaged latest one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an output dir that holds a previous run (removes only its "
                             "checkpoints, metrics.jsonl, tensorboard/, eval/, best/ and final/)")
    parser.add_argument("--steps", type=int, help="train until this many PPO steps (overrides the config)")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--device", help="'cpu' to force the CPU; GPUs are assigned per process by the "
                                         "launcher (choose them with CUDA_VISIBLE_DEVICES)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from radialog_rl.training.ppo.config import load_ppo_config
    from radialog_rl.training.ppo.trainer import PPOTrainer

    config = load_ppo_config(args.config, args.overrides, resume_from=args.resume, steps=args.steps,
                             output_dir=args.output_dir, device=args.device,
                             overwrite=args.overwrite or None)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    trainer = PPOTrainer(config)
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        last = history[-1]
        print(f"PPO finished at step {trainer.step_count}: score {last['env/score_mean']:.3f}, "
              f"KL {last['objective/kl']:.3f}; metrics in {trainer.output_dir / 'metrics.jsonl'}")
    return 0
