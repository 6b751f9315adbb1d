"""Batched multimodal generation for RaDialog (LLaVA-1.5 + BioViL-T).

:func:`generate` turns prompts (with ``<image>`` placeholders) and preprocessed images into
:class:`GenerationResult` objects:

1. every image goes through the vision tower and projector **once per call**
   (``model.encode_images``, in chunks of ``batch_size`` images); the features are reused for every
   batch, never recomputed;
2. prompts are tokenized with LLaVA's layout (``tokenizer_image_token``) and LEFT-padded with the
   tokenizer's pad id (= ``</s>`` by RaDialog's convention) so that the newest token of every row is
   at the same position;
3. ``model.generate`` runs with the KV cache (greedy, or sampling with temperature / top-k / top-p),
   stopping at ``</s>`` and at the caller's stop strings (transformers' ``StopStringCriteria``; rows
   that finished early are filled with pad tokens and the batch stops when every row is done);
4. each row is cut at its end: the first ``</s>`` (kept in ``token_ids``) or the first completed
   stop string (its tokens kept, its text removed), and decoded without special tokens.

``use_cache=False`` does not go through ``model.generate`` (transformers silently forces the cache
on for ``inputs_embeds``): it runs a plain loop that recomputes the whole sequence at every step, a
slow reference that the cached path must match token for token.

:func:`generate_reports` builds RaDialog's report prompts (``docs/checkpoint-format.md`` §8) for a batch
of images and calls :func:`generate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
from radialog_rl.data.prompts import build_prompt, report_prompt
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts
from radialog_rl.modeling.llava import unwrap_llava
from radialog_rl.value_greedy import choose_confidence_values

__all__ = [
    "FinishReason",
    "GenerationResult",
    "encode_image_features",
    "generate",
    "generate_reports",
    "report_prompts",
]

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "stop_string", "length"]


@dataclass
class GenerationResult:
    """One generated continuation.

    Attributes:
        token_ids: the new tokens only (no prompt), up to and including the first ``</s>``, or up
            to and including the token that completed the first stop string; pad tokens never
            appear.
        text: ``token_ids`` decoded with special tokens skipped, cut before the stop string, with
            surrounding whitespace stripped (as LLaVA's own inference did).
        num_tokens: ``len(token_ids)``.
        finished_by: ``"eos"`` (``</s>`` generated), ``"stop_string"`` or ``"length"``
            (``max_new_tokens`` reached).
    """

    token_ids: list[int]
    text: str
    num_tokens: int
    finished_by: FinishReason


# --------------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------------


class _DecodedStopStrings(StoppingCriteria):
    """Fallback stop-string criterion: decode each row's last tokens and look for the strings.

    Used only when transformers' :class:`StopStringCriteria` cannot be built for a tokenizer (it
    needs a ``tokenizers`` backend to see how tokens are rendered). ``input_ids`` ``[B, L]`` holds
    the new tokens only.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        # A stop string of n characters spans at most n tokens (every token renders >= 1 character,
        # except byte-fallback pieces of a multi-byte character: up to 4 per character).
        self.window = 4 * max(len(s) for s in self.stop_strings) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop_strings) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RecordStop(StoppingCriteria):
    """Wraps a stop-string criterion and records when each row first matched.

    Why: rows that stop early are padded with the pad id, which is ``</s>`` for LLaVA, so the output
    alone cannot tell "the model wrote ``</s>``" from "a stop string ended the row". ``stopped_at[b]``
    is the number of new tokens row ``b`` had when it first matched (0 = never).
    """

    def __init__(self, inner: StoppingCriteria, batch_size: int) -> None:
        self.inner = inner
        self.stopped_at = [0] * batch_size
        self.last_length = 0  # length of input_ids at the latest call

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.inner(input_ids, scores, **kwargs)
        self.last_length = input_ids.shape[1]
        for b in done.nonzero().flatten().tolist():
            if not self.stopped_at[b]:
                self.stopped_at[b] = input_ids.shape[1]
        return done

    def new_tokens_at_stop(self, num_new: int) -> list[int]:
        """``stopped_at`` counted in new tokens when the output holds ``num_new`` tokens (criteria see
        only new tokens for ``inputs_embeds`` generation; the offset keeps this right regardless)."""
        offset = self.last_length - num_new
        return [n - offset if n else 0 for n in self.stopped_at]


