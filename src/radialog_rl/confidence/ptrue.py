"""P(True): ask the model whether its own answer is correct and read P("Yes") against P("No").

The self-evaluation question is a new user turn that shows the image, the original question and the
model's proposed answer (its confidence statement removed), then asks for Yes or No. The prompt is
run once (image features reused, no vision-tower call) and the next-token logits ``z`` at the last
prompt position, where the assistant's reply starts, give

    P(True) = sum_{y in Yes ids} e^{z_y} / (sum_{y in Yes ids} e^{z_y} + sum_{n in No ids} e^{z_n}),

i.e. the softmax over the two token logits when each word is one token. The probability mass of
every other token is ignored (renormalised over the two answers), as in Kadavath et al.

Default template (:data:`DEFAULT_TEMPLATE`): adapted from the P(True) prompt of Kadavath et al.
2022, "Language Models (Mostly) Know What They Know" (arXiv:2207.05221, §3: "Question: ...
Proposed Answer: ... Is the proposed answer: (A) True (B) False"), with Yes/No in place of the
lettered True/False options so that RaDialog's chat format can answer in one word. ``{question}``
is the sample's user message (with its ``<image>``; the package's request for a stated confidence
removed), ``{answer}`` the response without its ``{"confidence": N}`` statement.

Yes/No token ids come from the tokenizer: for each word the SentencePiece pieces ``"▁Word"``
(after a space, which is how ``"ASSISTANT: Yes"`` tokenizes) and ``"Word"`` (no space) that exist
as single tokens. A word that is no single token in either form (only in tiny test vocabularies)
falls back to the first piece of its encoding that is more than a bare ``"▁"``, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radialog_rl.calibration.parsing import strip_confidence
from radialog_rl.calibration.prompts import CONFIDENCE_SCALES, confidence_instruction
from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
from radialog_rl.data.prompts import SYSTEM_PROMPT, build_prompt
from radialog_rl.errors import ConfigError
from radialog_rl.generation import _unwrap
from radialog_rl.loading.tokenizer import batch_tokenize_image_prompts
from radialog_rl.data.prompt_rows import user_message

__all__ = [
    "DEFAULT_TEMPLATE",
    "PTrueConfig",
    "answer_token_ids",
    "ptrue_from_logits",
    "ptrue_prompts",
    "ptrue_scores",
    "resolve_yes_no_ids",
    "strip_confidence_request",
]

logger = logging.getLogger(__name__)

#: Self-evaluation user message (see the module docstring for its source).
DEFAULT_TEMPLATE = (
    "{question}\nProposed answer: {answer}\n"
    "Is the proposed answer correct? Answer Yes or No."
)

_SPIECE_SPACE = "\u2581"  # SentencePiece's word-start marker "▁"


@dataclass(frozen=True)
class PTrueConfig:
    """``template`` with ``{question}`` and ``{answer}``; the words whose token probabilities are
    compared (each may list several, e.g. ``("Yes", "yes")``)."""

    template: str = DEFAULT_TEMPLATE
    yes_words: tuple[str, ...] = ("Yes",)
    no_words: tuple[str, ...] = ("No",)

    def __post_init__(self) -> None:
        for key in ("{question}", "{answer}"):
            if key not in self.template:
                raise ConfigError(f"the P(True) template must contain {key}; got {self.template!r}")
        if self.template.count(DEFAULT_IMAGE_TOKEN) > 1:
            raise ConfigError("the P(True) template may hold at most one <image> (the question has one)")
        if not self.yes_words or not self.no_words:
            raise ConfigError("P(True) needs at least one Yes word and one No word")


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """Single-token ids of ``word``: ``"▁word"`` and ``"word"`` where the vocabulary has them.

    Falls back (with a warning) to the first non-``"▁"`` piece of ``word``'s encoding.
    """
    ids: list[int] = []
    for piece in (_SPIECE_SPACE + word, word):
        token_id = tokenizer.convert_tokens_to_ids(piece)
        if token_id is None or token_id == tokenizer.unk_token_id:
            continue
        if tokenizer.convert_ids_to_tokens(token_id) == piece and token_id not in ids:
            ids.append(int(token_id))
    if ids:
        return ids
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(word, add_special_tokens=False))
    informative = [p for p in pieces if p.strip(_SPIECE_SPACE)]
    if not informative:
        raise ConfigError(f"the tokenizer has no token for {word!r}; choose another P(True) word")
    logger.warning("%r is not one token in this vocabulary (pieces %s); P(True) uses its first piece %r",
                   word, pieces, informative[0])
    return [int(tokenizer.convert_tokens_to_ids(informative[0]))]


def _word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for word in words:
        ids += [i for i in answer_token_ids(tokenizer, word) if i not in ids]
    return ids


def resolve_yes_no_ids(tokenizer, config: PTrueConfig) -> tuple[list[int], list[int]]:
    """``(yes_ids, no_ids)`` of ``config``'s words; they must not share a token."""
    yes, no = _word_ids(tokenizer, config.yes_words), _word_ids(tokenizer, config.no_words)
    shared = sorted(set(yes) & set(no))
    if shared:
        raise ConfigError(f"the Yes and No words share token id(s) {shared}; choose other words")
    return yes, no


