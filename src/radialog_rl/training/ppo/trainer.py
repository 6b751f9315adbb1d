"""Multimodal PPO for a LoRA LLaVA policy with a shared-trunk value head, on ``accelerate``.

One :meth:`PPOTrainer.step`, top to bottom (Huang et al. 2024, "The N Implementation Details of
RLHF with PPO"; ``docs/ppo-and-calibration.md`` §A):

1. **rollout**: take ``batch_size`` rows, load images, compute image features ONCE (tower and
   projector are frozen), sample responses with left-padded prompts; the sampled ids are the
   response, masked from the first generated token through EOS (``rollout_merged_copy``: sampled
   by a merged-weights copy of the trunk; only the tokens are taken from it).
2. **score**: the reward sees the rows and decoded responses and returns one score per sample (and
   optionally a character span to optimise); NaN/inf stops the step with the samples named.
3. **old log-probs, values, reference log-probs**: no-grad passes over the same minibatches the
   first epoch trains on (so the first ratio is exactly 1), logits divided by the temperature,
   only the chosen tokens' log-probs computed; the reference runs on the same network
   (``reference_policy()``: adapter disabled or its frozen copy).
4. **advantages**: per-token reward ``-beta * KL`` plus the score on the last optimised token; GAE
   (gamma, lambda); advantages whitened over the batch.
5. **train**: ``ppo_epochs`` passes over shuffled minibatches, clipped policy and value losses,
   gradient accumulation, optional clipping and KL early stop; then the KL controller update.

The math lives in :mod:`.losses`, :mod:`.kl_control`, :mod:`.running_moments`; checkpoints in
:mod:`.state`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from radialog_rl.calibration.metrics import compute_calibration
from radialog_rl.calibration.rewards import BUILTIN_REWARDS, RewardOutput
from radialog_rl.data.images import ImageSizes, load_chest_xray
from radialog_rl.data.prompts import SYSTEM_PROMPT, build_prompt
from radialog_rl.errors import ConfigError, RadialogError
from radialog_rl.loading.adapters import radialog_lora_config
from radialog_rl.loading.bundle import (
    ADAPTER_FRESH,
    ADAPTER_RELEASE,
    LoadedModel,
    ModelSpec,
    load_model,
)
from radialog_rl.loading.export import save_lora_merged_llava_model_to_local_dir
from radialog_rl.loading.precision import parse_dtype
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts
from radialog_rl.modeling.llava import expand_image_tokens
from radialog_rl.modeling.value_head import (
    REFERENCE_ADAPTER_NAME,
    REFERENCE_FROZEN_COPY,
    ReferenceMode,
)
from radialog_rl.padding import pad_rows
from radialog_rl.scoring import build_scorer
from radialog_rl.scoring.base import scorer_metrics
from radialog_rl.training import engines
from radialog_rl.training.engines import unsharded
from radialog_rl.training.ppo import losses as L
from radialog_rl.training.ppo.config import PPOConfig
from radialog_rl.training.ppo.evaluation import evaluation_table, is_better
from radialog_rl.training.ppo.kl_control import make_kl_controller
from radialog_rl.training.ppo.merged_rollout import MergedRolloutCopy
from radialog_rl.training.ppo.rollout import (
    EpochSampler,
    PromptRow,
    RewardError,
    check_scores,
    load_prompt_jsonl,
    span_token_mask,
    user_message,
)
from radialog_rl.training.ppo.running_moments import (
    RunningMoments,
    clip_scores,
    normalize_scores,
)
from radialog_rl.training.ppo.state import (
    RUN_FILES,
    find_checkpoint,
    load_checkpoint,
    reward_rng_state,
    save_checkpoint,
    save_policy_files,
    set_reward_rng_state,
)
from radialog_rl.training.preflight import check_rows, load_config_reward
from radialog_rl.training.run_dir import (
    RunLock,
    check_not_locked,
    check_run_dir,
    remove_run_files,
    truncate_metrics,
)
from radialog_rl.value_greedy import (
    candidate_logprobs,
    choose_confidence_values,
    confidence_candidates,
    split_candidate_ids,
)

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of experience (all tensors on the training device, rows = samples).

    ``input_ids``/``attention_mask`` ``[B, Tq + Tr]`` hold the image-expanded, left-padded query
    followed by the right-padded response; ``response_ids`` ``[B, Tr]``; ``mask`` ``[B, Tr]`` the
    tokens the policy loss optimises (the reward's span when it gives one, else the response
    through EOS; zero for skipped samples); ``kl_mask`` ``[B, Tr]`` the tokens anchored to the
    reference (the whole response through EOS, less exploration-rewritten tokens; zero for skipped
    samples); ``image_features`` ``[B, N_img, hidden]``. With ``samples_per_prompt = K`` the rows
    come in contiguous groups of K samples of one prompt.

    With ``confidence_objective: all_values``, ``value_candidates[b]`` is ``(prefix_length, ids)``
    (:func:`~radialog_rl.value_greedy.value_candidate_ids`: the response up to its statement with
    each value 0..scale) for a valid sample with one integer statement, else None, and
    ``value_rewards`` ``[B, scale + 1]`` the processed score of each such response (NaN elsewhere)
    and ``failure_rewards`` ``[B]`` that of the response with its value removed (an unparsable
    statement); those samples' ``mask`` is zero (their statement is optimised by
    :func:`~radialog_rl.training.ppo.losses.all_values_loss` instead).
    """

    rows: list[PromptRow]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    kl_mask: torch.Tensor
    image_features: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor
    valid: torch.Tensor
    texts: list[str]
    has_eos: torch.Tensor
    reward_output: object = None
    rewritten: torch.Tensor | None = None  # [B] bool: exploration rewrote the confidence
    span_fallbacks: int = 0  # valid samples without a span (see PPOConfig.span_fallback)
    value_candidates: list | None = None
    value_rewards: torch.Tensor | None = None
    failure_rewards: torch.Tensor | None = None

    @property
    def query_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]


