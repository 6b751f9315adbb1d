"""The baseline loader against the tiny release: every tensor lands where it belongs, and bad
inputs are refused with errors that name the file and keys."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from radialog_rl import (
    load_baseline_llava_model_with_vision_modules,
    load_non_lora_trainables,
    load_tensor_file,
    merge_llm_with_vision_tower,
)
from radialog_rl.errors import CheckpointError, OfflineError


def _load(release, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", torch.float32)
    return load_baseline_llava_model_with_vision_modules(release.model_path, release.model_base, **kwargs)


def _copy_release(release, tmp_path):
    from radialog_rl.testing.tiny import TinyRelease

    root = tmp_path / "copy"
    shutil.copytree(release.root, root)
    return TinyRelease(root, root / release.model_base.name, root / release.model_path.name,
                       root / release.biovil_path.name)


def test_every_tensor_lands_in_its_parameter(tiny_release, tiny_model_fp32):
    model_state = tiny_model_fp32.state_dict()
    checked = 0
    # Base LLaVA shards: every LLaMA tensor, value for value (fp16 on disk -> exact in fp32).
    for shard in sorted(tiny_release.model_base.glob("pytorch_model-*.bin")):
        for key, value in torch.load(shard, weights_only=True).items():
            if key.startswith("model.mm_projector."):
                continue  # the base's CLIP-shaped projector is replaced (checked below)
            assert torch.equal(model_state[key], value.float()), key
            checked += 1
    # non_lora_trainables: projector and the whole fine-tuned tower, BatchNorm buffers included.
    non_lora = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    for raw_key, value in non_lora.items():
        if raw_key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by the model, ignored on purpose
        key = raw_key.removeprefix("base_model.model.")
        expected = value.float() if value.is_floating_point() else value
        assert torch.equal(model_state[key], expected), key
        checked += 1
    base_projector = torch.load(next(tiny_release.model_base.glob("pytorch_model-00002-*.bin")), weights_only=True)
    assert base_projector["model.mm_projector.0.weight"].shape == (128, 192)  # CLIP-shaped
    tower_keys = [k for k in model_state if k.startswith("model.vision_tower.")]
    assert any(k.endswith("num_batches_tracked") for k in tower_keys)
    assert int(model_state["model.vision_tower.encoder.encoder.bn1.num_batches_tracked"]) == 1000
    # Every parameter/buffer of the model was covered by one of the two files.
    assert checked == len(model_state)

    info = tiny_model_fp32.loading_info
    assert info.projector_source.endswith("non_lora_trainables.bin")
    assert info.vision_tower_source.endswith("non_lora_trainables.bin")
    assert info.non_lora.ignored == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]


def test_model_is_frozen_and_in_eval_mode(tiny_model_fp32):
    assert not any(p.requires_grad for p in tiny_model_fp32.parameters())
    assert not tiny_model_fp32.training
    assert not tiny_model_fp32.model.vision_tower.training


def test_projector_vision_tower_and_lm_head_are_never_quantized(tiny_release):
    from radialog_rl.loading.precision import quantized_module_names

    model = _load(tiny_release, precision="4bit")
    names = quantized_module_names(model)
    assert len(names) == 2 * 7  # 7 linears per tiny layer
    assert not any(n.startswith(("lm_head", "model.mm_projector", "model.vision_tower")) for n in names)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.mm_projector[0].weight.dtype == torch.float32


def _prompt_batch(tokenizer, n_images=1):
    from radialog_rl import batch_tokenize_image_prompts, build_prompt, report_prompt

    prompts = [build_prompt(report_prompt(["edema"])), build_prompt(report_prompt(None) + " Be brief.")]
    return batch_tokenize_image_prompts(prompts[:n_images] if n_images else prompts, tokenizer)


@pytest.mark.parametrize("precision,max_rel", [("8bit", 0.05), ("4bit", 0.25)])
def test_quantized_logits_stay_close_to_16bit(tiny_release, tiny_model_fp32, precision, max_rel):
    ids, mask = _prompt_batch(tiny_model_fp32.tokenizer, n_images=2)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model_fp32(input_ids=ids, attention_mask=mask, images=images).logits
        quant = _load(tiny_release, precision=precision)(input_ids=ids, attention_mask=mask, images=images).logits
    rel = (quant - ref).norm() / ref.norm()
    assert rel < max_rel, f"{precision}: relative logit error {rel:.3f}"
    cos = torch.nn.functional.cosine_similarity(quant.flatten(), ref.flatten(), dim=0)
    assert cos > 0.95


def test_4bit_lora_gradients_exact_after_eval_forward(tiny_release):
    """bitsandbytes' CPU repack trap: an eval no-grad forward must not corrupt later LoRA grads."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    ids, mask = _prompt_batch(_load(tiny_release, precision="4bit").tokenizer)
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                init_lora_weights=False)

    q_model = _load(tiny_release, precision="4bit")
    dequantized = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in q_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    torch.manual_seed(0)
    q_peft = get_peft_model(q_model, LoraConfig(**lora))
    with torch.no_grad():  # the forward that used to repack weights in place
        q_peft.eval()(input_ids=ids, attention_mask=mask, images=images)

    ref_model = _load(tiny_release)
    with torch.no_grad():
        for name, weight in dequantized.items():
            ref_model.get_submodule(name).weight.copy_(weight)
    torch.manual_seed(0)
    ref_peft = get_peft_model(ref_model, LoraConfig(**lora))
    ref_peft.load_state_dict({k: v for k, v in q_peft.state_dict().items() if "lora_" in k}, strict=False)

    grads = []
    for peft_model in (q_peft, ref_peft):
        peft_model.train()
        out = peft_model(input_ids=ids, attention_mask=mask, images=images)
        out.logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_tower_stays_in_eval_and_batchnorm_statistics_do_not_change(tiny_model_fp32):
    tower = tiny_model_fp32.model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k or "batches" in k}
    tiny_model_fp32.train()
    try:
        assert not tower.training
        assert all(not m.training for m in tower.modules())
        ids, mask = _prompt_batch(tiny_model_fp32.tokenizer)
        with torch.no_grad():
            tiny_model_fp32(input_ids=ids, attention_mask=mask, images=torch.rand(1, 3, 128, 128))
    finally:
        tiny_model_fp32.eval()
    after = tower.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_non_lora_trainables_with_unexpected_key_is_refused(tiny_release, tmp_path):
    model = _load(tiny_release)
    state = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    state["base_model.model.model.mm_projector.5.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.mm_projector\.5\.weight"):
        load_non_lora_trainables(model, state)


