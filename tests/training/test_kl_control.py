"""Hand-computed checks of the KL coefficient controllers."""

from __future__ import annotations

import json

import pytest
import torch

from radialog_rl.training.ppo.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
)


def test_adaptive_updates_with_clipping():
    # init 1.0, target 2, horizon 100, n_steps 10 (n/horizon = 0.1):
    # kl 4:   error 4/2 - 1 = 1.0 -> clipped 0.2;   beta = 1.0 * (1 + 0.02)    = 1.02
    # kl 1:   error -0.5 -> clipped -0.2;           beta = 1.02 * (1 - 0.02)   = 0.9996
    # kl 2.2: error 0.1 (inside the clip);          beta = 0.9996 * (1 + 0.01) = 1.009596
    # kl 2 (n 50): error 0;                          beta unchanged             = 1.009596
    ctl = AdaptiveKLController(init_kl_coef=1.0, target=2.0, horizon=100)
    assert ctl.value == 1.0
    assert ctl.update(4.0, 10) == pytest.approx(1.02)
    assert ctl.update(torch.tensor(1.0), 10) == pytest.approx(0.9996)
    assert ctl.update(2.2, 10) == pytest.approx(1.009596)
    ctl.update(2.0, 50)
    assert ctl.value == pytest.approx(1.009596)


def test_adaptive_defaults():
    # 0.05, target 6, horizon 10000; kl 9 -> error 0.5 -> 0.2; batch 12: 0.05 * (1 + 0.2*12/1e4)
    ctl = AdaptiveKLController()
    assert (ctl.value, ctl.target, ctl.horizon) == (0.05, 6.0, 10000.0)
    assert ctl.update(9.0, 12) == pytest.approx(0.050012)


def test_state_round_trip():
    ctl = AdaptiveKLController(1.0, 2.0, 100)
    ctl.update(4.0, 10)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain, serialisable
    assert state == {"kind": "adaptive", "value": pytest.approx(1.02), "target": 2.0, "horizon": 100.0}
    fresh = AdaptiveKLController(1.0, 2.0, 100)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    # Both continue identically: 1.02 * 0.98 = 0.9996.
    assert fresh.update(1.0, 10) == ctl.update(1.0, 10) == pytest.approx(0.9996)


def test_fixed_controller():
    ctl = FixedKLController(0.1)
    assert ctl.update(100.0, 12) == 0.1
    assert ctl.value == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.1


def test_kind_mismatch_and_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveKLController().load_state_dict(FixedKLController(0.1).state_dict())
    with pytest.raises(ValueError):
        AdaptiveKLController(target=0.0)
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_factory():
    adaptive = make_kl_controller(True, 0.2, 3.0, 50)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 3.0, 50.0)
    fixed = make_kl_controller(False, 0.2)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.2
