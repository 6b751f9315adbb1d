"""Tokenizer loading and LLaVA's historical image-token layout."""

from __future__ import annotations

import torch

from radialog_rl import (
    IMAGE_TOKEN_INDEX,
    load_pretrained_llava_tokenizer_with_image_support,
    load_pretrained_text_only_llava_tokenizer,
    modify_tokenizer_for_image_input,
    tokenizer_image_token,
)


def test_text_only_and_image_tokenizers(tiny_release):
    text = load_pretrained_text_only_llava_tokenizer(tiny_release.model_base)
    image = load_pretrained_llava_tokenizer_with_image_support(tiny_release.model_base)
    assert text.pad_token_id == text.eos_token_id == 2 and text.padding_side == "right"
    assert image.pad_token_id == 2 and image.padding_side == "left"
    assert len(image) == 384  # RaDialog's settings add no tokens


def test_image_tokens_are_added_as_special_tokens(tiny_release):
    tok = load_pretrained_text_only_llava_tokenizer(tiny_release.model_base)
    assert modify_tokenizer_for_image_input(tok, mm_use_im_start_end=True, mm_use_im_patch_token=True) == 3
    ids = tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
    assert ids == [384, 385, 386]
    assert tok("a <im_start> b", add_special_tokens=False).input_ids.count(385) == 1


def test_tokenizer_image_token_historical_layout(tiny_release):
    tok = load_pretrained_text_only_llava_tokenizer(tiny_release.model_base)
    prompt = "USER: <image>. Is there edema? ASSISTANT:"
    ids = tokenizer_image_token(prompt, tok)
    before, after = prompt.split("<image>")
    expected = tok(before).input_ids + [IMAGE_TOKEN_INDEX] + tok(after).input_ids[1:]
    assert ids == expected
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    tensor = tokenizer_image_token("<image> and <image>", tok, return_tensors="pt")
    assert isinstance(tensor, torch.Tensor) and int((tensor == IMAGE_TOKEN_INDEX).sum()) == 2
    assert tensor[0] == tok.bos_token_id