def test_partial_vision_tower_is_refused_with_keys_named(tiny_release):
    model = _load(tiny_release)
    state = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    del state["base_model.model.model.vision_tower.encoder.backbone_to_vit.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: model\.vision_tower\.encoder\.backbone_to_vit"):
        load_non_lora_trainables(model, state)


def test_wrong_shape_in_non_lora_is_refused(tiny_release):
    model = _load(tiny_release)
    state = torch.load(tiny_release.model_path / "non_lora_trainables.bin", weights_only=True)
    state["base_model.model.model.mm_projector.0.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"mm_projector\.0\.weight \(file \(128, 64\), model \(128, 128\)\)"):
        load_non_lora_trainables(model, state)


def test_biovil_t_file_loads_into_the_tower(tiny_release):
    model = _load(tiny_release)
    report = merge_llm_with_vision_tower(model, tiny_release.biovil_path)
    file_state = torch.load(tiny_release.biovil_path, weights_only=True)
    assert len(report.loaded) == len(file_state)
    tower_state = model.model.vision_tower.state_dict()
    for key, value in file_state.items():
        assert torch.equal(tower_state[key], value.to(tower_state[key].dtype)), key
    partial = dict(file_state)
    partial.pop("encoder.missing_previous_emb")
    with pytest.raises(CheckpointError, match="missing keys: encoder.missing_previous_emb"):
        merge_llm_with_vision_tower(model, partial)


def test_release_without_tower_uses_biovil_file_or_fails_clearly(tiny_release, tmp_path):
    release = _copy_release(tiny_release, tmp_path)
    path = release.model_path / "non_lora_trainables.bin"
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if ".vision_tower." not in k}, path)
    with pytest.raises(CheckpointError, match="no vision tower weights.*vision_tower_path"):
        _load(release)
    model = _load(release, vision_tower_path=release.biovil_path)
    assert model.loading_info.vision_tower_source == str(release.biovil_path)
    random_model = _load(release, allow_random_init=True)
    assert "random" in random_model.loading_info.vision_tower_source


