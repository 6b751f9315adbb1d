"""Tests of batched multimodal generation (radialog_rl.generation) on the tiny release.

The tiny weights are random, so the texts are gibberish; what is tested is the mechanics: left
padding, the KV cache, stop strings, EOS handling, seeded sampling, and that every image goes
through the vision tower exactly once per call.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from radialog_rl.data.images import make_synthetic_chest_xray, preprocess_chest_xray
from radialog_rl.data.prompts import build_prompt, report_prompt
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.generation import (
    GenerationResult,
    _finish_row,
    encode_image_features,
    generate,
    generate_reports,
    report_prompts,
)
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts

MAX_NEW = 16


@pytest.fixture(scope="module")
def images(tiny_model_fp32) -> torch.Tensor:
    """Four synthetic chest X-rays preprocessed for the tiny tower: ``[4, 3, 128, 128]``."""
    crop = tiny_model_fp32.config.image_size
    resize = round(crop * 512 / 448)
    return torch.stack([
        preprocess_chest_xray(make_synthetic_chest_xray(seed, size=160), resize=resize, crop=crop)
        for seed in range(4)
    ])


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Prompts of different lengths, so a batch of them needs left padding."""
    out = report_prompts([["edema"], None, ["cardiomegaly", "pleural effusion", "fracture"], []], 4)
    out[1] = build_prompt("Is there edema in <image>?")
    return out


@pytest.fixture(scope="module")
def greedy(tiny_model_fp32, tiny_tokenizer, prompts, images) -> list[GenerationResult]:
    return generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW)


