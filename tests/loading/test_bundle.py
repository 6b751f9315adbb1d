"""``load_model(spec) -> LoadedModel``: the one loading entry point, its checks, and the value head's
hook lifetime."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from radialog_rl import ImageSizes, LoadedModel, ModelSpec, load_model, unwrap_llava
from radialog_rl.errors import ConfigError
from radialog_rl.modeling.llava import LlavaLlamaForCausalLM
from radialog_rl.modeling.value_head import LlavaWithValueHead, ReferenceMode


@pytest.fixture(scope="module")
def spec(tiny_release) -> ModelSpec:
    return ModelSpec(model_path=tiny_release.model_path, model_base=tiny_release.model_base,
                     dtype="fp32", device="cpu")


def _inputs(bundle: LoadedModel):
    from radialog_rl import batch_tokenize_image_prompts, build_prompt

    ids, mask = batch_tokenize_image_prompts([build_prompt("<image>. Describe the image.")], bundle.tokenizer)
    torch.manual_seed(0)
    images = torch.rand(1, 3, bundle.image_sizes.crop, bundle.image_sizes.crop)
    return dict(input_ids=ids, attention_mask=mask, images=images)


def test_image_sizes_keep_radialogs_ratio():
    assert ImageSizes.for_crop(448) == ImageSizes(resize=512, crop=448)
    assert ImageSizes.for_crop(128) == ImageSizes(resize=146, crop=128)  # round(128 * 512 / 448) = 146.3


def test_bare_model_bundle_has_everything_a_caller_needs(spec):
    bundle = load_model(spec)
    assert isinstance(bundle.model, LlavaLlamaForCausalLM) and bundle.llava is bundle.model
    assert bundle.adapter is None and not bundle.is_peft
    assert bundle.precision.precision == "16bit" and bundle.precision.compute_dtype == torch.float32
    assert bundle.image_sizes == ImageSizes.for_crop(bundle.llava.config.image_size)
    assert bundle.tokenizer.pad_token_id is not None
    assert bundle.info.vision_tower_source  # the loading report travels with it
    # Nothing is glued onto the module.
    assert "tokenizer" not in vars(bundle.model) and "loading_info" not in vars(bundle.model)


def test_merged_release_adapter_equals_the_applied_adapter(spec):
    applied = load_model(spec.with_(adapter="release"))
    merged = load_model(spec.with_(adapter="release", merge=True))
    assert applied.is_peft and not merged.is_peft
    assert merged.adapter == applied.adapter is not None
    assert isinstance(merged.model, LlavaLlamaForCausalLM)
    batch = _inputs(applied)
    with torch.no_grad():
        a = applied.model(**batch).logits
        b = merged.model(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ppo_bundle_has_value_head_and_typed_reference(spec):
    bundle = load_model(spec.with_(adapter="release", trainable=True, value_head=True,
                                   reference=ReferenceMode.FROZEN_COPY))
    assert isinstance(bundle.model, LlavaWithValueHead)
    assert bundle.model.reference_mode is ReferenceMode.FROZEN_COPY
    assert bundle.model.reference_mode == "frozen_adapter_copy"  # old string comparisons still hold
    assert str(bundle.model.reference_mode) == "frozen_adapter_copy"
    assert bundle.llava is unwrap_llava(bundle.model)
    trainable = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n or n.startswith("v_head.") for n in trainable)


@pytest.mark.parametrize("changes, words", [
    (dict(adapter="release", merge=True, precision="4bit"), "re-quantises"),
    (dict(merge=True), "needs an adapter"),
    (dict(adapter="fresh", merge=True, trainable=True), "inference model"),
    (dict(value_head=True, reference="frozen_adapter_copy"), "needs an adapter"),
    (dict(adapter="release", reference="frozen_adapter_copy"), "value_head=True"),
    (dict(adapter="release", value_head=True, reference="disable_adapter"), "plain LLaVA"),
    (dict(adapter="fresh", value_head=True, reference="frozen"), "unknown reference mode"),
    (dict(value_head_path="x"), "value_head is False"),
])
def test_contradictory_specs_fail_before_loading(spec, changes, words):
    with pytest.raises(ConfigError, match=words):
        load_model(spec.with_(**changes))


def test_missing_adapter_path_fails_before_loading(spec, tmp_path):
    from radialog_rl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="adapter not found"):
        load_model(spec.with_(adapter=tmp_path / "nope"))


def test_unwrap_llava_refuses_other_models():
    with pytest.raises(ConfigError, match="not a LlavaLlamaForCausalLM"):
        unwrap_llava(torch.nn.Linear(2, 2))


def _norm_hooks(llava) -> int:
    return len(llava.model.norm._forward_hooks)


def test_value_head_hook_goes_with_the_wrapper(spec):
    bundle = load_model(spec.with_(adapter="fresh", trainable=True))
    policy, llava = bundle.model, bundle.llava
    before = _norm_hooks(llava)
    wrapped = LlavaWithValueHead(policy)
    assert _norm_hooks(llava) == before + 1
    batch = _inputs(bundle)
    with torch.no_grad():
        values = wrapped(**batch).values
    assert values.shape == batch["input_ids"].shape[:1] + (values.shape[1],)
    del wrapped
    gc.collect()
    assert _norm_hooks(llava) == before  # discarded wrapper: the policy is as it was

    wrapped = LlavaWithValueHead(policy)
    wrapped.remove_hook()
    assert _norm_hooks(llava) == before
    with pytest.raises(RuntimeError, match="hook is gone"), torch.no_grad():
        wrapped(**batch)


def test_deepcopied_value_head_captures_its_own_trunk(spec):
    bundle = load_model(spec.with_(adapter="fresh", trainable=True, value_head=True,
                                   reference="disable_adapter"))
    original = bundle.model
    with torch.no_grad():
        original.v_head.summary.weight.fill_(0.01)
    twin = copy.deepcopy(original)
    with torch.no_grad():
        twin.v_head.summary.weight.fill_(0.02)
    batch = _inputs(bundle)
    with torch.no_grad():
        v_original = original(**batch).values
        v_twin = twin(**batch).values
    # Same trunk weights, head weights doubled: each wrapper read its own trunk's hidden states.
    torch.testing.assert_close(v_twin, 2 * v_original, rtol=1e-5, atol=1e-6)
