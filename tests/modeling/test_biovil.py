"""Tests of the BioViL-T image tower (radialog-format.md §6): checkpoint key layout, shapes,
frozen-tower eval guarantee, the temporal pooler's maths, and state-dict round trips."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radialog_rl.modeling.biovil import (
    BioViLConfig,
    BioViLTImageEncoder,
    VisionTransformerPooler,
    sine_position_embedding_2d,
    tiny_biovil_config,
)

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str) -> set[str]:
    return {f"{prefix}.{suffix}" for suffix in BN_SUFFIXES}


def documented_keys(layers: tuple[int, ...] = (3, 4, 6, 3), pooler_blocks: int = 3) -> set[str]:
    """The checkpoint's key set, spelled out from the documented families (radialog-format.md §6)."""
    keys = {"encoder.encoder.conv1.weight", "encoder.encoder.fc.weight", "encoder.encoder.fc.bias"}
    keys |= _bn("encoder.encoder.bn1")
    for layer, num_blocks in enumerate(layers, start=1):
        for block in range(num_blocks):
            prefix = f"encoder.encoder.layer{layer}.{block}"
            for i in (1, 2, 3):
                keys.add(f"{prefix}.conv{i}.weight")
                keys |= _bn(f"{prefix}.bn{i}")
            if block == 0:
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= _bn(f"{prefix}.downsample.1")
    keys |= {"encoder.backbone_to_vit.weight", "encoder.missing_previous_emb"}
    keys.add("encoder.vit_pooler.type_embed")
    for block in range(pooler_blocks):
        prefix = f"encoder.vit_pooler.blocks.{block}"
        for norm in ("norm1", "norm2"):
            keys |= {f"{prefix}.{norm}.weight", f"{prefix}.{norm}.bias"}
        keys |= {f"{prefix}.attn.proj_{name}.weight" for name in ("q", "k", "v")}
        keys |= {f"{prefix}.attn.proj.weight", f"{prefix}.attn.proj.bias"}
        keys |= {f"{prefix}.mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    keys |= {"encoder.vit_pooler.norm_post.weight", "encoder.vit_pooler.norm_post.bias"}
    keys |= {"projector.model.0.weight", "projector.model.3.weight", "projector.model.3.bias"}
    keys |= _bn("projector.model.1")
    return keys


@pytest.fixture(scope="module")
def real_on_meta() -> BioViLTImageEncoder:
    with torch.device("meta"):
        return BioViLTImageEncoder(BioViLConfig())


def tiny(seed: int = 0, config: BioViLConfig | None = None) -> BioViLTImageEncoder:
    torch.manual_seed(seed)
    return BioViLTImageEncoder(config or tiny_biovil_config())


def images(batch: int = 2, size: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


# -- (1) the real layout --------------------------------------------------------------------------


def test_real_config_key_set_is_exactly_the_documented_one(real_on_meta: BioViLTImageEncoder) -> None:
    keys = set(real_on_meta.state_dict())
    assert keys == documented_keys()
    assert "encoder.vit_pooler.pos_embed" not in keys  # fixed, not in the checkpoint
    assert not any("pos_embed" in name for name, _ in real_on_meta.named_buffers())
    assert "encoder.vit_pooler.blocks.2.norm1.weight" in keys
    assert not any(k.startswith("encoder.vit_pooler.blocks.3.") for k in keys)


def test_real_config_shapes(real_on_meta: BioViLTImageEncoder) -> None:
    sd = real_on_meta.state_dict()
    expected = {
        "encoder.encoder.conv1.weight": (64, 3, 7, 7),
        "encoder.encoder.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "encoder.encoder.layer2.0.conv2.weight": (128, 128, 3, 3),
        "encoder.encoder.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "encoder.encoder.layer4.2.bn3.running_var": (2048,),
        "encoder.encoder.fc.weight": (1000, 2048),
        "encoder.encoder.fc.bias": (1000,),
        "encoder.backbone_to_vit.weight": (256, 2048, 1, 1),
        "encoder.missing_previous_emb": (1, 256, 1, 1),
        "encoder.vit_pooler.type_embed": (2, 1, 256),
        "encoder.vit_pooler.blocks.0.attn.proj_q.weight": (256, 256),
        "encoder.vit_pooler.blocks.2.attn.proj_v.weight": (256, 256),
        "encoder.vit_pooler.blocks.1.attn.proj.bias": (256,),
        "encoder.vit_pooler.blocks.0.mlp.fc1.weight": (256, 256),
        "encoder.vit_pooler.blocks.0.mlp.fc2.bias": (256,),
        "encoder.vit_pooler.norm_post.weight": (256,),
        "projector.model.0.weight": (128, 512, 1, 1),
        "projector.model.1.running_mean": (128,),
        "projector.model.1.num_batches_tracked": (),
        "projector.model.3.weight": (128, 128, 1, 1),
        "projector.model.3.bias": (128,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["projector.model.1.num_batches_tracked"].dtype == torch.int64


def test_real_config_derived_sizes_and_resnet50_parameter_count(real_on_meta: BioViLTImageEncoder) -> None:
    config = real_on_meta.config
    sizes = (config.grid_size, config.num_patches, config.backbone_dim, config.feature_dim)
    assert sizes == (14, 196, 2048, 512)
    trunk = sum(p.numel() for p in real_on_meta.encoder.encoder.parameters())
    assert trunk == 25_557_032  # torchvision's ResNet-50, fc included
    pooler = real_on_meta.encoder.vit_pooler
    assert (pooler.grid_size, pooler.dim) == (14, 256)
    assert tuple(sine_position_embedding_2d(pooler.grid_size, pooler.grid_size, pooler.dim).shape) == (1, 196, 256)


# -- (2) shapes and ordering ----------------------------------------------------------------------


def test_tiny_output_shapes_with_and_without_prior() -> None:
    model = tiny().eval()
    config = model.config
    x = images()
    with torch.no_grad():
        assert model(x).shape == (2, config.feature_dim, 4, 4)
        assert model(x, images(seed=2)).shape == (2, 128, 4, 4)
        assert model.patch_features(x).shape == (2, config.num_patches, 128)
        assert model.joint_embedding(x, images(seed=2)).shape == (2, config.joint_dim, 4, 4)


def test_patch_features_are_the_grid_flattened_row_major() -> None:
    model = tiny().eval()
    x = images()
    with torch.no_grad():
        grid = model(x)
        flat = model.patch_features(x)
    width = grid.shape[3]
    for row, col in [(0, 0), (0, 3), (1, 0), (2, 1), (3, 3)]:
        torch.testing.assert_close(flat[:, row * width + col], grid[:, :, row, col])


def test_other_image_sizes_compute_their_own_positional_embedding() -> None:
    model = tiny().eval()
    with torch.no_grad():
        out = model(images(size=160), images(size=160, seed=2))  # 5x5 grid, buffer is 4x4
    assert out.shape == (2, 128, 5, 5)
    assert torch.isfinite(out).all()


# -- (3) frozen towers stay in eval ---------------------------------------------------------------


def test_bf16_parameters_beside_fp32_running_stats_run_like_a_bf16_load() -> None:
    """DeepSpeed's bf16 engines cast parameters only; BatchNorm's fp32 statistics must follow."""
    reference = frozen(tiny()).to(torch.bfloat16).eval()  # what a bf16 load gives (buffers cast)
    engine_cast = frozen(tiny()).eval()
    for p in engine_cast.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert engine_cast.encoder.encoder.bn1.running_mean.dtype == torch.float32
    x = images().to(torch.bfloat16)
    with torch.no_grad():
        out = engine_cast(x)
        assert torch.equal(out, reference(x))
    assert all(m.running_var.dtype == torch.bfloat16 for m in engine_cast.modules() if isinstance(m, nn.BatchNorm2d))


def test_frozen_tower_refuses_train_mode_and_keeps_running_stats() -> None:
    model = frozen(tiny())
    model.train()
    assert not any(m.training for m in model.modules())
    before = bn_state(model)
    model(images(batch=3), images(batch=3, seed=5))
    after = bn_state(model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_frozen_after_train_is_switched_to_eval_on_forward() -> None:
    model = tiny().train()
    assert model.training
    model.requires_grad_(False)
    before = bn_state(model)
    model(images())
    assert not any(m.training for m in model.modules())
    for key, value in bn_state(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_frozen_tower_output_does_not_depend_on_batch_composition() -> None:
    model = frozen(tiny()).train()
    x = images(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_trainable_tower_trains_normally() -> None:
    model = tiny().train()
    assert all(m.training for m in model.modules())
    before = bn_state(model)
    model(images())
    changed = bn_state(model)["encoder.encoder.bn1.running_mean"]
    assert not torch.equal(changed, before["encoder.encoder.bn1.running_mean"])
    model.eval()
    assert not model.training


def test_partially_trainable_tower_may_train() -> None:
    model = tiny()
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    assert model.train().training


# -- (4) prior images -----------------------------------------------------------------------------


def test_missing_prior_uses_the_learned_embedding_everywhere() -> None:
    model = tiny().eval()
    with torch.no_grad():
        out = model(images())
    dim = model.config.vit_dim
    expected = model.encoder.missing_previous_emb.detach().expand(2, dim, 4, 4)
    torch.testing.assert_close(out[:, dim:], expected, rtol=0, atol=0)


def test_prior_images_replace_only_the_difference_half() -> None:
    model = tiny().eval()
    dim = model.config.vit_dim
    x = images()
    with torch.no_grad():
        alone = model(x)
        with_prior = model(x, images(seed=2))
        with_other_prior = model(x, images(seed=3))
    # The static half is the current image's own features, however the trunk was batched.
    torch.testing.assert_close(with_prior[:, :dim], alone[:, :dim], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_prior[:, dim:], alone[:, dim:])
    assert not torch.allclose(with_prior[:, dim:], with_other_prior[:, dim:])


def test_prior_shape_must_match() -> None:
    model = tiny().eval()
    with pytest.raises(ValueError, match="prior images"):
        model(images(batch=2), images(batch=1))


# -- (5) the pooler's maths -----------------------------------------------------------------------


def reference_sine_embedding(height: int, width: int, dim: int) -> torch.Tensor:
    """The DETR formula written out element by element (float64), as ``[h*w, dim]``."""
    half = dim // 2
    out = torch.zeros(height * width, dim, dtype=torch.float64)
    for r in range(height):
        for c in range(width):
            y = (r + 1) / (height + 1e-6) * 2 * math.pi
            x = (c + 1) / (width + 1e-6) * 2 * math.pi
            for k in range(half // 2):
                period = 10000 ** (2 * k / half)
                out[r * width + c, 2 * k] = math.sin(y / period)
                out[r * width + c, 2 * k + 1] = math.cos(y / period)
                out[r * width + c, half + 2 * k] = math.sin(x / period)
                out[r * width + c, half + 2 * k + 1] = math.cos(x / period)
    return out


@pytest.mark.parametrize(("height", "width", "dim"), [(4, 4, 64), (3, 5, 16), (14, 14, 256)])
def test_sine_position_embedding_matches_the_formula(height: int, width: int, dim: int) -> None:
    got = sine_position_embedding_2d(height, width, dim)
    assert got.shape == (1, height * width, dim) and got.dtype == torch.float32
    expected = reference_sine_embedding(height, width, dim)
    torch.testing.assert_close(got[0].double(), expected, rtol=0, atol=1e-5)


def reference_pooler(
    pooler: VisionTransformerPooler, current: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """hi-ml's semantics: each block adds pos + type embedding to norm1(x), which feeds q, k and v."""
    b, c, h, w = current.shape
    tokens = torch.cat([current.flatten(2).transpose(1, 2), previous.flatten(2).transpose(1, 2)], dim=1)
    pos = reference_sine_embedding(h, w, c).to(tokens.dtype)
    emb = torch.cat([pos + pooler.type_embed[0], pos + pooler.type_embed[1]], dim=0)
    x = tokens
    for block in pooler.blocks:
        heads = block.attn.num_heads
        e = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias, 1e-6) + emb
        q = (e @ block.attn.proj_q.weight.T).reshape(b, -1, heads, c // heads).transpose(1, 2)
        k = (e @ block.attn.proj_k.weight.T).reshape(b, -1, heads, c // heads).transpose(1, 2)
        v = (e @ block.attn.proj_v.weight.T).reshape(b, -1, heads, c // heads).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        x = x + o @ block.attn.proj.weight.T + block.attn.proj.bias
        n = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias, 1e-6)
        hidden = F.gelu(n @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        x = x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    x = F.layer_norm(x, (c,), pooler.norm_post.weight, pooler.norm_post.bias, 1e-6)
    return x[:, : h * w].transpose(1, 2).reshape(b, c, h, w)


def test_pooler_matches_an_independent_reference() -> None:
    config = dataclasses.replace(tiny_biovil_config(), pooler_blocks=2, pooler_heads=4)
    torch.manual_seed(0)
    pooler = BioViLTImageEncoder(config).encoder.vit_pooler.double().eval()
    # Non-trivial norms so that a misplaced embedding or norm cannot hide.
    with torch.no_grad():
        for p in pooler.parameters():
            p.add_(0.1 * torch.randn_like(p))
    generator = torch.Generator().manual_seed(4)
    current = torch.randn(2, 64, 4, 4, dtype=torch.float64, generator=generator)
    previous = torch.randn(2, 64, 4, 4, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(pooler(current, previous), reference_pooler(pooler, current, previous))


def test_pooler_uses_position_and_type_embeddings() -> None:
    """Without them self-attention is permutation-equivariant; with them the grid and roles matter."""
    model = tiny().eval()
    pooler = model.encoder.vit_pooler
    generator = torch.Generator().manual_seed(6)
    current = torch.randn(1, 64, 4, 4, generator=generator)
    previous = torch.randn(1, 64, 4, 4, generator=generator)
    with torch.no_grad():
        out = pooler(current, previous)
        # Transposing both grids would commute with a position-free pooler.
        transposed = pooler(current.transpose(2, 3), previous.transpose(2, 3)).transpose(2, 3)
        assert not torch.allclose(out, transposed, atol=1e-4)
        pooler.type_embed.zero_()
        assert not torch.allclose(out, pooler(current, previous), atol=1e-4)


# -- (6) state dicts, init, meta ------------------------------------------------------------------


def test_state_dict_round_trip_is_strict_and_exact() -> None:
    source, target = tiny(seed=0), tiny(seed=1)
    source.train()(images())  # move the running statistics away from their initial values
    source.eval()
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    target.eval()
    x, prior = images(), images(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(target(x, prior), source(x, prior), rtol=0, atol=0)
        torch.testing.assert_close(target.joint_embedding(x), source.joint_embedding(x), rtol=0, atol=0)


def test_initialisation_is_deterministic_given_the_seed() -> None:
    a, b, c = tiny(seed=3).state_dict(), tiny(seed=3).state_dict(), tiny(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.encoder.conv1.weight"], c["encoder.encoder.conv1.weight"])
    assert torch.equal(a["encoder.encoder.bn1.weight"], torch.ones(8))
    assert torch.equal(a["encoder.encoder.bn1.bias"], torch.zeros(8))
    assert 0 < a["encoder.missing_previous_emb"].abs().max() < 0.1
    assert 0 < a["encoder.vit_pooler.type_embed"].abs().max() < 0.1


def test_meta_tower_materialised_with_to_empty_and_loaded_is_exact() -> None:
    """Nothing outside the state dict must need initialising (transformers 5 builds on meta)."""
    reference = tiny(seed=0)
    with torch.device("meta"):
        model = BioViLTImageEncoder(tiny_biovil_config())
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images(), images(seed=2)), reference(images(), images(seed=2)))


def test_bfloat16_forward_runs() -> None:
    model = frozen(tiny()).to(torch.bfloat16)
    out = model.patch_features(images().bfloat16(), images(seed=2).bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 128)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooler_heads": 3}, "divisible"),
        ({"vit_dim": 66, "pooler_heads": 2}, "multiple of 4"),
        ({"image_size": 100}, "multiple of 32"),
        ({"resnet_layers": (1, 1, 1)}, "four positive"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny_biovil_config(), **overrides)