def _stop_string_criterion(tokenizer, stop_strings: Sequence[str]) -> StoppingCriteria:
    """transformers' :class:`StopStringCriteria` where it can be built, else the decoding fallback."""
    try:
        return StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings))
    except Exception as exc:  # noqa: BLE001 - any failure of the library path: use ours
        logger.debug("StopStringCriteria unavailable for %s (%s); decoding tails instead",
                     type(tokenizer).__name__, exc)
        return _DecodedStopStrings(tokenizer, stop_strings)


def _eos_ids(model, tokenizer) -> list[int]:
    """``</s>`` of the tokenizer plus any extra EOS ids in the model's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ConfigError("the tokenizer has no eos_token_id; generation could never stop at </s>")
    return ids


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


def _first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in ``text`` (-1 if none)."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def _shortest_prefix_with_stop(ids: list[int], tokenizer, stop_strings: Sequence[str]) -> int:
    """Fewest tokens whose decoded text contains a stop string (0 when ``ids`` has none).

    Binary search over prefix lengths: a prefix's text is (up to a partial last character) a prefix
    of the longer one's, so "contains a stop string" is monotone in the length.
    """
    def has_stop(n: int) -> bool:
        return _first_stop(tokenizer.decode(ids[:n], skip_special_tokens=True), stop_strings) >= 0

    if not ids or not has_stop(len(ids)):
        return 0
    lo, hi = 1, len(ids)  # invariant: has_stop(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if has_stop(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _finish_row(
    ids: list[int],
    tokenizer,
    eos_ids: Sequence[int],
    stop_strings: Sequence[str],
    criterion_stop: int,
) -> GenerationResult:
    """Cut one row of new tokens ``ids`` at ``</s>`` or a stop string and decode it.

    ``criterion_stop`` is the token count at which the stop-string criterion fired (0 = never).
    """
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), -1)
    usable = ids[: eos_at + 1] if eos_at >= 0 else ids
    stop_at = 0
    if stop_strings:
        # The criterion matches token renderings, we match decoded text: take whichever ends first,
        # so that a row the criterion stopped is never mistaken for one that wrote </s> (its
        # padding is </s> too).
        candidates = [n for n in (criterion_stop, _shortest_prefix_with_stop(usable, tokenizer, stop_strings))
                      if n and (eos_at < 0 or n <= eos_at)]
        stop_at = min(candidates) if candidates else 0
    if stop_at:
        token_ids = ids[:stop_at]
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = _first_stop(text, stop_strings)
        if cut < 0:  # e.g. a leading space the decoder dropped: match without the outer whitespace
            cut = _first_stop(text, [s.strip() for s in stop_strings if s.strip()])
        text = text[:cut] if cut >= 0 else text
        reason: FinishReason = "stop_string"
    elif eos_at >= 0:
        token_ids = ids[: eos_at + 1]
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        reason = "eos"
    else:
        token_ids = list(ids)
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        reason = "length"
    return GenerationResult(token_ids=token_ids, text=text.strip(), num_tokens=len(token_ids),
                            finished_by=reason)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_image_features(
    model,
    images: torch.Tensor,
    prior_images: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Vision tower + projector over ``images`` in chunks: ``[N, num_image_tokens, hidden]``.

    Args:
        model: a ``LlavaLlamaForCausalLM`` or a wrapper of one (see :func:`generate`).
        images: ``[N, 3, H, W]`` preprocessed images in [0, 1] (any dtype/device; cast by the model).
        prior_images: ``[N, 3, H, W]`` previous studies (BioViL-T's temporal input) or None.
        chunk_size: images per tower call (None: all at once). Bounds the tower's activation memory.

    Returns:
        Features on the device of the token embeddings, in the projector's dtype.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"images must be a [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    if prior_images is not None and prior_images.shape != images.shape:
        raise DataError(f"prior_images {tuple(prior_images.shape)} must have the shape of images "
                        f"{tuple(images.shape)}")
    _, llava = _unwrap(model)
    device = llava.get_input_embeddings().weight.device
    n = images.shape[0]
    step = n if not chunk_size else max(1, int(chunk_size))
    chunks = []
    for start in range(0, n, step):
        prior = prior_images[start : start + step] if prior_images is not None else None
        chunks.append(llava.encode_images(images[start : start + step], prior).to(device))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _unwrap(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(policy, llava)``: what to run (a value head's ``pretrained_model``, else the model itself),
    and the ``LlavaLlamaForCausalLM`` inside it (:func:`~radialog_rl.modeling.llava.unwrap_llava`)."""
    return getattr(model, "pretrained_model", model), unwrap_llava(model)


