"""Run the confidence methods on labelled image+text samples, batch by batch.

Per batch of samples, :func:`estimate_confidence`:

1. loads and preprocesses the images (``data/images.py``: RaDialog's resize 512 / crop 448 ratio,
   scaled to the model's tower) and encodes them **once** (one vision-tower call per batch, each
   image once); every later pass reuses the features;
2. takes each row's ``response`` when the data gives one, else generates it greedily
   (:func:`radialog_rl.generation.generate`);
3. ``verbalized``: parses the stated confidence; ``seqprob`` / ``probe``: one teacher-forced scoring
   pass over prompt ⊕ response (:func:`.seqprob.score_responses`) gives the response log-probs and
   the probe's hidden layer; ``ptrue``: one pass over the self-evaluation prompt (:mod:`.ptrue`);
4. scores the response against the row's label (:func:`.samples.sample_accuracy`).

The chat template (``build_prompt``) wraps every prompt unless ``chat_template=False``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from radialog_rl.confidence.base import METHODS, ConfidenceResult, bin_confidence, check_methods
from radialog_rl.confidence.probe import ConfidenceProbe, ProbeFeatureConfig, probe_features
from radialog_rl.confidence.ptrue import PTrueConfig, ptrue_prompts, ptrue_scores, resolve_yes_no_ids
from radialog_rl.confidence.samples import LabelledSample, sample_accuracy
from radialog_rl.confidence.seqprob import (
    ScoredResponses,
    SeqProbConfig,
    score_responses,
    sequence_confidence,
)
from radialog_rl.confidence.verbalized import verbalized_confidence
from radialog_rl.data.images import ImageSizes, load_chest_xray
from radialog_rl.data.prompts import SYSTEM_PROMPT, build_prompt
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.generation import _eos_ids, encode_image_features, generate
from radialog_rl.modeling.llava import unwrap_llava

__all__ = ["EstimateConfig", "estimate_confidence", "probe_training_data", "train_probe"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimateConfig:
    """Settings shared by the methods.

    Attributes:
        batch_size: samples per batch (images per tower call, prompts per forward).
        max_new_tokens: most new tokens of a generated response (greedy decoding).
        scale: the verbalized confidence scale, 10 or 100 (the probability is N / scale).
        chat_template: wrap prompts in RaDialog's vicuna conversation (``build_prompt``).
        system_prompt: the template's system text (None: RaDialog's own); use what the model was
            trained with (the SFT/PPO ``system_prompt`` key).
        ptrue / seqprob: the method settings.
        probe_features: layer and position of the probe's features when training one (a loaded
            probe carries its own).
        confidence_decoding: how a generated response's stated confidence is chosen: "token"
            (plain greedy) or "value" (the most likely whole value; :mod:`radialog_rl.value_greedy`).
    """

    batch_size: int = 8
    max_new_tokens: int = 64
    scale: int = 10
    chat_template: bool = True
    system_prompt: str | None = None
    ptrue: PTrueConfig = field(default_factory=PTrueConfig)
    seqprob: SeqProbConfig = field(default_factory=SeqProbConfig)
    probe_features: ProbeFeatureConfig = field(default_factory=ProbeFeatureConfig)
    confidence_decoding: str = "token"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be >= 1")
        if self.confidence_decoding not in ("token", "value"):
            raise ConfigError(f"confidence_decoding must be 'token' or 'value', got {self.confidence_decoding!r}")


@dataclass
class _Batch:
    """Everything the passes produced for one batch of samples (lists in sample order)."""

    texts: list[str]
    accuracies: list[float | None]
    finished_by: list[str]
    num_tokens: list[int]
    values: dict[str, list[float | None]] = field(default_factory=dict)
    scored: ScoredResponses | None = None  # the scoring pass, kept when a probe needs its hidden states


def _encode(model, samples: Sequence[LabelledSample]) -> torch.Tensor:
    sizes = ImageSizes.for_crop(unwrap_llava(model).config.image_size)
    load = lambda p: load_chest_xray(p, resize=sizes.resize, crop=sizes.crop)  # noqa: E731
    images = torch.stack([load(s.image) for s in samples])
    priors = None
    if any(s.prior_image is not None for s in samples):
        if not all(s.prior_image is not None for s in samples):
            raise DataError("either every sample has a prior_image or none does")
        priors = torch.stack([load(s.prior_image) for s in samples])
    return encode_image_features(model, images, priors)


def _responses(model, tokenizer, samples, prompts, features, config: EstimateConfig):
    """``(texts, token_ids, finished_by)``: given responses (+ ``</s>``) or greedy generations."""
    eos = tokenizer.eos_token_id
    texts: list[str] = [""] * len(samples)
    ids: list[list[int]] = [[] for _ in samples]
    finished: list[str] = ["given"] * len(samples)
    todo = [i for i, s in enumerate(samples) if s.response is None]
    for i, s in enumerate(samples):
        if s.response is not None:
            texts[i] = s.response
            ids[i] = tokenizer(s.response, add_special_tokens=False).input_ids + [eos]
    if todo:
        results = generate(model, tokenizer, [prompts[i] for i in todo], None,
                           image_features=features[todo], max_new_tokens=config.max_new_tokens,
                           confidence_decoding=config.confidence_decoding, confidence_scale=config.scale)
        for i, r in zip(todo, results):
            texts[i], ids[i], finished[i] = r.text, list(r.token_ids), r.finished_by
    return texts, ids, finished


def _run_batch(model, tokenizer, samples, methods, config, probe_layer, yes_no) -> _Batch:
    system = SYSTEM_PROMPT if config.system_prompt is None else config.system_prompt
    prompts = [build_prompt(s.prompt, system=system) if config.chat_template else s.prompt for s in samples]
    features = _encode(model, samples)
    texts, ids, finished = _responses(model, tokenizer, samples, prompts, features, config)
    batch = _Batch(texts=texts, accuracies=[sample_accuracy(s, t) for s, t in zip(samples, texts)],
                   finished_by=finished, num_tokens=[len(r) for r in ids])
    if "verbalized" in methods:
        batch.values["verbalized"] = verbalized_confidence(texts, config.scale)
    if "seqprob" in methods or probe_layer is not None:
        scored = score_responses(model, tokenizer, prompts, ids, features, hidden_layer=probe_layer)
        if "seqprob" in methods:
            batch.values["seqprob"] = sequence_confidence(scored, _eos_ids(model, tokenizer), config.seqprob)
        if probe_layer is not None:
            batch.scored = scored
    if "ptrue" in methods:
        questions = [s.prompt for s in samples]
        batch.values["ptrue"] = ptrue_scores(
            model, tokenizer, ptrue_prompts(questions, texts, config.ptrue.template, config.chat_template, system),
            features, *yes_no,
        )
    return batch


def _batches(model, tokenizer, samples, methods, config, feature_config: ProbeFeatureConfig | None, desc: str):
    """Yield ``(start, batch, features)`` over ``samples``; features ``[b, H]`` when a probe needs them."""
    from tqdm.auto import tqdm

    if not samples:
        raise DataError("no samples to estimate confidence on")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass one, or load the model with the package's loader")
    yes_no = resolve_yes_no_ids(tokenizer, config.ptrue) if "ptrue" in methods else None
    layer = feature_config.layer if feature_config is not None else None
    starts = range(0, len(samples), config.batch_size)
    quiet = len(starts) < 2 or not logger.isEnabledFor(logging.INFO)  # -q: no bar
    for start in tqdm(starts, desc=desc, unit="batch", disable=quiet, file=sys.stderr):
        chunk = samples[start : start + config.batch_size]
        batch = _run_batch(model, tokenizer, chunk, methods, config, layer, yes_no)
        feats = probe_features(batch.scored, feature_config) if feature_config is not None else None
        batch.scored = None  # free the hidden states before the next batch
        yield start, batch, feats


@torch.no_grad()
def estimate_confidence(
    model,
    tokenizer,
    samples: Sequence[LabelledSample],
    methods: str | Sequence[str] = METHODS,
    *,
    probe: ConfidenceProbe | None = None,
    config: EstimateConfig = EstimateConfig(),
) -> dict[str, list[ConfidenceResult]]:
    """Confidence of every sample by every requested method.

    Args:
        model: a loaded RaDialog model (``load_baseline_llava_model_with_vision_modules``, optionally
            with LoRA), in eval mode. tokenizer: its tokenizer (None: ``model.tokenizer``).
        samples: labelled samples (:func:`~radialog_rl.confidence.samples.load_labelled_jsonl`).
        methods: names from :data:`~radialog_rl.confidence.base.METHODS`, or ``"all"``.
        probe: a trained probe, required for ``"probe"`` (:func:`train_probe` or
            :meth:`ConfidenceProbe.load`).

    Returns:
        ``{method: [ConfidenceResult per sample]}`` in table order; every method scores the same
        response of a sample.
    """
    methods = check_methods(methods)
    if "probe" in methods and probe is None:
        raise ConfigError("the probe method needs a trained probe (train one on a labelled split "
                          "with train_probe, or load one)")
    feature_config = probe.features if "probe" in methods else None
    out: dict[str, list[ConfidenceResult]] = {m: [] for m in methods}
    for start, batch, feats in _batches(model, tokenizer, list(samples), methods, config, feature_config,
                                        "confidence"):
        if feats is not None:
            batch.values["probe"] = probe.predict(feats).tolist()
        for j in range(len(batch.texts)):
            sample = samples[start + j]
            for method in methods:
                p = batch.values[method][j]
                extra = {"finished_by": batch.finished_by[j], "num_tokens": batch.num_tokens[j]}
                out[method].append(ConfidenceResult(
                    id=sample.id, method=method, probability=p, confidence=bin_confidence(p),
                    accuracy=batch.accuracies[j], response=batch.texts[j], extra=extra,
                ))
    return out


@torch.no_grad()
def probe_training_data(
    model, tokenizer, samples: Sequence[LabelledSample], *,
    feature_config: ProbeFeatureConfig = ProbeFeatureConfig(), config: EstimateConfig = EstimateConfig(),
) -> tuple[torch.Tensor, list[float], list[int]]:
    """``(features [M, H], accuracies [M], indices [M])`` of the samples whose accuracy is known."""
    feats, accs, kept = [], [], []
    for start, batch, f in _batches(model, tokenizer, list(samples), (), config, feature_config, "probe features"):
        for j, acc in enumerate(batch.accuracies):
            if acc is not None:
                feats.append(f[j])
                accs.append(acc)
                kept.append(start + j)
    if not feats:
        raise DataError("no sample has a known accuracy (no clear yes/no answer); cannot train a probe")
    return torch.stack(feats), accs, kept


def train_probe(
    model, tokenizer, samples: Sequence[LabelledSample], *,
    feature_config: ProbeFeatureConfig = ProbeFeatureConfig(), config: EstimateConfig = EstimateConfig(),
    heldout_fraction: float = 0.2, seed: int = 0, **train_kwargs,
) -> ConfidenceProbe:
    """Features of ``samples`` from ``model``, then :meth:`ConfidenceProbe.train` on them."""
    feats, accs, kept = probe_training_data(model, tokenizer, samples, feature_config=feature_config,
                                            config=config)
    if len(kept) < len(samples):
        logger.info("probe: %d of %d samples have no accuracy and are left out", len(samples) - len(kept),
                    len(samples))
    probe = ConfidenceProbe.train(feats, accs, feature_config=feature_config,
                                  heldout_fraction=heldout_fraction, seed=seed, **train_kwargs)
    logger.info("probe trained (C=%g): train %s, held-out %s", probe.C, probe.metrics["train"],
                probe.metrics["heldout"])
    return probe
