"""Greedy decoding of a stated confidence by *value*, not by token.

LLaMA's tokenizer (and the tiny release's) spells "10" as two tokens, "1" then "0". Token-level
greedy decoding therefore compares ``p("1")``, which is ``p(1) + p(10) + ...``, with ``p("7")``
alone: after SFT on uniformly random confidences (the Rewarding-Doubt recipe) the first token "1"
carries twice the mass of any other digit, and greedy decoding says 1 or 10 for almost every image
whatever the model believes (measured on the synthetic task: 98 % of greedy confidences were 1 or
10). Sampling is unaffected (ancestral sampling draws values with their true probabilities), and a
value's log-probability is the sum of its tokens' (what PPO uses), so only *greedy* decoding needs
this: for each response with one confidence statement, every value ``0..scale`` is scored by
teacher forcing, ``log p(value tokens + the statement's closing | prompt, text before the value)``,
and the statement is rewritten with the most likely value. The closing (``}`` of
``{"confidence": N}``) is part of the scored continuation, so "1" followed by "}" and "1" "0" "}"
are compared as complete values.

Reference: the issue on calibration learning (item 4, digit tokenisation); the same idea as
scoring multi-token class labels by their full sequence probability in classification by
generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radialog_rl.calibration.parsing import CONFIDENCE_PATTERN
from radialog_rl.padding import pad_rows


def confidence_candidates(text: str, scale: int = 10) -> tuple[str, list[str], str] | None:
    """Split ``text`` at its one integer confidence statement.

    Returns ``(prefix, candidates, rest)``: ``prefix`` is the text before the value, ``candidates``
    the continuations ``str(v) + closing`` for ``v = 0..scale`` (``closing`` = what follows the
    value inside the statement, e.g. ``"}"``), and ``rest`` what follows the statement. None when
    the text holds no statement, several, or a non-integer value (nothing to choose).
    """
    matches = list(CONFIDENCE_PATTERN.finditer(text or ""))
    if len(matches) != 1 or not matches[0].group("value").lstrip("+-").isdigit():
        return None
    m = matches[0]
    closing = text[m.end("value"): m.end()]
    return text[: m.start("value")], [f"{v}{closing}" for v in range(scale + 1)], text[m.end():]


def _continuation_ids(tokenizer, prefix: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``prefix + continuation`` and how many of them belong to the prefix.

    The prefix is tokenised on its own and must be a prefix of the whole (true for LLaMA-style
    tokenizers at a digit boundary); otherwise the continuation is tokenised separately.
    """
    head = tokenizer(prefix, add_special_tokens=False).input_ids
    whole = tokenizer(prefix + continuation, add_special_tokens=False).input_ids
    if whole[: len(head)] == head and len(whole) > len(head):
        return whole, len(head)
    return head + tokenizer(continuation, add_special_tokens=False).input_ids, len(head)


@torch.no_grad()
def choose_confidence_values(
    model,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    image_features: torch.Tensor,
    texts: Sequence[str],
    scale: int = 10,
    rows_per_forward: int = 256,
) -> list[str]:
    """``texts`` with each confidence value replaced by the model's most likely value.

    Args:
        model: the policy (an ``LlavaLlamaForCausalLM``, PEFT or value-head wrapper), eval mode.
        tokenizer: its tokenizer.
        query_ids / query_mask: ``[B, Tq]`` the left-padded, image-expanded prompts the texts were
            generated from (as passed to ``generate``).
        image_features: ``[B, num_image_tokens, hidden]``.
        texts: the ``B`` greedy responses (decoded, special tokens removed).
        scale: confidence scale (10: values 0..10; 100: 0..100).
        rows_per_forward: candidate rows per teacher-forced forward (memory bound).

    Returns:
        The texts; rows without exactly one integer statement are returned unchanged.
    """
    jobs: list[tuple[int, list[int], int]] = []  # (row, candidate ids, prefix length)
    splits: dict[int, tuple[str, list[str], str]] = {}
    for b, text in enumerate(texts):
        split = confidence_candidates(text, scale)
        if split is None:
            continue
        splits[b] = split
        prefix, candidates, _ = split
        jobs += [(b, *_continuation_ids(tokenizer, prefix, c)) for c in candidates]
    if not jobs:
        return list(texts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = query_ids.device
    scores: list[float] = []
    for start in range(0, len(jobs), rows_per_forward):
        chunk = jobs[start : start + rows_per_forward]
        rows = torch.tensor([b for b, _, _ in chunk], device=device)
        response, response_mask = pad_rows([ids for _, ids, _ in chunk], pad)
        response, response_mask = response.to(device), response_mask.to(device)
        width = response.shape[1]
        logits = model(
            input_ids=torch.cat([query_ids[rows], response], 1),
            attention_mask=torch.cat([query_mask[rows].to(response_mask.dtype), response_mask], 1),
            image_features=image_features[rows], logits_to_keep=width + 1,
        ).logits[:, :-1].float()
        # logits[:, t] predicts response[:, t] (the last query position predicts the first token).
        logprobs = torch.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
        for k, (_, ids, n_prefix) in enumerate(chunk):
            scores.append(float(logprobs[k, n_prefix : len(ids)].sum()))
    out = list(texts)
    per_row = scale + 1
    for j in range(0, len(jobs), per_row):
        b = jobs[j][0]
        best = max(range(per_row), key=lambda v: scores[j + v])
        prefix, candidates, rest = splits[b]
        out[b] = prefix + candidates[best] + rest
    return out
