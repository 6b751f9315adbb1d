"""BioViL-T chest X-ray image encoder (the vision tower of RaDialog), as a plain torch module.

Architecture (see ``docs/checkpoint-format.md`` §6 and §7)::

    images [B,3,H,W] (values in [0,1], no mean/std normalisation; 448x448 for RaDialog)
      -> ResNet-50 trunk (torchvision layout, ResNet v1.5)        [B,2048,H/32,W/32]
      -> backbone_to_vit (1x1 conv, no bias)                      [B,256,h,w]      = patch
      -> diff: with a prior image, a small transformer ("vit_pooler") over the tokens of the
               current and the prior image; without one (RaDialog's case), the learned
               ``missing_previous_emb`` broadcast over the grid     [B,256,h,w]
      -> patch_fused = cat([patch, diff], channels)               [B,512,h,w]
      -> LLaVA consumes it flattened row-major: [B,h*w,512] (196 positions at 448 px)
      (-> projector: 1x1 conv MLP to BioViL's 128-d joint space; in the checkpoint, unused by LLaVA)

The temporal pooler follows hi-ml's code, not a textbook DETR layer: every block adds the (fixed 2-D
sine position + learned current/previous type) embedding to its LayerNorm-ed input, and that sum feeds
the query, key *and* value projections; the residual stream never receives the embedding.

Every parameter and persistent buffer is named exactly as in Microsoft's
``biovil_t_image_model_proj_size_128.pt`` (``encoder.encoder.conv1.weight``,
``encoder.vit_pooler.blocks.0.attn.proj_q.weight``, ``projector.model.3.bias``, ...), so that file and
the tower stored in RaDialog's ``non_lora_trainables.bin`` load with ``strict=True`` and no renaming.

Differences from the original hi-ml implementation, none of which changes the state dict:

* No dropout / stochastic depth in the temporal pooler (the original uses 0.1 dropout and 0.25 drop
  path during training). Inference is identical; RaDialog never feeds a prior image.
* The fixed sine positional embedding is computed in every pooler call instead of being held in a
  non-persistent buffer (the original's ``pos_embed``). No checkpoint carries such a buffer, and
  loaders that build on the meta device and materialise afterwards (``to_empty``, transformers 5's
  ``from_pretrained``, observed) leave it as uninitialised memory (NaNs), silently corrupting the
  prior-image path. The values are identical (bit for bit in float32), it costs a few hundred
  thousand flops, and any grid size works (the original asserted 14x14).
* A frozen tower (no parameter requires grad) never leaves eval mode, see
  :meth:`BioViLTImageEncoder.train`.

All sizes come from :class:`BioViLConfig`, so tests can build a tiny tower
(:func:`tiny_biovil_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BioViLConfig",
    "tiny_biovil_config",
    "Bottleneck",
    "ResNetTrunk",
    "sine_position_embedding_2d",
    "PoolerAttention",
    "PoolerMlp",
    "PoolerBlock",
    "VisionTransformerPooler",
    "MultiImageEncoder",
    "BioViLTProjector",
    "BioViLTImageEncoder",
]

#: Total downsampling of the ResNet trunk (stem conv 2 x maxpool 2 x layer2..4 2 x 2 x 2).
RESNET_STRIDE = 32
#: Bottleneck output channels = 4 x its inner width (ResNet-50 design).
BOTTLENECK_EXPANSION = 4


@dataclass(frozen=True)
class BioViLConfig:
    """Sizes of the BioViL-T image encoder. The defaults are the released model.

    Attributes:
        resnet_layers: Bottleneck blocks in ``layer1..layer4`` ((3, 4, 6, 3) = ResNet-50).
        resnet_base_width: Output channels of the stem ``conv1`` and inner width of ``layer1``; layer
            ``i`` has inner width ``base_width * 2**i`` and outputs 4x that, so ``layer4`` outputs
            ``base_width * 32`` channels (2048 for the default 64).
        num_classes: Output size of the ImageNet head ``fc`` (kept only because the checkpoint has it).
        vit_dim: Channels after ``backbone_to_vit``; the temporal pooler's token width.
        joint_dim: Output (and hidden) channels of the joint-space ``projector``.
        pooler_blocks: Transformer blocks in the temporal pooler.
        pooler_heads: Attention heads in each pooler block (must divide ``vit_dim``).
        pooler_mlp_ratio: Pooler MLP hidden width as a multiple of ``vit_dim``.
        image_size: Expected input side in pixels (448 for RaDialog), a multiple of 32; it sets
            ``grid_size``/``num_patches`` (what LLaVA expects). The tower itself accepts any size.
    """

    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    resnet_base_width: int = 64
    num_classes: int = 1000
    vit_dim: int = 256
    joint_dim: int = 128
    pooler_blocks: int = 3
    pooler_heads: int = 8
    pooler_mlp_ratio: float = 1.0
    image_size: int = 448

    def __post_init__(self) -> None:
        if len(self.resnet_layers) != 4 or any(int(n) < 1 for n in self.resnet_layers):
            raise ValueError(f"resnet_layers must be four positive block counts, got {self.resnet_layers}")
        # A list from a YAML/JSON config would make the frozen dataclass unhashable: store a tuple.
        object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
        if self.vit_dim % self.pooler_heads != 0:
            raise ValueError(
                f"vit_dim ({self.vit_dim}) must be divisible by pooler_heads ({self.pooler_heads})"
            )
        # The 2-D sine embedding gives vit_dim/2 channels per axis, as (sin, cos) pairs.
        if self.vit_dim % 4 != 0:
            raise ValueError(f"vit_dim ({self.vit_dim}) must be a multiple of 4 (sine positional embedding)")
        if self.image_size % RESNET_STRIDE != 0 or self.image_size <= 0:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of {RESNET_STRIDE}")
        if int(self.vit_dim * self.pooler_mlp_ratio) < 1:
            raise ValueError(f"pooler_mlp_ratio ({self.pooler_mlp_ratio}) gives an empty pooler MLP")

    @property
    def grid_size(self) -> int:
        """Side of the patch grid for ``image_size`` inputs (14 at 448 px)."""
        return self.image_size // RESNET_STRIDE

    @property
    def num_patches(self) -> int:
        """Image positions per image handed to the language model (196 at 448 px)."""
        return self.grid_size**2

    @property
    def backbone_dim(self) -> int:
        """Channels of the ResNet ``layer4`` output (2048 for ResNet-50)."""
        return self.resnet_base_width * 8 * BOTTLENECK_EXPANSION

    @property
    def feature_dim(self) -> int:
        """Channels of ``patch_fused`` (512): LLaVA's ``mm_hidden_size``."""
        return 2 * self.vit_dim