def _check_settings(prompts, max_new_tokens, do_sample, temperature, top_k, top_p, batch_size) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError("prompts must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("every prompt must be a string")
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not float(temperature) > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
    if int(top_k) < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < float(top_p) <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def _sampling_warpers(do_sample: bool, temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The same warpers, in the same order, as ``model.generate`` builds for these settings."""
    warpers = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


@torch.no_grad()
def _generate_without_cache(
    policy, llava, input_ids, attention_mask, features, *, max_new_tokens, do_sample, warpers,
    criteria: StoppingCriteriaList, pad_id: int, min_new_tokens: int = 0, eos_ids: Sequence[int] = (),
) -> torch.LongTensor:
    """Reference decoding loop: the whole sequence is recomputed at every step (no KV cache).

    ``policy`` runs the forward (LoRA applied); ``llava`` embeds the prompt. Returns the new tokens
    ``[B, <= max_new_tokens]``; finished rows are filled with ``pad_id``.
    """
    embeds, mask, _, _ = llava.prepare_multimodal_inputs(input_ids, attention_mask, image_features=features)
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    embed_tokens = llava.get_input_embeddings()
    batch = embeds.shape[0]
    new = torch.empty((batch, 0), dtype=torch.long, device=embeds.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=embeds.device)
    for _ in range(max_new_tokens):
        # position_ids come from the attention mask inside forward (no cache), so left padding is safe.
        logits = policy(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
        scores = logits[:, -1, :].float()  # fp32 like transformers' own loop
        if new.shape[1] < min_new_tokens:  # before the warpers, as transformers orders them
            scores[:, list(eos_ids)] = -float("inf")
        scores = warpers(new, scores)
        if do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        new = torch.cat([new, token[:, None]], dim=1)
        embeds = torch.cat([embeds, embed_tokens(token[:, None]).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        unfinished &= ~criteria(new, scores)
        if not bool(unfinished.any()):
            break
    return new


def generate(
    model,
    tokenizer,
    prompts: list[str],
    images: torch.Tensor | None,
    *,
    prior_images: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: list[str] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    min_new_tokens: int = 0,
    image_features: torch.Tensor | None = None,
    confidence_decoding: Literal["token", "value"] = "token",
    confidence_scale: int = 10,
) -> list[GenerationResult]:
    """Generate one continuation per prompt, batched with left padding.

    Args:
        model: a ``LlavaLlamaForCausalLM``, a ``PeftModel`` of one, or a value-head wrapper
            (16-, 8- or 4-bit, any device; put it in eval mode: dropout is not switched off here).
        tokenizer: its tokenizer (None: ``model.tokenizer``, attached by the loader).
        prompts: full prompts (e.g. ``build_prompt(report_prompt(...))``), each with as many
            ``<image>`` placeholders as images it refers to (usually one).
        images: ``[N, 3, H, W]`` preprocessed images in [0, 1], N = total number of ``<image>``
            placeholders, assigned in order of appearance (prompt 0 first); None for text-only
            prompts or with ``image_features``.
        prior_images: ``[N, 3, H, W]`` previous studies for BioViL-T's temporal pooler, or None.
        max_new_tokens: most new tokens per prompt.
        do_sample: sample instead of greedy decoding.
        temperature / top_k / top_p: sampling settings (``top_k=0`` and ``top_p=1`` are off). They
            always override whatever the model's ``generation_config`` says.
        stop_strings: texts that end a continuation (in addition to ``</s>``).
        batch_size: prompts per ``model.generate`` call (None: all at once); also the chunk size of
            the image encoder.
        seed: seed for sampling (the global RNG state is restored afterwards); None uses the
            current RNG state.
        use_cache: False recomputes the full sequence at every step (slow reference path).
        min_new_tokens: ``</s>`` is forbidden before this many new tokens (benchmarks use
            ``min_new_tokens = max_new_tokens`` for a fixed length). Stop strings still apply.
        image_features: ``[N, num_image_tokens, hidden]`` from :func:`encode_image_features`
            instead of ``images`` (e.g. PPO reusing one encoding for several passes).
        confidence_decoding: "value" (greedy only, one image per prompt): a stated confidence
            ``{"confidence": N}`` is re-chosen as the most likely complete value ``0..confidence_scale``
            (:mod:`radialog_rl.value_greedy`: "10" is two tokens, so token-level greedy favours
            1 and 10); ``token_ids`` are then those of the rewritten text. "token": plain decoding.
        confidence_scale: the confidence scale for ``confidence_decoding="value"``.

    Returns:
        One :class:`GenerationResult` per prompt, in order.

    Raises:
        ConfigError: bad settings. DataError: images do not match the placeholders.
    """
    policy, llava = _unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass one, or load the model with the package's loader")
    _check_settings(prompts, max_new_tokens, do_sample, temperature, top_k, top_p, batch_size)
    if not 0 <= int(min_new_tokens) <= int(max_new_tokens):
        raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
    if image_features is not None and images is not None:
        raise ConfigError("pass images or image_features, not both")
    stop_strings = [s for s in (stop_strings or []) if s]
    per_prompt = [p.count(DEFAULT_IMAGE_TOKEN) for p in prompts]
    given = images if images is not None else image_features
    n_images = 0 if given is None else int(given.shape[0])
    if sum(per_prompt) != n_images:
        raise DataError(f"the prompts contain {sum(per_prompt)} '{DEFAULT_IMAGE_TOKEN}' placeholder(s) "
                        f"but {n_images} image(s) were given; put one '{DEFAULT_IMAGE_TOKEN}' in a prompt "
                        "per image")
    if prior_images is not None and images is None:
        raise DataError("prior_images were given without images")
    if confidence_decoding not in ("token", "value"):
        raise ConfigError(f"confidence_decoding must be 'token' or 'value', got {confidence_decoding!r}")
    by_value = confidence_decoding == "value"
    if by_value and (do_sample or any(n != 1 for n in per_prompt)):
        raise ConfigError("confidence_decoding='value' is for greedy decoding with one image per prompt")

    device = llava.get_input_embeddings().weight.device
    step = len(prompts) if batch_size is None else int(batch_size)
    features = None
    if image_features is not None:
        features = image_features.to(device)
    elif n_images:
        started = time.perf_counter()
        features = encode_image_features(llava, images, prior_images, chunk_size=step)
        logger.debug("encoded %d image(s) in %.3f s", n_images, time.perf_counter() - started)

    eos_ids = _eos_ids(llava, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    warpers = _sampling_warpers(do_sample, float(temperature), int(top_k), float(top_p))
    stop_criterion = _stop_string_criterion(tokenizer, stop_strings) if stop_strings else None
    sampling = (
        dict(do_sample=True, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        if do_sample
        # Greedy: no sampling flags at all; transformers warns about explicitly given ones it
        # ignores (a release's own generation_config values are ignored silently).
        else dict(do_sample=False)
    )

    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        results: list[GenerationResult] = []
        image_start = 0
        for start in range(0, len(prompts), step):
            batch_prompts = list(prompts[start : start + step])
            n_batch_images = sum(per_prompt[start : start + step])
            batch_features = None
            if n_batch_images:
                batch_features = features[image_start : image_start + n_batch_images]
            image_start += n_batch_images
            input_ids, attention_mask = batch_tokenize_image_prompts(batch_prompts, tokenizer,
                                                                     padding_side="left")
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            recorder = _RecordStop(stop_criterion, len(batch_prompts)) if stop_criterion else None
            criteria = StoppingCriteriaList([recorder] if recorder else [])
            started = time.perf_counter()
            if use_cache:
                out = policy.generate(
                    input_ids=input_ids, attention_mask=attention_mask, image_features=batch_features,
                    max_new_tokens=int(max_new_tokens), eos_token_id=eos_ids, pad_token_id=pad_id,
                    stopping_criteria=criteria, use_cache=True, min_new_tokens=int(min_new_tokens) or None,
                    **sampling,
                )
            else:
                criteria.append(EosTokenCriteria(eos_token_id=eos_ids))
                out = _generate_without_cache(
                    policy, llava, input_ids, attention_mask, batch_features,
                    max_new_tokens=int(max_new_tokens),
                    do_sample=do_sample, warpers=warpers, criteria=criteria, pad_id=pad_id,
                    min_new_tokens=int(min_new_tokens), eos_ids=eos_ids,
                )
            rows = out.tolist()
            stops = recorder.new_tokens_at_stop(out.shape[1]) if recorder else [0] * len(rows)
            batch_results = [_finish_row(r, tokenizer, eos_ids, stop_strings, s) for r, s in zip(rows, stops)]
            if by_value:
                batch_results = _rechoose_confidences(policy, tokenizer, input_ids, attention_mask, batch_features,
                                                      batch_results, confidence_scale, eos_ids)
            results.extend(batch_results)
            logger.debug("batch of %d: %d new tokens max in %.3f s", len(rows), out.shape[1],
                         time.perf_counter() - started)
    return results


def _rechoose_confidences(policy, tokenizer, input_ids, attention_mask, features, results, scale, eos_ids):
    """:func:`~radialog_rl.value_greedy.choose_confidence_values` on a batch of results; a changed
    text gets the token ids of its new text (and ``</s>`` when the original ended with one)."""
    texts = choose_confidence_values(policy, tokenizer, input_ids, attention_mask, features,
                                     [r.text for r in results], scale)
    out = []
    for result, text in zip(results, texts):
        if text != result.text:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            ids += [eos_ids[0]] if result.finished_by == "eos" else []
            result = GenerationResult(token_ids=ids, text=text, num_tokens=len(ids), finished_by=result.finished_by)
        out.append(result)
    return out


def report_prompts(findings, num_images: int) -> list[str]:
    """RaDialog report prompts (``build_prompt(report_prompt(...))``) for ``num_images`` images.

    ``findings``: None, a string ("edema, cardiomegaly") or a list of finding names — the same for
    every image — or a list with one entry per image whose entries are lists of names or None.
    """
    per_image = (
        isinstance(findings, Sequence)
        and not isinstance(findings, str)
        and len(findings) > 0
        and all(f is None or (isinstance(f, Sequence) and not isinstance(f, str)) for f in findings)
    )
    if per_image:
        if len(findings) != num_images:
            raise DataError(f"got findings for {len(findings)} image(s) but {num_images} image(s)")
        return [build_prompt(report_prompt(f)) for f in findings]
    return [build_prompt(report_prompt(findings))] * num_images


def generate_reports(
    model,
    tokenizer,
    images: torch.Tensor,
    findings=None,
    **kwargs,
) -> list[GenerationResult]:
    """RaDialog report generation: one findings section per image.

    Args:
        model / tokenizer: as for :func:`generate` (tokenizer None: ``model.tokenizer``).
        images: ``[N, 3, H, W]`` preprocessed chest X-rays (``load_chest_xray``).
        findings: predicted CheXpert findings, see :func:`report_prompts` (None: "no common
            findings").
        **kwargs: passed to :func:`generate` (``max_new_tokens``, ``batch_size``, sampling, ...).

    Returns:
        One :class:`GenerationResult` per image.
    """
    if images.dim() != 4:
        raise DataError(f"images must be a [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    return generate(model, tokenizer, report_prompts(findings, images.shape[0]), images, **kwargs)
