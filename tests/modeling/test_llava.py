"""LlavaLlamaForCausalLM: key layout of the real-size model, image-position expansion, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from radialog_rl import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaLlamaConfig, LlavaLlamaForCausalLM, expand_image_tokens
from radialog_rl.errors import ConfigError, DataError

RESNET50_BLOCKS = (3, 4, 6, 3)


def _bn(prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def expected_llava_biovil_keys(num_layers: int = 32) -> set[str]:
    """LLaVA-1.5-7B + BioViL-T key set, written out from radialog-format.md §3-§6."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        keys |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    keys |= {f"model.mm_projector.{i}.{n}" for i in (0, 2) for n in ("weight", "bias")}
    tower = "model.vision_tower."
    resnet = tower + "encoder.encoder."
    keys |= {resnet + "conv1.weight", resnet + "fc.weight", resnet + "fc.bias"} | _bn(resnet + "bn1")
    for layer, blocks in enumerate(RESNET50_BLOCKS, start=1):
        for b in range(blocks):
            p = f"{resnet}layer{layer}.{b}."
            for c in (1, 2, 3):
                keys |= {p + f"conv{c}.weight"} | _bn(p + f"bn{c}")
            if b == 0:
                keys |= {p + "downsample.0.weight"} | _bn(p + "downsample.1")
    keys |= {tower + "encoder.backbone_to_vit.weight", tower + "encoder.missing_previous_emb"}
    pooler = tower + "encoder.vit_pooler."
    keys |= {pooler + "type_embed", pooler + "norm_post.weight", pooler + "norm_post.bias"}
    for i in range(3):
        p = f"{pooler}blocks.{i}."
        keys |= {p + f"{n}.{w}" for n in ("norm1", "norm2") for w in ("weight", "bias")}
        keys |= {p + f"attn.proj_{n}.weight" for n in "qkv"} | {p + "attn.proj.weight", p + "attn.proj.bias"}
        keys |= {p + f"mlp.fc{n}.{w}" for n in (1, 2) for w in ("weight", "bias")}
    keys |= {tower + "projector.model.0.weight", tower + "projector.model.3.weight", tower + "projector.model.3.bias"}
    keys |= _bn(tower + "projector.model.1")
    return keys


def test_real_size_state_dict_keys_equal_llava_plus_biovil():
    config = LlavaLlamaConfig()  # LLaMA-7B sizes + the real BioViL-T
    with torch.device("meta"):
        model = LlavaLlamaForCausalLM(config)
    state = model.state_dict()
    assert set(state) == expected_llava_biovil_keys()
    assert state["model.mm_projector.0.weight"].shape == (4096, 512)
    assert state["model.mm_projector.2.weight"].shape == (4096, 4096)
    assert state["model.embed_tokens.weight"].shape == (32000, 4096)
    assert state["model.layers.31.mlp.down_proj.weight"].shape == (4096, 11008)
    assert config.num_image_tokens == 196


