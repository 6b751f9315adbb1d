"""LLaVA-1.5 with a BioViL-T vision tower: RaDialog's network, in one file.

``LlavaLlamaForCausalLM`` is a ``LlamaForCausalLM`` whose inner model also owns ``vision_tower``
(BioViL-T, :mod:`radialog_rl.modeling.biovil`) and ``mm_projector``. Parameter names are exactly
LLaVA-1.5's (``model.embed_tokens``, ``model.layers.N...``, ``model.norm``, ``lm_head``,
``model.mm_projector.{0,2}.*``, ``model.vision_tower.*``) so the real base shards,
``non_lora_trainables.bin`` and RaDialog's LoRA keys map without renaming
(``docs/checkpoint-format.md`` §1-§6).

Image positions are expanded *in the token sequence*: a prompt's image placeholder
(``IMAGE_TOKEN_INDEX`` = -200) becomes one position per image feature (196 for BioViL-T at 448 px)
before the LLaMA trunk runs, so ``input_ids``, attention mask, labels, logits (and a value head's
values) line up one-to-one. Expanded positions keep the id -200 as a marker; their labels are -100.
The historical single -200 placeholder is expanded on the fly by :func:`expand_image_tokens`.

Forward, top to bottom:
1. expand legacy placeholders (if any) in ``input_ids`` / ``attention_mask`` / ``labels``;
2. ``encode_images``: BioViL-T patch features ``[n_img, 196, 512]`` -> projector ``[n_img, 196, hidden]``
   (or reuse precomputed ``image_features``);
3. embed text tokens, write image features into the image positions (in order of appearance);
4. position ids from the attention mask (left padding safe); the LLaMA trunk; ``lm_head``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from radialog_rl.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.modeling.biovil import BioViLConfig, BioViLTImageEncoder
from radialog_rl.modeling.projector import build_mm_projector
from radialog_rl.padding import pad_rows

#: Vision towers this implementation can build (RaDialog's config says "biovil").
SUPPORTED_VISION_TOWERS = ("biovil", "biovil-t", "biovil_t")


@strict
class LlavaLlamaConfig(LlamaConfig):
    """LLaMA config plus LLaVA's multimodal fields (RaDialog's ``config.json``, §2).

    ``model_type`` is ``llava_llama``: transformers' built-in ``llava`` is a different architecture,
    so a legacy RaDialog config that says ``"llava"`` is read with this class explicitly
    (:func:`radialog_rl.loading.release.load_llava_config`), never through ``AutoConfig``.

    ``biovil`` holds the BioViL-T sizes as a dict of :class:`BioViLConfig` fields; ``None`` means the
    real BioViL-T (448 px, 196 image positions, 512-d features). Tiny test towers set it.
    """

    model_type = "llava_llama"

    mm_vision_tower: str | None = "biovil"
    mm_hidden_size: int = 512
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    use_mm_proj: bool = True
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    image_aspect_ratio: str = "pad"
    tune_mm_mlp_adapter: bool = False
    mv_type: str = "concat"
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None
    biovil: dict | None = None

    @property
    def biovil_config(self) -> BioViLConfig:
        return BioViLConfig(**(self.biovil or {}))

    @property
    def num_image_tokens(self) -> int:
        """Sequence positions one image occupies after expansion (196 for the real tower)."""
        return self.biovil_config.num_patches

    @property
    def image_size(self) -> int:
        return self.biovil_config.image_size

    def check_vision_tower(self) -> None:
        tower = (self.mm_vision_tower or "").lower()
        if tower not in SUPPORTED_VISION_TOWERS:
            raise ConfigError(
                f"mm_vision_tower {self.mm_vision_tower!r} is not supported: this package builds the "
                "BioViL-T tower only (RaDialog's config says 'biovil'). Pass RaDialog's config.json "
                "directory as model_path."
            )
        if self.mm_hidden_size != self.biovil_config.feature_dim:
            raise ConfigError(
                f"mm_hidden_size={self.mm_hidden_size} does not match the BioViL-T feature size "
                f"{self.biovil_config.feature_dim} (2 x vit_dim)"
            )


class ExpandedInputs(NamedTuple):
    """Token-level tensors after image-placeholder expansion (all ``[B, T_expanded]``)."""

    input_ids: torch.LongTensor
    attention_mask: torch.Tensor | None
    labels: torch.LongTensor | None


def _image_runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``IMAGE_TOKEN_INDEX`` in a 1-D id tensor."""
    is_img = (row == IMAGE_TOKEN_INDEX).to(torch.int8)
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _images_in_run(length: int, num_image_tokens: int) -> int:
    if length == num_image_tokens:
        return 1
    if length == 1:  # the historical single placeholder
        return 1
    if length % num_image_tokens == 0:
        return length // num_image_tokens
    raise DataError(
        f"found {length} consecutive image positions; an image occupies either 1 (placeholder) or "
        f"{num_image_tokens} (expanded) positions. Separate adjacent <image> placeholders with text."
    )


