"""Hand-computed checks of the RLOO baseline, the KL loss term and the span-vs-KL reward split."""

from __future__ import annotations

import math

import pytest
import torch

from radialog_rl.training.ppo import losses as L


def test_rloo_subtracts_the_mean_of_the_other_samples_of_the_same_prompt():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts x 3 samples
    adv = L.rloo_advantages(scores, 3)
    # prompt 0: 1-(2+6)/2=-3, 2-(1+6)/2=-1.5, 6-(1+2)/2=4.5; prompt 1: 0-1.5, 0-1.5, 3-0
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))


def test_rloo_ignores_invalid_samples_and_lonely_valid_ones():
    scores = torch.tensor([1.0, 100.0, 3.0, 5.0, 7.0, 9.0])
    valid = torch.tensor([True, False, True, True, False, False])
    adv = L.rloo_advantages(scores, 3, valid)
    # prompt 0: valid 1 and 3 -> 1-3=-2, skipped 0, 3-1=2; prompt 1: only one valid -> 0
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]))


def test_rloo_rejects_bad_groups():
    with pytest.raises(ValueError):
        L.rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError):
        L.rloo_advantages(torch.zeros(5), 2)


def test_kl_loss_is_the_masked_mean_of_k3_with_the_reverse_kl_gradient():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, mean_kl = L.kl_loss(logp, ref, mask, "k3")
    # k3 = exp(ref-logp) - 1 - (ref-logp): 0.5-1+log2 and 2-1-log2
    expected = ((0.5 - 1 + math.log(2)) + (2 - 1 - math.log(2))) / 2
    assert loss.item() == pytest.approx(expected) and mean_kl.item() == pytest.approx(expected)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): 1-0.5 and 1-2, halved by the mean; masked position 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25, -0.5, 0.0]]))


def test_kl_loss_with_an_empty_mask_is_zero_and_keeps_the_graph():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = L.kl_loss(logp, torch.ones(1, 2), torch.zeros(1, 2), "k3")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(1, 2))


def test_score_goes_on_the_span_while_kl_covers_the_whole_response():
    # response of 5 tokens through EOS; the confidence span is tokens 1-2
    logp = torch.tensor([[-1.0, -2.0, -1.0, -0.5, -0.1]])
    ref = torch.tensor([[-1.5, -2.0, -1.5, -1.0, -2.1]])
    kl_mask = torch.ones(1, 5)
    span = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    rewards, non_score, kl = L.compute_token_rewards(torch.tensor([3.0]), logp, ref, kl_mask, 0.1, "k1",
                                                     score_mask=span)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5, 0.5, 2.0]]))
    torch.testing.assert_close(non_score, -0.1 * kl)
    # the score sits on the span's last token (2), not on EOS (4); KL is charged everywhere
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.95, -0.05, -0.2]]))


def test_all_values_loss_is_the_exact_expected_reward_hand_computed():
    # One response, three values with p = (0.4, 0.2, 0.2): 0.2 of the mass on tokens that are no
    # value (a failure, reward -6); rewards (1, 0, -1).
    logp = torch.log(torch.tensor([[0.4, 0.2, 0.2]])).requires_grad_(True)
    rewards = torch.tensor([[1.0, 0.0, -1.0]])
    loss, expected, entropy, mass = L.all_values_loss(logp, rewards, torch.tensor([-6.0]))
    # J = 0.4 - 0.2 + 0.2 * -6 = -1.0
    assert expected.item() == pytest.approx(-1.0) and loss.item() == pytest.approx(1.0)
    assert mass.item() == pytest.approx(0.8)
    # entropy of the renormalised (0.5, 0.25, 0.25)
    assert entropy.item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    loss.backward()
    # dJ/d logp_v = p_v (r_v - r_fail): 0.4*7, 0.2*6, 0.2*5; the loss is -J
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.8, -1.2, -1.0]]))


def test_all_values_loss_averages_rows_and_a_failure_at_the_worst_value_costs_nothing_extra():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.75, 0.25]]))
    rewards = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    _, expected, _, mass = L.all_values_loss(logp, rewards, torch.tensor([0.0, 0.0]))
    # row 0: 1; row 1: 1; mean 1; all mass on values
    assert expected.item() == pytest.approx(1.0) and mass.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same"):
        L.all_values_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="failure_rewards"):
        L.all_values_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_all_values_entropy_bonus_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(True)
    rewards = torch.tensor([[1.0, 0.0]])
    loss, expected, entropy, _ = L.all_values_loss(logp, rewards, torch.tensor([0.0]), entropy_coef=0.1)
    # J = 0.5; H = log 2 (the maximum: its gradient is 0 here); loss = -(0.5 + 0.1 log 2)
    assert expected.item() == pytest.approx(0.5) and entropy.item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(-(0.5 + 0.1 * math.log(2)))
    loss.backward()
    # dJ/dlogp = p (r - r_fail) = (0.5, 0); dH/dlogp at uniform = 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0]]))
