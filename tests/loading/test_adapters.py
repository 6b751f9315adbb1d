"""LoRA mapping, value heads, reference policies, entry points, and merge/export on the tiny release."""

from __future__ import annotations

import json

import pytest
import torch

from radialog_rl import (
    add_value_head_to_LlavaLlamaForCausalLM_model,
    batch_tokenize_image_prompts,
    build_prompt,
    load_baseline_llava_model_with_vision_modules,
    load_pretrained_llava_model_for_ppo_training,
    load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters,
    load_pretrained_llava_model_for_sft_training,
    save_lora_merged_llava_model_to_local_dir,
)
from radialog_rl.errors import CheckpointError, ConfigError
from radialog_rl.loading.adapters import map_adapter_key, save_value_head_model

F32 = dict(dtype=torch.float32)


@pytest.fixture(scope="module")
def merged_dir(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "radialog-merged"
    return save_lora_merged_llava_model_to_local_dir(
        out, model_path=tiny_release.model_path, model_base=tiny_release.model_base, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def batch(tiny_release):
    from radialog_rl import load_pretrained_llava_tokenizer_with_image_support

    tokenizer = load_pretrained_llava_tokenizer_with_image_support(tiny_release.model_base)
    ids, mask = batch_tokenize_image_prompts(
        [build_prompt("<image>. Describe the image."), build_prompt("<image>. Predicted Findings: edema.")], tokenizer
    )
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=mask, images=images)


def _sft(release, **kw):
    return load_pretrained_llava_model_for_sft_training(
        "cpu", model_path=release.model_path, model_base=release.model_base, **F32, **kw
    )


def test_map_adapter_key_old_and_current_names():
    assert (map_adapter_key("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight", "default")
            == "model.layers.3.mlp.up_proj.lora_B.default.weight")
    assert (map_adapter_key("base_model.model.model.layers.3.mlp.up_proj.lora_A.default.weight", "reference")
            == "model.layers.3.mlp.up_proj.lora_A.reference.weight")


def test_radialog_adapter_values_land_and_only_lora_is_trainable(tiny_release):
    model = _sft(tiny_release)
    file_state = torch.load(tiny_release.model_path / "adapter_model.bin", weights_only=True)
    model_state = model.get_base_model().state_dict()
    for key, value in file_state.items():
        target = map_adapter_key(key, "default")
        assert torch.equal(model_state[target], value.float()), key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(file_state) == 2 * 7 * 2
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert not model.get_base_model().model.vision_tower.training
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (
        16, 32, sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )


def test_standard_radialog_lora_config():
    from radialog_rl import radialog_lora_config

    config = radialog_lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (128, 256, 0.05, "none")
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert radialog_lora_config(r=8).r == 8


def test_partial_and_wrong_adapters_are_refused_with_keys(tiny_release, tmp_path):
    state = torch.load(tiny_release.model_path / "adapter_model.bin", weights_only=True)
    config = (tiny_release.model_path / "adapter_config.json").read_text()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text(config)
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    torch.save({k: v for k, v in state.items() if k != dropped}, partial / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.mlp\.down_proj\.lora_B\.default\.weight"):
        _sft(tiny_release, radialog_lora_weights_path=partial)

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "adapter_config.json").write_text(config)
    torch.save({**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(16, 128)}, extra / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys: base_model\.model\.lm_head\.lora_A\.weight"):
        _sft(tiny_release, radialog_lora_weights_path=extra)

    wrong_r = tmp_path / "wrong_r"
    wrong_r.mkdir()
    (wrong_r / "adapter_config.json").write_text(json.dumps({**json.loads(config), "r": 8}))
    torch.save(state, wrong_r / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*lora_A\.weight \(file \(16, 128\), model \(8, 128\)\)"):
        _sft(tiny_release, radialog_lora_weights_path=wrong_r)


def test_peft_adapter_directory_with_safetensors_loads(tiny_release, tmp_path):
    model = _sft(tiny_release)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = _sft(tiny_release, radialog_lora_weights_path=tmp_path / "adapter")
    a = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_value_head_outputs_align_with_input_ids(tiny_release, batch):
    model = load_pretrained_llava_model_for_ppo_training(
        "cpu", model_path=tiny_release.model_path, model_base=tiny_release.model_base, **F32
    )
    with torch.no_grad():
        out = model(**batch)
    n_ids = batch["input_ids"].shape[1] - 1 + 16  # one placeholder became 16 image positions
    assert out.logits.shape[:2] == out.values.shape == (2, n_ids)
    assert torch.count_nonzero(out.values) == 0  # zero-initialised head
    assert model.v_head.summary.weight.shape == (1, 128)


def _randomize_trainables(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_reference_equals_policy_at_step_zero_pretrained_adapter_flow(tiny_release, batch):
    model = load_pretrained_llava_model_for_ppo_training(
        "cpu", model_path=tiny_release.model_path, model_base=tiny_release.model_base, **F32
    )
    assert model.reference_mode == "frozen_adapter_copy"
    with torch.no_grad():
        policy = model(**batch).logits
        with model.reference_policy():
            reference = model(**batch).logits
        with model.pretrained_model.disable_adapter():
            plain_llava = model(**batch).logits
    assert torch.equal(policy, reference)
    assert not torch.allclose(policy, plain_llava)  # why disabling the adapter would be wrong here
    # After a policy update the reference stays put, and trainable flags survive the context.
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    _randomize_trainables(model)
    with torch.no_grad(), model.reference_policy():
        reference_after = model(**batch).logits
    assert torch.equal(reference, reference_after)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    assert not any(".reference." in n for n in trainable_before)


def test_reference_equals_policy_at_step_zero_fresh_adapter_flow(merged_dir, batch):
    model = load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters(merged_dir, "cpu", **F32)
    assert model.reference_mode == "disable_adapter"
    with torch.no_grad():
        policy = model(**batch).logits
        with model.reference_policy():
            reference = model(**batch).logits
    assert torch.equal(policy, reference)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".lora_" in n for n in trainable) == 2 * 7 * 2 and "v_head.summary.weight" in trainable
    assert len(trainable) == 2 * 7 * 2 + 2


def test_merged_and_unmerged_logits_agree(tiny_release, merged_dir, batch):
    merged = load_baseline_llava_model_with_vision_modules(merged_dir, merged_dir, device="cpu", **F32)
    unmerged = _sft(tiny_release).eval()
    with torch.no_grad():
        a = merged(**batch).logits
        b = unmerged(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert merged.loading_info.vision_tower_source.endswith("non_lora_trainables.safetensors")
    files = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "non_lora_trainables.safetensors", "tokenizer.json"} <= files
    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        assert not any(".vision_tower." in k for k in f.keys())
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == "biovil" and config["biovil"]["image_size"] == 128


@pytest.mark.parametrize("precision", ["16bit", "8bit", "4bit"])
def test_merged_directory_loads_at_every_precision(merged_dir, batch, precision):
    """Quantized where asked, and still the same model: logits near the fp32 ones (bf16 compute)."""
    from radialog_rl.loading.precision import quantized_module_names

    reference = load_baseline_llava_model_with_vision_modules(merged_dir, merged_dir, device="cpu", dtype="fp32")
    model = load_baseline_llava_model_with_vision_modules(merged_dir, merged_dir, precision=precision, device="cpu")
    with torch.no_grad():
        expected, got = reference(**batch).logits, model(**batch).logits.float()
    assert bool(quantized_module_names(model)) == (precision != "16bit")
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < {"16bit": 0.05, "8bit": 0.1, "4bit": 0.4}[precision]  # measured 0.014, 0.026, 0.25
    assert error > 0  # not the fp32 model itself


def test_merge_into_quantized_base_is_refused(tiny_release, tmp_path):
    with pytest.raises(ConfigError, match="re-quantises"):
        save_lora_merged_llava_model_to_local_dir(
            tmp_path / "m", model_path=tiny_release.model_path, model_base=tiny_release.model_base, precision="4bit"
        )


def test_ppo_model_save_load_round_trip(tiny_release, batch, tmp_path):
    model = load_pretrained_llava_model_for_ppo_training(
        "cpu", model_path=tiny_release.model_path, model_base=tiny_release.model_base, **F32
    )
    _randomize_trainables(model, seed=3)
    save_value_head_model(model, tmp_path / "ckpt")
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()}
    again = load_pretrained_llava_model_for_ppo_training(
        "cpu", model_path=tiny_release.model_path, model_base=tiny_release.model_base,
        radialog_lora_weights_path=tmp_path / "ckpt", value_head_path=tmp_path / "ckpt", **F32,
    )
    with torch.no_grad():
        a, b = model(**batch), again(**batch)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.values, b.values) and torch.count_nonzero(a.values) > 0


def test_adapter_loads_into_a_value_head_model(tiny_release, merged_dir):
    from radialog_rl import load_lora_weights, radialog_lora_config

    model = load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters(
        merged_dir, "cpu", lora_config=radialog_lora_config(r=16, lora_alpha=32), **F32)
    state = torch.load(tiny_release.model_path / "adapter_model.bin", weights_only=True)
    report = load_lora_weights(model, state)
    assert len(report.loaded) == len(state) == 28
    llava_state = model.llava.state_dict()
    for key, value in state.items():
        assert torch.equal(llava_state[map_adapter_key(key, "default")], value.float()), key


def test_trl_value_head_formats_load(merged_dir, tmp_path):
    model = load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters(merged_dir, "cpu", **F32)
    weight, bias = torch.arange(128.0).reshape(1, 128) / 100, torch.tensor([0.5])
    trl_dir = tmp_path / "trl"
    trl_dir.mkdir()
    torch.save({"v_head.summary.weight": weight, "v_head.summary.bias": bias}, trl_dir / "pytorch_model.bin")
    wrapped = add_value_head_to_LlavaLlamaForCausalLM_model(model.pretrained_model, trl_dir)  # via directory
    assert torch.equal(wrapped.v_head.summary.weight, weight) and torch.equal(wrapped.v_head.summary.bias, bias)
    from radialog_rl.loading.adapters import load_value_head

    load_value_head(model, trl_dir / "pytorch_model.bin")
    assert torch.equal(model.v_head.summary.weight, weight) and torch.equal(model.v_head.summary.bias, bias)

    full = tmp_path / "full_model.bin"  # TRL without PEFT: the head inside the model's own file
    torch.save({"model.norm.weight": torch.ones(128), "v_head.summary.weight": weight * 2,
                "v_head.summary.bias": bias * 2}, full)
    load_value_head(model, full)
    assert torch.equal(model.v_head.summary.weight, weight * 2)

    bad = tmp_path / "bad.bin"
    torch.save({"v_head.summary.weight": weight}, bad)
    with pytest.raises(CheckpointError, match="lacks v_head.summary.bias"):
        load_value_head(model, bad)


def test_fresh_adapter_flow_requires_a_merged_path():
    with pytest.raises(ConfigError, match="llava_model_path is required"):
        load_pretrained_llava_model_for_ppo_training_with_fresh_lora_adapters()


def test_device_aliases_must_agree(tiny_release):
    with pytest.raises(ConfigError, match="disagree"):
        load_pretrained_llava_model_for_sft_training(
            "cpu", device="cuda:0", model_path=tiny_release.model_path, model_base=tiny_release.model_base
        )
