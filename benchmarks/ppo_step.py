"""Benchmark one PPO step: reference policy on the shared trunk vs. a separate reference copy.

What is compared
    ``shared``    our design: the reference log-probs come from the SAME network inside
                  ``trainer.unwrapped.reference_policy()`` (a frozen copy of the LoRA adapter for the
                  ``radialog_lora`` entry point, the adapter disabled for ``fresh_lora``).
    ``separate``  what the earlier RaDialog PPO and legacy TRL did: a ``copy.deepcopy`` of the whole
                  policy model (trunk, vision tower, projector, adapter, value head), frozen, made
                  before the trainer is built and held for the whole run; ``old_policy_pass`` is
                  overridden (in this file; the trainer is not modified) to take the reference
                  log-probs from that copy.

Everything else is the unmodified :class:`PPOTrainer`: one rollout batch (``--batch-size`` prompts,
``--max-new-tokens`` sampled tokens, image features computed once), the no-grad scoring passes (old
log-probs/values/entropy + reference log-probs over the first epoch's minibatches) and the PPO update.
The reward is a toy (response length) so that no reward model enters the numbers.

Method
    * Each variant runs in its own child process (this script re-invoked with ``--worker``), so the
      two variants never share an allocator and a freed copy cannot hide in the other's RSS. Inside
      that process: load the model, build the trainer, run one warm-up step (not reported: it
      allocates the optimizer state and warms the allocator), then ``--repeats`` steps; medians are
      reported.
    * Time per phase is the trainer's own ``time/rollout``, ``time/forward`` (the scoring passes plus
      KL penalty, GAE and whitening, which are negligible), ``time/train`` and ``time/step``.
    * Peak memory per phase is measured around ``rollout``, ``old_policy_pass`` and ``_train`` (thin
      wrappers in a subclass). On CPU: process RSS, sampled every ``--sample-ms`` by a background
      thread (psutil when importable, else ``/proc/self/status`` VmRSS) and, on Linux, also the
      kernel's exact high-water mark ``VmHWM`` reset at each phase start via ``/proc/self/clear_refs``;
      the larger of the two is taken. Before each phase ``malloc_trim(0)`` returns glibc's cached
      free memory to the OS, so a phase does not inherit the previous phase's peak as its own.
      On CUDA: ``torch.cuda.max_memory_allocated`` reset per phase.
      Every memory figure is reported ABOVE THE BASELINE taken in the worker after the imports and
      before the model is loaded, so it contains the weights (and the reference copy when there is
      one), optimizer state and the phase's activations. ``held`` is that figure just before the
      first step (model(s) loaded, trainer built, no optimizer state yet). ``step`` is the largest
      of the three phase peaks.
    * Vision-tower calls per step come from a forward hook on
      ``trainer.unwrapped.llava.model.vision_tower`` (cross-checked against the trainer's own
      ``vision_tower_calls`` metric); the design computes image features once per rollout batch and
      reuses them in every pass, so 1 is expected for both variants.
    * Sanity check: on the first step the policy equals its reference, so ``objective/kl`` must be
      exactly 0 in both variants; a non-zero value is reported as a warning.

Caveats
    * CPU RSS measures the whole process: Python objects, the allocator's cached free blocks (glibc
      keeps freed memory for reuse; what is returned to the OS depends on its thresholds), thread
      arenas. It is an upper bound on tensor memory: within a phase freed blocks are reused or kept
      rather than returned (on the ``small`` preset the train phase's RSS peak is about twice what it
      is with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment, which makes glibc hand every
      block above 128 KiB straight back; that setting gives RSS closer to live tensor memory but
      slows the steps, so it is not the default). Small models therefore give small, noisy
      differences. CUDA figures count allocated tensors only (not the caching allocator's reserve,
      not the CUDA context).
    * The separate copy's cost is model-size dependent: it is one more full set of weights (plus
      vision tower and projector), so the separate/shared ratio grows with model size. ``tiny``
      (~0.7 M LLaMA parameters) mostly measures the runtime's overhead; ``small`` (~11 M) makes the
      copy visible; at 7 B in 4-bit the reference copy alone costs about another 4 GB.
    * In the ``separate`` variant the policy still carries the (LoRA-sized) ``reference`` adapter of
      the ``radialog_lora`` entry point; it is unused there and negligible next to the copy.
    * Threads: CPU runs use ONE torch thread by default (``--threads``). On a 2-core machine shared
      with other processes, torch's default (one thread per core) oversubscribes the cores and its
      spinning OpenMP workers made element-wise ops ~10x and whole steps ~3x slower; one thread gives
      steadier, comparable numbers. Pass ``--threads 0`` for torch's default on a dedicated machine.
    * Timings on a shared machine are noisy: the ``train`` phase is the same code in both variants,
      so its separate/shared ratio shows the noise level. Compare medians, look at the printed
      min-max range, and rerun with more ``--repeats`` when the spread matters. The CUDA path has not
      been exercised on a GPU here.

Usage
    python benchmarks/ppo_step.py --preset small            # ~2 minutes on 2 shared CPU cores
    python benchmarks/ppo_step.py --preset tiny --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules
from peak_memory import MB, PeakMemory  # noqa: E402

VARIANTS = ("shared", "separate")
# LLaMA sizes written into the release's config.json; None = the tiny release as it is.
# intermediate_size stays a multiple of 64 and the vocabulary stays the tiny tokenizer's 384 pieces.
PRESETS = {
    "tiny": None,
    "small": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
}
PHASES = ("rollout", "score", "train")


# -- trainers --------------------------------------------------------------------------------------


def make_trainer_classes():
    """The two benchmarked trainers (built in the worker, after the memory baseline is taken)."""
    import torch

    from radialog_rl.training.ppo.trainer import OldPolicyPass, PPOTrainer

    class ProbedPPOTrainer(PPOTrainer):
        """PPOTrainer whose three phases report their peak memory to ``self.probe``."""

        probe: PeakMemory | None = None
        phase_memory: dict

        def rollout(self):
            with self.probe.phase(self.phase_memory, "rollout"):
                return super().rollout()

        def old_policy_pass(self, batch, first_epoch):
            with self.probe.phase(self.phase_memory, "score"):
                return super().old_policy_pass(batch, first_epoch)

        def _train(self, *args, **kwargs):
            with self.probe.phase(self.phase_memory, "train"):
                return super()._train(*args, **kwargs)

    class SeparateReferencePPOTrainer(ProbedPPOTrainer):
        """The legacy layout: reference log-probs from a frozen deep copy of the whole policy model.

        The copy is made before ``PPOTrainer.__init__`` (so it does not inherit the trainer's
        vision-tower hook) and kept in ``self.reference_model`` for the trainer's lifetime.
        """

        def __init__(self, config, model, **kwargs):
            self.reference_model = copy.deepcopy(model).eval()
            for p in self.reference_model.parameters():
                p.requires_grad_(False)
            super().__init__(config, model=model, **kwargs)

        @torch.no_grad()
        def old_policy_pass(self, batch, first_epoch):
            # PPOTrainer.old_policy_pass with the reference forward on the copy instead of
            # `with model.reference_policy():` on the policy itself.
            with self.probe.phase(self.phase_memory, "score"):
                model = self.unwrapped
                shape = batch.response_ids.shape
                zeros = lambda: torch.zeros(shape, device=batch.input_ids.device)  # noqa: E731
                out = OldPolicyPass(logprobs=zeros(), values=zeros(), entropy=zeros(), ref_logprobs=zeros())
                for idx in first_epoch:
                    logprobs, values, entropy = self._forward(model, batch, idx, with_entropy=True)
                    out.logprobs[idx], out.values[idx], out.entropy[idx] = logprobs, values, entropy
                    out.ref_logprobs[idx] = self._forward(self.reference_model, batch, idx)[0]
                return out

    return {"shared": ProbedPPOTrainer, "separate": SeparateReferencePPOTrainer}


def length_reward(samples, responses):
    """Toy reward (response length): cheap, deterministic, always finite."""
    return [len(r) / 10.0 for r in responses]


# -- one variant (child process) ------------------------------------------------------------------


def run_variant(args, variant: str) -> dict:
    """Run warm-up + ``args.repeats`` PPO steps of one variant; return per-step records."""
    import torch

    from radialog_rl.training.ppo.config import PPOConfig
    from radialog_rl.training.ppo.trainer import build_ppo_model

    # Import what model loading and the trainer import lazily, so the baseline includes the code.
    import accelerate  # noqa: F401
    import peft  # noqa: F401

    import radialog_rl.loading.adapters  # noqa: F401
    import radialog_rl.modeling.llava  # noqa: F401

    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    probe = PeakMemory(args.device, interval=args.sample_ms / 1000)
    probe.start()
    extra = ({"entry_point": "fresh_lora", "llava_model_path": args.merged_dir, "lora_r": args.lora_r}
             if args.entry_point == "fresh_lora" else {})
    config = PPOConfig(
        model_path=args.release_model_path, model_base=args.release_model_base, train_file=args.data,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        gradient_accumulation_steps=args.batch_size // args.mini_batch_size, ppo_epochs=1,
        max_new_tokens=args.max_new_tokens, steps=1 + args.repeats, learning_rate=1e-5,
        dtype=args.dtype, device=args.device, seed=args.seed, tensorboard=False, save_every=10**9,
        output_dir=str(Path(args.workdir) / f"run-{variant}"), **extra,
    )
    model = build_ppo_model(config).model  # the trainer takes the bundle or, as here, the module
    trainer_cls = make_trainer_classes()[variant]
    trainer = trainer_cls(config, model=model, reward_fn=length_reward)
    trainer.probe = probe
    trainer.phase_memory = {}
    vision_calls = [0]
    trainer.unwrapped.llava.model.vision_tower.register_forward_hook(
        lambda *_: vision_calls.__setitem__(0, vision_calls[0] + 1))
    n_params = sum(p.numel() for p in trainer.unwrapped.parameters())
    ref_params = sum(p.numel() for p in getattr(trainer, "reference_model", torch.nn.Module()).parameters())
    held = probe.held()

    records, first_kl = [], None
    for i in range(1 + args.repeats):
        trainer.phase_memory = {}
        calls_before = vision_calls[0]
        metrics = trainer.step()
        if i == 0:
            first_kl = metrics["objective/kl"]
            print(f"[{variant}] warm-up step {metrics['time/step']:.2f} s", file=sys.stderr, flush=True)
            continue
        mem = trainer.phase_memory
        records.append({
            "rollout_s": metrics["time/rollout"], "score_s": metrics["time/forward"],
            "train_s": metrics["time/train"], "step_s": metrics["time/step"],
            **{f"{p}_mb": mem[p] / MB for p in PHASES},
            "step_mb": max(mem[p] for p in PHASES) / MB,
            "vision_calls": vision_calls[0] - calls_before,
            "vision_calls_trainer": metrics["vision_tower_calls"],
        })
        print(f"[{variant}] step {i}/{args.repeats} {metrics['time/step']:.2f} s", file=sys.stderr,
              flush=True)
    probe.stop()
    return {"variant": variant, "held_mb": held / MB, "params": n_params,
            "reference_copy_params": ref_params, "first_step_kl": first_kl,
            "memory": "cuda allocated" if probe.cuda else "RSS", "torch_threads": torch.get_num_threads(),
            "records": records}


# -- setup and report (parent process) ------------------------------------------------------------


@contextlib.contextmanager
def llama_sizes(overrides: dict | None):
    """Temporarily replace ``radialog_rl.testing.tiny.TINY_LLAMA`` (read by every tiny-release
    writer: weights, adapter, configs, rotary buffers) with larger sizes."""
    from radialog_rl.testing import tiny

    original = tiny.TINY_LLAMA
    if overrides:
        tiny.TINY_LLAMA = {**original, **overrides}
    try:
        yield
    finally:
        tiny.TINY_LLAMA = original


def build_release(preset: str, workdir: Path):
    """The tiny release (``tiny``) or one with the preset's LLaMA sizes, under ``workdir/preset``."""
    from radialog_rl.testing.tiny import make_tiny_release

    sizes = PRESETS[preset]
    root = workdir / f"release-{preset}"
    config_file = root / "RaDialog-tiny" / "config.json"
    stale = config_file.is_file() and sizes is not None and any(
        json.loads(config_file.read_text()).get(k) != v for k, v in sizes.items())
    with llama_sizes(sizes):
        return make_tiny_release(root, overwrite=stale)


