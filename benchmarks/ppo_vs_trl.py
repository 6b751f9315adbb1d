"""One PPO step of this package vs TRL 0.11.4's legacy ``PPOTrainer`` on the same LLaMA trunk.

What is compared
    ``ours``  :class:`radialog_rl.training.ppo.trainer.PPOTrainer` on a LLaVA policy
              (``LlavaLlamaForCausalLM``: the LLaMA trunk, a tiny BioViL-T tower sized to
              ``--image-size`` so the query holds its real number of image positions, the projector),
              RaDialog's layout of a trainable LoRA adapter plus a frozen copy of it as the
              reference, and the shared-trunk value head. One step = rollout (image loading, one
              vision-tower call, tokenization, sampling, decoding, the reward), the no-grad scoring
              passes (old log-probs, values, entropy, reference log-probs), advantages, the update.
    ``trl``   TRL 0.11.4 ``PPOTrainer.generate`` + ``PPOTrainer.step`` on
              ``AutoModelForCausalLMWithValueHead`` over a ``LlamaForCausalLM`` with the SAME trunk
              weights and the same LoRA (rank, targets); the reference is the adapter disabled
              (TRL's PEFT path, also on the shared trunk). Queries are plain token ids of the SAME
              per-row lengths as ours after image expansion (text + image positions), so both run
              the trunk over the same sequence lengths.

    Both: batch ``--batch-size``, minibatch ``--mini-batch-size``, gradient accumulation over the
    whole batch (one optimizer update per PPO epoch), ``--ppo-epochs``, sampling with temperature 1,
    top-k 0, top-p 1, ``--new-tokens`` new tokens (EOS is possible but has probability ~1/vocab per
    token), a toy reward (response length), AdamW/Adam at lr 1e-5, fp32, dropout 0.

Method
    * Each side runs in its own long-lived worker process; TRL's in its own virtual environment
      (``--trl-venv``, default ``.venv-bench-trl`` in the repository root), created on first use with
      pinned versions (``TRL_PINS``; ``torch==2.13.0`` is the CPU build) and reused afterwards, since
      TRL 0.11.4 needs transformers 4.x while this package needs 5.x.
    * The parent writes the LLaMA trunk once (safetensors) and both workers load it.
    * Rounds are interleaved: in round r the parent asks one worker for one step, then the other
      (the order alternates each round), so a slow drift of the machine's load hits both alike.
      ``--warmup`` steps per side are not reported (optimizer state, allocator warm-up).
    * Times are wall-clock per phase (rollout / scoring passes incl. rewards and advantages /
      training) and the process CPU time of the whole step; medians over ``--rounds``. The ratio row
      is TRL / ours: > 1 means ours is faster; ``throughput ratio`` = TRL step time / our step time.
    * Peak memory: RSS above the worker's post-import baseline (``peak_memory.PeakMemory``), for the
      rollout and for the update (scoring + training) phases; an upper bound on tensor memory.
    * One torch thread on both sides (``--threads``); on a 2-core machine shared with other work,
      more threads oversubscribe the cores (see ``ppo_step.py``).

What differs by design (and is included in ours): image loading, the vision tower and projector
(once per rollout), prompt tokenization and decoding, the entropy of the sampled distribution in the
no-grad pass (TRL computes it over every position in the training pass instead), the reference
adapter is a frozen LoRA copy (a LoRA forward) where TRL disables the adapter.

Usage
    python benchmarks/ppo_vs_trl.py                 # ~3 minutes on 2 shared CPU cores (venv exists)
    python benchmarks/ppo_vs_trl.py --rounds 3 --skip-trl
    python benchmarks/ppo_vs_trl.py --alt-options '{"mixed_adapter_scoring": true}'   # A/B an option
    python benchmarks/ppo_vs_trl.py --skip-trl --alt-options '{"rollout_merged_copy": true}'   # A/B the merged rollout copy
    python benchmarks/ppo_vs_trl.py --alt-src /tmp/before/src   # A/B another checkout's src/
    python benchmarks/ppo_vs_trl.py --profile prof/            # + one profiled step per side
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules
from peak_memory import MB, PeakMemory  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# TRL 0.11.4 (the last release with the legacy PPOTrainer.step API) with the transformers / accelerate
# / peft releases of its time; torch pinned to the CPU build (an unpinned torch pulls a CUDA build).
TRL_PINS = ["torch==2.13.0", "trl==0.11.4", "transformers==4.45.2", "accelerate==0.34.2", "peft==0.13.2",
            "rich", "safetensors"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("ours", "trl")
PROTOCOL = "@@BENCH "  # prefix of the workers' result lines on stdout (libraries may print too)


def llama_kwargs(args) -> dict:
    """The LLaMA trunk both sides build (transformers 4.x and 5.x accept these fields)."""
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, attention_dropout=0.0,
    )


def emit(payload: dict) -> None:
    print(PROTOCOL + json.dumps(payload), flush=True)


# -- ours (worker, project environment) -----------------------------------------------------------


def build_ours(args):
    """A PPOTrainer on an in-memory LLaVA policy with the shared trunk; returns (trainer, probe, info)."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from radialog_rl.loading.adapters import (
        add_value_head_to_LlavaLlamaForCausalLM_model,
        attach_lora,
        radialog_lora_config,
    )
    from radialog_rl.loading.tokenizer import load_pretrained_llava_tokenizer_with_image_support
    from radialog_rl.modeling.biovil import tiny_biovil_config
    from radialog_rl.modeling.llava import LlavaLlamaConfig, LlavaLlamaForCausalLM
    from radialog_rl.modeling.value_head import REFERENCE_FROZEN_COPY
    from radialog_rl.training.ppo.config import PPOConfig

    from ppo_step import make_trainer_classes

    probe = PeakMemory("cpu", interval=0.002)
    probe.start()
    biovil = dataclasses.asdict(dataclasses.replace(tiny_biovil_config(), image_size=args.image_size))
    torch.manual_seed(args.seed)
    llava = LlavaLlamaForCausalLM(LlavaLlamaConfig(**llama_kwargs(args), biovil=biovil,
                                                   mm_hidden_size=2 * biovil["vit_dim"]))
    missing, unexpected = llava.load_state_dict(load_file(args.trunk), strict=False)
    if unexpected or not all(k.startswith(("model.vision_tower.", "model.mm_projector.")) for k in missing):
        raise SystemExit(f"trunk weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    lora = radialog_lora_config(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                target_modules=LORA_TARGETS)
    model = add_value_head_to_LlavaLlamaForCausalLM_model(
        attach_lora(llava, None, lora_config=lora, reference_copy=True), reference_mode=REFERENCE_FROZEN_COPY)
    model.tokenizer = load_pretrained_llava_tokenizer_with_image_support(args.model_base)
    config = PPOConfig(
        model_path=args.model_path, model_base=args.model_base, train_file=args.data,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        gradient_accumulation_steps=args.batch_size // args.mini_batch_size, ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.new_tokens, steps=10**6, learning_rate=1e-5, dtype="fp32", device="cpu",
        seed=args.seed, tensorboard=False, save_every=10**9, image_size=args.image_size,
        output_dir=str(Path(args.workdir) / "run-ours"), overwrite=True, chat_template=False,
        **json.loads(args.ours_options),
    )
    trainer = make_trainer_classes()["shared"](config, model=model,
                                               reward_fn=lambda rows, texts: [len(t) / 10.0 for t in texts])
    trainer.probe = probe
    trainer.phase_memory = {}
    info = {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return trainer, probe, info


def ours_step(trainer) -> dict:
    trainer.phase_memory = {}
    c0 = time.process_time()
    m = trainer.step()
    cpu = time.process_time() - c0
    mem = trainer.phase_memory
    return {"rollout_s": m["time/rollout"], "score_s": m["time/forward"], "train_s": m["time/train"],
            "step_s": m["time/step"], "cpu_s": cpu, "rollout_mb": mem["rollout"] / MB,
            "update_mb": max(mem["score"], mem["train"]) / MB,
            "response_len": m["env/response_length"], "first_ratio_max_dev": m["ppo/policy/first_ratio_max_dev"],
            "kl": m["objective/kl"]}


# -- TRL (worker, TRL's own environment) ----------------------------------------------------------


def build_trl(args):
    """TRL 0.11.4's PPOTrainer on the same trunk + LoRA; returns (step function, probe, info)."""
    import warnings

    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    probe = PeakMemory("cpu", interval=0.002)
    probe.start()
    torch.manual_seed(args.seed)
    llama = LlamaForCausalLM(LlamaConfig(**llama_kwargs(args)))
    llama.load_state_dict(load_file(args.trunk), strict=True)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(llama, peft_config=lora, summary_dropout_prob=0.0)
    # A word-level tokenizer over the whole vocabulary: TRL only pads and collates with it.
    vocab = {f"<t{i}>": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<t0>")),
                                        pad_token="<t0>", bos_token="<t1>", eos_token="<t2>", unk_token="<t0>")
    config = PPOConfig(
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        gradient_accumulation_steps=args.batch_size // args.mini_batch_size, ppo_epochs=args.ppo_epochs,
        learning_rate=1e-5, init_kl_coef=0.05, adap_kl_ctrl=True, target=6, horizon=10000, gamma=1.0,
        lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, seed=args.seed, log_with=None,
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    lengths = json.loads(args.query_lengths)
    gen = torch.Generator().manual_seed(args.seed)
    state = {"row": 0}
    generation = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
                      pad_token_id=0, eos_token_id=2)

    def step() -> dict:
        queries = []
        for _ in range(args.batch_size):
            n = lengths[state["row"] % len(lengths)]
            state["row"] += 1
            queries.append(torch.randint(3, args.vocab, (n,), generator=gen))
        record: dict = {}
        c0, t0 = time.process_time(), time.perf_counter()
        with probe.phase(record, "rollout"):
            responses = trainer.generate(queries, batch_size=args.batch_size, return_prompt=False, **generation)
        t1 = time.perf_counter()
        scores = [torch.tensor(len(r) / 10.0) for r in responses]
        with probe.phase(record, "update"):
            stats = trainer.step(queries, responses, scores)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        score_s = sum(stats[k] for k in ("time/ppo/forward_pass", "time/ppo/compute_rewards",
                                         "time/ppo/compute_advantages"))
        return {"rollout_s": t1 - t0, "score_s": score_s, "train_s": stats["time/ppo/optimize_step"],
                "step_s": t2 - t0, "cpu_s": cpu, "rollout_mb": record["rollout"] / MB,
                "update_mb": record["update"] / MB,
                "response_len": sum(len(r) for r in responses) / len(responses),
                "first_ratio_max_dev": float("nan"), "kl": float(stats["objective/kl"])}

    info = {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return step, probe, info


def profile_step(step, path: str) -> str:
    """Run one step under ``torch.profiler`` (CPU) and write the operator table to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    text = (averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n\n"
            + averages.table(sort_by="cpu_time_total", row_limit=40))
    Path(path).write_text(text)
    return path


def run_worker(args) -> None:
    """Build one side, then answer ``step`` / ``quit`` commands from stdin with JSON lines."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "ours":
        import accelerate  # noqa: F401  (imported before the baseline, like the code it measures)
        import peft  # noqa: F401

        trainer, probe, info = build_ours(args)
        step = lambda: ours_step(trainer)  # noqa: E731
    else:
        step, probe, info = build_trl(args)
    import transformers

    info.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    if args.worker == "trl":
        import trl

        info["trl"] = trl.__version__
    emit({"ready": info})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            emit({"step": step()})
        elif command.startswith("profile "):
            emit({"profile": profile_step(step, command.split(" ", 1)[1])})
        elif command == "quit":
            break
    probe.stop()


# -- parent ---------------------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> Path:
    """The TRL environment's python, creating the venv with ``TRL_PINS`` when it is missing."""
    python = venv / "bin" / "python"
    marker = venv / "bench-pins.json"
    if python.is_file() and marker.is_file() and json.loads(marker.read_text()) == TRL_PINS:
        return python
    print(f"creating {venv} with {' '.join(TRL_PINS)} (once; a few minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    marker.write_text(json.dumps(TRL_PINS))
    return python


def prepare(args) -> list[int]:
    """Write the trunk, the tiny release (tokenizer) and prompts; return our per-row query lengths."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from radialog_rl.loading.tokenizer import (
        batch_tokenize_image_prompts,
        load_pretrained_llava_tokenizer_with_image_support,
    )
    from radialog_rl.testing.data import make_binary_qa_jsonl
    from radialog_rl.testing.tiny import make_tiny_release
    from radialog_rl.training.ppo.rollout import load_prompt_jsonl, user_message

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    trunk = LlamaForCausalLM(LlamaConfig(**llama_kwargs(args)))
    args.trunk = str(work / "trunk.safetensors")
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, args.trunk)
    release = make_tiny_release(work / "release")
    args.model_path, args.model_base = str(release.model_path), str(release.model_base)
    data = make_binary_qa_jsonl(work / "data", n=max(8, args.batch_size))
    # Short questions without the chat template: ~36 text tokens + the image positions, about the
    # length of a RaDialog binary question with the real tokenizer.
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for row in lines:
        row["prompt"] = row["prompt"].split("?")[0] + "? Answer yes or no."
    data.write_text("".join(json.dumps(row) + "\n" for row in lines))
    args.data = str(data)
    tokenizer = load_pretrained_llava_tokenizer_with_image_support(release.model_base)
    rows = load_prompt_jsonl(args.data)
    prompts = [user_message(r.prompt) for r in rows]
    ids, mask = batch_tokenize_image_prompts(prompts, tokenizer, padding_side="left")
    positions = (args.image_size // 32) ** 2  # BioViL-T: one position per 32 x 32 pixels
    return [int(m.sum()) - 1 + positions for m in mask]  # the -200 placeholder becomes `positions` tokens


class Worker:
    """A worker process speaking the stdin/stdout protocol of :func:`run_worker`."""

    def __init__(self, side: str, python: str, args, extra: list[str]):
        cmd = [python, os.path.abspath(__file__), *extra, "--worker", side.split("*")[0]]
        if side == "ours*":
            cmd += ["--ours-options", args.alt_options or "{}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or ""), "TOKENIZERS_PARALLELISM": "false"}
        if not args.threads:
            env.pop("OMP_NUM_THREADS")
        if side == "trl":  # the TRL environment must not see this package's source tree
            env.pop("PYTHONPATH", None)
        if side == "ours*" and args.alt_src:  # another checkout's package, e.g. before a change
            env["PYTHONPATH"] = str(Path(args.alt_src).resolve())
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise SystemExit(f"the {self.side} worker exited (code {self.proc.wait()}) without answering")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()["step"]

    def profile(self, path: Path) -> str:
        self.proc.stdin.write(f"profile {path}\n")
        self.proc.stdin.flush()
        return self._read()["profile"]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


COLUMNS = [("rollout s", "rollout_s", "{:.3f}"), ("scoring passes s", "score_s", "{:.3f}"),
           ("training s", "train_s", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
           ("step CPU s", "cpu_s", "{:.3f}"), ("rollout peak MB", "rollout_mb", "{:.0f}"),
           ("update peak MB", "update_mb", "{:.0f}")]


def medians(records: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in records) for key in records[0]}


def table(results: dict[str, list[dict]]) -> str:
    rows = {side: medians(records) for side, records in results.items()}
    header = ["side"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = {"ours": "ours (radialog-rl)", "ours*": "ours* (--alt-options / --alt-src)", "trl": "TRL 0.11.4 legacy"}
    for side, row in rows.items():
        lines.append(f"| {names[side]} | " + " | ".join(f.format(row[k]) for _, k, f in COLUMNS) + " |")
    for num, den, label in (("trl", "ours", "TRL / ours"), ("trl", "ours*", "TRL / ours*"),
                            ("ours", "ours*", "ours / ours*")):
        if num in rows and den in rows:
            a, b = rows[num], rows[den]
            lines.append(f"| **{label}** | " + " | ".join(f"{a[k] / b[k]:.2f}x" if b[k] else "n/a"
                                                         for _, k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6, help="measured interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="unreported steps per side first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mini-batch-size", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000, help="LLaMA's vocabulary: a realistic lm_head")
    p.add_argument("--image-size", type=int, default=448, help="pixels; (size/32)^2 image positions")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true", help="measure ours only")
    p.add_argument("--trl-venv", default=str(REPO / ".venv-bench-trl"))
    p.add_argument("--ours-options", default="{}",
                   help="JSON of extra PPOConfig fields for ours (e.g. rollout options)")
    p.add_argument("--alt-options", default=None, metavar="JSON",
                   help="also run ours with these extra PPOConfig fields as side 'ours*', e.g. "
                        "'{\"mixed_adapter_scoring\": true}'")
    p.add_argument("--alt-src", default=None, metavar="DIR",
                   help="also run ours from this src/ directory as side 'ours*' (e.g. an older checkout's, "
                        "exported with `git archive REV src | tar -x -C DIR/..`): a before/after A/B")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the raw per-step records here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the rounds, profile one more step per side (torch.profiler) into DIR/SIDE.txt")
    for name in ("--worker", "--trunk", "--model-path", "--model-base", "--data", "--query-lengths"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size % args.mini_batch_size:
        p.error("--batch-size must be a multiple of --mini-batch-size")
    if args.image_size % 32:
        p.error("--image-size must be a multiple of 32 (BioViL-T's stride)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        run_worker(args)
        return
    sides = ["ours"] if args.skip_trl else list(SIDES)
    if args.alt_options or args.alt_src:
        sides.insert(1, "ours*")
    pythons = {"ours": sys.executable, "ours*": sys.executable}
    if "trl" in sides:
        pythons["trl"] = str(ensure_trl_venv(Path(args.trl_venv)))
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ppo-vs-trl-"))
        args.workdir = str(Path(args.workdir).resolve())
        t0 = time.perf_counter()
        lengths = prepare(args)
        passed = ["--trunk", args.trunk, "--model-path", args.model_path, "--model-base", args.model_base,
                  "--data", args.data, "--query-lengths", json.dumps(lengths), "--workdir", args.workdir]
        for name in ("rounds", "batch_size", "mini_batch_size", "ppo_epochs", "new_tokens", "hidden",
                     "intermediate", "layers", "heads", "vocab", "image_size", "lora_r", "threads", "seed",
                     "ours_options"):
            passed += ["--" + name.replace("_", "-"), str(getattr(args, name))]
        workers = {}
        try:
            for side in sides:
                workers[side] = Worker(side, pythons[side], args, passed)
            print(f"prepared and built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            results: dict[str, list[dict]] = {side: [] for side in sides}
            for r in range(args.warmup + args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for side in order:
                    record = workers[side].step()
                    if r >= args.warmup:
                        results[side].append(record)
                    print(f"round {r - args.warmup + 1}/{args.rounds} {side}: step {record['step_s']:.2f} s",
                          file=sys.stderr, flush=True)
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                for side, w in workers.items():
                    print(f"profile of one {side} step: {w.profile(Path(args.profile).resolve() / (side + '.txt'))}",
                          file=sys.stderr, flush=True)
        finally:
            for w in workers.values():
                w.close()
    report(args, results, {s: w.info for s, w in workers.items()}, lengths)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "info": {s: w.info for s, w in workers.items()}},
                                              indent=1))


def report(args, results, info, lengths) -> None:
    ours = info["ours"]
    grid = args.image_size // 32
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    print(f"\n`{command}`\n")
    versions = "; ".join(f"{s}: torch {i['torch']}, transformers {i['transformers']}"
                         + (f", trl {i['trl']}" if "trl" in i else "") for s, i in info.items())
    print(f"{platform.machine()} CPU, {ours['threads']} torch thread(s) per side, fp32; LLaMA hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}, LoRA r {args.lora_r} on all projections; "
          f"query {min(lengths)}-{max(lengths)} positions ({grid * grid} image); batch {args.batch_size}, "
          f"minibatch {args.mini_batch_size}, {args.ppo_epochs} PPO epoch(s), {args.new_tokens} new tokens; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up; {versions}\n")
    print(table(results))
    for side, records in results.items():
        steps = [r["step_s"] for r in records]
        m = medians(records)
        print(f"\n- {side}: step s min-max {min(steps):.2f}-{max(steps):.2f}; mean response length "
              f"{m['response_len']:.1f}; params {info[side]['params'] / 1e6:.2f} M "
              f"({info[side]['trainable'] / 1e6:.2f} M trainable)"
              + (f"; first ratio max |r-1| {max(r['first_ratio_max_dev'] for r in records):.2g}"
                 if side.startswith("ours") else ""), end="")
    if "trl" in results:
        a, b = medians(results["trl"]), medians(results["ours"])
        print(f"\n\nthroughput ours / TRL (median step time TRL / ours): wall {a['step_s'] / b['step_s']:.2f}x, "
              f"CPU {a['cpu_s'] / b['cpu_s']:.2f}x")
    else:
        print()


if __name__ == "__main__":
    main()
