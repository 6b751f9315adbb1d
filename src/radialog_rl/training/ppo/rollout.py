"""What one PPO step samples: prompts with images in, sampled token ids and scores out.

The response is the *sampled token ids* (never re-tokenized from decoded text). Its mask runs from
the first generated token through the first EOS inclusive. A reward may ask to optimise only a
character span of the response (e.g. the ``{"confidence": N}`` statement); :func:`span_token_mask`
maps it onto the sampled tokens. The one deliberate exception to "never re-tokenize" is the
Rewarding-Doubt exploration trick, whose reward rewrites the stated confidence: those rows are
re-tokenized so the policy is updated on the text that was scored (``docs/ppo-and-calibration.md`` §B).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from radialog_rl.constants import DEFAULT_IMAGE_TOKEN
from radialog_rl.data.text_lines import NOT_UTF8, numbered_lines
from radialog_rl.errors import DataError, RadialogError

logger = logging.getLogger(__name__)


class RewardError(RadialogError):
    """The reward function returned something unusable (NaN/inf scores, wrong lengths)."""


@dataclass(frozen=True)
class PromptRow:
    """One PPO dataset row: the image, the user message, and every other field (labels)."""

    image: Path
    prompt: str
    fields: dict
    prior_image: Path | None = None
    source: str = ""


def load_prompt_jsonl(path: str | os.PathLike) -> list[PromptRow]:
    """Rows of ``{"image": ..., "prompt": ..., <labels>}``; relative image paths resolve against
    the file's folder. Bad rows raise one :class:`DataError` naming their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PPO data file not found: {path}")
    rows, bad = [], []
    for number, line in numbered_lines(path):
        where = f"{path.name} line {number}"
        if line is None:
            bad.append(f"{where}: {NOT_UTF8}")
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"{where}: invalid JSON ({exc.msg})")
            continue
        if not isinstance(data, dict) or not data.get("image") or not isinstance(data.get("prompt"), str):
            bad.append(f"{where}: needs 'image' and 'prompt' fields")
            continue
        image = (path.parent / data["image"]).resolve()
        prior = (path.parent / data["prior_image"]).resolve() if data.get("prior_image") else None
        missing = [str(p) for p in (image, prior) if p is not None and not p.is_file()]
        if missing:
            bad.append(f"{where}: image not found: {', '.join(missing)}")
            continue
        rows.append(PromptRow(image, data["prompt"], data, prior, where))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} bad row(s) in {path}: " + "; ".join(bad[:5]) + more)
    if not rows:
        raise DataError(f"PPO data file {path} has no rows")
    with_prior = [r.source for r in rows if r.prior_image is not None]
    if with_prior and len(with_prior) != len(rows):
        without = [r.source for r in rows if r.prior_image is None]
        raise DataError(
            f"{path}: either every row has a 'prior_image' or none does (BioViL-T's temporal input is "
            f"batched); without one: {', '.join(without[:5])}"
        )
    return rows


def user_message(prompt: str) -> str:
    """The prompt with exactly one ``<image>`` (prepended when absent, as LLaVA's data does)."""
    count = prompt.count(DEFAULT_IMAGE_TOKEN)
    if count > 1:
        raise DataError(f"prompt has {count} '<image>' placeholders; one image per prompt: {prompt[:80]!r}")
    return prompt if count == 1 else f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"


class EpochSampler:
    """Deterministic, resumable order over dataset indices: a seeded permutation per epoch.

    With several processes each takes every ``world``-th index of the same permutation. The state
    (epoch, position) goes into checkpoints so a resumed run sees the same rows.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=gen)[self.rank :: self.world].tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            chunk = order[self.position : self.position + k - len(out)]
            self.position += len(chunk)
            out += chunk
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def char_offsets(tokenizer, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range ``[start, end)`` of each token inside ``decode(token_ids, skip_special_tokens=True)``.

    Computed by decoding growing prefixes: robust to sentencepiece's leading-space handling and to
    multi-token characters (a byte-fallback token gets an empty range until its character completes).
    """
    offsets, previous = [], 0
    for k in range(1, len(token_ids) + 1):
        end = len(tokenizer.decode(list(token_ids[:k]), skip_special_tokens=True))
        offsets.append((previous, max(previous, end)))
        previous = max(previous, end)
    return offsets


def span_token_mask(tokenizer, token_ids: Sequence[int], span: tuple[int, int]) -> list[int]:
    """1 for every token whose characters overlap ``span = (start, end)`` of the decoded text."""
    start, end = span
    return [int(s < end and e > start) for s, e in char_offsets(tokenizer, token_ids)]


def check_scores(scores: Sequence[float | None], rows: Sequence[PromptRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores -> ``(scores [B] float32, valid [B] bool)``; None = skipped sample (score 0, invalid).

    Raises:
        RewardError: NaN or infinite scores, naming the samples.
    """
    if len(scores) != len(rows):
        raise RewardError(f"the reward returned {len(scores)} scores for {len(rows)} samples")
    bad = [i for i, s in enumerate(scores) if s is not None and not math.isfinite(float(s))]
    if bad:
        names = ", ".join(f"#{i} ({rows[i].source or rows[i].image.name}: {scores[i]})" for i in bad[:5])
        raise RewardError(f"the reward returned non-finite scores for samples {names}; the step was stopped")
    valid = torch.tensor([s is not None for s in scores])
    values = torch.tensor([float(s) if s is not None else 0.0 for s in scores], dtype=torch.float32)
    return values, valid
