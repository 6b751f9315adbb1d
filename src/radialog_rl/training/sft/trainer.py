"""Supervised fine-tuning (SFT) of RaDialog on image + text conversations with ``transformers.Trainer``.

The Trainer does the training loop: gradient accumulation, evaluation, checkpoints and resume,
best-checkpoint selection, TensorBoard, and DDP / DeepSpeed / FSDP through accelerate. This module
is the glue around it:

* :class:`SFTConfig` (declared in :mod:`.config`; ``trainer`` holds
  ``transformers.TrainingArguments`` fields) and :func:`load_sft_config` for YAML files;
* :func:`build_sft_model`: RaDialog with its own LoRA trainable (``entry_point: radialog_lora``) or a
  fresh/saved adapter on the baseline or on a merged directory (``fresh_lora``), 16/8/4-bit;
  optionally the ``mm_projector`` trainable too;
* :func:`~.data.build_datasets` (:mod:`.data`): :class:`~radialog_rl.data.datasets.SFTDataset` sized
  from the model config (image positions, crop, ``max_length``);
* :func:`run_sft`: the stock ``Trainer`` with our collator, then the final adapter written to
  ``<output_dir>/adapter`` (PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``,
  plus ``non_lora_trainables.safetensors`` when the projector was trained) and, with ``merge``, a
  self-contained merged model in ``<output_dir>/merged`` (:mod:`.state`).

Why the stock Trainer works without a subclass: the collator's batch has ``images`` (and maybe
``prior_images``) next to ``input_ids``/``labels``; with ``remove_unused_columns=False`` the Trainer
passes every key to ``model(**batch)`` and our forward takes them. The loss comes from the model
(labels already carry -100 on image positions and padding); the Trainer passes
``num_items_in_batch`` so gradient accumulation averages over tokens, not micro-batches.

Dropout and eval mode: the Trainer puts the model in train mode each step, which turns LoRA dropout
on. The frozen BioViL-T tower stays in eval mode by itself (it overrides ``train``), so its
BatchNorm statistics never move.

Several processes (``torchrun`` / ``accelerate launch``): each process loads the model onto its own
device (``cuda:LOCAL_RANK``, or the CPU) and the Trainer wraps it in DDP with
``find_unused_parameters=False`` (every LoRA parameter, and the projector when trained, is used in
every forward; the frozen tower and base weights take no gradient). Only the main process writes
the final adapter and the merge. DeepSpeed ZeRO-3 / FSDP partition parameters: the final adapter is
then saved through the Trainer's own gathering (``trainer.save_model``), and ``train_projector`` is
refused (its file is written from the live parameters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from radialog_rl.errors import ConfigError
from radialog_rl.loading.adapters import (
    radialog_lora_config,
    trainable_parameter_report,
)
from radialog_rl.loading.bundle import (
    ADAPTER_FRESH,
    ADAPTER_RELEASE,
    LoadedModel,
    ModelSpec,
    load_model,
)
from radialog_rl.loading.precision import precision_spec
from radialog_rl.training.engines import check_engine, describe_engine
from radialog_rl.training.run_dir import (
    RunLock,
    check_not_locked,
    check_run_dir,
    remove_run_files,
)
from radialog_rl.training.sft.config import TRAINER_DEFAULTS, SFTConfig
from radialog_rl.training.sft.data import build_datasets, read_examples, sft_collator
from radialog_rl.training.sft.state import (
    ADAPTER_SUBDIR,
    MERGED_SUBDIR,
    RUN_FILES,
    load_projector,
    merge_sft_adapter,
    require_merged_base,
    resolve_resume_checkpoint,
    save_projector,
    save_sft_adapter,
)

logger = logging.getLogger(__name__)


def resolve_device(config: SFTConfig) -> str:
    """The device this process loads the model onto.

    Default cuda when available, else cpu. Under several processes ``cuda`` becomes
    ``cuda:LOCAL_RANK`` so each process holds its own replica (what DDP expects); an explicit index
    that disagrees with the local rank is an error rather than a silent fight with accelerate.
    """
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if device == "cuda" and local_rank >= 0:
        return f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        try:
            index = int(device.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"device {device!r} is not a device name (cpu, cuda, cuda:0)") from None
        expected = max(local_rank, 0)
        if index != expected:
            raise ConfigError(
                f"device {device!r}: the Trainer trains on cuda:{expected} in this process; select GPUs "
                "with CUDA_VISIBLE_DEVICES and set device: cuda"
            )
    return device


def _default_report_to() -> str:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return "none"
    return "tensorboard"


def build_training_arguments(config: SFTConfig):
    """``transformers.TrainingArguments`` from :data:`TRAINER_DEFAULTS` + ``config.trainer``.

    Also: ``report_to`` tensorboard when installed (else none), ``use_cpu`` when the model is on the
    CPU, bf16 autocast by default for a bf16 model on a GPU that supports it, evaluation every
    ``save_steps`` when an ``eval_file`` is given (and none without one).
    """
    from transformers import TrainingArguments

    trainer = dict(config.trainer)
    if not trainer.get("output_dir"):
        raise ConfigError("trainer.output_dir is required (where checkpoints, logs and the adapter go); "
                          "set it in the config or pass --output-dir")
    values = dict(TRAINER_DEFAULTS)
    values["report_to"] = _default_report_to()
    device = resolve_device(config)
    if device == "cpu":
        values["use_cpu"] = True
    compute = precision_spec(config.precision, config.dtype).compute_dtype
    if compute == torch.bfloat16 and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        values["bf16"] = True
    if config.eval_file:
        values["eval_strategy"] = "steps"
        values["eval_steps"] = trainer.get("save_steps", values["save_steps"])
    elif trainer.get("eval_strategy", "no") != "no":
        raise ConfigError(f"trainer.eval_strategy is {trainer['eval_strategy']!r} but no eval_file is given")
    values["disable_tqdm"] = not logger.isEnabledFor(logging.INFO)  # -q: no progress bar
    values.update(trainer)
    values["output_dir"] = str(Path(values["output_dir"]).expanduser())
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {' '.join(str(exc).split())}") from exc


def build_sft_model(config: SFTConfig) -> LoadedModel:
    """Load the starting model for SFT: a ``PeftModel`` with adapter ``"default"`` trainable.

    ``radialog_lora``: RaDialog's adapter (or ``adapter_path``) on the release. ``fresh_lora``: a
    fresh adapter (``lora_*`` fields), or ``adapter_path``, on the release or a merged directory.
    Everything else is frozen except, with ``train_projector`` / ``train_vision_tower``, those
    modules (cast to fp32: optimiser updates of 16-bit weights lose most of their bits). The model
    comes back in eval mode (the Trainer switches it to train mode).
    """
    from transformers import set_seed

    # A fresh adapter's A matrices are random: seed them like the Trainer seeds everything else.
    set_seed(int(config.trainer.get("seed", TRAINER_DEFAULTS["seed"])))
    spec = ModelSpec(
        model_path=config.model_path, model_base=config.model_base, precision=config.precision,
        dtype=config.dtype, device=resolve_device(config), device_map=config.device_map,
        trainable=True, gradient_checkpointing=config.gradient_checkpointing,
    )
    if config.entry_point == "radialog_lora":
        spec = spec.with_(adapter=config.adapter_path if config.adapter_path is not None else ADAPTER_RELEASE)
    else:
        if not config.model_path:
            raise ConfigError("entry_point 'fresh_lora' needs model_path (the RaDialog release, or a "
                              "merged directory)")
        lora_config = None
        if config.adapter_path is None:
            overrides = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                         "target_modules": config.lora_target_modules}
            lora_config = radialog_lora_config(**{k: v for k, v in overrides.items() if v is not None})
        spec = spec.with_(model_base=config.model_base or require_merged_base(config.model_path),
                          adapter=config.adapter_path if config.adapter_path is not None else ADAPTER_FRESH,
                          lora_config=lora_config)
    bundle = load_model(spec)
    if config.train_projector:
        bundle.llava.model.mm_projector.to(dtype=torch.float32).requires_grad_(True)
    if config.train_vision_tower:
        bundle.llava.model.vision_tower.to(dtype=torch.float32).requires_grad_(True)
    if config.trains_non_lora:
        trainable_parameter_report(bundle.model)
    return bundle


def _projector_callback():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ProjectorCheckpointCallback(TrainerCallback):
        """Writes the trained projector into each checkpoint (the Trainer saves only the adapter)."""

        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                save_projector(model, checkpoint)
            return control

    return ProjectorCheckpointCallback()


def _route_logs_to_logging(trainer) -> None:
    """Send the Trainer's per-step log dicts to our logger (stderr) instead of ``print``/``tqdm.write``.

    Stdout stays free for what a command means to output (the CLI's result line, the demo's tables);
    the progress bar (stderr) stays.
    """
    from transformers.trainer_callback import (
        PrinterCallback,
        ProgressCallback,
        TrainerCallback,
    )

    class _LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                shown = {k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()}
                logger.info("step %d: %s", state.global_step, shown)

    class _BarOnlyProgressCallback(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarOnlyProgressCallback())
    trainer.add_callback(_LogCallback())


def run_sft(
    config: SFTConfig,
    resume_from_checkpoint: str | os.PathLike | None = None,
    *,
    callbacks: Sequence[Any] | None = None,
) -> Path:
    """Train with ``transformers.Trainer`` and save the final adapter.

    Args:
        config: the run's configuration.
        resume_from_checkpoint: a ``checkpoint-N`` directory or ``"latest"`` (newest in
            ``trainer.output_dir``): model adapter, optimiser, scheduler, RNG states and data
            position are restored, so the losses continue as if never interrupted.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. to collect losses).

    Returns:
        ``<output_dir>/adapter``: the PEFT adapter directory (+ ``non_lora_trainables.safetensors``
        with ``train_projector``). ``<output_dir>/trainer_state.json`` holds the log history,
        ``<output_dir>/sft_config.json`` the configuration, ``<output_dir>/merged`` the merged model
        when ``merge`` is set.

    Raises:
        ConfigError / DataError / CheckpointError: bad configuration, data rows (named by file and
        line), or model files; raised before the model is loaded where possible. A directory
        holding a previous run is refused unless resuming or ``config.overwrite`` (which removes
        only :data:`RUN_FILES`), and so is one in use by a live run.
    """
    args = build_training_arguments(config)  # validates the trainer mapping before any loading
    output_dir = Path(args.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        check_not_locked(output_dir)
    check_run_dir(output_dir, RUN_FILES, resume=resume_from_checkpoint is not None,
                  overwrite=config.overwrite, what="SFT")
    resume = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
    examples = read_examples(config)  # bad rows fail here, before minutes of model loading
    # The main process holds the output dir for the run's life (another run there is refused).
    with RunLock(output_dir) if main_process else contextlib.nullcontext():
        if main_process and config.overwrite:
            remove_run_files(output_dir, RUN_FILES)
        return _train_and_save(config, args, resume, examples, callbacks)


def _train_and_save(config: SFTConfig, args, resume: str | None, examples, callbacks) -> Path:
    from transformers import Trainer


    output_dir = Path(args.output_dir)
    # Whole on each process (device placement, BioViL-T's init: the loader steps outside zero.Init);
    # ZeRO-3 partitions it in train().
    bundle = build_sft_model(config)
    model, tokenizer, model_config = bundle.model, bundle.tokenizer, bundle.llava.config
    train_dataset, eval_dataset = build_datasets(config, tokenizer, model_config, examples=examples)
    logger.info("SFT: %d training rows%s; %s", len(train_dataset),
                f", {len(eval_dataset)} evaluation rows" if eval_dataset else "", output_dir)

    all_callbacks = list(callbacks or [])
    if config.trains_non_lora:
        all_callbacks.append(_projector_callback())
        if resume is not None:
            load_projector(model, resume)  # the Trainer restores only the adapter
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=sft_collator(tokenizer, model_config),
        processing_class=tokenizer,
        callbacks=all_callbacks or None,
    )
    check_engine(trainer.accelerator)  # e.g. a DeepSpeed launch that would train plain DDP
    logger.info("SFT runs under %s", describe_engine(trainer.accelerator))
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if config.trains_non_lora and sharded:
        # Our projector file is written from the live parameters, which ZeRO-3 / FSDP partition.
        raise ConfigError("train_projector / train_vision_tower are not supported with DeepSpeed or FSDP; "
                          "train them under DDP (torchrun / accelerate launch --multi_gpu) or leave them frozen")
    _route_logs_to_logging(trainer)
    trainer.train(resume_from_checkpoint=resume)
    best = trainer.state.best_model_checkpoint
    if config.trains_non_lora and args.load_best_model_at_end and best:
        load_projector(model, best)  # the Trainer reloaded the best adapter, not the projector

    adapter_dir = output_dir / ADAPTER_SUBDIR
    if trainer.is_fsdp_enabled:
        # The Trainer's save_model writes nothing under FSDP's SHARDED_STATE_DICT (only a
        # FULL_STATE_DICT run is exported); gather the full state dict (a collective) and write the
        # adapter from it on the main process.
        full = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_world_process_zero():
            save_sft_adapter(model, adapter_dir, state_dict=full)
    elif sharded:
        # Partitioned parameters: the Trainer gathers them (every process must take part).
        trainer.save_model(str(adapter_dir))
    elif trainer.is_world_process_zero():
        save_sft_adapter(model, adapter_dir, with_projector=config.trains_non_lora)
    if trainer.is_world_process_zero():
        trainer.save_state()
        (output_dir / "sft_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    trainer.accelerator.wait_for_everyone()

    if config.merge and trainer.is_world_process_zero():
        del trainer, model
        _free_memory()
        merged = merge_sft_adapter(config, adapter_dir, output_dir / MERGED_SUBDIR)
        logger.info("merged model written to %s", merged)
    return adapter_dir


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