def test_projector_types_from_config():
    from radialog_rl import build_mm_projector

    assert isinstance(build_mm_projector("linear", 8, 16), torch.nn.Linear)
    mlp3 = build_mm_projector("mlp3x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    with pytest.raises(ConfigError, match="unknown mm_projector_type"):
        build_mm_projector("qformer", 8, 16)


def test_non_biovil_tower_is_refused():
    with pytest.raises(ConfigError, match="BioViL-T tower only"):
        LlavaLlamaConfig(mm_vision_tower="openai/clip-vit-large-patch14-336").check_vision_tower()


def test_expand_single_placeholder_left_padded():
    P = IMAGE_TOKEN_INDEX
    ids = torch.tensor([[0, 0, 1, P, 5, 6], [1, 7, P, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 5, 6], [-100, -100, -100, 8, 9, 10]])
    out = expand_image_tokens(ids, 3, mask, labels, pad_token_id=0)
    assert out.input_ids.tolist() == [[0, 0, 1, P, P, P, 5, 6], [1, 7, P, P, P, 8, 9, 10]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert out.labels.tolist() == [[-100, -100, -100, -100, -100, -100, 5, 6], [-100, -100, -100, -100, -100, 8, 9, 10]]


def test_expand_right_padded_and_already_expanded_rows():
    P = IMAGE_TOKEN_INDEX
    ids = torch.tensor([[1, P, 5, 0, 0, 0], [1, P, P, P, 9, 2]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = expand_image_tokens(ids, 3, mask, None, pad_token_id=0)
    assert out.input_ids.tolist() == [[1, P, P, P, 5, 0], [1, P, P, P, 9, 2]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    with pytest.raises(DataError, match="2 consecutive image positions"):
        expand_image_tokens(torch.tensor([[1, P, P, 5]]), 3)


def _prompt_ids(tokenizer, texts):
    from radialog_rl import batch_tokenize_image_prompts, build_prompt

    return batch_tokenize_image_prompts([build_prompt(t) for t in texts], tokenizer)


def test_legacy_and_expanded_prompts_give_identical_logits(tiny_model_fp32, tiny_tokenizer):
    model = tiny_model_fp32
    ids, mask = _prompt_ids(tiny_tokenizer, ["<image>. Describe.", "<image>. Predicted Findings: edema. Write."])
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    expanded = expand_image_tokens(ids, model.num_image_tokens, mask, pad_token_id=0)
    assert (expanded.input_ids == IMAGE_TOKEN_INDEX).sum() == 2 * 16
    with torch.no_grad():
        legacy = model(input_ids=ids, attention_mask=mask, images=images).logits
        full = model(input_ids=expanded.input_ids, attention_mask=expanded.attention_mask, images=images).logits
        features = model.encode_images(images)
        reused = model(input_ids=expanded.input_ids, attention_mask=expanded.attention_mask,
                       image_features=features).logits
    assert legacy.shape == (2, expanded.input_ids.shape[1], model.config.vocab_size)
    assert torch.equal(legacy, full)
    assert torch.equal(full, reused)


def test_left_padding_does_not_change_a_row(tiny_model_fp32, tiny_tokenizer):
    ids, mask = _prompt_ids(tiny_tokenizer, ["<image>. Short.", "<image>. A much longer prompt with more words."])
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    single_ids, single_mask = _prompt_ids(tiny_tokenizer, ["<image>. Short."])
    with torch.no_grad():
        batch = tiny_model_fp32(input_ids=ids, attention_mask=mask, images=images).logits
        single = tiny_model_fp32(input_ids=single_ids, attention_mask=single_mask, images=images[:1]).logits
    n = single.shape[1]
    torch.testing.assert_close(batch[0, -n:], single[0], rtol=1e-4, atol=1e-5)


def test_labels_at_image_positions_are_ignored(tiny_model_fp32, tiny_tokenizer):
    ids, mask = _prompt_ids(tiny_tokenizer, ["<image>. Describe."])
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_INDEX] = 5  # a careless caller
    expanded = expand_image_tokens(ids, 16, mask, labels)
    assert (expanded.labels[expanded.input_ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = tiny_model_fp32(input_ids=ids, attention_mask=mask, labels=labels, images=torch.rand(1, 3, 128, 128))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("prompt,n_images", [("No image here.", 1), ("<image> and <image>", 1), ("<image>.", 2)])
def test_wrong_placeholder_count_is_a_clear_error(tiny_model_fp32, tiny_tokenizer, prompt, n_images):
    ids, mask = _prompt_ids(tiny_tokenizer, [prompt])
    with pytest.raises(DataError, match=r"image placeholder\(s\) but \d image\(s\)"):
        tiny_model_fp32(input_ids=ids, attention_mask=mask, images=torch.rand(n_images, 3, 128, 128))


def test_prior_images_go_through_the_temporal_pooler(tiny_model_fp32):
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        without = tiny_model_fp32.encode_images(images)
        with_prior = tiny_model_fp32.encode_images(images, prior_images=images.flip(0))
    assert without.shape == with_prior.shape == (2, 16, 128)
    assert not torch.allclose(without, with_prior)


def test_importing_the_package_touches_no_network():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, socket
        def refuse(*a, **k):
            raise RuntimeError("network access at import time")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import radialog_rl
        for name in radialog_rl.__all__:
            getattr(radialog_rl, name)
        for mod in pkgutil.walk_packages(radialog_rl.__path__, "radialog_rl."):
            if not mod.name.endswith("__main__"):  # running it would start the CLI
                importlib.import_module(mod.name)
        print("ok")
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_generate_without_attention_mask_recognises_left_padding(tiny_model_fp32, tiny_tokenizer):
    """Issue 11 item 14: RaDialog's test script calls generate on a left-padded batch without a mask."""
    ids, mask = _prompt_ids(tiny_tokenizer, ["<image>\nDescribe.", "<image>\nIs there edema in this chest X-ray?"])
    assert (mask[:, 0] == 0).any()  # left-padded
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    kwargs = dict(images=images, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        with_mask = tiny_model_fp32.generate(input_ids=ids, attention_mask=mask, **kwargs)
        without = tiny_model_fp32.generate(input_ids=ids, **kwargs)
    assert torch.equal(with_mask, without)
    right_ids = torch.full_like(ids, tiny_tokenizer.pad_token_id)
    for i in range(2):
        row = ids[i][mask[i].bool()]
        right_ids[i, : len(row)] = row
    with pytest.raises(DataError, match="right-padded"):
        tiny_model_fp32.generate(input_ids=right_ids, **kwargs)


def test_sequences_longer_than_tokenizer_model_max_length_are_refused(tiny_model_fp32, tiny_tokenizer,
                                                                      monkeypatch):
    """Issue 11 item 15: RaDialog cut expanded sequences at tokenizer_model_max_length; we name it."""
    ids, mask = _prompt_ids(tiny_tokenizer, ["<image>\nIs there edema in this chest X-ray?"])
    length = int(mask.sum()) - 1 + tiny_model_fp32.num_image_tokens
    monkeypatch.setattr(tiny_model_fp32.config, "tokenizer_model_max_length", length - 1)
    with pytest.raises(DataError, match=rf"{length} tokens long .* tokenizer_model_max_length of {length - 1}"):
        tiny_model_fp32(input_ids=ids, attention_mask=mask, images=torch.rand(1, 3, 128, 128))
    monkeypatch.setattr(tiny_model_fp32.config, "tokenizer_model_max_length", length)
    tiny_model_fp32(input_ids=ids, attention_mask=mask, images=torch.rand(1, 3, 128, 128))


def test_expanding_image_tokens_keeps_interior_padding():
    """A left-padded prompt followed by a left-padded continuation (the value-level confidence
    scorer's layout): the padding between them stays masked after expansion (it used to become
    attended tokens, which changed the scored values on the generate() path)."""
    from radialog_rl.constants import IMAGE_TOKEN_INDEX
    from radialog_rl.modeling.llava import expand_image_tokens

    ids = torch.tensor([[0, 5, IMAGE_TOKEN_INDEX, 6, 0, 7, 8], [4, 5, IMAGE_TOKEN_INDEX, 6, 9, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    out = expand_image_tokens(ids, 3, mask, pad_token_id=0)
    assert out.input_ids.tolist() == [[0, 5, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 6, 0, 7, 8],
                                      [4, 5, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 6, 9, 7, 8]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1, 0, 1, 1], [1] * 9]
