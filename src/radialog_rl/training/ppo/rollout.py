"""What one PPO step samples: prompts with images in, sampled token ids and scores out.

The response is the *sampled token ids* (never re-tokenized from decoded text). Its mask runs from
the first generated token through the first EOS inclusive. A reward may ask to optimise only a
character span of the response (e.g. the ``{"confidence": N}`` statement); :func:`span_token_mask`
maps it onto the sampled tokens. The one deliberate exception to "never re-tokenize" is the
Rewarding-Doubt exploration trick, whose reward rewrites the stated confidence: those rows are
re-tokenized so the policy is updated on the text that was scored (``docs/ppo-and-calibration.md`` §B).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from radialog_rl.data.prompt_rows import PromptRow, load_prompt_jsonl, user_message  # noqa: F401 (re-exported)
from radialog_rl.errors import RadialogError

logger = logging.getLogger(__name__)


class RewardError(RadialogError):
    """The reward function returned something unusable (NaN/inf scores, wrong lengths)."""


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
