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


def _continuation_ids(tokenizer, prefix_ids: list[int], prefix: str, continuation: str) -> list[int]:
    """Token ids of ``continuation`` as it is spelled after ``prefix`` (``prefix_ids`` = its ids).

    ``prefix + continuation`` is tokenised whole and must start with ``prefix_ids`` (true for
    LLaMA-style tokenizers at a digit boundary); otherwise the continuation is tokenised alone.
    """
    whole = tokenizer(prefix + continuation, add_special_tokens=False).input_ids
    if whole[: len(prefix_ids)] == prefix_ids and len(whole) > len(prefix_ids):
        return whole[len(prefix_ids):]
    return tokenizer(continuation, add_special_tokens=False).input_ids


def split_candidate_ids(tokenizer, split: tuple[str, list[str], str]) -> tuple[int, list[list[int]]]:
    """``(prefix_length, ids)`` for one :func:`confidence_candidates` split: ``ids[v]`` the token
    ids of ``prefix + candidates[v]`` (the response up to and including the statement with value
    ``v``), whose first ``prefix_length`` tokens are the prefix."""
    prefix, candidates, _ = split
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    return len(prefix_ids), [prefix_ids + _continuation_ids(tokenizer, prefix_ids, prefix, c) for c in candidates]


def value_candidate_ids(tokenizer, texts: Sequence[str], scale: int = 10) -> list[tuple[int, list[list[int]]] | None]:
    """Per text, :func:`split_candidate_ids` of its statement, or None for a text without exactly
    one integer statement (:func:`confidence_candidates`)."""
    splits = (confidence_candidates(text, scale) for text in texts)
    return [None if split is None else split_candidate_ids(tokenizer, split) for split in splits]