def prepare(args) -> None:
    """Write the release, the prompts and (fresh_lora) the merged model; store paths in ``args``."""
    from radialog_rl.testing.data import make_binary_qa_jsonl

    workdir = Path(args.workdir)
    release = build_release(args.preset, workdir)
    args.release_model_path, args.release_model_base = str(release.model_path), str(release.model_base)
    args.data = str(make_binary_qa_jsonl(workdir / "data", n=max(8, args.batch_size)))
    args.merged_dir = None
    if args.entry_point == "fresh_lora":
        import torch

        from radialog_rl import save_lora_merged_llava_model_to_local_dir

        merged = workdir / f"merged-{args.preset}"
        if not (merged / "config.json").is_file():
            save_lora_merged_llava_model_to_local_dir(merged, model_path=release.model_path,
                                                      model_base=release.model_base, dtype=torch.float32)
        args.merged_dir = str(merged)


def run_worker_process(args, variant: str) -> dict:
    """Run one variant in a fresh interpreter and return its JSON result."""
    result = Path(args.workdir) / f"result-{variant}.json"
    options = {
        "--preset": args.preset, "--repeats": args.repeats, "--entry-point": args.entry_point,
        "--batch-size": args.batch_size, "--mini-batch-size": args.mini_batch_size,
        "--max-new-tokens": args.max_new_tokens, "--lora-r": args.lora_r, "--device": args.device,
        "--dtype": args.dtype, "--threads": args.threads, "--sample-ms": args.sample_ms, "--seed": args.seed,
        "--workdir": args.workdir, "--release-model-path": args.release_model_path,
        "--release-model-base": args.release_model_base, "--data": args.data, "--merged-dir": args.merged_dir,
        "--worker": variant, "--result": result,
    }
    cmd = [sys.executable, os.path.abspath(__file__)]
    for name, value in options.items():
        if value is not None:
            cmd += [name, str(value)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"the {variant} worker failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return json.loads(result.read_text())


COLUMNS = [  # (header, record key or None for held, format)
    ("rollout s", "rollout_s", "{:.3f}"), ("score-pass s", "score_s", "{:.3f}"),
    ("train s", "train_s", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
    ("held MB", None, "{:.1f}"), ("rollout peak MB", "rollout_mb", "{:.1f}"),
    ("score peak MB", "score_mb", "{:.1f}"), ("train peak MB", "train_mb", "{:.1f}"),
    ("step peak MB", "step_mb", "{:.1f}"), ("vision calls/step", "vision_calls", "{:g}"),
]


def summarize(result: dict) -> dict:
    """Medians over the repeats (``held`` is measured once)."""
    records = result["records"]
    row = {key: statistics.median(r[key] for r in records) for _, key, _ in COLUMNS if key}
    row["held"] = result["held_mb"]
    return row


def markdown_table(results: dict[str, dict]) -> str:
    rows = {v: summarize(r) for v, r in results.items()}
    header = ["variant"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, row in rows.items():
        cells = [fmt.format(row[key or "held"]) for _, key, fmt in COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if {"shared", "separate"} <= set(rows):
        a, b = rows["separate"], rows["shared"]
        cells = []
        for _, key, _ in COLUMNS:
            k = key or "held"
            cells.append("-" if k == "vision_calls" else f"{a[k] / b[k]:.2f}x" if b[k] else "n/a")
        lines.append("| **separate/shared** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args, results: dict[str, dict]) -> str:
    """The markdown report: settings, the table, per-variant checks, the command line."""
    first = next(iter(results.values()))
    lines = [
        f"## PPO step, preset {args.preset}, entry point {args.entry_point}, device {args.device} "
        f"({args.dtype}, {first['torch_threads']} torch threads), batch {args.batch_size}, minibatch "
        f"{args.mini_batch_size}, {args.max_new_tokens} new tokens, median of {args.repeats} steps "
        "after 1 warm-up",
        "",
        f"policy model: {first['params'] / 1e6:.2f} M parameters (incl. vision tower, projector, LoRA, "
        f"value head); memory = {first['memory']} above the worker's post-import baseline",
        "",
        markdown_table(results),
        "",
    ]
    for variant, r in results.items():
        steps = [rec["step_s"] for rec in r["records"]]
        calls = sorted({rec["vision_calls_trainer"] for rec in r["records"]})
        notes = [f"step s min-max {min(steps):.2f}-{max(steps):.2f}", f"first-step KL {r['first_step_kl']:g}",
                 f"trainer's vision_tower_calls metric {calls}"]
        if r["reference_copy_params"]:
            notes.insert(0, f"reference copy {r['reference_copy_params'] / 1e6:.2f} M params")
        lines.append(f"- {variant}: " + "; ".join(notes))
        if r["first_step_kl"] != 0.0:
            lines.append(f"  WARNING: the {variant} reference is not the initial policy (KL should be 0)")
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    lines += ["", f"command: `{command}`"]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="model size: tiny = the tiny release (~0.7M LLaMA params), small = ~11M")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per variant (after 1 warm-up)")
    parser.add_argument("--entry-point", choices=("radialog_lora", "fresh_lora"), default="radialog_lora",
                        help="shared-trunk reference: frozen adapter copy (radialog_lora) or adapter "
                             "disabled on a merged model (fresh_lora)")
    parser.add_argument("--batch-size", type=int, default=4, help="rollout batch (prompts per step)")
    parser.add_argument("--mini-batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=16, help="fresh adapter rank (fresh_lora only)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (0 = torch's default); see the docstring")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the release and data go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the raw per-step records here")
    # internal: the parent passes these to the per-variant workers
    for name in ("--worker", "--result", "--release-model-path", "--release-model-base", "--data",
                 "--merged-dir"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size % args.mini_batch_size:
        parser.error("--batch-size must be a multiple of --mini-batch-size")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        result = run_variant(args, args.worker)
        Path(args.result).write_text(json.dumps(result))
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ppo-bench-"))
        args.workdir = str(Path(args.workdir).resolve())
        t0 = time.perf_counter()
        prepare(args)
        print(f"prepared the {args.preset} release in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results = {v: run_worker_process(args, v) for v in args.variants}

    print(report(args, results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
