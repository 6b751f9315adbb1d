"""Sequence probability: how likely the model finds its own response.

A teacher-forced scoring pass (:func:`score_responses`) runs the model once over prompt ⊕ response
with the image features written in, and reads ``log p(r_t | prompt, r_<t)`` for every response
token (logit t predicts token t+1, ``docs/ppo-and-calibration.md`` §A.1). The prompt and the image
positions are never scored: the response mask covers exactly the response tokens. The same pass
can return a hidden layer for the probe (:mod:`.probe`), so both cost one forward.

:func:`sequence_confidence` turns the log-probs into a confidence:

* ``reduction="mean"`` (default): ``exp(mean_t log p_t)``, the geometric-mean token probability
  (length-normalised; the baseline of the published table);
* ``reduction="product"``: ``exp(sum_t log p_t)``, the probability of the whole sequence.

EOS handling: a generated response ends with ``</s>`` when the model stopped by itself, and a given
response text (a data row's ``response``) is scored with ``</s>`` appended, since a finished answer
ends there. ``include_eos=True`` (default) scores that ``</s>`` as one more token (the model's
decision to stop is part of the sequence); ``include_eos=False`` drops it from the mask. A response
cut by ``max_new_tokens`` has no ``</s>`` and is scored as it is. A response with no token left to
score gets None. The whole response is scored, its ``{"confidence": N}`` statement included when
the prompt asked for one.

Memory: the pass asks the model for its hidden states only when a probe needs them; transformers
then keeps every layer's ``[B, T, hidden]`` until the pass returns (about 1 GB in bf16 for 8
samples of ~450 positions on the 7B model), and only the requested layer is kept afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from radialog_rl.errors import ConfigError
from radialog_rl.generation import _unwrap
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts
from radialog_rl.modeling.llava import expand_image_tokens
from radialog_rl.padding import pad_rows
from radialog_rl.training.ppo.losses import gather_logprobs

__all__ = ["ScoredResponses", "SeqProbConfig", "score_responses", "sequence_confidence"]

Reduction = Literal["mean", "product"]


@dataclass(frozen=True)
class SeqProbConfig:
    """``reduction``: "mean" (geometric-mean token probability) or "product" (sequence
    probability); ``include_eos``: score the final ``</s>`` (see the module docstring)."""

    reduction: Reduction = "mean"
    include_eos: bool = True

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "product"):
            raise ConfigError(f"seqprob reduction must be 'mean' or 'product', got {self.reduction!r}")


@dataclass
class ScoredResponses:
    """Result of one teacher-forced pass over a batch.

    Attributes:
        response_ids: ``[B, Tr]`` response tokens, right-padded with the pad id.
        mask: ``[B, Tr]`` long, 1 on the real response tokens.
        logprobs: ``[B, Tr]`` float32 ``log p(response_ids[b, t] | everything before)``, 0 on padding.
        query_length: width ``Tq`` of the left-padded, image-expanded prompt block; response token
            t sits at sequence position ``Tq + t``.
        hidden_states: ``[B, Tq + Tr, hidden]`` float32 of the requested layer, or None.
    """

    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    query_length: int
    hidden_states: torch.Tensor | None = None


@torch.no_grad()
def score_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]],
    image_features: torch.Tensor,
    *,
    hidden_layer: int | None = None,
) -> ScoredResponses:
    """One forward over ``prompt_b ⊕ responses[b]`` for every row (left-padded prompts).

    Args:
        model: a ``LlavaLlamaForCausalLM`` or a PEFT / value-head wrapper of one (eval mode).
        tokenizer: its tokenizer.
        prompts: full prompts (chat template applied), one ``<image>`` each.
        responses: the response token ids of each row (no prompt), at least one token each.
        image_features: ``[B, num_image_tokens, hidden]`` from
            :func:`radialog_rl.generation.encode_image_features` (no vision-tower call here).
        hidden_layer: index into the model's ``hidden_states`` (0 = embeddings, k = output of
            decoder layer k, -1 = the final-norm output the LM head reads), or None for none.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(r) == 0 for r in responses):
        raise ConfigError("every response needs at least one token to score")
    policy, llava = _unwrap(model)
    device = llava.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = batch_tokenize_image_prompts(list(prompts), tokenizer, padding_side="left")
    query = expand_image_tokens(ids, llava.num_image_tokens, mask, pad_token_id=pad_id)
    response_ids, response_mask = pad_rows([list(r) for r in responses], pad_id)
    width = response_ids.shape[1]
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    out = policy(
        input_ids=torch.cat([query.input_ids.to(device), response_ids], 1),
        attention_mask=torch.cat([query.attention_mask.to(device), response_mask], 1),
        image_features=image_features.to(device), logits_to_keep=width + 1,
        output_hidden_states=hidden_layer is not None,
    )
    # logits_to_keep = Tr + 1 keeps positions Tq-1 .. Tq+Tr-1; logit t predicts token t+1, so the
    # first Tr of them predict exactly the response tokens.
    logprobs = gather_logprobs(out.logits[:, :-1], response_ids) * response_mask
    hidden = None
    if hidden_layer is not None:
        states = out.hidden_states
        if not -len(states) <= hidden_layer < len(states):
            raise ConfigError(f"hidden layer {hidden_layer} out of range: the model has "
                              f"{len(states)} hidden states (0 .. {len(states) - 1}, or negative)")
        hidden = states[hidden_layer].float()
    return ScoredResponses(response_ids=response_ids, mask=response_mask, logprobs=logprobs.float(),
                           query_length=int(query.input_ids.shape[1]), hidden_states=hidden)


def sequence_confidence(
    scored: ScoredResponses,
    eos_ids: Sequence[int] = (),
    config: SeqProbConfig = SeqProbConfig(),
) -> list[float | None]:
    """Confidence of each row from its response log-probs (see the module docstring).

    ``eos_ids``: the ids counted as ``</s>`` when ``config.include_eos`` is False (only a final one
    is dropped). Returns one float in [0, 1] per row, or None when no token is left to score.
    """
    mask = scored.mask.bool()
    if not config.include_eos and eos_ids:
        lengths = scored.mask.sum(1)
        last = scored.response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        ends_eos = torch.isin(last, torch.tensor(list(eos_ids), device=last.device)) & (lengths > 0)
        drop = torch.zeros_like(mask)
        drop[ends_eos, (lengths - 1)[ends_eos]] = True
        mask = mask & ~drop
    total = (scored.logprobs * mask).sum(1)
    count = mask.sum(1)
    out: list[float | None] = []
    for s, n in zip(total.tolist(), count.tolist()):
        if n == 0:
            out.append(None)
            continue
        log_conf = s / n if config.reduction == "mean" else s
        out.append(float(torch.tensor(log_conf, dtype=torch.float64).exp()))
    return out
