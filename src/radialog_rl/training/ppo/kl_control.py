"""KL coefficient controllers for the per-token KL penalty.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2; the legacy
TRL ``AdaptiveKLController``. The adaptive controller nudges ``beta`` so that the measured KL between
policy and reference tracks a target:

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)

Both controllers expose ``value`` (the beta to use for the next rollout), ``update`` and a plain-dict
``state_dict`` / ``load_state_dict`` pair so a resumed run continues with the same beta.
"""

from __future__ import annotations

from typing import Any

import torch

#: Ziegler et al.'s limit on the proportional error per update.
PROPORTIONAL_ERROR_CLIP = 0.2


class KLController:
    """Interface: ``value``, ``update(current_kl, n_steps)``, ``state_dict``, ``load_state_dict``."""

    kind = "base"

    def __init__(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"the KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Update ``value`` from the KL measured on the last batch; returns the new value."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain Python dict (JSON- and ``torch.save``-friendly)."""
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``value``. The configuration (target, horizon) stays the constructor's.

        Raises:
            ValueError: the state comes from a controller of the other kind.
        """
        if state.get("kind") != self.kind:
            raise ValueError(f"cannot load a {state.get('kind')!r} KL controller state into a "
                             f"{self.kind!r} controller")
        self.value = float(state["value"])


class AdaptiveKLController(KLController):
    """Ziegler et al.'s proportional controller of the KL coefficient.

    Args:
        init_kl_coef: initial beta (0.05 in the RaDialog calibration runs).
        target: target KL (nats per response, the summed per-token KL averaged over the batch).
        horizon: number of *samples* over which the error is corrected.
    """

    kind = "adaptive"

    def __init__(
        self, init_kl_coef: float = 0.05, target: float = 6.0, horizon: int = 10000
    ) -> None:
        super().__init__(init_kl_coef)
        if not target > 0 or not horizon > 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """``beta <- beta * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)``.

        Args:
            current_kl: the KL of the batch just collected: the per-response KL summed over its
                tokens, averaged over the batch (legacy TRL's ``objective/kl``).
            n_steps: samples in that batch (legacy TRL passes the batch size, not 1).
        """
        error = float(current_kl) / self.target - 1.0
        error = min(max(error, -PROPORTIONAL_ERROR_CLIP), PROPORTIONAL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "value", "target", "horizon"}``; target/horizon are informational."""
        return {**super().state_dict(), "target": self.target, "horizon": self.horizon}


class FixedKLController(KLController):
    """A constant KL coefficient; ``update`` is a no-op."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        super().__init__(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value


def make_kl_controller(
    adaptive: bool, init_kl_coef: float = 0.05, target: float = 6.0, horizon: int = 10000
) -> KLController:
    """An :class:`AdaptiveKLController` or (``adaptive=False``) a :class:`FixedKLController` with
    ``init_kl_coef`` (``target`` and ``horizon`` are then unused)."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
