"""Supervised fine-tuning data: JSONL rows, token ids with label masks, and the batch collator.

* :func:`load_sft_jsonl` reads rows into :class:`SFTExample` (validated, image files checked).
* :func:`tokenize_conversation` renders a conversation with RaDialog's template and returns LLaVA's
  historical ids (one -200 per ``<image>``) plus labels under a :data:`LABEL_POLICIES` policy.
* :class:`SFTDataset` yields ``input_ids``/``labels`` with the image placeholder already expanded to
  ``num_image_tokens`` positions, and the preprocessed image(s).
* :class:`SFTCollator` pads items into a batch.

How label boundaries are found: the whole rendered conversation is tokenized once, chunk by chunk
at ``<image>`` exactly as :func:`~radialog_rl.loading.tokenizer.tokenizer_image_token` does (so the
ids are identical to it), with ``return_offsets_mapping=True``. A token is supervised when its
character span overlaps an assistant reply span. Tokenizing turn by turn instead would not give the
same ids: sentencepiece puts a dummy-prefix ``▁`` on each piece and may merge across the boundary.
This needs a fast (tokenizers-backed) tokenizer, which ``AutoTokenizer`` gives for LLaMA.

JSONL row format (one JSON object per line; blank lines are skipped)::

    {"image": "imgs/a.png", "prior_image": "imgs/a0.png", "findings": ["Edema"],
     "conversations": [{"from": "human", "value": "<image>\\nIs there edema?"},
                       {"from": "gpt", "value": "yes {\\"confidence\\": 7}"}]}
    {"image": "/abs/b.png", "prompt": "Is there edema?", "target": "no {\\"confidence\\": 3}"}
    {"image": "c.png", "findings": "Edema, Cardiomegaly", "target": "Mild edema."}

``conversations`` uses LLaVA's keys (``from``/``value``; ``role``/``content`` also accepted) with
roles ``human``/``user`` and ``gpt``/``assistant``; it must start with a user turn, alternate and end
with an assistant turn. ``prompt`` + ``target`` is one exchange; without ``prompt`` the RaDialog
report prompt is built from ``findings`` (:func:`~radialog_rl.data.prompts.report_prompt`).
Relative image paths are resolved against the JSONL file's folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from radialog_rl.calibration.parsing import CONFIDENCE_PATTERN
from radialog_rl.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from radialog_rl.data.images import DEFAULT_CROP, DEFAULT_RESIZE, load_chest_xray
from radialog_rl.data.prompts import EOS_TEXT, SYSTEM_PROMPT, render_conversation, report_prompt
from radialog_rl.data.rows import RowErrors, jsonl_objects, require_file
from radialog_rl.errors import ConfigError, DataError, ImageError
from radialog_rl.padding import PADDING_SIDES, pad_rows

__all__ = [
    "LABEL_POLICIES",
    "SFTCollator",
    "SFTDataset",
    "SFTExample",
    "load_sft_jsonl",
    "tokenize_conversation",
]

logger = logging.getLogger(__name__)

#: How labels are set; image positions and padding are -100 under every policy.
#:
#: * ``assistant``: only the assistant replies, each with the space that follows ``ASSISTANT:`` and
#:   its closing ``</s>`` (what the model generates after a ``... ASSISTANT:`` prompt).
#: * ``all``: every text token except the leading BOS (nothing predicts it: it is never a target).
#: * ``all_but_confidence_value``: as ``all``, but the tokens carrying the number ``N`` of each
#:   confidence statement in an assistant reply (every form the reward parses:
#:   ``{"confidence": N}``, ``Confidence: N``, ...; one pattern,
#:   :data:`radialog_rl.calibration.parsing.CONFIDENCE_PATTERN`) are -100. Braces, key and colon
#:   stay supervised.
#: * ``assistant_but_confidence_value``: as ``assistant``, with the same digits masked.
#:
#: What the ``*_but_confidence_value`` policies are for, and what not: they leave the digit
#: position with no gradient at all, so the model keeps whatever it predicted there before SFT.
#: That suits a model that already writes numbers after ``"confidence":`` (and whose value
#: distribution should not be touched); on a model that never saw the format (the tiny release, a
#: fresh base) it produces no digits, every confidence fails to parse and PPO sees only the format
#: penalty. To teach the format from scratch use ``assistant`` with uniform random confidence
#: targets (Rewarding Doubt's recipe, ``configs/calibration_sft.yaml``): the digit position is
#: supervised towards the uniform distribution over values, which is what PPO should start from.
LABEL_POLICIES: tuple[str, ...] = (
    "assistant",
    "all",
    "all_but_confidence_value",
    "assistant_but_confidence_value",
)

#: What SFTDataset does with rows longer than max_length.
OVERFLOW_MODES = ("truncate", "error")
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")

@dataclass(frozen=True)
class SFTExample:
    """One supervised conversation about one chest X-ray.

    Attributes:
        image: the current image file (absolute once loaded from JSONL).
        turns: ``(role, text)`` pairs, role ``"user"`` or ``"assistant"``: user first, alternating,
            assistant last; ``<image>`` appears exactly once, in the first user turn.
        prior_image: the previous study for BioViL-T's temporal pooler, or None (RaDialog: None).
        findings: finding names from the row (metadata; used for the prompt only without one).
        source: where the row came from, e.g. ``"train.jsonl line 3"`` (used in messages).
    """

    image: Path
    turns: tuple[tuple[str, str], ...]
    prior_image: Path | None = None
    findings: tuple[str, ...] | None = None
    source: str = ""


# --------------------------------------------------------------------------------------------------
# Reading JSONL
# --------------------------------------------------------------------------------------------------


class _RowError(Exception):
    """A problem with one row; collected and reported together by :func:`load_sft_jsonl`."""


def _normalise_role(role: Any) -> str:
    role_l = role.strip().lower() if isinstance(role, str) else role
    if role_l in _USER_ROLES:
        return "user"
    if role_l in _ASSISTANT_ROLES:
        return "assistant"
    raise _RowError(f"unknown role {role!r} (use 'human'/'user' or 'gpt'/'assistant')")


def _check_turns(turns: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Validate a conversation, normalise roles to user/assistant, and put ``<image>`` at the start
    of the first user turn if absent.

    LLaVA's layout for an inserted placeholder is ``"<image>\\n" + text``.
    """
    if not turns:
        raise _RowError("empty conversation")
    out: list[tuple[str, str]] = []
    for i, (role, text) in enumerate(turns):
        try:
            role = _normalise_role(role)
        except _RowError as e:
            raise _RowError(f"turn {i + 1}: {e}") from None
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise _RowError(f"turn {i + 1} is {role!r} but {expected!r} was expected (a "
                            f"conversation starts with the user and alternates)")
        if not isinstance(text, str):
            raise _RowError(f"turn {i + 1} text must be a string, got {type(text).__name__}")
        if role == "assistant":
            if not text.strip():
                raise _RowError(f"turn {i + 1}: empty assistant reply (target)")
            if EOS_TEXT in text:
                # The template appends </s> itself; one inside the reply would end it early.
                raise _RowError(f"turn {i + 1}: assistant reply contains {EOS_TEXT!r}; drop it, "
                                f"the template adds it")
        count = text.count(DEFAULT_IMAGE_TOKEN)
        if i == 0:
            if count > 1:
                raise _RowError(f"the first user turn holds {count} {DEFAULT_IMAGE_TOKEN} "
                                f"placeholders; exactly one is allowed (one image per row)")
            if count == 0:
                text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
        elif count:
            raise _RowError(f"turn {i + 1} holds {DEFAULT_IMAGE_TOKEN}; only the first user turn "
                            f"may hold the image placeholder")
        out.append((role, text))
    if out[-1][0] != "assistant":
        raise _RowError("the conversation must end with an assistant turn")
    return tuple(out)


