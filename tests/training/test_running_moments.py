"""Running moments against hand-computed values and numpy; score normalisation and clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radialog_rl.training.ppo.running_moments import RunningMoments, clip_scores, normalize_scores


def test_two_batches_by_hand():
    rm = RunningMoments()
    assert (rm.count, rm.mean, rm.std) == (0, 0.0, 1.0)  # std 1 before two values
    # [1,2,3]: mean 2, unbiased std 1.
    assert rm.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    assert (rm.count, rm.mean, rm.std) == (3, pytest.approx(2.0), pytest.approx(1.0))
    # + [10]: values [1,2,3,10], mean 4, squared deviations 9+4+1+36 = 50, var 50/3.
    assert rm.update(torch.tensor([10.0])) == (10.0, 0.0)
    assert rm.count == 4
    assert rm.mean == pytest.approx(4.0)
    assert rm.var == pytest.approx(50.0 / 3.0)


def test_matches_numpy_over_several_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (12, 1, 7, 30, 2)]
    rm = RunningMoments()
    for b in batches:
        batch_mean, batch_std = rm.update(torch.tensor(b, dtype=torch.float32))
        assert batch_mean == pytest.approx(float(np.float32(b).mean()), abs=1e-5)
        expected_std = float(np.float32(b).std(ddof=1)) if len(b) > 1 else 0.0
        assert batch_std == pytest.approx(expected_std, abs=1e-5)
    everything = np.concatenate([np.float32(b) for b in batches]).astype(np.float64)
    assert rm.count == everything.size
    assert rm.mean == pytest.approx(everything.mean(), abs=1e-9)
    assert rm.std == pytest.approx(everything.std(ddof=1), abs=1e-9)


def test_state_round_trip():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 5.0, 6.0]))
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.state_dict() == rm.state_dict()
    other.update(torch.tensor([2.0]))
    rm.update(torch.tensor([2.0]))
    assert other.state_dict() == rm.state_dict()


def test_update_rejects_empty_and_nonfinite():
    with pytest.raises(ValueError):
        RunningMoments().update(torch.tensor([]))
    with pytest.raises(ValueError):
        RunningMoments().update(torch.tensor([1.0, float("nan")]))


def test_normalize_scores():
    rm = RunningMoments()
    rm.update(torch.tensor([2.0, 4.0, 6.0]))  # mean 4, var (4+0+4)/2 = 4, std 2
    scores = torch.tensor([2.0, -4.0, 8.0])
    torch.testing.assert_close(normalize_scores(scores, rm), torch.tensor([1.0, -2.0, 4.0]))
    # (s - 4)/2
    torch.testing.assert_close(normalize_scores(scores, rm, shift_mean=True),
                               torch.tensor([-1.0, -4.0, 2.0]))
    torch.testing.assert_close(normalize_scores(scores, rm, clip=3.0), torch.tensor([1.0, -2.0, 3.0]))
    torch.testing.assert_close(normalize_scores(scores, rm, clip=3.0, shift_mean=True),
                               torch.tensor([-1.0, -3.0, 2.0]))
    assert rm.count == 3  # normalisation does not update the moments


def test_normalize_scores_degenerate_std():
    scores = torch.tensor([1.5, -2.0])
    torch.testing.assert_close(normalize_scores(scores, RunningMoments()), scores)  # no data: std 1
    constant = RunningMoments()
    constant.update(torch.tensor([5.0, 5.0, 5.0]))  # std 0 -> treated as 1
    torch.testing.assert_close(normalize_scores(scores, constant), scores)


def test_clip_scores():
    torch.testing.assert_close(clip_scores(torch.tensor([-5.0, 0.5, 5.0]), 2.0),
                               torch.tensor([-2.0, 0.5, 2.0]))
    with pytest.raises(ValueError):
        clip_scores(torch.tensor([1.0]), 0.0)
