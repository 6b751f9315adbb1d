"""Streaming mean/std of the task scores, and the score normalisation/clipping options.

Score scaling by running moments and score clipping are common PPO options (Huang et al., "The N
Implementation Details of RLHF with PPO"; legacy TRL ``use_score_scaling`` / ``use_score_norm`` /
``score_clip``). The moments are combined batch by batch with the parallel-variance formula of
Chan, Golub & LeVeque ("Updating formulae and a pairwise algorithm for computing sample variances",
1979), kept in float64 on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class RunningMoments:
    """Running count, mean and sum of squared deviations (``m2``) of every value seen.

    ``std`` is the unbiased (``n - 1``) standard deviation of all values seen so far; it is 1.0
    until at least two values have been seen, so normalising by it is then a no-op rather than a
    division by zero.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance of all values seen (1.0 before two values)."""
        return self.m2 / (self.count - 1) if self.count >= 2 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold every element of ``x`` (any shape, e.g. scores ``[B]``) into the moments.

        Chan et al.: with ``delta = mean_b - mean_a`` and ``n = n_a + n_b``,
        ``mean = mean_a + delta * n_b / n`` and ``m2 = m2_a + m2_b + delta^2 * n_a * n_b / n``.

        Returns:
            ``(batch_mean, batch_std)`` of ``x`` alone as floats; ``batch_std`` is unbiased
            (0.0 for a single element).

        Raises:
            ValueError: ``x`` is empty or not finite.
        """
        values = x.detach().to(device="cpu", dtype=torch.float64).flatten()
        n_b = values.numel()
        if n_b == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("RunningMoments.update: non-finite value")
        mean_b = float(values.mean())
        m2_b = float((values - mean_b).square().sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n
        return mean_b, (math.sqrt(m2_b / (n_b - 1)) if n_b >= 2 else 0.0)

    def state_dict(self) -> dict[str, Any]:
        """``{"count": int, "mean": float, "m2": float}`` (JSON- and ``torch.save``-friendly)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def clip_scores(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """Clamp ``scores`` (any shape) to ``[-clip, clip]``; ``clip`` must be > 0."""
    if not clip > 0:
        raise ValueError(f"score clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


def normalize_scores(
    scores: torch.Tensor,
    moments: RunningMoments,
    clip: float | None = None,
    shift_mean: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Scale ``scores`` ``[B]`` by the running std, optionally centre them, optionally clip.

    Default (``shift_mean=False``, legacy TRL ``use_score_scaling``): ``scores / std``; the sign
    of each score is kept, so a penalty stays a penalty. ``shift_mean=True`` (``use_score_norm``):
    ``(scores - mean) / std``. Then, if ``clip`` is given, :func:`clip_scores`.

    Pure: ``moments`` is only read. Call ``moments.update(scores)`` first if the current batch
    should count (legacy TRL updates first). A running std below ``eps`` (all scores so far
    equal) is treated as 1 (no scaling) instead of blowing the scores up.
    """
    std = moments.std if moments.std > eps else 1.0
    centred = scores - moments.mean if shift_mean else scores
    out = centred / std
    return clip_scores(out, clip) if clip is not None else out