def count_image_placeholders(input_ids: torch.Tensor, num_image_tokens: int) -> list[int]:
    """Number of images each row of ``input_ids`` ``[B, T]`` refers to (legacy or expanded)."""
    return [
        sum(_images_in_run(length, num_image_tokens) for _, length in _image_runs(row))
        for row in input_ids
    ]


def expand_image_tokens(
    input_ids: torch.Tensor,
    num_image_tokens: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> ExpandedInputs:
    """Replace each single -200 placeholder by ``num_image_tokens`` image positions.

    Args:
        input_ids: ``[B, T]`` ids; image placeholders are ``IMAGE_TOKEN_INDEX``. Already expanded runs
            (``num_image_tokens`` long) are kept as they are.
        attention_mask: ``[B, T]`` (1 = token, 0 = padding) or None.
        labels: ``[B, T]`` or None; image positions get ``IGNORE_INDEX``.
        pad_token_id: id used to re-pad rows that became shorter than the longest row.
        padding_side: "left" or "right"; None infers it from ``attention_mask`` (left when some row
            starts with padding).

    Returns:
        :class:`ExpandedInputs` with every tensor ``[B, T']``. A no-op (same tensors) when nothing
        needs expanding.
    """
    rows_runs = [_image_runs(row) for row in input_ids]
    for runs in rows_runs:
        for _, length in runs:
            _images_in_run(length, num_image_tokens)  # validates every run's length
    if all(length != 1 or num_image_tokens == 1 for runs in rows_runs for _, length in runs):
        if labels is not None:
            labels = labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
        return ExpandedInputs(input_ids, attention_mask, labels)

    if padding_side is None:
        padding_side = (
            "left" if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()) else "right"
        )
    new_ids, new_mask, new_labels = [], [], []
    for b, runs in enumerate(rows_runs):
        keep = slice(None)
        if attention_mask is not None:  # drop this row's padding; it is re-added below
            valid = attention_mask[b].nonzero().flatten()
            keep = slice(int(valid[0]), int(valid[-1]) + 1) if len(valid) else slice(0, 0)
        ids = input_ids[b, keep]
        lab = labels[b, keep] if labels is not None else None
        # Interior padding (a left-padded prompt followed by a left-padded continuation, as the
        # value-level confidence scorer builds) keeps its 0s: only the ends are re-padded.
        msk = attention_mask[b, keep] if attention_mask is not None else torch.ones_like(ids)
        pieces_ids, pieces_lab, pieces_mask, pos = [], [], [], 0
        for start, length in _image_runs(ids):
            reps = num_image_tokens if length == 1 else length
            pieces_ids += [ids[pos:start], ids.new_full((reps,), IMAGE_TOKEN_INDEX)]
            pieces_mask += [msk[pos:start], msk.new_ones((reps,))]
            if lab is not None:
                pieces_lab += [lab[pos:start], lab.new_full((reps,), IGNORE_INDEX)]
            pos = start + length
        pieces_ids.append(ids[pos:])
        pieces_mask.append(msk[pos:])
        new_ids.append(torch.cat(pieces_ids))
        if lab is not None:
            pieces_lab.append(lab[pos:])
            new_labels.append(torch.cat(pieces_lab))
        new_mask.append(torch.cat(pieces_mask))

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_rows(rows, value, side=padding_side)[0]

    mask_out = None
    if attention_mask is not None:
        mask_out = pad(new_mask, 0).to(attention_mask.dtype)
    labels_out = pad(new_labels, IGNORE_INDEX) if labels is not None else None
    return ExpandedInputs(pad(new_ids, pad_token_id), mask_out, labels_out)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions ``[B, T]`` counting only real tokens (exclusive cumsum), 0 on padding.

    Matches what ``generate`` does, so a left-padded row gets the same positions as unpadded.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