def candidate_logprobs(
    model,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    image_features: torch.Tensor,
    rows: Sequence[int],
    candidates: Sequence[Sequence[int]],
    lengths: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """``[N]`` summed log-probabilities of the last ``lengths[k]`` tokens of ``candidates[k]`` given
    the query of row ``rows[k]`` and the candidate's earlier tokens (differentiable: PPO's
    ``confidence_objective: all_values`` trains through it).

    ``query_ids`` / ``query_mask`` ``[B, Tq]`` left-padded, image-expanded prompts,
    ``image_features`` ``[B, num_image_tokens, hidden]``; ``rows`` index them.

    Candidates that share a row and a prefix (``candidates[k][:-lengths[k]]``: the response before
    the value, the same for all ``scale + 1`` values of one statement) share one forward of
    ``query + prefix``; its KV cache is repeated per candidate and only the 1-3 value tokens run
    again (:func:`_cached_candidate_logprobs`). Without a usable cache (gradient checkpointing drops
    it; an empty prefix has no last token to predict from) every candidate runs whole
    (:func:`_full_candidate_logprobs`); both give the same numbers.
    """
    if min(len(c) - n for c, n in zip(candidates, lengths)) > 0:
        out = _cached_candidate_logprobs(model, query_ids, query_mask, image_features, rows, candidates, lengths,
                                         pad_token_id)
        if out is not None:
            return out
    return _full_candidate_logprobs(model, query_ids, query_mask, image_features, rows, candidates, lengths,
                                    pad_token_id)


def _full_candidate_logprobs(model, query_ids, query_mask, image_features, rows, candidates, lengths,
                             pad_token_id) -> torch.Tensor:
    """:func:`candidate_logprobs` in ONE teacher-forced forward of every whole candidate."""
    device = query_ids.device
    index = torch.as_tensor(list(rows), device=device)
    # Left-padded, so every candidate ends at the last position and the LM head only has to see the
    # last `longest` ones (the padding between prompt and response is masked, and positions come
    # from the attention mask).
    response, response_mask = pad_rows([list(c) for c in candidates], pad_token_id, side="left")
    response, response_mask = response.to(device), response_mask.to(device)
    longest = max(lengths)
    logits = model(
        input_ids=torch.cat([query_ids[index], response], 1),
        attention_mask=torch.cat([query_mask[index].to(response_mask.dtype), response_mask], 1),
        image_features=image_features[index], logits_to_keep=longest + 1,
    ).logits[:, :-1].float()
    # logits[:, j] predicts the token at response position -longest + j.
    targets = response[:, -longest:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    keep = torch.arange(longest, device=device)[None, :] >= (longest - torch.as_tensor(list(lengths), device=device))[:, None]
    return (logprobs * keep).sum(1)


def _cached_candidate_logprobs(model, query_ids, query_mask, image_features, rows, candidates, lengths,
                               pad_token_id) -> torch.Tensor | None:
    """:func:`candidate_logprobs` with one forward per shared ``query + prefix`` (every prefix at
    least one token long), or None when the model left its KV cache empty.

    Layout: the prefixes are left-padded after the left-padded queries (interior padding, masked),
    so every prefix ends at the last column and its last logits predict each value's first token;
    the cache is indexed per candidate (a gather: the graph flows back to the one prefix pass) and
    the value tokens, right-padded, run on it with positions counted from the real tokens.
    """
    from transformers import DynamicCache  # here, not at import: this module is light

    device = query_ids.device
    groups: dict[tuple[int, tuple[int, ...]], int] = {}
    group_of, continuations = [], []
    for row, ids, n in zip(rows, candidates, lengths):
        ids = list(ids)
        group_of.append(groups.setdefault((int(row), tuple(ids[: len(ids) - n])), len(groups)))
        continuations.append(ids[len(ids) - n:])
    keys = list(groups)
    index = torch.as_tensor([row for row, _ in keys], device=device)
    prefix, prefix_mask = pad_rows([list(p) for _, p in keys], pad_token_id, side="left")
    prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
    past_mask = torch.cat([query_mask[index].to(prefix_mask.dtype), prefix_mask], 1)
    cache = DynamicCache()
    first = model(input_ids=torch.cat([query_ids[index], prefix], 1), attention_mask=past_mask,
                  image_features=image_features[index], logits_to_keep=1, past_key_values=cache,
                  use_cache=True).logits[:, -1].float()
    if cache.get_seq_length() != past_mask.shape[1]:
        return None  # gradient checkpointing (or a model without a cache): run whole candidates
    per_candidate = torch.as_tensor(group_of, device=device)
    cache.batch_select_indices(per_candidate)
    tokens, tokens_mask = pad_rows(continuations, pad_token_id, side="right")
    tokens, tokens_mask = tokens.to(device), tokens_mask.to(device)
    past_mask = past_mask[per_candidate]
    positions = past_mask.sum(1, keepdim=True) + torch.arange(tokens.shape[1], device=device)[None, :]
    rest = model(input_ids=tokens, attention_mask=torch.cat([past_mask, tokens_mask.to(past_mask.dtype)], 1),
                 position_ids=positions, past_key_values=cache, use_cache=True).logits[:, :-1].float()
    # first[g] predicts token 0 of each of group g's values; rest[:, j] predicts token j + 1.
    logits = torch.cat([first[per_candidate][:, None], rest], 1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return (logprobs * tokens_mask).sum(1)


@torch.no_grad()
def confidence_value_logprobs(
    model,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    image_features: torch.Tensor,
    texts: Sequence[str],
    scale: int = 10,
    rows_per_forward: int = 256,
) -> dict[int, list[float]]:
    """``{row: [log p(value 0), ..., log p(value scale)]}`` for every text with one integer
    confidence statement: the summed log-probability of the value's tokens and the statement's
    closing, given the prompt and the text before the value (arguments as
    :func:`choose_confidence_values`)."""
    jobs: list[tuple[int, list[int], int]] = []  # (row, prefix + candidate ids, candidate length)
    for b, split in enumerate(value_candidate_ids(tokenizer, texts, scale)):
        if split is not None:
            prefix_len, candidates = split
            jobs.extend((b, ids, len(ids) - prefix_len) for ids in candidates)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[int, list[float]] = {}
    for start in range(0, len(jobs), rows_per_forward):
        chunk = jobs[start : start + rows_per_forward]
        logprobs = candidate_logprobs(model, query_ids, query_mask, image_features, [b for b, _, _ in chunk],
                                      [ids for _, ids, _ in chunk], [n for _, _, n in chunk], pad)
        for (b, _, _), value in zip(chunk, logprobs.tolist()):
            out.setdefault(b, []).append(value)
    return out


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
        rows_per_forward: candidate rows per teacher-forced forward (memory bound: the LM head
            sees only the last few positions of each).

    Returns:
        The texts; rows without exactly one integer statement are returned unchanged.
    """
    scores = confidence_value_logprobs(model, tokenizer, query_ids, query_mask, image_features, texts, scale,
                                       rows_per_forward)
    out = list(texts)
    for b, values in scores.items():
        prefix, candidates, rest = confidence_candidates(texts[b], scale)
        out[b] = prefix + candidates[max(range(len(values)), key=values.__getitem__)] + rest
    return out