def _parse_findings(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(f.strip() for f in value.split(",") if f.strip())
    if isinstance(value, list) and all(isinstance(f, str) for f in value):
        return tuple(f.strip() for f in value if f.strip())
    raise _RowError("'findings' must be a list of strings or a comma-separated string")


def _parse_turns(row: Mapping[str, Any], findings: tuple[str, ...] | None) -> list[tuple[str, str]]:
    has_conv = "conversations" in row
    has_pair = "prompt" in row or "target" in row
    if has_conv and has_pair:
        raise _RowError("give either 'conversations' or 'prompt'/'target', not both")
    if has_conv:
        conv = row["conversations"]
        if not isinstance(conv, list):
            raise _RowError("'conversations' must be a list of {'from': ..., 'value': ...}")
        turns = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise _RowError(f"turn {i + 1} must be an object with 'from' and 'value'")
            role = turn.get("from", turn.get("role"))
            text = turn.get("value", turn.get("content"))
            if role is None or text is None:
                raise _RowError(f"turn {i + 1} needs 'from' (or 'role') and 'value' (or 'content')")
            turns.append((role, text))
        return turns
    target = row.get("target")
    if not isinstance(target, str) or not target.strip():
        raise _RowError("missing or empty 'target' (or give 'conversations')")
    prompt = row.get("prompt")
    if prompt is None:
        prompt = report_prompt(findings)
    elif not isinstance(prompt, str):
        raise _RowError("'prompt' must be a string")
    return [("user", prompt), ("assistant", target)]


def _resolve(value: Any, key: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _RowError(f"'{key}' must be a non-empty path string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _parse_row(row: Any, source: str, base_dir: Path) -> SFTExample:
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    if "image" not in row:
        raise _RowError("missing 'image'")
    image = _resolve(row["image"], "image", base_dir)
    prior = row.get("prior_image")
    prior_image = None if prior is None else _resolve(prior, "prior_image", base_dir)
    findings = _parse_findings(row.get("findings"))
    turns = _check_turns(_parse_turns(row, findings))
    for key, path in (("image", image), ("prior_image", prior_image)):
        # Cheap existence check now, so a typo fails before training rather than mid-epoch.
        if path is not None and not path.exists():
            raise _RowError(f"{key} file not found: {path} (relative paths are resolved against "
                            f"{base_dir})")
    return SFTExample(image=image, turns=turns, prior_image=prior_image, findings=findings,
                      source=source)


def load_sft_jsonl(path: str | os.PathLike[str]) -> list[SFTExample]:
    """Read an SFT JSONL file (format in the module docstring).

    Returns:
        One :class:`SFTExample` per non-blank line, in file order.

    Raises:
        DataError: the file is missing or empty, or some rows are bad (invalid JSON, no image, empty
            target, unknown role, a conversation that does not alternate or end with the assistant,
            a missing image file). All rows are checked; the message lists the first few bad ones
            by line number.
    """
    path = require_file(path, "SFT data file")
    base_dir = path.resolve().parent
    examples: list[SFTExample] = []
    errors = RowErrors(path)
    for row in jsonl_objects(path, errors):
        try:
            examples.append(_parse_row(row.data, row.source, base_dir))
        except _RowError as e:
            errors.add(row.number, str(e))
    errors.raise_if_any()
    if not examples:
        raise DataError(f"{path} holds no rows")
    logger.debug("read %d SFT examples from %s", len(examples), path)  # run_sft logs the counts once
    return examples


# --------------------------------------------------------------------------------------------------
# Tokenization and labels
# --------------------------------------------------------------------------------------------------


def _reply_spans(turns: Sequence[tuple[str, str]], system: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered text and, per assistant turn, ``(span_start, text_start, span_end)``.

    The span runs from the space after ``ASSISTANT:`` through the closing ``</s>``; ``text_start``
    is where the reply text itself begins. Found by rendering growing prefixes of the conversation
    (the template is prefix-stable), so no knowledge of the template's separators is duplicated.
    """
    spans = []
    for i, (role, text) in enumerate(turns):
        if role == "assistant":
            end = len(render_conversation(turns[: i + 1], system))
            text_start = end - len(EOS_TEXT) - len(text)
            spans.append((text_start - 1, text_start, end))
    full = render_conversation(turns, system)
    for start, text_start, end in spans:  # guards the prefix-stability assumption above
        if full[start] != " " or not full[text_start:end].endswith(EOS_TEXT):
            raise AssertionError("render_conversation is not prefix-stable; fix _reply_spans")
    return full, spans


def _tokenize_with_offsets(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """``tokenizer_image_token``'s ids for ``text`` plus each token's character span in ``text``.

    Image placeholders and the BOS get empty spans.
    """
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((pos, pos))
            pos += len(DEFAULT_IMAGE_TOKEN)
        try:
            enc = tokenizer(chunk, return_offsets_mapping=True)
        except NotImplementedError as e:
            raise ConfigError("SFT tokenization needs a fast (tokenizers-backed) tokenizer for "
                              "character offsets; load it with AutoTokenizer (use_fast)") from e
        chunk_ids, chunk_off = list(enc["input_ids"]), list(enc["offset_mapping"])
        if chunk_ids and chunk_ids[0] == bos:
            # Same rule as tokenizer_image_token: only the first chunk keeps its BOS.
            if i == 0:
                ids.append(bos)
                offsets.append((0, 0))
            chunk_ids, chunk_off = chunk_ids[1:], chunk_off[1:]
        ids.extend(chunk_ids)
        offsets.extend((pos + s, pos + e) for s, e in chunk_off)
        pos += len(chunk)
    return ids, offsets


def _check_policy(label_policy: str) -> None:
    if label_policy not in LABEL_POLICIES:
        raise ConfigError(f"unknown label_policy {label_policy!r}; use one of "
                          f"{', '.join(LABEL_POLICIES)}")


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer,
    *,
    label_policy: str = "assistant",
    system: str = SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a finished conversation rendered with RaDialog's template.

    Args:
        turns: ``(role, text)`` pairs as in :class:`SFTExample` (already validated).
        tokenizer: a fast LLaMA tokenizer (BOS added by the tokenizer, as LLaVA's is).
        label_policy: one of :data:`LABEL_POLICIES`.
        system: the system prompt.

    Returns:
        ``(input_ids, labels)``, both length ``T``; ``input_ids`` equals
        ``tokenizer_image_token(render_conversation(turns, system), tokenizer)`` (a single -200 per
        ``<image>``, not yet expanded). Unsupervised positions (and the -200) have label -100.
    """
    _check_policy(label_policy)
    text, spans = _reply_spans(turns, system)
    ids, offsets = _tokenize_with_offsets(text, tokenizer)

    def overlaps(s: int, e: int, ranges: list[tuple[int, int]]) -> bool:
        return e > s and any(s < r_end and e > r_start for r_start, r_end in ranges)

    if label_policy.startswith("assistant"):
        supervised = [overlaps(s, e, [(a, b) for a, _, b in spans]) for s, e in offsets]
    else:
        # Every token but the image placeholder and the leading BOS (only position 0 can hold it).
        supervised = [i != IMAGE_TOKEN_INDEX for i in ids]
        if ids and ids[0] == tokenizer.bos_token_id:
            supervised[0] = False
    if label_policy.endswith("_but_confidence_value"):
        digits = [
            (m.start("value"), m.end("value"))
            for _, text_start, end in spans
            for m in CONFIDENCE_PATTERN.finditer(text, text_start, end)
        ]
        supervised = [sup and not overlaps(s, e, digits) for sup, (s, e) in zip(supervised, offsets)]
    labels = [i if sup else IGNORE_INDEX for i, sup in zip(ids, supervised)]
    return ids, labels


# --------------------------------------------------------------------------------------------------
# Dataset and collator
# --------------------------------------------------------------------------------------------------


class SFTDataset(Dataset):
    """Tokenized SFT examples with images loaded on access.

    Text is tokenized once here (so overflow errors and truncation warnings come before training);
    images are read in ``__getitem__``.

    Each item is a dict:
        * ``input_ids``: LongTensor ``[T]``, the image placeholder already expanded to
          ``num_image_tokens`` consecutive -200 positions;
        * ``labels``: LongTensor ``[T]``, -100 where not supervised (always on image positions);
        * ``image``: float32 ``[3, image_size, image_size]`` in [0, 1];
        * ``prior_image``: same shape, only when the example has one.

    ``T`` counts the expanded sequence and is at most ``max_length``. With ``overflow="truncate"``
    longer rows are cut from the right (a warning names the row); with ``"error"`` they raise
    :class:`DataError`. A row is never cut inside its image positions (that raises instead).
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        tokenizer,
        *,
        num_image_tokens: int,
        image_size: int = DEFAULT_CROP,
        resize: int = DEFAULT_RESIZE,
        label_policy: str = "assistant",
        max_length: int | None = None,
        overflow: str = "truncate",
        system: str = SYSTEM_PROMPT,
    ) -> None:
        _check_policy(label_policy)
        if overflow not in OVERFLOW_MODES:
            raise ConfigError(f"unknown overflow {overflow!r}; use 'truncate' or 'error'")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ConfigError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ConfigError(f"max_length must be a positive integer or None, got {max_length!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("SFTDataset needs a fast (tokenizers-backed) tokenizer for character "
                              "offsets; load it with AutoTokenizer (use_fast)")
        with_prior = sum(ex.prior_image is not None for ex in examples)
        if 0 < with_prior < len(examples):
            # Batches must be all-or-none (BioViL-T takes a prior for every image or for none);
            # failing here beats failing at a random batch mid-epoch.
            lacking = next(_name(ex, i) for i, ex in enumerate(examples) if ex.prior_image is None)
            raise DataError(f"{with_prior} of {len(examples)} examples have a prior_image but not "
                            f"all (e.g. {lacking}); give one on every row or on none")
        self.examples = list(examples)
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.resize = resize
        self.label_policy = label_policy
        self.max_length = max_length
        self.overflow = overflow
        self._encoded = [self._encode(ex, i, tokenizer, system) for i, ex in enumerate(self.examples)]

    def _encode(self, example: SFTExample, index: int, tokenizer, system: str):
        name = _name(example, index)
        try:
            turns = _check_turns(example.turns)
        except _RowError as e:
            raise DataError(f"{name}: {e}") from e
        ids, labels = tokenize_conversation(turns, tokenizer, label_policy=self.label_policy, system=system)
        # Expand the single placeholder here so lengths and truncation count real positions.
        at = ids.index(IMAGE_TOKEN_INDEX)
        n = self.num_image_tokens
        ids = ids[:at] + [IMAGE_TOKEN_INDEX] * n + ids[at + 1 :]
        labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
        if self.max_length is not None and len(ids) > self.max_length:
            what = (f"{name}: {len(ids)} tokens ({n} image positions + {len(ids) - n} text) exceed "
                    f"max_length {self.max_length}")
            if self.overflow == "error":
                raise DataError(f"{what}; shorten the row, raise max_length or use overflow='truncate'")
            if at + n > self.max_length:
                raise DataError(f"{what}, and truncating would cut into the image positions; "
                                f"shorten the prompt or raise max_length")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            left = sum(label != IGNORE_INDEX for label in labels)
            logger.warning("%s; truncated from the right (%d supervised tokens left%s)", what, left,
                           ": this row teaches nothing" if left == 0 else "")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.examples)

    def _image(self, path: Path, index: int) -> torch.Tensor:
        try:
            return load_chest_xray(path, resize=self.resize, crop=self.image_size)
        except ImageError as e:
            raise ImageError(f"{_name(self.examples[index], index)}: {e}") from e

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        input_ids, labels = self._encoded[index]
        item = {
            "input_ids": input_ids.clone(),
            "labels": labels.clone(),
            "image": self._image(example.image, index),
        }
        if example.prior_image is not None:
            item["prior_image"] = self._image(example.prior_image, index)
        return item


def _name(example: SFTExample, index: int) -> str:
    return example.source or f"example {index}"


class SFTCollator:
    """Pads :class:`SFTDataset` items into a batch.

    Returns a dict:
        * ``input_ids``: ``[B, T]`` padded with ``pad_token_id`` (T = longest item);
        * ``attention_mask``: ``[B, T]``, 1 on tokens and image positions, 0 on padding;
        * ``labels``: ``[B, T]``, -100 on padding;
        * ``images``: ``[B, 3, H, W]``;
        * ``prior_images``: ``[B, 3, H, W]``, only when every item has one (some but not all is a
          :class:`DataError`: BioViL-T takes a prior for the whole batch or none).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if pad_token_id is None:
            raise ConfigError("pad_token_id is None; RaDialog pads with eos (tokenizer.pad_token = "
                              "tokenizer.eos_token)")
        if padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise DataError("cannot collate an empty batch")
        side = self.padding_side
        input_ids, attention_mask = pad_rows([item["input_ids"] for item in items], self.pad_token_id, side=side)
        labels, _ = pad_rows([item["labels"] for item in items], IGNORE_INDEX, side=side)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "images": torch.stack([item["image"] for item in items]),
        }
        with_prior = sum("prior_image" in item for item in items)
        if with_prior == len(items):
            batch["prior_images"] = torch.stack([item["prior_image"] for item in items])
        elif with_prior:
            raise DataError(f"{with_prior} of {len(items)} batch items have a prior_image; give one "
                            f"on every row or on none")
        return batch