@dataclass
class OldPolicyPass:
    """What the no-grad passes computed for one rollout, each ``[B, Tr]`` (float32), aligned with
    ``Rollout.response_ids``: the sampling policy's log-probs of the sampled tokens (PPO's "old"
    log-probs), its values, its entropy, and the reference policy's log-probs."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor


@dataclass
class Advantages:
    """Step 4's output, each ``[B, Tr]``: advantages, value targets (returns), the per-token KL
    (for logging and the controller) and the KL part of the rewards (``-beta * kl`` or 0)."""

    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    non_score: torch.Tensor


def response_logit_positions(total_length: int, response_length: int, device=None) -> torch.Tensor:
    """``[Tr]`` positions ``Tq-1 .. Tq+Tr-2`` of a query ⊕ response sequence whose logits predict the
    response tokens, for ``logits_to_keep``: only those ``Tr`` rows go through the LM head.

    Why an index tensor rather than ``logits_to_keep=Tr + 1`` and a slice: transformers keeps an int
    as the strided view ``hidden[:, -k:]``, which sends the ``[b, k, hidden] x [hidden, vocab]``
    product down matmul's batched (bmm) path, about twice as slow on CPU as the 2-D GEMM that the
    contiguous copy made by index selection gets; and no logit row is computed only to be dropped.
    """
    start = total_length - response_length - 1
    return torch.arange(start, start + response_length, device=device)


def build_ppo_model(config: PPOConfig, device: str | torch.device | None = None) -> LoadedModel:
    """Load the policy + value head + reference named by ``config.entry_point``.

    ``radialog_lora``: RaDialog's adapter is the start, a frozen copy of it the reference.
    ``fresh_lora``: a fresh adapter on a merged SFT directory, the adapter disabled the reference.
    """
    device = device or config.device
    common = dict(precision=config.precision, dtype=config.dtype, device=device, trainable=True,
                  gradient_checkpointing=config.gradient_checkpointing, value_head=True,
                  value_head_path=config.value_head_path)
    if config.entry_point == "radialog_lora":
        return load_model(ModelSpec(
            model_path=config.model_path, model_base=config.model_base,
            adapter=config.adapter_path if config.adapter_path is not None else ADAPTER_RELEASE,
            reference=ReferenceMode.FROZEN_COPY, **common,
        ))
    if config.llava_model_path is None:
        raise ConfigError("entry_point 'fresh_lora' needs llava_model_path: a merged model directory written "
                          "by `radialog-rl merge` (or the SFT run's merged/ folder)")
    overrides = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                 "target_modules": config.lora_target_modules}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "r" in overrides and "lora_alpha" not in overrides:
        overrides["lora_alpha"] = 2 * overrides["r"]  # RaDialog's alpha / r ratio
    return load_model(ModelSpec(
        model_path=config.llava_model_path, model_base=config.llava_model_path,
        adapter=config.adapter_path if config.adapter_path is not None else ADAPTER_FRESH,
        lora_config=radialog_lora_config(**overrides) if overrides else None,
        reference=ReferenceMode.DISABLE_ADAPTER, **common,
    ))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def disable_dropout(model: torch.nn.Module) -> int:
    """Set ``p = 0`` on every dropout module (LoRA's included); returns how many were changed.

    Why not just ``eval()``: the update phase runs in train mode so that gradient checkpointing
    (active only in train mode) still saves memory; with dropout at 0 train and eval mode compute
    the same thing for LLaMA, and the frozen BioViL-T tower keeps itself in eval mode.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
    return changed


class PPOTrainer:
    """PPO on image+text prompts. See the module docstring for one step; ``train()`` runs
    ``config.steps`` of them with metrics, checkpoints and resume.

    Args:
        config: :class:`PPOConfig`.
        model: a :class:`~radialog_rl.loading.bundle.LoadedModel` from :func:`build_ppo_model` /
            ``load_model`` (its tokenizer is used), or a ``LlavaWithValueHead`` with a reference from a
            research entry point; built from ``config`` when None.
        tokenizer: defaults to the bundle's (or the research entry point's ``model.tokenizer``).
        reward_fn: ``(rows' fields, responses) -> RewardOutput | list[float]``; default from
            ``config.reward``.
        rows: the prompts (default ``config.train_file``).
        accelerator: an ``accelerate.Accelerator`` (created when None).
    """

    def __init__(self, config: PPOConfig, model=None, tokenizer=None, reward_fn=None,
                 rows: list[PromptRow] | None = None, accelerator=None):
        from accelerate.utils import set_seed


        self.config = config
        # On a machine without CUDA the process group is gloo on the CPU; DeepSpeed and FSDP stay
        # available (see engines.make_accelerator), so an `accelerate launch` with a DeepSpeed config
        # runs DeepSpeed, and a mismatch with the launcher is refused rather than run as DDP.
        cpu = str(config.device or "").startswith("cpu") or not torch.cuda.is_available()
        self.accelerator = accelerator or engines.make_accelerator(cpu)
        engines.check_engine(self.accelerator)
        self.engine = engines.engine_name(self.accelerator)
        logger.info("PPO runs under %s", engines.describe_engine(self.accelerator))
        set_seed(config.seed + self.accelerator.process_index)  # different samples per process
        # Cheap checks first (output dir, resume target, reward, data): a typo must not cost a 7B load.
        self.output_dir = Path(config.output_dir)
        self._resume_path = self._check_output_dir()
        if reward_fn is None:

            params = dict(config.reward_params)
            if config.reward in BUILTIN_REWARDS and "seed" not in params and "rng" not in params:
                # Exploration draws follow the run's seed (one stream per process) and are resumed
                # with the checkpoint's reward_rng state.
                params["seed"] = config.seed + self.accelerator.process_index
            if config.accuracy_scorer:

                params["accuracy_scorer"] = build_scorer(config.accuracy_scorer, **config.scorer)
            reward_fn = load_config_reward(config.reward, params, config.config_dir)
        self.reward_fn = reward_fn
        if config.confidence_objective == "all_values" and getattr(reward_fn, "explore_prob", 0.0) > 0:
            raise ConfigError("confidence_objective 'all_values' scores every value itself: set the reward's "
                              "explore_prob (reward_params.explore_prob) to 0 (exploration would rewrite the "
                              "texts it scores)")
        if rows is None:
            if not config.train_file:
                raise ConfigError("no PPO data: set train_file in the config")
            rows = load_prompt_jsonl(config.train_file)
            check_rows(rows, reward_fn, what=f"PPO train_file {config.train_file}")
        self.rows = rows
        self.eval_rows = load_prompt_jsonl(config.eval_file) if config.eval_file else []
        if config.eval_file:
            check_rows(self.eval_rows, reward_fn, what=f"PPO eval_file {config.eval_file}")
        self.best_value: float | None = None
        if model is None:
            # The loader builds the model whole on each process (outside zero.Init); ZeRO-3
            # partitions it at prepare.
            model = build_ppo_model(config, device=self.accelerator.device)
        if isinstance(model, LoadedModel):
            model, tokenizer = model.model, tokenizer or model.tokenizer
        if model.reference_mode is None:
            raise ConfigError("the PPO model has no reference policy; build it with a PPO entry point")
        self.tokenizer = tokenizer or model.tokenizer
        disable_dropout(model)  # detail 8: every pass (rollout, scoring, update) is deterministic
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas,
                                      eps=config.adam_eps, weight_decay=config.weight_decay)
        self._deepspeed = self.engine == "deepspeed"
        if self._deepspeed:  # no dataloader to read these from: ours are set (or checked) here
            engines.set_deepspeed_batch_keys(self.accelerator, config.mini_batch_size,
                                             config.gradient_accumulation_steps, config.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.eval()
        from transformers import get_scheduler

        updates = config.steps * config.ppo_epochs * self._optimizer_steps_per_epoch()
        # Not passed to accelerator.prepare: it would step the schedule once per process.
        self.scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                       num_warmup_steps=config.warmup_steps, num_training_steps=updates)
        self.kl_ctl = make_kl_controller(config.adaptive_kl, config.init_kl_coef, config.kl_target, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.sampler = EpochSampler(len(rows), config.seed, self.accelerator.process_index,
                                    self.accelerator.num_processes)
        self.step_count = 0
        self.vision_calls = 0
        self._writer = None
        self._overwrite_pending = config.overwrite and self._resume_path is None
        llava = self.unwrapped.llava
        self.image_size = config.image_size or llava.config.image_size
        self.image_resize = config.image_resize or ImageSizes.for_crop(self.image_size).resize
        llava.model.vision_tower.register_forward_hook(self._count_vision_call)
        self.rollout_copy = self._build_rollout_copy() if config.rollout_merged_copy else None
        if self._resume_path is not None:
            self.load_checkpoint(self._resume_path)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer's own state, as plain JSON: step, KL controller, running score moments, data
        order and the reward's exploration RNG (model, optimizer and scheduler have their own files)."""
        return {
            "step": self.step_count,
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "sampler": self.sampler.state_dict(),
            "reward_rng": reward_rng_state(self.reward_fn),
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.sampler.load_state_dict(state["sampler"])
        self.step_count = int(state["step"])
        set_reward_rng_state(self.reward_fn, state.get("reward_rng"))

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-<step>`` atomically (every process calls this; file layout
        in :mod:`radialog_rl.training.ppo.state`)."""
        return save_checkpoint(self)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (policy, value head, optimizer,
        scheduler, :meth:`state_dict`, RNG streams)."""
        load_checkpoint(self, Path(path))

    def _build_rollout_copy(self):
        """The :class:`~.merged_rollout.MergedRolloutCopy` of ``rollout_merged_copy`` (refused where
        parameters are sharded: the copy needs the whole weights on each process)."""
        if engines.zero_stage(self.accelerator) == 3 or self.engine == "fsdp":
            raise ConfigError(f"rollout_merged_copy is not supported under {engines.describe_engine(self.accelerator)}: "
                              "parameters are sharded, the merged copy needs whole weights on every process")
        dtype = self.config.rollout_merged_dtype
        return MergedRolloutCopy(self.unwrapped, parse_dtype(dtype) if dtype else None)

    def _check_output_dir(self) -> Path | None:
        """Refuse a locked or previously used output dir (no --resume/--overwrite); the checkpoint
        to resume from, checked for damage."""
        cfg = self.config
        if self.accelerator.is_main_process:
            check_not_locked(self.output_dir)
        check_run_dir(self.output_dir, RUN_FILES, resume=bool(cfg.resume_from), overwrite=cfg.overwrite,
                      what="PPO")
        return find_checkpoint(cfg.resume_from, self.output_dir) if cfg.resume_from else None

    @contextlib.contextmanager
    def _holding_output_dir(self):
        """The main process holds the run lock while steps write metrics and checkpoints."""
        if not self.accelerator.is_main_process:
            yield
            return
        with RunLock(self.output_dir):
            if self._overwrite_pending:
                remove_run_files(self.output_dir, RUN_FILES)
                self._overwrite_pending = False
            truncate_metrics(self.output_dir / "metrics.jsonl", self.step_count)
            yield

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _count_vision_call(self, *_):
        self.vision_calls += 1

    def _optimizer_steps_per_epoch(self) -> int:
        minibatches = self.config.batch_size // self.config.mini_batch_size
        return -(-minibatches // self.config.gradient_accumulation_steps)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    # -- 1-2: rollout and score -------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, rows: list[PromptRow], repeats: int = 1, do_sample: bool = True,
                max_new_tokens: int | None = None, merged: bool = False):
        """Generate for ``rows`` (each ``repeats`` times, contiguously) with images.

        The image features are computed once per distinct row and repeated, so a group of
        ``samples_per_prompt`` samples costs one vision-tower call. ``merged``: decode with the
        ``rollout_merged_copy`` (refreshed from the adapter first) instead of the PEFT policy.
        Returns ``(rows, query, features, response [B, Tr], response_mask [B, Tr], texts)`` with
        ``B = len(rows) * repeats``.
        """
        cfg, device = self.config, self.accelerator.device
        load = lambda p: load_chest_xray(p, resize=self.image_resize, crop=self.image_size)  # noqa: E731
        images = torch.stack([load(r.image) for r in rows]).to(device)
        priors = torch.stack([load(r.prior_image) for r in rows]).to(device) if rows[0].prior_image else None
        llava = self.unwrapped.llava
        features = llava.encode_images(images, priors)  # once per distinct prompt
        rows = [r for r in rows for _ in range(repeats)]
        features = features.repeat_interleave(repeats, dim=0)
        prompts = [user_message(r.prompt) for r in rows]
        if cfg.chat_template:
            system = SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
            prompts = [build_prompt(p, system=system) for p in prompts]
        ids, mask = batch_tokenize_image_prompts(prompts, self.tokenizer, padding_side="left")
        query = expand_image_tokens(ids, llava.num_image_tokens, mask, pad_token_id=self.pad_token_id)
        eos = self.tokenizer.eos_token_id
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) \
            if do_sample else dict(do_sample=False)
        decoder = self.unwrapped
        if merged:
            # Lazily before each rollout: picks up every update since (and a resumed adapter).
            self.rollout_copy.refresh()
            decoder = self.rollout_copy
        generated = decoder.generate(
            input_ids=query.input_ids.to(device), attention_mask=query.attention_mask.to(device),
            image_features=features, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            pad_token_id=self.pad_token_id, eos_token_id=eos, return_dict_in_generate=True, **sampling,
            **self._cache_options(),
        )
        response = generated.sequences
        response_mask = L.response_mask_from_eos(response, eos)
        texts = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                 for r, m in zip(response, response_mask)]
        return rows, query, features, response, response_mask, texts

    def _cache_options(self) -> dict:
        """``generate`` keywords for ``rollout_cache`` / ``rollout_compile`` (empty by default)."""
        cfg = self.config
        if cfg.rollout_cache == "dynamic":
            return {}
        options = {"cache_implementation": "static"}
        if cfg.rollout_compile is False:
            options["disable_compile"] = True
        elif cfg.rollout_compile:
            from transformers import CompileConfig

            compile_config = CompileConfig(fullgraph=False, dynamic=None)
            compile_config._compile_all_devices = True  # transformers compiles on accelerators only
            options["compile_config"] = compile_config
        return options

    @torch.no_grad()
    def rollout(self) -> Rollout:
        """Sample one batch of responses with images and score them."""
        cfg, device = self.config, self.accelerator.device
        k = cfg.samples_per_prompt
        prompts = [self.rows[i] for i in self.sampler.take(cfg.batch_size // k)]
        # The sampler only picks tokens: every log-prob PPO uses comes from score_passes on the policy.
        rows, query, features, response, response_mask, texts = self._sample(
            prompts, repeats=k, merged=self.rollout_copy is not None, do_sample=cfg.rollout_decoding == "sample")
        output = self._call_reward(rows, texts)
        rewritten = [False] * len(rows)
        if output.texts is not None and list(output.texts) != texts:
            rewritten = [a != b for a, b in zip(texts, output.texts)]
            response, response_mask = self._retokenize_rewritten(response, response_mask, texts, output.texts)
            texts = list(output.texts)
        raw_scores, valid = check_scores(output.scores, rows)
        eos_seen = L.has_eos(response, self.tokenizer.eos_token_id)
        scores = self._process_scores(raw_scores.to(device), valid.to(device), eos_seen)
        loss_mask, kl_mask, fallbacks = self._masks(response, response_mask, output.spans, rewritten, valid)
        value_candidates = value_rewards = failure_rewards = None
        if cfg.confidence_objective == "all_values":
            value_candidates, value_rewards, failure_rewards = self._score_values(rows, texts, valid)
            for b, candidates in enumerate(value_candidates):
                if candidates is not None:
                    loss_mask[b] = 0  # optimised by the all-values term instead
        return Rollout(
            rows=rows,
            input_ids=torch.cat([query.input_ids.to(device), response], 1),
            attention_mask=torch.cat([query.attention_mask.to(device), response_mask], 1),
            response_ids=response, mask=loss_mask, kl_mask=kl_mask, image_features=features,
            scores=scores, raw_scores=raw_scores, valid=valid, texts=texts, has_eos=eos_seen,
            reward_output=output, rewritten=torch.tensor(rewritten), span_fallbacks=fallbacks,
            value_candidates=value_candidates, value_rewards=value_rewards, failure_rewards=failure_rewards,
        )

    @property
    def confidence_scale(self) -> int:
        """The reward's confidence scale (its ``scale`` attribute, else ``reward_params.scale``, else
        10): what evaluation, the rollout metrics and the all_values objective read."""
        return int(getattr(self.reward_fn, "scale", self.config.reward_params.get("scale", 10)))

    def _score_values(self, rows: list[PromptRow], texts: list[str], valid: torch.Tensor):
        """``(value_candidates, value_rewards, failure_rewards)`` of :class:`Rollout`
        (``confidence_objective: all_values``): the reward is called once per value on every
        response with its statement's value replaced, and once with the value and the statement's
        closing removed (the failure score; a reward that skips it gives the row's lowest value
        score instead). The scores are processed as the sampled ones are (running-std scaling with
        the moments as they are now, then the clip); the no-EOS penalty is one constant per
        response and cannot change which value is better, so it is left out."""
        cfg, scale = self.config, self.confidence_scale
        splits = [confidence_candidates(t, scale) if bool(ok) else None for t, ok in zip(texts, valid)]
        candidates = [None if split is None else split_candidate_ids(self.tokenizer, split) for split in splits]
        rewards = torch.full((len(rows), scale + 1), float("nan"))
        for v in range(scale + 1):
            texts_v = [t if split is None else split[0] + split[1][v] + split[2] for t, split in zip(texts, splits)]
            raw, ok = check_scores(self._call_reward(rows, texts_v).scores, rows)
            rewards[:, v] = torch.where(ok, raw.float(), torch.nan)
        broken = [t if split is None else split[0] + split[2] for t, split in zip(texts, splits)]
        raw, ok = check_scores(self._call_reward(rows, broken).scores, rows)
        failure = torch.where(ok, raw.float(), torch.nan)
        for b in range(len(rows)):
            if candidates[b] is None:
                continue
            if bool(torch.isnan(rewards[b]).any()):
                candidates[b] = None  # some value was not scored: the sampled loss handles this one
            elif torch.isnan(failure[b]):
                failure[b] = rewards[b].min()
        device = self.accelerator.device
        rewards, failure = rewards.to(device), failure.to(device)
        if cfg.score_normalization:
            rewards, failure = normalize_scores(rewards, self.score_moments), normalize_scores(failure, self.score_moments)
        if cfg.score_clip is not None:
            rewards, failure = clip_scores(rewards, cfg.score_clip), clip_scores(failure, cfg.score_clip)
        return candidates, rewards, failure

    def _all_values_term(self, model, batch: Rollout, idx: torch.Tensor):
        """``(loss, expected_reward, entropy, value_mass)`` of :func:`L.all_values_loss` over the rows of ``idx``
        that have value candidates (one teacher-forced forward of ``scale + 1`` rows each), or None."""
        if batch.value_candidates is None:
            return None
        chosen = [b for b in idx.tolist() if batch.value_candidates[b] is not None]
        if not chosen:
            return None
        rows, ids, lengths = [], [], []
        for b in chosen:
            prefix_length, candidates = batch.value_candidates[b]
            rows += [b] * len(candidates)
            ids += candidates
            lengths += [len(c) - prefix_length for c in candidates]
        tq = batch.query_length
        logprobs = candidate_logprobs(model, batch.input_ids[:, :tq], batch.attention_mask[:, :tq],
                                      batch.image_features, rows, ids, lengths, self.pad_token_id)
        index = torch.tensor(chosen, device=batch.value_rewards.device)
        return L.all_values_loss(logprobs.view(len(chosen), -1), batch.value_rewards[index],
                                 batch.failure_rewards[index], self.config.values_entropy_coef)

    def _masks(self, response, response_mask, spans, rewritten, valid):
        """``(loss_mask, kl_mask, n_fallbacks)``, each mask ``[B, Tr]`` (see :class:`Rollout`).

        The loss mask is the reward's span (the confidence statement) when it has one; a sample
        without a span is optimised on its whole response or not at all (``span_fallback``), and
        counted, so a parse failure never changes what is optimised unnoticed. The KL mask is the
        whole sampled response through EOS, less the confidence tokens that exploration rewrote:
        those were not sampled from the policy, their log-ratio to the reference says nothing about
        drift (k3 explodes on them), so they carry no KL; their policy term uses the policy's own
        log-prob of the rewritten token as the old log-prob (ratio 1 at the first epoch, no
        importance correction), as Rewarding Doubt trains on them.
        """
        loss_mask, kl_mask, fallbacks = response_mask.clone(), response_mask.clone(), 0
        for i in range(response.shape[0]):
            span = spans[i] if spans is not None else None
            if span is None:
                if spans is not None and bool(valid[i]):
                    fallbacks += 1
                    if self.config.span_fallback == "skip":
                        loss_mask[i] = 0
                continue
            span_mask = torch.tensor(span_token_mask(self.tokenizer, response[i].tolist(), span),
                                     device=loss_mask.device, dtype=loss_mask.dtype)
            loss_mask[i] *= span_mask
            if rewritten[i]:
                kl_mask[i] *= 1 - span_mask
        invalid = ~valid.to(loss_mask.device)
        loss_mask[invalid] = 0
        kl_mask[invalid] = 0
        return loss_mask, kl_mask, fallbacks

    def _call_reward(self, rows: list[PromptRow], texts: list[str]):
        """The reward's output; a reward that raises or returns non-numbers is named with the rows."""
        name = getattr(self.reward_fn, "__name__", type(self.reward_fn).__name__)
        where = ", ".join(r.source for r in rows[:3]) + (" ..." if len(rows) > 3 else "")
        try:
            output = self.reward_fn([r.fields for r in rows], texts)
            output = output if isinstance(output, RewardOutput) else RewardOutput(scores=list(output))
        except RadialogError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {name} failed on the samples {where}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}") from exc
        for row, score in zip(rows, output.scores):
            if score is not None and (isinstance(score, bool) or not isinstance(score, numbers.Real)):
                raise RewardError(f"reward {name} returned {score!r} for {row.source}; a score must be a "
                                  "number (or None to skip the sample)")
        return output

    def _retokenize_rewritten(self, response, response_mask, old_texts, new_texts):
        """Exploration rewrote some confidences: train on the rewritten text (re-tokenized)."""
        eos = self.tokenizer.eos_token_id
        rows = []
        for i, (old, new) in enumerate(zip(old_texts, new_texts)):
            ids = response[i][response_mask[i].bool()].tolist()
            if old != new:
                ended = bool(ids) and ids[-1] == eos
                ids = self.tokenizer(new, add_special_tokens=False).input_ids + ([eos] if ended else [])
            rows.append(ids)
        out, mask = pad_rows(rows, self.pad_token_id, dtype=response.dtype)
        return out.to(response.device), mask.to(device=response.device, dtype=response_mask.dtype)

    def _process_scores(self, scores: torch.Tensor, valid: torch.Tensor, eos_seen: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.no_eos_penalty is not None:
            scores = torch.where(eos_seen.to(scores.device), scores, scores - cfg.no_eos_penalty)
        if cfg.score_normalization:
            gathered = self.accelerator.gather(torch.where(valid, scores, torch.nan))
            self.score_moments.update(gathered[~torch.isnan(gathered)])
            scores = normalize_scores(scores, self.score_moments)
        if cfg.score_clip is not None:
            scores = clip_scores(scores, cfg.score_clip)
        return torch.where(valid, scores, torch.zeros_like(scores))

    # -- 3: forward passes ------------------------------------------------------------------------
    def _forward(self, model, batch: Rollout, idx: torch.Tensor, with_entropy: bool = False,
                 entropy_rows: int | None = None, **kwargs):
        """Log-probs ``[b, Tr]`` of the response tokens, values ``[b, Tr]`` (and entropy, of the first
        ``entropy_rows`` rows when given). ``kwargs`` go to the model (``adapter_names``)."""
        tr = batch.response_ids.shape[1]
        out = model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                    image_features=batch.image_features[idx],
                    logits_to_keep=response_logit_positions(batch.input_ids.shape[1], tr, batch.input_ids.device),
                    **kwargs)
        logits = out.logits  # [b, Tr, V]: logit t predicts token t+1
        logprobs = L.gather_logprobs(logits, batch.response_ids[idx], self.config.temperature)
        values = out.values[:, -tr - 1 : -1]
        entropy = None
        if with_entropy:
            entropy = L.entropy_from_logits(logits[:entropy_rows], self.config.temperature)
        return logprobs, values, entropy

    def _reference_adapter_name(self, model) -> str:
        """The PEFT adapter name that gives the reference in a mixed-adapter batch."""
        return REFERENCE_ADAPTER_NAME if model.reference_mode == REFERENCE_FROZEN_COPY else "__base__"

    def _minibatches(self, generator: torch.Generator) -> list[list[torch.Tensor]]:
        """Shuffled minibatch indices for every PPO epoch (drawn up front, see step 3)."""
        cfg = self.config
        return [list(torch.randperm(cfg.batch_size, generator=generator).split(cfg.mini_batch_size))
                for _ in range(cfg.ppo_epochs)]

    @torch.no_grad()
    def old_policy_pass(self, batch: Rollout, first_epoch: list[torch.Tensor]) -> OldPolicyPass:
        """Old log-probs, values, entropy and reference log-probs over ``first_epoch``'s minibatches.

        Using the exact minibatches (shapes and rows) of the first training epoch makes the first
        ratio exactly 1: the no-grad pass and the grad pass do the same arithmetic.
        """
        model = self.unwrapped
        shape = batch.response_ids.shape
        zeros = lambda: torch.zeros(shape, device=batch.input_ids.device)  # noqa: E731
        out = OldPolicyPass(logprobs=zeros(), values=zeros(), entropy=zeros(), ref_logprobs=zeros())
        if self.config.mixed_adapter_scoring:
            # Rows [idx ; idx]: the first half through the policy's adapter, the second through the
            # reference's, in one forward (PEFT mixed adapter batch; eval mode only).
            names = [model.pretrained_model.active_adapter, self._reference_adapter_name(model)]
            for idx in first_epoch:
                b = len(idx)
                logprobs, values, entropy = self._forward(
                    model, batch, torch.cat([idx, idx]), with_entropy=True, entropy_rows=b,
                    adapter_names=[names[0]] * b + [names[1]] * b)
                out.logprobs[idx], out.values[idx], out.entropy[idx] = logprobs[:b], values[:b], entropy
                out.ref_logprobs[idx] = logprobs[b:]
            return out
        for idx in first_epoch:
            logprobs, values, entropy = self._forward(model, batch, idx, with_entropy=True)
            out.logprobs[idx], out.values[idx], out.entropy[idx] = logprobs, values, entropy
            with model.reference_policy():
                out.ref_logprobs[idx] = self._forward(model, batch, idx)[0]
        return out

    # -- 4: advantages ----------------------------------------------------------------------------
    def advantages(self, batch: Rollout, passes: OldPolicyPass) -> Advantages:
        """Per-token rewards, advantages and returns for one rollout (:class:`Advantages`).

        ``kl`` (for logging and the KL controller) is charged over ``batch.kl_mask``; with ``kl_penalty: reward`` it also
        enters the rewards (``non_score = -beta * kl``), else it is a loss term (see ``_train``).
        """
        cfg = self.config
        mask = batch.mask.to(passes.logprobs.dtype)
        kl_mask = batch.kl_mask.to(mask.dtype)
        beta = self.kl_ctl.value if cfg.kl_penalty == "reward" else 0.0
        # With kl_penalty "loss", beta is 0 here: the rewards hold only the score, and kl (returned
        # unscaled) is for logging and the controller; the KL itself enters the loss in _train.
        rewards, non_score, kl = L.compute_token_rewards(batch.scores, passes.logprobs, passes.ref_logprobs,
                                                         kl_mask, beta, cfg.kl_estimator, score_mask=mask)
        if cfg.advantage_estimator == "rloo":
            returns_seq = batch.scores + non_score.sum(1)
            seq_adv = L.rloo_advantages(returns_seq, cfg.samples_per_prompt, batch.valid.to(returns_seq.device))
            advantages = seq_adv[:, None] * mask
            returns = torch.zeros_like(advantages)  # no value target: the value head is not trained
        else:
            # GAE runs over every charged or optimised token, so KL penalties after the span (EOS)
            # reach the span's advantages; the policy loss then uses the span only.
            gae_mask = ((mask > 0) | (kl_mask > 0)).to(mask.dtype)
            advantages, returns = L.gae(rewards, passes.values, gae_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages and mask.sum() > 1:
            advantages = L.masked_whiten(advantages, mask)
        return Advantages(advantages=advantages, returns=returns, kl=kl, non_score=non_score)

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """Run one PPO step (rollout, score, advantages, update). Returns the step's metrics."""
        cfg, timings = self.config, {}
        t0 = time.perf_counter()
        vision_before = self.vision_calls

        with unsharded(self.accelerator, self.model):  # FSDP2: direct submodule calls below
            batch = self.rollout()
        timings["time/rollout"] = time.perf_counter() - t0

        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        epochs = self._minibatches(generator)
        t1 = time.perf_counter()
        with unsharded(self.accelerator, self.model):
            passes = self.old_policy_pass(batch, epochs[0])
        adv = self.advantages(batch, passes)
        mask = batch.mask.to(passes.logprobs.dtype)
        timings["time/forward"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        self.model.train()
        try:
            train_stats = self._train(batch, epochs, passes, adv, mask)
        finally:
            self.model.eval()  # generation and scoring run in eval mode (KV cache, no checkpointing)
            self.accelerator.sync_gradients = True  # _train sets it per micro-batch
        timings["time/train"] = time.perf_counter() - t2

        # The controller sees the mean KL of the samples that count: skipped samples carry none.
        valid = batch.valid.to(adv.kl.device)
        n_valid = int(self.accelerator.gather(valid.sum().reshape(1)).sum())
        mean_kl = self._global_sum((adv.kl * batch.kl_mask).sum(1)[valid].sum()) / max(n_valid, 1)
        beta = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, max(n_valid, 1))
        self.step_count += 1
        timings["time/step"] = time.perf_counter() - t0
        metrics = self._metrics(batch, passes, adv, train_stats, mean_kl=mean_kl, beta=beta)
        metrics.update(timings)
        metrics["vision_tower_calls"] = self.vision_calls - vision_before
        generated = float(batch.attention_mask[:, batch.query_length:].sum())
        metrics["tokens_per_second"] = generated / max(timings["time/rollout"], 1e-9)
        return metrics

    def _train(self, batch: Rollout, epochs, passes: OldPolicyPass, adv: Advantages,
               mask: torch.Tensor) -> dict[str, list[float]]:
        cfg, acc = self.config, self.accelerator
        advantages, returns = adv.advantages, adv.returns
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "kl_loss", "clipfrac",
                                                          "vf_clipfrac", "approx_kl", "ratio",
                                                          "first_ratio_max_dev", "values_expected_reward",
                                                          "values_entropy", "values_mass")}
        groups = cfg.gradient_accumulation_steps
        kl_mask = batch.kl_mask.to(mask.dtype)
        use_value = cfg.advantage_estimator == "gae"
        for epoch, minibatches in enumerate(epochs):
            early_stop = False
            for start in range(0, len(minibatches), groups):
                group = minibatches[start : start + groups]
                for j, idx in enumerate(group):
                    m = mask[idx]
                    sync = j == len(group) - 1
                    # DDP: no all-reduce before the group's last backward. DeepSpeed: accelerate's
                    # backward steps the engine whenever sync_gradients is true, so it is set per
                    # micro-batch (the engine steps once per group, like the optimizer below).
                    acc.sync_gradients = sync
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                    with ctx:
                        logprobs, values, _ = self._forward(self.model, batch, idx)
                        pg, clipfrac, approx_kl, ratio = L.policy_loss(
                            logprobs, passes.logprobs[idx], advantages[idx], m, cfg.cliprange)
                        if use_value:
                            vf, vf_clipfrac = L.value_loss(values, passes.values[idx], returns[idx], m,
                                                           cfg.cliprange_value)
                        else:
                            vf = vf_clipfrac = (values.sum() * 0.0)  # keep the value head in the graph (DDP)
                        kl_part, klv = 0.0, torch.zeros((), device=logprobs.device)
                        if cfg.kl_penalty == "loss":
                            kl_term, klv = L.kl_loss(logprobs, passes.ref_logprobs[idx], kl_mask[idx], cfg.kl_estimator)
                            kl_part = self.kl_ctl.value * kl_term
                        if m.any():
                            loss = pg + cfg.vf_coef * vf + kl_part
                        else:  # no sampled token optimised here: only the KL (and all-values) terms count
                            pg = vf = clipfrac = vf_clipfrac = approx_kl = ratio = torch.zeros(())
                            # a zero that keeps every parameter in the graph (DDP needs each rank's backward)
                            loss = (logprobs.sum() + values.sum()) * 0.0 + kl_part
                        all_values = self._all_values_term(self.model, batch, idx)
                        if all_values is not None:
                            loss = loss + all_values[0]
                            stats["values_expected_reward"].append(float(all_values[1]))
                            stats["values_entropy"].append(float(all_values[2]))
                            stats["values_mass"].append(float(all_values[3]))
                        # The mean over the group's micro-batches (a last group may be shorter than
                        # gradient_accumulation_steps); DeepSpeed must not divide again.
                        loss = loss / len(group)
                        acc.backward(loss, **({"scale_wrt_gas": False} if self._deepspeed else {}))
                    if epoch == 0 and start == 0 and j == 0 and m.any():
                        dev = ((logprobs - passes.logprobs[idx]).exp() - 1).abs() * m
                        stats["first_ratio_max_dev"].append(float(dev.detach().max()))
                    for name, value in (("policy_loss", pg), ("value_loss", vf), ("kl_loss", klv),
                                        ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac),
                                        ("approx_kl", approx_kl), ("ratio", ratio)):
                        stats[name].append(float(value.detach()))
                    early_stop |= cfg.early_stopping and float(approx_kl) > 1.5 * cfg.target_kl
                if cfg.max_grad_norm is not None and not self._deepspeed:  # DeepSpeed clips in its step
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()  # under DeepSpeed a no-op: the engine stepped in backward
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if cfg.early_stopping and self._any_process(early_stop):  # a collective: only if asked
                    logger.info("early stop: approx KL above 1.5 x target_kl (%.3f)", cfg.target_kl)
                    return stats
        return stats

    def _global_sum(self, x: torch.Tensor) -> float:
        """Sum of a per-process scalar over all processes."""
        return float(self.accelerator.gather(x.detach().float().reshape(1)).sum())

    def _global_mean(self, x: torch.Tensor) -> float:
        return float(self.accelerator.gather(x.detach().float()).mean())

    def _any_process(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.gather(t).max() > 0)

    def _metrics(self, batch: Rollout, passes: OldPolicyPass, adv: Advantages,
                 train_stats: dict[str, list[float]], *, mean_kl: float, beta: float) -> dict:
        """The step's metrics (TRL's names where TRL had one), from what the step computed."""
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        mask = batch.mask.to(passes.logprobs.dtype)
        non_score, returns = adv.non_score, adv.returns
        valid_scores = batch.raw_scores[batch.valid]
        values = passes.values
        metrics = {
            "step": self.step_count,
            "objective/kl": mean_kl,
            "objective/kl_coef": beta,
            "objective/entropy": float(L.masked_mean(passes.entropy, mask)) if mask.any() else float("nan"),
            "objective/non_score_reward": self._global_mean(non_score.sum(1)),
            "objective/kl_loss": mean(train_stats["kl_loss"]),
            "env/score_mean": self._global_mean(valid_scores) if len(valid_scores) else float("nan"),
            "env/score_std": float(valid_scores.std()) if len(valid_scores) > 1 else 0.0,
            "env/skipped_samples": int((~batch.valid).sum()),
            "env/no_eos_fraction": float((~batch.has_eos).float().mean()),
            "env/response_length": float(batch.attention_mask[:, batch.query_length:].sum(1).float().mean()),
            "env/optimised_tokens": float(mask.sum(1).mean()),
            "env/span_fallback_fraction": batch.span_fallbacks / len(batch.rows),
            "env/rewritten_fraction": float(batch.rewritten.float().mean()) if batch.rewritten is not None else 0.0,
            "ppo/loss/policy": mean(train_stats["policy_loss"]),
            "ppo/loss/value": mean(train_stats["value_loss"]),
            "ppo/policy/clipfrac": mean(train_stats["clipfrac"]),
            "ppo/val/clipfrac": mean(train_stats["vf_clipfrac"]),
            "ppo/policy/approxkl": mean(train_stats["approx_kl"]),
            "ppo/policy/ratio_mean": mean(train_stats["ratio"]),
            "ppo/policy/first_ratio_max_dev": mean(train_stats["first_ratio_max_dev"]),
            "ppo/values/expected_reward": mean(train_stats["values_expected_reward"]),
            "ppo/values/entropy": mean(train_stats["values_entropy"]),
            "ppo/values/mass": mean(train_stats["values_mass"]),
            "env/all_values_fraction": (sum(c is not None for c in batch.value_candidates) / len(batch.rows)
                                        if batch.value_candidates is not None else 0.0),
            "ppo/val/error": float(L.masked_mean((values - returns) ** 2, mask)) if mask.any() else float("nan"),
            "ppo/val/explained_variance": float(L.explained_variance(values, returns, mask)) if mask.sum() > 1 else 0.0,
            "ppo/learning_rate": self.scheduler.get_last_lr()[0],
        }
        metrics.update(self._calibration_metrics(batch.reward_output))

        metrics.update(scorer_metrics(self.reward_fn))  # scorer/failures etc. of this step's batch
        return metrics

    def _calibration_metrics(self, output) -> dict[str, float]:
        confidences = getattr(output, "confidences", None)
        accuracies = getattr(output, "accuracies", None)
        if confidences is None or accuracies is None:
            return {}

        scale = self.confidence_scale
        report = compute_calibration(confidences, accuracies, scale=scale).to_dict()
        keys = ("ece", "sigma_cbnd", "d_nckl", "brier", "parse_failure_rate")
        return {f"calibration/{k}": report[k] for k in keys if report.get(k) is not None}

    # -- held-out evaluation and export ---------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: list[PromptRow] | None = None, write: bool = True, folder: str = "eval") -> dict:
        """Greedy answers on ``rows`` (default the ``eval_file`` rows) -> the calibration table.

        Returns the metrics of :func:`~radialog_rl.training.ppo.evaluation.evaluation_table`; with
        ``write``, the main process also writes ``output_dir/<folder>/step-NNNNNN.json`` (metrics
        and every row's text, confidence and correctness). Another ``folder`` keeps a second set
        (e.g. a test split next to the validation ``eval_file``) apart from the training curve.
        """
        cfg = self.config
        rows = self.eval_rows if rows is None else rows
        texts: list[str] = []

        with unsharded(self.accelerator, self.model):  # FSDP2: generation calls submodules directly
            scale = self.confidence_scale
            for start in range(0, len(rows), cfg.eval_batch_size):
                chunk = rows[start : start + cfg.eval_batch_size]
                _, query, features, _, _, chunk_texts = self._sample(
                    chunk, do_sample=False, max_new_tokens=cfg.eval_max_new_tokens)
                if cfg.eval_confidence_decoding == "value":
                    device = self.accelerator.device
                    chunk_texts = choose_confidence_values(
                        self.unwrapped, self.tokenizer, query.input_ids.to(device),
                        query.attention_mask.to(device), features, chunk_texts, scale)
                texts += chunk_texts
        metrics, per_row = evaluation_table([r.fields for r in rows], texts, scale, cfg.eval_group_by)
        metrics["step"] = self.step_count
        if write and self.accelerator.is_main_process:
            out = self.output_dir / folder
            out.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({"metrics": metrics, "rows": per_row}, indent=1)
            (out / f"step-{self.step_count:06d}.json").write_text(payload)
        return metrics

    def export(self, directory: str | Path, eval_metrics: dict | None = None, merged: bool = False) -> Path:
        """Write the policy adapter (PEFT directory ``adapter/``), ``value_head.safetensors`` and
        ``eval.json`` to ``directory`` (main process; written beside it and renamed into place).
        ``merged`` also writes ``merged/``: the saved adapter merged into a freshly loaded 16-bit
        base (the trainer's own model is left as it is)."""
        directory = Path(directory)
        save_policy_files(self, directory, eval_metrics)  # every process: sharded weights are gathered
        if self.accelerator.is_main_process and merged:
            self._export_merged(directory)
        self.accelerator.wait_for_everyone()
        return directory

    def _export_merged(self, directory: Path) -> None:
        """``directory/merged``: the saved adapter merged into a freshly loaded 16-bit base."""
        cfg = self.config
        if cfg.entry_point == "fresh_lora":
            paths = dict(model_path=cfg.llava_model_path, model_base=cfg.llava_model_path)
        else:
            paths = dict(model_path=cfg.model_path, model_base=cfg.model_base)
        dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
        save_lora_merged_llava_model_to_local_dir(directory / "merged", directory / "adapter", dtype=dtype, **paths)

    def _after_eval(self, metrics: dict) -> None:
        cfg = self.config
        if not cfg.best_metric:
            return

        value = metrics.get(cfg.best_metric.removeprefix("eval/"))
        if is_better(cfg.best_metric, value, self.best_value, cfg.best_mode):
            self.best_value = value
            self.export(self.output_dir / "best", metrics)
            logger.info("new best %s = %.4f at step %d", cfg.best_metric, value, self.step_count)

    def _log_eval(self, metrics: dict) -> None:
        flat = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for key, table in metrics.get("groups", {}).items():
            for value, stats in table.items():
                if stats["mean_confidence"] is not None:
                    flat[f"eval/mean_confidence/{key}={value}"] = stats["mean_confidence"]
        flat["step"] = self.step_count
        self._log(flat)
        logger.info("eval at step %d: accuracy %.3f, ECE %s, AUROC %s, parse failures %s", self.step_count,
                    metrics["accuracy"], _fmt(metrics["ece"]), _fmt(metrics["auroc"]),
                    _fmt(metrics["parse_failure_rate"]))

    # -- the loop -------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``steps`` (default ``config.steps``) steps are done; metrics every step to
        ``output_dir/metrics.jsonl`` (and TensorBoard), checkpoints every ``save_every`` steps.

        The output directory is locked meanwhile (:class:`~radialog_rl.training.run_dir.RunLock`);
        ``metrics.jsonl`` rows after the current step (left by a run that resumed here) are dropped.
        """
        with self._holding_output_dir():
            return self._run_steps(steps)

    def _run_steps(self, steps: int | None) -> list[dict]:
        from tqdm.auto import tqdm

        total = steps if steps is not None else self.config.steps
        history = []
        main = self.accelerator.is_main_process
        bar = tqdm(total=total, initial=self.step_count, desc="PPO", dynamic_ncols=True,
                   disable=not main or not logger.isEnabledFor(logging.INFO))  # -q: no bar
        while self.step_count < total:
            metrics = self.step()
            history.append(metrics)
            self._log(metrics)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['env/score_mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            cfg = self.config
            if self.eval_rows and cfg.eval_every and self.step_count % cfg.eval_every == 0 \
                    and self.step_count < total:
                evaluation = self.evaluate()
                self._log_eval(evaluation)
                self._after_eval(evaluation)
            if self.step_count % cfg.save_every == 0 or self.step_count == total:
                self.save_checkpoint()
        bar.close()
        final_eval = None
        if self.eval_rows:
            final_eval = self.evaluate()
            self._log_eval(final_eval)
            self._after_eval(final_eval)
        if self.config.export_final:
            self.export(self.output_dir / "final", final_eval, merged=self.config.export_merged)
        return history

    def _log(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process or self.step_count % self.config.log_every:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, self.step_count)
            writer.flush()

    def _tensorboard(self):
        if self._writer is None and self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                self.config.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        return self._writer
