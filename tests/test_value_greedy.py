"""Value-level greedy choice of the stated confidence (radialog_rl/value_greedy.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from radialog_rl.value_greedy import choose_confidence_values, confidence_candidates, confidence_value_logprobs


def test_candidates_split_the_one_statement():
    prefix, candidates, rest = confidence_candidates('yes {"confidence": 7} thanks', scale=10)
    assert prefix == 'yes {"confidence": '
    assert candidates == [f"{v}}}" for v in range(11)]
    assert rest == " thanks"
    assert confidence_candidates("Yes. Confidence: 4", 10) == ("Yes. Confidence: ", [str(v) for v in range(11)], "")
    assert len(confidence_candidates('{"confidence": 50}', 100)[1]) == 101
    assert confidence_candidates("no statement", 10) is None
    assert confidence_candidates('{"confidence": 3} {"confidence": 4}', 10) is None  # ambiguous
    assert confidence_candidates('{"confidence": 0.5}', 10) is None  # not an integer value


class _Teacher:
    """A fake policy that puts logit 4 on the next token of one target text and 0 elsewhere, so
    the target's tokens are the most likely continuation at every position. It reads the response
    block after the ``query_width`` prompt columns and skips its padding (attention mask 0).

    Given a KV cache it keeps the attention mask of what it has seen in it (as the keys of one
    layer), so a continuation pass sees exactly the rows the cache was indexed to, and checks that
    its attention mask starts with them."""

    def __init__(self, tokenizer, target_ids: list[int], query_width: int):
        self.target, self.query_width = target_ids, query_width
        self.vocab = len(tokenizer)

    def __call__(self, input_ids, attention_mask, image_features=None, logits_to_keep=0, past_key_values=None,
                 position_ids=None, use_cache=None):
        n, new = input_ids.shape
        total = attention_mask.shape[1]  # the cached columns plus the new ones
        if past_key_values is not None:
            past = past_key_values.get_seq_length()
            if past:
                seen = past_key_values.layers[0].keys[:, 0, :, 0]
                assert torch.equal(seen, attention_mask[:, :past].float()), "the cache holds other rows"
            fresh = attention_mask[:, past:].float()[:, None, :, None]
            past_key_values.update(fresh, fresh, 0)
        keep = logits_to_keep or new
        logits = torch.zeros(n, keep, self.vocab)
        real = attention_mask[:, self.query_width:].cumsum(1)  # response tokens seen up to each column
        for b in range(n):
            for t in range(keep):
                column = total - keep + t - self.query_width  # column of this logit
                k = int(real[b, column]) if column >= 0 else 0  # index of the token it predicts
                if k < len(self.target):
                    logits[b, t, self.target[k]] = 4.0
        return SimpleNamespace(logits=logits)


def test_the_whole_value_wins_over_its_first_token(tiny_tokenizer):
    """The teacher spells 10 ("1" "0" "}"): scoring complete values picks 10, not 1 (token-level
    greedy would stop at whichever of "0" / "}" follows "1" more often in training)."""
    text = 'yes {"confidence": 3}'
    prefix = 'yes {"confidence": '
    target = tiny_tokenizer(prefix + "10}", add_special_tokens=False).input_ids
    query = torch.ones(2, 5, dtype=torch.long)
    model = _Teacher(tiny_tokenizer, target, query_width=5)
    out = choose_confidence_values(model, tiny_tokenizer, query, torch.ones_like(query),
                                   torch.zeros(2, 1, 1), [text, "no statement here"], scale=10)
    assert out == ['yes {"confidence": 10}', "no statement here"]
    # Small forwards give the same choice.
    assert choose_confidence_values(model, tiny_tokenizer, query, torch.ones_like(query), torch.zeros(2, 1, 1),
                                    [text, text], scale=10, rows_per_forward=3) == ['yes {"confidence": 10}'] * 2


def test_batched_choice_equals_scoring_each_value_alone(tiny_model_fp32, tiny_tokenizer):
    """Rows whose prefixes differ in length are padded between prompt and response; the choice must
    equal scoring every complete value on its own, unpadded."""
    from radialog_rl import batch_tokenize_image_prompts, build_prompt
    from radialog_rl.generation import encode_image_features
    from radialog_rl.modeling.llava import expand_image_tokens

    model = tiny_model_fp32
    crop = model.config.image_size
    images = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    features = encode_image_features(model, images)
    prompts = [build_prompt("<image>\nIs there an opacity?")] * 2
    ids, mask = batch_tokenize_image_prompts(prompts, tiny_tokenizer)
    query = expand_image_tokens(ids, model.num_image_tokens, mask, pad_token_id=tiny_tokenizer.pad_token_id)
    texts = ['Yes {"confidence": 3}', 'No, there is none {"confidence": 7}']
    args = (model, tiny_tokenizer, query.input_ids, query.attention_mask, features, texts)
    chosen = choose_confidence_values(*args, scale=10)
    batched = confidence_value_logprobs(*args, scale=10)
    assert sorted(batched) == [0, 1]
    for b, text in enumerate(texts):
        prefix, candidates, rest = confidence_candidates(text, 10)
        head = tiny_tokenizer(prefix, add_special_tokens=False).input_ids
        scores = []
        for candidate in candidates:
            full = tiny_tokenizer(prefix + candidate, add_special_tokens=False).input_ids
            seq = torch.cat([query.input_ids[b : b + 1], torch.tensor([full])], 1)
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                               image_features=features[b : b + 1]).logits[0].float()
            c = len(full) - len(head)  # the candidate's tokens, predicted by the c logits before the last
            logp = torch.log_softmax(logits[-c - 1 : -1], -1).gather(-1, seq[0, -c:, None]).squeeze(-1)
            scores.append(float(logp.sum()))
        torch.testing.assert_close(torch.tensor(batched[b]), torch.tensor(scores), rtol=0, atol=1e-4)
        best = max(range(11), key=scores.__getitem__)
        assert chosen[b] == prefix + candidates[best] + rest, (b, scores)


def test_generate_value_decoding_is_greedy_only_and_keeps_texts_without_a_statement(tiny_model_fp32, tiny_tokenizer):
    import pytest

    from radialog_rl import build_prompt, generate
    from radialog_rl.errors import ConfigError

    crop = tiny_model_fp32.config.image_size
    images = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    prompts = [build_prompt("<image>\nIs there an opacity?")] * 2
    with pytest.raises(ConfigError, match="greedy decoding"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, do_sample=True, confidence_decoding="value")
    with pytest.raises(ConfigError, match="'token' or 'value'"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, confidence_decoding="values")
    plain = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=6)
    by_value = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=6,
                        confidence_decoding="value")
    assert [r.text for r in by_value] == [r.text for r in plain]  # random weights: no statement to re-choose


def test_candidate_ids_and_logprobs_hand_computed(tiny_tokenizer):
    """value_candidate_ids + candidate_logprobs (the differentiable path PPO's all_values objective
    trains through) against hand-computed numbers: the teacher puts logit 4 on the next token of
    'yes {"confidence": 10}' and 0 elsewhere, so a hit costs log(e^4 + V - 1) - 4 and a miss
    log(e^4 + V - 1)."""
    import math

    from radialog_rl.value_greedy import candidate_logprobs, value_candidate_ids

    texts = ['yes {"confidence": 3}', "no statement here"]
    target = tiny_tokenizer('yes {"confidence": 10}', add_special_tokens=False).input_ids
    query = torch.ones(2, 5, dtype=torch.long)
    model = _Teacher(tiny_tokenizer, target, query_width=5)
    splits = value_candidate_ids(tiny_tokenizer, texts, scale=10)
    assert splits[1] is None
    prefix_length, ids = splits[0]
    prefix = tiny_tokenizer('yes {"confidence": ', add_special_tokens=False).input_ids
    assert prefix_length == len(prefix) and len(ids) == 11 and all(c[:prefix_length] == prefix for c in ids)
    assert tiny_tokenizer.decode(ids[10]) == 'yes {"confidence": 10}'
    got = candidate_logprobs(model, query, torch.ones_like(query), torch.zeros(2, 1, 1), [0] * 11, ids,
                             [len(c) - prefix_length for c in ids], pad_token_id=0)
    lse = math.log(math.exp(4) + model.vocab - 1)
    hit, miss = 4 - lse, -lse
    expected = [2 * miss] * 11  # "v" misses the target's "1", and "}" misses its "0"
    expected[1] = hit + miss  # "1" hits, "}" misses "0"
    expected[10] = 3 * hit  # "1" "0" "}"
    torch.testing.assert_close(got, torch.tensor(expected))


def test_the_shared_prefix_pass_equals_whole_candidates_values_and_gradients(tiny_model_fp32, tiny_tokenizer):
    """candidate_logprobs runs each statement's prefix once and reuses its KV cache for the values;
    on the tiny model that gives the numbers and the gradients of scoring every candidate whole,
    with prompts and prefixes of different lengths (interior padding) and two statements."""
    from radialog_rl.value_greedy import _cached_candidate_logprobs, _full_candidate_logprobs, value_candidate_ids

    from radialog_rl import batch_tokenize_image_prompts, build_prompt
    from radialog_rl.generation import encode_image_features
    from radialog_rl.modeling.llava import expand_image_tokens

    import copy

    model = copy.deepcopy(tiny_model_fp32).requires_grad_(True)  # gradients through the cached keys too
    crop = model.config.image_size
    with torch.no_grad():
        features = encode_image_features(model, torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(2)))
    prompts = [build_prompt("<image>\nIs there an opacity?"), build_prompt("<image>\nIs there a large effusion here?")]
    ids, mask = batch_tokenize_image_prompts(prompts, tiny_tokenizer)
    expanded = expand_image_tokens(ids, model.num_image_tokens, mask, pad_token_id=tiny_tokenizer.pad_token_id)
    query, query_mask = expanded.input_ids, expanded.attention_mask
    assert bool((query_mask[:, 0] == 0).any())  # one prompt is left-padded
    texts = ['yes {"confidence": 3}', 'no, it is absent {"confidence": 7} thanks']
    rows, ids, lengths = [], [], []
    for b, (prefix_length, candidates) in enumerate(value_candidate_ids(tiny_tokenizer, texts, scale=10)):
        rows += [b] * len(candidates)
        ids += candidates
        lengths += [len(c) - prefix_length for c in candidates]
    results = []
    for fn in (_cached_candidate_logprobs, _full_candidate_logprobs):
        model.zero_grad(set_to_none=True)
        out = fn(model, query, query_mask, features, rows, ids, lengths, tiny_tokenizer.pad_token_id)
        (out * torch.linspace(-1, 1, len(out))).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (cached, cached_grads), (full, full_grads) = results
    assert cached.shape == (22,)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cached_grads.keys() == full_grads.keys() and "model.layers.0.self_attn.k_proj.weight" in cached_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # Gradient checkpointing drops the cache in training: the cached path says so (None) and the
    # public function runs whole candidates instead.
    from radialog_rl.value_greedy import candidate_logprobs

    model.gradient_checkpointing_enable()
    model.train()
    assert _cached_candidate_logprobs(model, query, query_mask, features, rows, ids, lengths,
                                      tiny_tokenizer.pad_token_id) is None
    torch.testing.assert_close(candidate_logprobs(model, query, query_mask, features, rows, ids, lengths,
                                                  tiny_tokenizer.pad_token_id).detach(), full, atol=1e-5, rtol=1e-5)