def strip_confidence_request(question: str) -> str:
    """``question`` without the package's request for a ``{"confidence": N}`` statement
    (:func:`radialog_rl.calibration.prompts.confidence_instruction`, any task and scale): the
    self-evaluation asks about the answer only."""
    for scale in CONFIDENCE_SCALES:
        for task in ("qa", "report"):
            question = question.replace(confidence_instruction(scale, task), "")
    return question.strip()


def ptrue_prompts(
    questions: Sequence[str], responses: Sequence[str], template: str = DEFAULT_TEMPLATE,
    chat_template: bool = True, system: str = SYSTEM_PROMPT,
) -> list[str]:
    """The full self-evaluation prompts (vicuna chat template when ``chat_template``).

    The image goes where the template has ``<image>``; without one it stays where the question has
    it (or is prepended). The question's request for a stated confidence is removed
    (:func:`strip_confidence_request`) and so is the answer's confidence statement.
    """
    out = []
    own_image = DEFAULT_IMAGE_TOKEN in template  # the template places the image: drop the question's
    for question, response in zip(questions, responses, strict=True):
        question = strip_confidence_request(question)
        if own_image:
            question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip(" .\n")
        message = user_message(template.format(question=question, answer=strip_confidence(response)))
        out.append(build_prompt(message, system=system) if chat_template else message)
    return out


def ptrue_from_logits(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """``[B]`` float32 P(Yes) renormalised over the Yes and No ids, from next-token ``logits [B, V]``."""
    z = logits.float()
    yes = torch.logsumexp(z[:, list(yes_ids)], dim=-1)
    no = torch.logsumexp(z[:, list(no_ids)], dim=-1)
    return torch.sigmoid(yes - no)  # = e^yes / (e^yes + e^no)


@torch.no_grad()
def ptrue_scores(
    model, tokenizer, prompts: Sequence[str], image_features: torch.Tensor,
    yes_ids: Sequence[int], no_ids: Sequence[int],
) -> list[float]:
    """P(True) of each full self-evaluation prompt: one left-padded forward, last position only.

    ``image_features``: ``[B, num_image_tokens, hidden]``, one image per prompt.
    """
    policy, llava = _unwrap(model)
    device = llava.get_input_embeddings().weight.device
    ids, mask = batch_tokenize_image_prompts(list(prompts), tokenizer, padding_side="left")
    logits = policy(input_ids=ids.to(device), attention_mask=mask.to(device),
                    image_features=image_features.to(device), logits_to_keep=1).logits[:, -1]
    return ptrue_from_logits(logits, yes_ids, no_ids).tolist()
