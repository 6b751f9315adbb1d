"""SFT data: JSONL loading, token ids, label policies, image expansion, truncation, collation.

Expected labels are written out from token pieces inspected on the tiny tokenizer (384-piece
sentencepiece BPE, digits split), e.g. " yes</s>" -> ["▁", "y", "es", "</s>"], never computed with
the module's own helpers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radialog_rl.data.datasets import (
    LABEL_POLICIES,
    SFTCollator,
    SFTDataset,
    SFTExample,
    load_sft_jsonl,
    tokenize_conversation,
)
from radialog_rl.data.prompts import SYSTEM_PROMPT, render_conversation, report_prompt
from radialog_rl.errors import ConfigError, DataError
from radialog_rl.loading.tokenizer import (
    load_pretrained_text_only_llava_tokenizer,
    tokenizer_image_token,
)

IGN = -100
IMG = -200
N_IMG = 5  # image positions per image in these tests (the tiny model's count does not matter here)
CROP, RESIZE = 16, 20

# Hand-inspected pieces of the tiny tokenizer.
YES = ["▁", "y", "es", "</s>"]  # " yes</s>"
NO = ["▁no", "</s>"]  # " no</s>"
# 'USER: and? ASSISTANT:' right after a '</s>' (no leading space in the template there)
USER_AND = ["U", "S", "E", "R", ":", "▁and", "?", "▁A", "S", "S", "I", "S", "T", "A", "N", "T", ":"]
CONF_KEY = ["▁", "{", '"', "c", "on", "f", "id", "ence", '"', ":", "▁"]  # ' {"confidence": '


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from radialog_rl.testing.tiny import make_tiny_release

    release = make_tiny_release(tmp_path_factory.mktemp("tiny-release-datasets"))
    return load_pretrained_text_only_llava_tokenizer(release.model_base)


def ids_of(tok, pieces: list[str]) -> list[int]:
    out = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in out, pieces  # a typo in a piece would silently become <unk>
    return out


def prompt_ids(tok, user: str) -> list[int]:
    """Ids of ``SYSTEM USER: {user} ASSISTANT:`` (everything before the first reply)."""
    return tokenizer_image_token(f"{SYSTEM_PROMPT} USER: {user} ASSISTANT:", tok)


def write_png(path: Path, value: int = 100, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(size[::-1], value, dtype=np.uint8)
    array[0, 0] = 0  # not constant, so the min-max stretch has a range
    Image.fromarray(array).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def example(tmp_path: Path, turns, prior: bool = False, source: str = "") -> SFTExample:
    image = write_png(tmp_path / "x.png")
    prior_image = write_png(tmp_path / "prior.png", value=50) if prior else None
    return SFTExample(image=image, turns=tuple(turns), prior_image=prior_image, source=source)


# --------------------------------------------------------------------------------------------------
# tokenize_conversation: ids equal tokenizer_image_token, labels per policy
# --------------------------------------------------------------------------------------------------


def test_single_turn_ids_and_assistant_labels(tok):
    turns = [("user", "<image>\nhi"), ("assistant", "yes")]
    ids, labels = tokenize_conversation(turns, tok)

    text = render_conversation(turns)
    assert text == f"{SYSTEM_PROMPT} USER: <image>\nhi ASSISTANT: yes</s>"
    assert ids == tokenizer_image_token(text, tok)
    prefix = prompt_ids(tok, "<image>\nhi")
    reply = ids_of(tok, YES)
    assert ids == prefix + reply
    assert ids.count(IMG) == 1 and ids[0] == tok.bos_token_id
    assert labels == [IGN] * len(prefix) + reply


def test_multi_turn_ids_and_assistant_labels(tok):
    turns = [("user", "<image>\nhi"), ("assistant", "yes"), ("user", "and?"), ("assistant", "no")]
    ids, labels = tokenize_conversation(turns, tok)

    text = render_conversation(turns)
    assert text.endswith(" ASSISTANT: yes</s>USER: and? ASSISTANT: no</s>")
    assert ids == tokenizer_image_token(text, tok)
    prefix = prompt_ids(tok, "<image>\nhi")
    assert ids == prefix + ids_of(tok, YES) + ids_of(tok, USER_AND) + ids_of(tok, NO)
    # Both replies (with their </s>) are supervised; the user turn between them is not.
    assert labels == (
        [IGN] * len(prefix) + ids_of(tok, YES) + [IGN] * len(USER_AND) + ids_of(tok, NO)
    )


def test_report_prompt_ids_match_tokenizer_image_token(tok):
    # The real RaDialog prompt puts text right after <image> ("<image>. Predicted ..."): the second
    # chunk is tokenized on its own, BOS dropped, exactly as tokenizer_image_token does.
    turns = [("user", report_prompt(["Edema"])), ("assistant", "Mild edema.")]
    ids, labels = tokenize_conversation(turns, tok)
    assert ids == tokenizer_image_token(render_conversation(turns), tok)
    prefix = prompt_ids(tok, report_prompt(["Edema"]))
    assert ids[: len(prefix)] == prefix
    assert labels == [IGN] * len(prefix) + ids[len(prefix):]
    assert ids[-1] == tok.eos_token_id


def test_policy_all_ignores_only_bos_and_image(tok):
    turns = [("user", "<image>\nhi"), ("assistant", "yes"), ("user", "and?"), ("assistant", "no")]
    ids, labels = tokenize_conversation(turns, tok, label_policy="all")
    assert ids[0] == tok.bos_token_id
    at = ids.index(IMG)
    expected = list(ids)
    expected[0] = IGN  # BOS: nothing predicts it
    expected[at] = IGN  # image placeholder
    assert labels == expected


def test_all_but_confidence_value_masks_single_digit(tok):
    turns = [("user", "<image>\nhi"), ("assistant", 'yes {"confidence": 7}')]
    ids, labels = tokenize_conversation(turns, tok, label_policy="all_but_confidence_value")
    reply = ["▁", "y", "es"] + CONF_KEY + ["7", "}", "</s>"]
    assert ids[-len(reply):] == ids_of(tok, reply)
    expected_tail = ids_of(tok, reply)
    expected_tail[reply.index("7")] = IGN  # only the digit; braces, key, colon stay
    n_prefix = len(ids) - len(reply)
    prefix_labels = [IGN] + [IGN if i == IMG else i for i in ids[1:n_prefix]]  # BOS, image ignored
    assert labels == prefix_labels + expected_tail


def test_all_but_confidence_value_masks_two_digits_in_every_reply(tok):
    turns = [
        ("user", "<image>\nhi"),
        ("assistant", 'yes {"confidence": 10}'),
        ("user", "and?"),
        ("assistant", 'no {"confidence": 3}'),
    ]
    _, labels_all = tokenize_conversation(turns, tok, label_policy="all")
    ids, labels = tokenize_conversation(turns, tok, label_policy="all_but_confidence_value")
    reply2 = ["▁no"] + CONF_KEY + ["3", "}", "</s>"]
    reply1 = ["▁", "y", "es"] + CONF_KEY + ["1", "0", "}", "</s>"]
    tail = reply1 + USER_AND + reply2
    assert ids[-len(tail):] == ids_of(tok, tail)
    start = len(ids) - len(tail)
    masked = {start + len(["▁", "y", "es"] + CONF_KEY) + k for k in (0, 1)}  # "1", "0"
    masked.add(start + len(reply1) + len(USER_AND) + len(["▁no"] + CONF_KEY))  # "3"
    assert [ids[p] for p in sorted(masked)] == ids_of(tok, ["1", "0", "3"])
    assert labels == [IGN if p in masked else v for p, v in enumerate(labels_all)]


def test_assistant_but_confidence_value(tok):
    turns = [("user", "<image>\nhi"), ("assistant", 'yes {"confidence": 7}')]
    ids, labels = tokenize_conversation(turns, tok, label_policy="assistant_but_confidence_value")
    reply = ["▁", "y", "es"] + CONF_KEY + ["7", "}", "</s>"]
    expected_tail = ids_of(tok, reply)
    expected_tail[reply.index("7")] = IGN
    assert labels == [IGN] * (len(ids) - len(reply)) + expected_tail


@pytest.mark.parametrize("reply", ["yes Confidence: 7", "yes {'confidence': '7'}", 'yes "confidence": 7'])
def test_every_statement_the_reward_parses_has_its_digits_masked(tok, reply):
    """One pattern owns the confidence statement: what the reward reads is what SFT masks."""
    from radialog_rl.calibration.parsing import parse_confidence

    assert parse_confidence(reply) == 7
    turns = [("user", "<image>\nhi"), ("assistant", reply)]
    ids, labels = tokenize_conversation(turns, tok, label_policy="assistant_but_confidence_value")
    seven = tok.convert_tokens_to_ids("7")
    assert seven in ids and labels[len(ids) - 1 - ids[::-1].index(seven)] == IGN
    assert sum(label == IGN for label in labels[-6:]) == 1  # only the digit among the reply's tail


def test_shipped_format_recipes_supervise_the_digit_position():
    """``*_but_confidence_value`` leaves the digit without gradient (no digits on a fresh model):
    the shipped format-SFT configs must use ``assistant`` with random targets instead."""
    import yaml

    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("sft_radialog.yaml", "calibration_sft.yaml"):
        policy = yaml.safe_load((configs / name).read_text())["label_policy"]
        assert policy == "assistant", name


def test_confidence_in_user_turn_is_not_masked(tok):
    # Only the model's stated value (assistant replies) is masked; a prompt example stays text.
    turns = [("user", '<image>\nreply like {"confidence": 5}'), ("assistant", "yes")]
    ids, labels = tokenize_conversation(turns, tok, label_policy="all_but_confidence_value")
    five = tok.convert_tokens_to_ids("5")
    assert five in ids and labels[ids.index(five)] == five


def test_unknown_policy(tok):
    with pytest.raises(ConfigError, match="label_policy"):
        tokenize_conversation([("user", "<image>"), ("assistant", "x")], tok, label_policy="some")
    assert "assistant" in LABEL_POLICIES and "all_but_confidence_value" in LABEL_POLICIES


# --------------------------------------------------------------------------------------------------
# SFTDataset: expanded image positions, images, truncation
# --------------------------------------------------------------------------------------------------


def test_dataset_item_expands_image_positions(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")])
    ds = SFTDataset([ex], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE)
    item = ds[0]
    assert set(item) == {"input_ids", "labels", "image"}

    prefix = prompt_ids(tok, "<image>\nhi")
    at = prefix.index(IMG)
    expected_ids = prefix[:at] + [IMG] * N_IMG + prefix[at + 1 :] + ids_of(tok, YES)
    expected_labels = [IGN] * (len(prefix) - 1 + N_IMG) + ids_of(tok, YES)
    assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
    assert item["input_ids"].tolist() == expected_ids
    assert item["labels"].tolist() == expected_labels
    assert (item["input_ids"] == IMG).sum() == N_IMG
    assert (item["labels"][item["input_ids"] == IMG] == IGN).all()
    assert item["image"].shape == (3, CROP, CROP) and item["image"].dtype == torch.float32


def test_dataset_all_policy_image_positions_ignored(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")])
    item = SFTDataset([ex], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE,
                      label_policy="all")[0]
    ids, labels = item["input_ids"], item["labels"]
    image = ids == IMG
    assert image.sum() == N_IMG
    assert (labels[image] == IGN).all()
    assert labels[0] == IGN  # BOS
    assert torch.equal(labels[1:][~image[1:]], ids[1:][~image[1:]])


def test_dataset_prior_image(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], prior=True)
    item = SFTDataset([ex], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE)[0]
    assert item["prior_image"].shape == (3, CROP, CROP)


def test_dataset_rejects_mixed_prior_images(tok, tmp_path):
    a = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], prior=True)
    b = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "no")], source="d.jsonl line 2")
    with pytest.raises(DataError, match="d.jsonl line 2"):
        SFTDataset([a, b], tok, num_image_tokens=N_IMG)


def test_dataset_inserts_image_and_normalises_roles_of_built_examples(tok, tmp_path):
    ex = example(tmp_path, [("human", "hi"), ("gpt", "yes")])
    item = SFTDataset([ex], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE)[0]
    prefix = prompt_ids(tok, "<image>\nhi")
    assert len(item["input_ids"]) == len(prefix) - 1 + N_IMG + len(YES)


def test_truncation_warns_and_names_row(tok, tmp_path, caplog):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], source="t.jsonl line 4")
    full = len(prompt_ids(tok, "<image>\nhi")) - 1 + N_IMG + len(YES)
    with caplog.at_level(logging.WARNING, logger="radialog_rl.data.datasets"):
        ds = SFTDataset([ex], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE,
                        max_length=full - 2)
    assert "t.jsonl line 4" in caplog.text and "truncated" in caplog.text
    item = ds[0]
    assert len(item["input_ids"]) == len(item["labels"]) == full - 2
    # Cut from the right: the last two reply tokens ("es", "</s>") are gone.
    assert item["labels"].tolist()[-2:] == ids_of(tok, ["▁", "y"])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radialog_rl.data.datasets"):
        SFTDataset([ex], tok, num_image_tokens=N_IMG, max_length=full)
    assert caplog.text == ""  # exactly max_length: no truncation


def test_overflow_error_names_row(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], source="t.jsonl line 4")
    with pytest.raises(DataError, match=r"t\.jsonl line 4.*max_length 10"):
        SFTDataset([ex], tok, num_image_tokens=N_IMG, max_length=10, overflow="error")


def test_truncation_never_cuts_image_positions(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], source="t.jsonl line 4")
    image_end = len(tokenizer_image_token(f"{SYSTEM_PROMPT} USER: ", tok)) + N_IMG
    with pytest.raises(DataError, match=r"t\.jsonl line 4.*image positions"):
        SFTDataset([ex], tok, num_image_tokens=N_IMG, max_length=image_end - 1)


def test_dataset_rejects_bad_options(tok, tmp_path):
    ex = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")])
    with pytest.raises(ConfigError, match="overflow"):
        SFTDataset([ex], tok, num_image_tokens=N_IMG, overflow="drop")
    with pytest.raises(ConfigError, match="num_image_tokens"):
        SFTDataset([ex], tok, num_image_tokens=0)
    with pytest.raises(ConfigError, match="label_policy"):
        SFTDataset([ex], tok, num_image_tokens=N_IMG, label_policy="none")


# --------------------------------------------------------------------------------------------------
# SFTCollator
# --------------------------------------------------------------------------------------------------


def _two_items(tok, tmp_path, prior=False):
    short = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "no")], prior=prior)
    long = example(tmp_path, [("user", "<image>\nhi"), ("assistant", "yes")], prior=prior)
    ds = SFTDataset([short, long], tok, num_image_tokens=N_IMG, image_size=CROP, resize=RESIZE)
    return ds[0], ds[1]


def test_collator_right_padding(tok, tmp_path):
    a, b = _two_items(tok, tmp_path)
    assert len(b["input_ids"]) == len(a["input_ids"]) + 2  # " yes</s>" is 4 pieces, " no</s>" 2
    batch = SFTCollator(tok.pad_token_id)([a, b])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "images"}
    n, width = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == a["input_ids"].tolist() + [tok.pad_token_id] * 2
    assert batch["labels"][0].tolist() == a["labels"].tolist() + [IGN, IGN]
    assert batch["attention_mask"][0].tolist() == [1] * n + [0, 0]
    assert batch["attention_mask"][1].tolist() == [1] * width
    assert torch.equal(batch["labels"][1], b["labels"])
    assert batch["images"].shape == (2, 3, CROP, CROP)
    assert ((batch["input_ids"] == IMG).sum(dim=1) == N_IMG).all()
    assert (batch["labels"][batch["input_ids"] == IMG] == IGN).all()


def test_collator_left_padding_and_priors(tok, tmp_path):
    a, b = _two_items(tok, tmp_path, prior=True)
    batch = SFTCollator(tok.pad_token_id, padding_side="left")([a, b])
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * 2 + a["input_ids"].tolist()
    assert batch["labels"][0].tolist()[:2] == [IGN, IGN]
    assert batch["attention_mask"][0].tolist()[:3] == [0, 0, 1]
    assert batch["prior_images"].shape == (2, 3, CROP, CROP)


def test_collator_rejects_some_priors(tok, tmp_path):
    a, b = _two_items(tok, tmp_path, prior=True)
    del b["prior_image"]
    with pytest.raises(DataError, match="prior_image"):
        SFTCollator(tok.pad_token_id)([a, b])
    with pytest.raises(ConfigError):
        SFTCollator(tok.pad_token_id, padding_side="middle")


# --------------------------------------------------------------------------------------------------
# load_sft_jsonl
# --------------------------------------------------------------------------------------------------


def test_load_formats_and_relative_paths(tmp_path, tok):
    write_png(tmp_path / "imgs" / "a.png")
    write_png(tmp_path / "imgs" / "a0.png")
    abs_b = write_png(tmp_path / "elsewhere" / "b.png")
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"image": "imgs/a.png", "prior_image": "imgs/a0.png", "findings": ["Edema"],
         "conversations": [{"from": "human", "value": "<image>\nIs there edema?"},
                           {"from": "gpt", "value": 'yes {"confidence": 7}'}]},
        "",  # blank lines are skipped but still counted
        {"image": str(abs_b), "prompt": "Is there edema?", "target": "no",
         "findings": "Edema, Cardiomegaly"},
        {"image": "imgs/a.png", "target": "Mild edema.", "findings": ["Edema"]},
        {"image": "imgs/a.png",
         "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                           {"role": "user", "content": "more?"}, {"role": "assistant", "content": "y"}]},
    ])
    rows = load_sft_jsonl(path)
    assert len(rows) == 4
    first, second, third, fourth = rows
    assert first.image == tmp_path / "imgs" / "a.png" and first.prior_image == tmp_path / "imgs" / "a0.png"
    assert first.turns == (("user", "<image>\nIs there edema?"), ("assistant", 'yes {"confidence": 7}'))
    assert first.findings == ("Edema",) and first.source == "train.jsonl line 1"
    # <image> absent from the prompt: inserted at the start with LLaVA's "\n"
    assert second.image == abs_b and second.prior_image is None and second.source == "train.jsonl line 3"
    assert second.turns == (("user", "<image>\nIs there edema?"), ("assistant", "no"))
    assert second.findings == ("Edema", "Cardiomegaly")
    # no prompt: RaDialog's report prompt from the findings (already holds <image>)
    assert third.turns == (("user", report_prompt(["Edema"])), ("assistant", "Mild edema."))
    assert [r for r, _ in fourth.turns] == ["user", "assistant", "user", "assistant"]
    assert fourth.turns[0] == ("user", "<image>\nhi")


def test_load_relative_to_jsonl_folder_not_cwd(tmp_path, monkeypatch):
    write_png(tmp_path / "data" / "a.png")
    path = write_jsonl(tmp_path / "data" / "d.jsonl", [{"image": "a.png", "target": "x"}])
    monkeypatch.chdir(tmp_path)
    (row,) = load_sft_jsonl("data/d.jsonl")
    assert row.image.is_absolute() and row.image == (tmp_path / "data" / "a.png")


@pytest.mark.parametrize("row, message", [
    ('{"image": "a.png", "target": ', "invalid JSON"),
    ({"target": "x"}, "missing 'image'"),
    ({"image": "a.png", "target": "  "}, "empty 'target'"),
    ({"image": "a.png", "prompt": "hi"}, "empty 'target'"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                          {"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                          {"from": "human", "value": "x"}]}, "alternates"),
    ({"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}, "starts with the user"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"},
                                          {"from": "human", "value": "more"}]}, "end with an assistant"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                          {"from": "gpt", "value": ""}]}, "empty assistant reply"),
    ({"image": "a.png", "prompt": "<image> <image>", "target": "x"}, "exactly one"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"},
                                          {"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": "y"}]}, "only the first user turn"),
    ({"image": "a.png", "prompt": "hi", "target": "x", "conversations": []}, "not both"),
    ([1, 2], "JSON object"),
])
def test_bad_row_names_line(tmp_path, row, message):
    write_png(tmp_path / "a.png")
    good = {"image": "a.png", "target": "fine"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, row])
    with pytest.raises(DataError) as info:
        load_sft_jsonl(path)
    text = str(info.value)
    assert "line 3:" in text and message in text
    assert "line 1" not in text and "line 2" not in text


def test_bad_rows_are_collected_and_listed(tmp_path):
    write_png(tmp_path / "a.png")
    bad = {"image": "a.png", "target": ""}
    good = {"image": "a.png", "target": "fine"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, "{oops", good] + [bad] * 5)
    with pytest.raises(DataError) as info:
        load_sft_jsonl(path)
    text = str(info.value)
    assert "7 bad row(s)" in text
    for number in (2, 3, 5, 6, 7):
        assert f"line {number}:" in text
    assert "line 8:" not in text and "and 2 more" in text


def test_missing_image_names_row_and_path(tmp_path):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "a.png", "target": "x"},
        {"image": "sub/missing.png", "target": "x"},
        {"image": "a.png", "prior_image": "gone.png", "target": "x"},
    ])
    with pytest.raises(DataError) as info:
        load_sft_jsonl(path)
    text = str(info.value)
    assert f"line 2: image file not found: {tmp_path / 'sub' / 'missing.png'}" in text
    assert f"line 3: prior_image file not found: {tmp_path / 'gone.png'}" in text


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_sft_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_sft_jsonl(tmp_path / "empty.jsonl")


def test_jsonl_to_batch_end_to_end(tmp_path, tok):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "a.png", "prompt": "hi", "target": 'yes {"confidence": 7}'},
        {"image": "a.png", "prompt": "hi", "target": 'no {"confidence": 10}'},
    ])
    ds = SFTDataset(load_sft_jsonl(path), tok, num_image_tokens=N_IMG, image_size=CROP,
                    resize=RESIZE, label_policy="all_but_confidence_value")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=SFTCollator(tok.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and batch["images"].shape == (2, 3, CROP, CROP)
    digits = set(ids_of(tok, ["7", "1", "0"]))
    for row_ids, row_labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        for i, label in zip(row_ids, row_labels):
            if i in digits:
                assert label == IGN


def test_pad_rows_left_and_right_with_masks():
    from radialog_rl.padding import pad_rows

    rows = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    right, right_mask = pad_rows(rows, 0)
    left, left_mask = pad_rows(rows, -1, side="left")
    assert right.tolist() == [[1, 2, 3], [4, 0, 0]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left.tolist() == [[1, 2, 3], [-1, -1, 4]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[5, 6], [7]], 9, dtype=torch.int32)
    assert ids.dtype == torch.int32 and ids.tolist() == [[5, 6], [7, 9]] and mask.dtype == torch.long
    with pytest.raises(ConfigError, match="left' or 'right"):
        pad_rows(rows, 0, side="middle")
    with pytest.raises(ConfigError, match="empty"):
        pad_rows([], 0)