class CallCounter:
    """Forward hook counting calls and the rows (batch dim of the first input) a module saw."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        self.rows += args[0].shape[0] if args else 0

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_prompts_really_need_padding(tiny_tokenizer, prompts):
    _, mask = batch_tokenize_image_prompts(prompts, tiny_tokenizer)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 2
    assert bool((mask[:, 0] == 0).any())  # some rows start with (left) padding


def test_result_fields(greedy, tiny_tokenizer):
    assert len(greedy) == 4
    for r in greedy:
        assert r.num_tokens == len(r.token_ids) > 0
        assert r.finished_by in ("eos", "stop_string", "length")
        assert r.text == tiny_tokenizer.decode(r.token_ids, skip_special_tokens=True).strip()
        if r.finished_by == "length":
            assert r.num_tokens == MAX_NEW


def test_left_padded_batch_equals_one_at_a_time(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    single = [
        generate(tiny_model_fp32, tiny_tokenizer, [p], images[i : i + 1], max_new_tokens=MAX_NEW)[0]
        for i, p in enumerate(prompts)
    ]
    assert [r.token_ids for r in greedy] == [r.token_ids for r in single]
    # Smaller batches (the last one ragged) give the same tokens too.
    by_three = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW, batch_size=3)
    assert [r.token_ids for r in by_three] == [r.token_ids for r in greedy]


def test_kv_cache_and_full_recompute_agree(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    # use_cache=False recomputes the whole sequence each step (its own loop: transformers would
    # silently turn the cache back on for inputs_embeds); the LLM runs once per new token.
    with CallCounter(tiny_model_fp32.model.layers[0]) as layer:
        no_cache = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW,
                            use_cache=False)
    assert [r.token_ids for r in no_cache] == [r.token_ids for r in greedy]
    assert layer.calls == max(r.num_tokens for r in greedy)


def test_image_features_computed_once_per_call(tiny_model_fp32, tiny_tokenizer, prompts, images):
    tower = tiny_model_fp32.model.vision_tower
    with CallCounter(tower) as counter:
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=4)
    assert (counter.calls, counter.rows) == (1, 4)
    # Batched generation encodes in chunks of batch_size, still each image exactly once.
    with CallCounter(tower) as counter:
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=4, batch_size=2)
    assert (counter.calls, counter.rows) == (2, 4)
    with CallCounter(tower) as counter:
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=4, use_cache=False)
    assert (counter.calls, counter.rows) == (1, 4)


def test_features_match_model_encoder(tiny_model_fp32, images):
    chunked = encode_image_features(tiny_model_fp32, images, chunk_size=3)
    whole = tiny_model_fp32.encode_images(images)
    assert chunked.shape == (4, tiny_model_fp32.config.num_image_tokens, tiny_model_fp32.config.hidden_size)
    torch.testing.assert_close(chunked, whole)


def _ascii_stop(result: GenerationResult, tokenizer) -> tuple[str, int]:
    """A one-letter stop string that first completes at a token index >= 2 of ``result``."""
    for k in range(2, result.num_tokens):
        before = tokenizer.decode(result.token_ids[:k], skip_special_tokens=True)
        piece = tokenizer.decode(result.token_ids[: k + 1], skip_special_tokens=True)[len(before):]
        letters = re.findall(r"[A-Za-z]", piece)
        if letters and letters[0] not in before:
            return letters[0], k + 1
    pytest.skip("the tiny model's greedy text has no usable ASCII letter")


def test_stop_strings_cut_text_and_tokens(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    stop, n_tokens = _ascii_stop(greedy[0], tiny_tokenizer)
    with CallCounter(tiny_model_fp32.model.layers[0]) as layer:
        stopped = generate(tiny_model_fp32, tiny_tokenizer, prompts[:1], images[:1],
                           max_new_tokens=MAX_NEW, stop_strings=[stop])
    r = stopped[0]
    assert r.finished_by == "stop_string"
    assert r.token_ids == greedy[0].token_ids[:n_tokens]  # tokens up to the one completing it
    assert stop not in r.text
    full_text = tiny_tokenizer.decode(greedy[0].token_ids, skip_special_tokens=True)
    assert r.text == full_text[: full_text.index(stop)].strip()
    assert layer.calls == n_tokens  # generation stopped early instead of running to MAX_NEW


def test_batch_with_stop_strings_matches_singles(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    stop, _ = _ascii_stop(greedy[0], tiny_tokenizer)
    batched = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW,
                       stop_strings=[stop, "zzz-never"])
    single = [
        generate(tiny_model_fp32, tiny_tokenizer, [p], images[i : i + 1], max_new_tokens=MAX_NEW,
                 stop_strings=[stop, "zzz-never"])[0]
        for i, p in enumerate(prompts)
    ]
    assert batched == single
    for r, full in zip(batched, greedy):
        assert full.token_ids[: r.num_tokens] == r.token_ids
        if r.finished_by == "stop_string":
            assert stop not in r.text


def test_fallback_stop_criterion_gives_the_same_result(monkeypatch, tiny_model_fp32, tiny_tokenizer,
                                                       prompts, images, greedy):
    import radialog_rl.generation as generation

    stop, _ = _ascii_stop(greedy[0], tiny_tokenizer)
    library = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW,
                       stop_strings=[stop])

    def unavailable(**kwargs):
        raise ValueError("no tokenizers backend")

    monkeypatch.setattr(generation, "StopStringCriteria", unavailable)
    fallback = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW,
                        stop_strings=[stop])
    assert fallback == library


def test_eos_ends_a_row_and_is_kept(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    # Declare greedy[0]'s third token to be the tokenizer's EOS: row 0 must end right there, EOS
    # included, while the model and the other rows are untouched.
    first_three = greedy[0].token_ids[:3]
    assert first_three[2] not in first_three[:2]
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first_three[2])
    eos = tokenizer.eos_token_id
    results = generate(tiny_model_fp32, tokenizer, prompts, images, max_new_tokens=MAX_NEW)
    first = results[0]
    assert first.finished_by == "eos"
    assert first.token_ids == first_three
    assert first.text == tokenizer.decode(first_three, skip_special_tokens=True).strip()
    for r, full in zip(results, greedy):
        assert full.token_ids[: r.num_tokens] == r.token_ids  # same tokens up to its end
        assert eos not in r.token_ids[:-1]
        if r.finished_by == "eos":
            assert r.token_ids[-1] == eos
        # Finished rows are padded by generate (pad = </s> here); nothing after the end leaks in.
        assert r.finished_by != "length" or r.num_tokens == MAX_NEW


def test_min_new_tokens_forbids_early_eos(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(greedy[0].token_ids[2])
    cached = generate(tiny_model_fp32, tokenizer, prompts, images, max_new_tokens=6, min_new_tokens=6)
    assert all(r.num_tokens == 6 and r.finished_by == "length" for r in cached)
    no_cache = generate(tiny_model_fp32, tokenizer, prompts, images, max_new_tokens=6, min_new_tokens=6,
                        use_cache=False)
    assert no_cache == cached


def test_precomputed_image_features(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    features = encode_image_features(tiny_model_fp32, images)
    with CallCounter(tiny_model_fp32.model.vision_tower) as counter:
        out = generate(tiny_model_fp32, tiny_tokenizer, prompts, None, image_features=features,
                       max_new_tokens=MAX_NEW, batch_size=3)
    assert counter.calls == 0
    assert out == greedy
    with pytest.raises(ConfigError, match="not both"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, image_features=features)


def test_sampling_is_reproducible_with_a_seed(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.3, top_k=50, top_p=0.95)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, seed=7, **kwargs)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, seed=7, **kwargs)
    c = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, seed=8, **kwargs)
    assert a == b
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_top_k_one_is_greedy(tiny_model_fp32, tiny_tokenizer, prompts, images, greedy):
    sampled = generate(tiny_model_fp32, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW,
                       do_sample=True, top_k=1, seed=0)
    assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


def test_release_generation_config_does_not_leak_into_sampling(tiny_model_fp32, tiny_tokenizer, prompts,
                                                                images):
    # A release's generation_config.json may say temperature 0.2 / top_k 1; our explicit settings win.
    model = copy.deepcopy(tiny_model_fp32)
    kwargs = dict(max_new_tokens=8, do_sample=True, seed=3)
    plain = generate(model, tiny_tokenizer, prompts, images, **kwargs)
    model.generation_config.temperature = 0.2
    model.generation_config.top_k = 1
    assert generate(model, tiny_tokenizer, prompts, images, **kwargs) == plain


def test_works_through_peft_lora(tiny_model_fp32, tiny_tokenizer, tiny_release, prompts, images, greedy):
    from radialog_rl.loading.adapters import attach_lora

    peft_model = attach_lora(copy.deepcopy(tiny_model_fp32), tiny_release.model_path, trainable=False)
    with_lora = generate(peft_model, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW)
    no_cache = generate(peft_model, tiny_tokenizer, prompts, images, max_new_tokens=MAX_NEW, use_cache=False)
    assert [r.token_ids for r in with_lora] == [r.token_ids for r in no_cache]
    assert [r.token_ids for r in with_lora] != [r.token_ids for r in greedy]  # the adapter is applied


def test_generate_reports_builds_radialog_prompts(tiny_model_fp32, tiny_tokenizer, images):
    prompts = report_prompts([["Edema"], None], 2)
    assert "Predicted Findings: edema." in prompts[0]
    assert "Predicted Findings: no common findings." in prompts[1]
    assert report_prompts("edema, cardiomegaly", 2)[1].count("edema, cardiomegaly") == 1
    shared = [build_prompt(report_prompt(["Edema", "Cardiomegaly"]))] * 3
    assert report_prompts(["Edema", "Cardiomegaly"], 3) == shared
    expected = generate(tiny_model_fp32, tiny_tokenizer, prompts, images[:2], max_new_tokens=4)
    assert generate_reports(tiny_model_fp32, None, images[:2], [["Edema"], None], max_new_tokens=4) == expected
    with pytest.raises(DataError, match="findings for 3"):
        report_prompts([["edema"], None, None], 2)


def test_text_only_prompts(tiny_model_fp32, tiny_tokenizer):
    prompts = [build_prompt("hi"), build_prompt("Is there edema in the lungs?")]
    batched = generate(tiny_model_fp32, tiny_tokenizer, prompts, None, max_new_tokens=6)
    single = [generate(tiny_model_fp32, tiny_tokenizer, [p], None, max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(r.num_tokens > 0 for r in batched)


def test_quantized_4bit_generates(tiny_release, prompts, images):
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    model = load_baseline_llava_model_with_vision_modules(
        tiny_release.model_path, tiny_release.model_base, precision="4bit", device="cpu", dtype="fp32"
    )
    results = generate(model, None, prompts, images, max_new_tokens=6)
    assert len(results) == 4 and all(r.num_tokens > 0 for r in results)
    single = generate(model, None, prompts[:1], images[:1], max_new_tokens=6)
    assert single[0].token_ids == results[0].token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_equals_singles_and_seeded_sampling(tiny_release, prompts, images):
    from radialog_rl.loading.release import load_baseline_llava_model_with_vision_modules

    model = load_baseline_llava_model_with_vision_modules(
        tiny_release.model_path, tiny_release.model_base, device="cuda", dtype="fp32"
    )
    batched = generate(model, None, prompts, images, max_new_tokens=MAX_NEW)
    single = [generate(model, None, [p], images[i : i + 1], max_new_tokens=MAX_NEW)[0]
              for i, p in enumerate(prompts)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    sampled = generate(model, None, prompts, images, max_new_tokens=MAX_NEW, do_sample=True, seed=1)
    assert sampled == generate(model, None, prompts, images, max_new_tokens=MAX_NEW, do_sample=True, seed=1)


# -- post-processing, errors ----------------------------------------------------------------------


def test_finish_row_rules(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("The heart size is normal. The lungs are clear.", add_special_tokens=False).input_ids
    r = _finish_row(ids + [eos, eos, eos], tiny_tokenizer, [eos], [], 0)
    assert (r.finished_by, r.token_ids, r.text) == ("eos", ids + [eos], "The heart size is normal. The lungs are clear.")
    r = _finish_row(ids, tiny_tokenizer, [eos], [], 0)
    assert (r.finished_by, r.num_tokens) == ("length", len(ids))
    r = _finish_row(ids + [eos], tiny_tokenizer, [eos], ["lungs"], 0)
    assert r.finished_by == "stop_string" and r.text == "The heart size is normal. The"
    assert "lungs" in tiny_tokenizer.decode(r.token_ids) and "lungs" not in tiny_tokenizer.decode(r.token_ids[:-1])
    # A stop string after </s> does not count: the row ended at </s>.
    r = _finish_row(ids[:3] + [eos] + ids, tiny_tokenizer, [eos], ["lungs"], 0)
    assert (r.finished_by, r.token_ids) == ("eos", ids[:3] + [eos])
    # The criterion's own count wins when the decoded text cannot show the match (padding after it
    # is </s>, which must not be mistaken for a generated </s>).
    r = _finish_row(ids[:4] + [eos, eos], tiny_tokenizer, [eos], ["zzz"], 4)
    assert (r.finished_by, r.token_ids) == ("stop_string", ids[:4])


def test_bad_arguments(tiny_model_fp32, tiny_tokenizer, prompts, images):
    with pytest.raises(DataError, match="placeholder"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images[:3])
    with pytest.raises(DataError, match="placeholder"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, None)
    with pytest.raises(DataError, match="shape"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts, images, prior_images=images[:2])
    with pytest.raises(ConfigError, match="list of strings"):
        generate(tiny_model_fp32, tiny_tokenizer, prompts[0], images[:1])
    for bad in (dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_k=-1),
                dict(top_p=0.0), dict(batch_size=0), dict(max_new_tokens=4, min_new_tokens=5)):
        with pytest.raises(ConfigError):
            generate(tiny_model_fp32, tiny_tokenizer, prompts, images, **bad)
    with pytest.raises(ConfigError, match="LlavaLlamaForCausalLM"):
        generate(torch.nn.Linear(2, 2), tiny_tokenizer, prompts, images)