def test_missing_projector_weights_is_an_error_unless_opted_in(tiny_release, tmp_path):
    release = _copy_release(tiny_release, tmp_path)
    (release.model_path / "non_lora_trainables.bin").unlink()
    with pytest.raises(CheckpointError, match="no projector weights"):
        _load(release, vision_tower_path=release.biovil_path)
    model = _load(release, vision_tower_path=release.biovil_path, allow_random_init=True)
    assert "random" in model.loading_info.projector_source


def test_missing_directory_and_files(tiny_release, tmp_path):
    with pytest.raises(CheckpointError, match="RaDialog release directory not found"):
        load_baseline_llava_model_with_vision_modules(tmp_path / "nope", tiny_release.model_base, device="cpu")
    release = _copy_release(tiny_release, tmp_path)
    (release.model_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        _load(release)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_checkpoint_names_the_file(tiny_release, tmp_path, damage):
    release = _copy_release(tiny_release, tmp_path)
    path = release.model_path / "non_lora_trainables.bin"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint" * 10}[damage])
    with pytest.raises(CheckpointError, match="non_lora_trainables.bin"):
        _load(release)


class _RunsCode:
    """Unpickling this calls os.mkdir: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tiny_release, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load .*evil.bin.*would run"):
        load_tensor_file(evil)
    assert not marker.exists()

    release = _copy_release(tiny_release, tmp_path)
    shard = next(release.model_base.glob("pytorch_model-00001-*.bin"))
    torch.save({"payload": _RunsCode(marker)}, shard)
    with pytest.raises(CheckpointError, match="cannot load base LLaVA weights"):
        _load(release)
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "odd.bin"
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="non-tensor entries: b"):
        load_tensor_file(path)


def test_hub_id_offline_names_the_local_path_to_use(tiny_release, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OfflineError, match=r"someone/not-cached.*hf download someone/not-cached.*local path"):
        load_baseline_llava_model_with_vision_modules("someone/not-cached", tiny_release.model_base, device="cpu")


def test_legacy_model_type_llava_is_read_with_our_class(tiny_release):
    import json

    from radialog_rl import LlavaLlamaConfig, load_llava_config

    assert json.loads((tiny_release.model_path / "config.json").read_text())["model_type"] == "llava"
    config = load_llava_config(tiny_release.model_path)
    assert isinstance(config, LlavaLlamaConfig) and config.model_type == "llava_llama"
    assert config.mm_vision_tower == "biovil" and config.num_image_tokens == 16
    from transformers import AutoConfig

    assert AutoConfig.for_model("llava").__class__.__name__ == "LlavaConfig"  # built-in untouched


def test_embeddings_are_resized_to_the_tokenizer_with_a_defined_init(tiny_release):
    from radialog_rl import load_pretrained_llava_tokenizer_with_image_support

    tokenizer = load_pretrained_llava_tokenizer_with_image_support(
        tiny_release.model_base, mm_use_im_start_end=True, mm_use_im_patch_token=True)
    model = _load(tiny_release, tokenizer=tokenizer)
    assert model.loading_info.resized_embeddings == (384, 387)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embed.shape == (387, 128) and head.shape == (387, 128)
    assert torch.isfinite(embed).all() and torch.isfinite(head).all()
    # mean-resizing: new rows are drawn around the old rows' mean, not left as raw memory
    old_mean = embed[:384].mean(0)
    assert (embed[384:] - old_mean).abs().max() < 1.0


def test_bad_config_files_are_named(tmp_path):
    from radialog_rl import load_llava_config, resolve_model_dir
    from radialog_rl.errors import ConfigError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_llava_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="model_type 'bert'; expected a LLaVA-1.5 config"):
        load_llava_config(tmp_path)
    with pytest.raises(CheckpointError, match="is a file; pass the directory"):
        resolve_model_dir(tmp_path / "config.json", what="RaDialog release")


def test_loading_asks_transformers_for_no_hub_kernels(tiny_release, monkeypatch):
    # transformers 5.24/5.25 kernelize by default; on CUDA that downloads kernels-community layers at
    # load time (and fails offline). The loader must turn it off on every load, 16-bit and 4-bit.
    from transformers import PreTrainedModel

    asked = []
    original = PreTrainedModel.set_use_kernels

    def record(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", record)
    for precision in ("16bit", "4bit"):
        model = _load(tiny_release, precision=precision)
        assert model.use_kernels is False
    assert asked == [False, False]