def tiny_biovil_config() -> BioViLConfig:
    """A tower small enough for unit tests: 128 px -> 4x4 grid, 128-d features, ~0.5 M parameters.

    Linear ``in_features`` stay multiples of 64 (bitsandbytes' CPU kernels need that, see
    docs/stack-notes.md).
    """
    return BioViLConfig(
        resnet_layers=(1, 1, 1, 1),
        resnet_base_width=8,  # layer4 -> 256 channels
        num_classes=16,
        vit_dim=64,  # feature_dim 128
        joint_dim=64,
        pooler_blocks=1,
        pooler_heads=2,
        pooler_mlp_ratio=1.0,
        image_size=128,  # grid 4x4
    )


# --------------------------------------------------------------------------------------------------
# ResNet trunk (torchvision parameter names, ResNet v1.5: the stride sits on the 3x3 conv)
# --------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), plus an identity/projection shortcut.

    Shapes: ``[B, in_channels, H, W] -> [B, 4*width, H/stride, W/stride]``.
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # The shortcut needs a projection only when the shape changes (first block of a layer).
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNetTrunk(nn.Module):
    """ResNet with Bottleneck blocks; returns the ``layer4`` feature map (no pooling, no ``fc``).

    ``[B, 3, H, W] -> [B, 32*base_width, ceil(H/32), ceil(W/32)]`` (every stride-2 step rounds up).
    ``fc`` exists only so the checkpoint's ImageNet head loads.
    """

    def __init__(
        self, layers: tuple[int, int, int, int], base_width: int = 64, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = base_width
        stages = []
        for index, num_blocks in enumerate(layers):
            width = base_width * 2**index
            stride = 1 if index == 0 else 2  # the maxpool already halved the map before layer1
            blocks = [Bottleneck(in_channels, width, stride)]
            in_channels = width * BOTTLENECK_EXPANSION
            blocks += [Bottleneck(in_channels, width) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


# --------------------------------------------------------------------------------------------------
# Temporal pooler (current vs. prior image)
# --------------------------------------------------------------------------------------------------


def sine_position_embedding_2d(
    height: int,
    width: int,
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed DETR-style 2-D sine positional embedding, ``[1, height*width, dim]`` (float32).

    Row and column coordinates 1..n are normalised to (0, 2*pi] (divided by ``n + 1e-6``). Each axis
    gets ``dim/2`` channels: ``sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...`` with
    ``t_k = temperature ** (2k / (dim/2))``; the row (y) channels come first, then the column (x)
    channels. Tokens are in row-major order. The arithmetic is done in float32 tensors, in the same
    order as the original, so the values match it bit for bit.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim ({dim}) must be a multiple of 4")
    axis_dim = dim // 2
    scale = 2 * math.pi
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    ys = ys / (ys[-1:] + 1e-6) * scale
    xs = xs / (xs[-1:] + 1e-6) * scale
    # One frequency per (sin, cos) pair, repeated so that channel 2k and 2k+1 share it.
    exponents = 2 * torch.div(torch.arange(axis_dim, device=device), 2, rounding_mode="floor") / axis_dim
    periods = temperature ** exponents.to(torch.float32)

    def encode(coords: torch.Tensor) -> torch.Tensor:  # [n] -> [n, axis_dim]
        angles = coords[:, None] / periods
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    pos_y = encode(ys)[:, None, :].expand(height, width, axis_dim)
    pos_x = encode(xs)[None, :, :].expand(height, width, axis_dim)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(1, height * width, dim)


class PoolerAttention(nn.Module):
    """Multi-head self-attention with separate bias-free q/k/v projections and a biased output ``proj``.

    ``[B, N, C] -> [B, N, C]``. The caller adds the positional/type embedding to the input.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.proj_q = nn.Linear(dim, dim, bias=False)
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, heads, N, C/heads]
            return t.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.proj_q(x)), heads(self.proj_k(x)), heads(self.proj_v(x))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class PoolerMlp(nn.Module):
    """``fc1 -> GELU -> fc2``: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PoolerBlock(nn.Module):
    """Pre-norm transformer block whose attention input carries the positional + type embedding.

    As in the original (hi-ml's ``Block`` calling ``forward_as_mhsa``), the embedding is added to
    ``norm1(x)`` and that sum feeds the query, key *and* value projections; the residual stream itself
    never receives the embedding::

        x = x + attn(norm1(x) + emb)
        x = x + mlp(norm2(x))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PoolerMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, N, C]`` tokens; ``embedding``: ``[B or 1, N, C]`` positional + type embedding."""
        x = x + self.attn(self.norm1(x) + embedding)
        return x + self.mlp(self.norm2(x))


class VisionTransformerPooler(nn.Module):
    """Temporal pooler: attends jointly over the current and the prior image's patch tokens.

    ``forward(current [B,C,h,w], previous [B,C,h,w]) -> [B,C,h,w]`` (the current image's tokens after
    the blocks and ``norm_post``). Tokens are the row-major flattened grid; the learned ``type_embed``
    (index 0 current, 1 previous) plus the fixed 2-D sine positional embedding make up the embedding
    that every block adds to its attention input.
    """

    def __init__(self, dim: int, grid_size: int, num_blocks: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.grid_size = grid_size
        self.type_embed = nn.Parameter(torch.zeros(2, 1, dim))
        self.blocks = nn.ModuleList([PoolerBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks)])
        self.norm_post = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        if current.shape != previous.shape:
            raise ValueError(f"current {tuple(current.shape)} and previous {tuple(previous.shape)} differ")
        batch, dim, height, width = current.shape
        num_tokens = height * width
        # [B, C, h, w] -> [B, h*w, C], row-major; current tokens first.
        tokens = torch.cat((current.flatten(2).transpose(1, 2), previous.flatten(2).transpose(1, 2)), dim=1)
        pos = sine_position_embedding_2d(height, width, dim, device=current.device)  # [1, hw, C]
        pos = pos.to(current.dtype)
        embedding = torch.cat(
            (pos + self.type_embed[0].to(current.dtype), pos + self.type_embed[1].to(current.dtype)), dim=1
        )  # [1, 2hw, C], broadcast over the batch
        for block in self.blocks:
            tokens = block(tokens, embedding)
        tokens = self.norm_post(tokens[:, :num_tokens])  # LayerNorm is per token: only the current half
        return tokens.transpose(1, 2).reshape(batch, dim, height, width)


# --------------------------------------------------------------------------------------------------
# Multi-image encoder, projector and the full tower
# --------------------------------------------------------------------------------------------------


class MultiImageEncoder(nn.Module):
    """ResNet trunk + ``backbone_to_vit`` + temporal pooler / missing-prior embedding.

    ``forward(current [B,3,H,W], previous [B,3,H,W] | None) -> patch_fused [B, 2*vit_dim, H/32, W/32]``.
    """

    def __init__(self, config: BioViLConfig) -> None:
        super().__init__()
        self.encoder = ResNetTrunk(config.resnet_layers, config.resnet_base_width, config.num_classes)
        self.backbone_to_vit = nn.Conv2d(config.backbone_dim, config.vit_dim, kernel_size=1, bias=False)
        self.vit_pooler = VisionTransformerPooler(
            config.vit_dim,
            config.grid_size,
            config.pooler_blocks,
            config.pooler_heads,
            config.pooler_mlp_ratio,
        )
        self.missing_previous_emb = nn.Parameter(torch.zeros(1, config.vit_dim, 1, 1))

    def forward(self, current: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        batch = current.shape[0]
        if previous is not None:
            if previous.shape != current.shape:
                raise ValueError(
                    f"prior images {tuple(previous.shape)} must match images {tuple(current.shape)}"
                )
            # One trunk pass over both; in eval mode BatchNorm is per-sample, so this equals two passes.
            both = self.backbone_to_vit(self.encoder(torch.cat((current, previous), dim=0)))
            patch, patch_previous = both[:batch], both[batch:]
            diff = self.vit_pooler(patch, patch_previous)
        else:
            patch = self.backbone_to_vit(self.encoder(current))
            diff = self.missing_previous_emb.to(patch.dtype).expand(batch, -1, patch.shape[2], patch.shape[3])
        return torch.cat((patch, diff), dim=1)


class BioViLTProjector(nn.Module):
    """BioViL's joint-space head: ``model`` = 1x1 conv (no bias) -> BatchNorm -> ReLU -> 1x1 conv.

    ``[B, in_dim, h, w] -> [B, out_dim, h, w]``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, kernel_size=1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class BioViLTImageEncoder(nn.Module):
    """The BioViL-T image tower; its ``state_dict`` matches ``biovil_t_image_model_proj_size_128.pt``.

    Inputs are ``[B, 3, H, W]`` images in [0, 1] (see docs/checkpoint-format.md §7); H and W should be
    multiples of 32 (448 for RaDialog). ``prior_images``, if given, has the same shape.
    """

    def __init__(self, config: BioViLConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else BioViLConfig()
        self.encoder = MultiImageEncoder(self.config)
        joint_dim = self.config.joint_dim
        self.projector = BioViLTProjector(self.config.feature_dim, joint_dim, joint_dim)
        self.reset_parameters()

    # -- initialisation ---------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic (given torch's RNG) fresh initialisation; real use loads a checkpoint over it.

        Convs: Kaiming normal (fan_out, ReLU) as in torchvision's ResNet; BatchNorm/LayerNorm: weight 1,
        bias 0, fresh running statistics; pooler linears: truncated normal (std 0.02), bias 0;
        ``fc``: PyTorch's default; ``type_embed`` and ``missing_previous_emb``: truncated normal (0.02).
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
            elif isinstance(module, nn.Linear):
                if name.startswith("encoder.vit_pooler."):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                else:
                    module.reset_parameters()
        nn.init.trunc_normal_(self.encoder.vit_pooler.type_embed, std=0.02)
        nn.init.trunc_normal_(self.encoder.missing_previous_emb, std=0.02)

    # -- frozen tower stays in eval mode ----------------------------------------------------------

    def is_frozen(self) -> bool:
        """True when no parameter of the tower requires grad."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> BioViLTImageEncoder:
        """Like :meth:`nn.Module.train`, except that a frozen tower always stays in eval mode.

        Why: the original RaDialog code froze the tower's parameters but let ``model.train()`` reach
        it, so its BatchNorm layers normalised with batch statistics (outputs depend on the batch
        composition) and kept overwriting their running statistics: the "frozen" tower drifted
        during training. With every parameter frozen there is nothing for train mode to do, so we
        refuse it: BatchNorm uses (and never changes) its running statistics.
        """
        if mode and self.is_frozen():
            mode = False
        return super().train(mode)

    def _stay_in_eval_if_frozen(self) -> None:
        # Covers freezing *after* train() was called (requires_grad_ does not revisit the mode).
        if self.training and self.is_frozen():
            self.train(False)

    def _align_batchnorm_buffers(self) -> int:
        """Give each BatchNorm's running statistics its weight's dtype; returns how many changed.

        ``module.to(dtype)`` casts buffers with the parameters, but DeepSpeed's bf16/fp16 engines
        cast only parameters (and FSDP's mixed precision only what it shards), which leaves bf16
        weights next to fp32 running statistics: ``expected scalar type BFloat16 but found Float``
        in ``batch_norm``. Matching the weight gives exactly what a bf16 load has.
        """
        changed = 0
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight is not None and module.running_mean is not None:
                dtype = module.weight.dtype
                if module.running_mean.dtype != dtype:
                    module.running_mean.data = module.running_mean.data.to(dtype)
                    module.running_var.data = module.running_var.data.to(dtype)
                    changed += 1
        return changed

    # -- forward passes ---------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, prior_images: torch.Tensor | None = None) -> torch.Tensor:
        """``images [B,3,H,W]`` (+ optional ``prior_images`` of the same shape) -> ``patch_fused
        [B, 2*vit_dim, H/32, W/32]`` (``[B,512,14,14]`` at 448 px)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        self._stay_in_eval_if_frozen()
        self._align_batchnorm_buffers()
        return self.encoder(images, prior_images)

    def patch_features(self, images: torch.Tensor, prior_images: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, h*w, 2*vit_dim]`` (``[B,196,512]`` at 448 px): the grid flattened row-major, as
        LLaVA's ``mm_projector`` consumes it (position ``r*w + c`` is grid cell ``(r, c)``)."""
        return self(images, prior_images).flatten(2).transpose(1, 2)

    def joint_embedding(self, images: torch.Tensor, prior_images: torch.Tensor | None = None) -> torch.Tensor:
        """BioViL's joint-space patch embeddings ``[B, joint_dim, h, w]`` (unused by LLaVA)."""
        return self.projector(self(images, prior_images))