class LlavaLlamaModel(LlamaModel):
    """LLaMA trunk plus ``vision_tower`` and ``mm_projector`` (LLaVA's ``model.`` namespace)."""

    config_class = LlavaLlamaConfig

    def __init__(self, config: LlavaLlamaConfig):
        super().__init__(config)
        config.check_vision_tower()
        self.vision_tower = BioViLTImageEncoder(config.biovil_config)
        self.mm_projector = build_mm_projector(
            config.mm_projector_type, config.mm_hidden_size, config.hidden_size
        )


class LlavaLlamaForCausalLM(LlamaForCausalLM):
    """RaDialog's LLaVA-1.5 + BioViL-T causal LM (see the module docstring for the forward)."""

    config_class = LlavaLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "BioViLTImageEncoder"]

    def __init__(self, config: LlavaLlamaConfig):
        super().__init__(config)
        self.model = LlavaLlamaModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The tower has parameters the generic initialiser does not know (missing_previous_emb,
        # type_embed) and a non-persistent positional embedding: it initialises itself
        # (``apply`` visits it after its children, so this wins).
        if isinstance(module, BioViLTImageEncoder):
            module.reset_parameters()

    # -- images -------------------------------------------------------------------------------
    def get_vision_tower(self) -> BioViLTImageEncoder:
        return self.model.vision_tower

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def encode_images(
        self, images: torch.Tensor, prior_images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image features in the LLM embedding space.

        Args:
            images: ``[N, 3, H, W]`` preprocessed images (``[0, 1]``, no normalisation).
            prior_images: ``[N, 3, H, W]`` previous studies for BioViL-T's temporal pooler, or None.

        Returns:
            ``[N, num_image_tokens, hidden_size]`` in the projector's dtype.
        """
        tower = self.model.vision_tower
        first = next(tower.parameters())
        images = images.to(device=first.device, dtype=first.dtype)
        if prior_images is not None:
            prior_images = prior_images.to(device=first.device, dtype=first.dtype)
        patches = tower.patch_features(images, prior_images)  # [N, h*w, mm_hidden]
        projector = self.model.mm_projector
        reference = next(projector.parameters(), first)  # an identity projector has no parameters
        return projector(patches.to(device=reference.device, dtype=reference.dtype))

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        prior_images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None, torch.LongTensor]:
        """Expand placeholders and build ``inputs_embeds`` ``[B, T', hidden]``.

        Images are assigned to placeholders in order of appearance across the batch (row 0 first).
        Returns ``(inputs_embeds, attention_mask, labels, input_ids)``, all expanded.
        """
        n_placeholders = sum(count_image_placeholders(input_ids, self.num_image_tokens))
        n_images = (
            image_features.shape[0] if image_features is not None
            else images.shape[0] if images is not None else 0
        )
        if n_placeholders != n_images:
            raise DataError(
                f"the prompts contain {n_placeholders} image placeholder(s) but {n_images} image(s) "
                "were given; put exactly one '<image>' in the prompt per image"
            )
        input_ids, attention_mask, labels = expand_image_tokens(
            input_ids, self.num_image_tokens, attention_mask, labels,
            pad_token_id=self.config.pad_token_id or 0,
        )
        self._check_max_length(input_ids, attention_mask)
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.model.embed_tokens(input_ids.masked_fill(image_mask, 0))
        if n_images:
            if image_features is None:
                image_features = self.encode_images(images, prior_images)
            features = image_features.to(device=embeds.device, dtype=embeds.dtype)
            # masked_scatter fills positions in row-major order: image i -> its placeholder run.
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.reshape(-1, embeds.shape[-1]))
        return embeds, attention_mask, labels, input_ids

    def _check_max_length(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Refuse an expanded sequence longer than ``config.tokenizer_model_max_length``.

        RaDialog's LLaVA code cut such sequences to that length (1300 in its config), silently
        dropping their end; refusing names the lengths instead of computing something different.
        """
        limit = self.config.tokenizer_model_max_length
        if not limit:
            return
        lengths = attention_mask.sum(1) if attention_mask is not None else torch.full(
            (input_ids.shape[0],), input_ids.shape[1])
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > limit:
            row = int(lengths.argmax())
            raise DataError(
                f"row {row} is {longest} tokens long with its {self.num_image_tokens} image positions, "
                f"above the model's tokenizer_model_max_length of {limit} (config.json); RaDialog would "
                "cut it there: shorten the prompt/response or raise tokenizer_model_max_length"
            )

    def _generation_mask(self, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
        """The attention mask of prompts given without one: leading ``pad_token_id`` tokens are
        padding (left-padded batch); an ambiguous batch is refused rather than padding attended."""
        if input_ids.shape[0] == 1:
            return torch.ones_like(input_ids)
        if pad_token_id is None:
            raise ConfigError("batched generate() without attention_mask: pass the tokenizer's attention_mask "
                              "(or pad_token_id, so left padding can be recognised)")
        is_pad = input_ids == pad_token_id
        if bool(is_pad[:, -1].any()) and not bool(is_pad[:, 0].any()):
            raise DataError("generate() got right-padded prompts; batched generation needs left padding "
                            "(tokenizer padding_side='left') or an attention_mask")
        return ((~is_pad).long().cumsum(1) > 0).long()  # 0 before each row's first real token

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | None = None,
        prior_images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward with images.

        Args:
            input_ids: ``[B, T]``; image placeholders (-200) single or already expanded.
            images / prior_images: ``[N, 3, H, W]``, one per placeholder (see ``encode_images``).
            image_features: ``[N, num_image_tokens, hidden]`` from ``encode_images`` instead of images
                (PPO reuses them across passes).
            labels: ``[B, T]``; image positions are ignored in the loss.
            past_key_values / cache: a transformers ``Cache`` (both names accepted: transformers 5
                renamed it; forwarding only one of them would silently drop the other).

        Returns:
            ``CausalLMOutputWithPast`` whose ``logits`` are ``[B, T', vocab]`` over the *expanded*
            sequence (``T' = T`` when the input was already expanded).
        """
        cache = cache if cache is not None else past_key_values
        past_len = cache.get_seq_length() if cache is not None else 0
        # Decode steps (a cache is filled) only ever see sampled text tokens: skip the placeholder
        # scan there, it would cost a device sync per generated token.
        if inputs_embeds is None and input_ids is not None and past_len == 0:
            has_images = images is not None or image_features is not None
            if has_images or bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                inputs_embeds, attention_mask, labels, input_ids = self.prepare_multimodal_inputs(
                    input_ids, attention_mask, labels, images, prior_images, image_features
                )
                input_ids = None
        if position_ids is None and attention_mask is not None and past_len == 0:
            position_ids = position_ids_from_attention_mask(attention_mask)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        prior_images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ):
        """``transformers`` generation with images: the prompt is embedded (placeholders expanded,
        image features written in) and passed as ``inputs_embeds``; returns only the new tokens
        ``[B, new]``. Prompts must be left-padded for batched generation."""
        if input_ids is not None and "inputs_embeds" not in kwargs:
            if attention_mask is None:  # RaDialog's own test script calls generate this way
                pad = kwargs.get("pad_token_id", self.generation_config.pad_token_id)
                attention_mask = self._generation_mask(input_ids, pad if pad is not None else self.config.pad_token_id)
            embeds, attention_mask, _, _ = self.prepare_multimodal_inputs(
                input_ids, attention_mask, None, images, prior_images, image_features
            )
            return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def unwrap_llava(model: nn.Module) -> LlavaLlamaForCausalLM:
    """The ``LlavaLlamaForCausalLM`` inside ``model``: itself, a PEFT ``PeftModel`` of it, or a
    value-head wrapper (TRL's ``pretrained_model`` attribute) around either.

    The LoRA layers live inside the LLaVA modules, so image encoding and embedding on the inner
    model are the same as through the wrappers.

    Raises:
        ConfigError: ``model`` holds no ``LlavaLlamaForCausalLM`` (e.g. transformers' own LLaVA).
    """
    inner = getattr(model, "pretrained_model", model)
    get_base = getattr(inner, "get_base_model", None)
    llava = get_base() if callable(get_base) else inner
    if not isinstance(llava, LlavaLlamaForCausalLM):
        raise ConfigError(f"{type(llava).__name__} is not a LlavaLlamaForCausalLM (no encode_images); "
                          "load the model with radialog_rl's loaders")
    return llava


AutoConfig.register("llava_llama", LlavaLlamaConfig)
AutoModelForCausalLM.register(LlavaLlamaConfig, LlavaLlamaForCausalLM)

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "ExpandedInputs",
    "expand_image_tokens",
    "count_image_placeholders",
    "position_ids_from_attention_mask",
    "unwrap_llava",
]
