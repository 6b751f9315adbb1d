"""Hand-computed checks of the pure PPO math in ``radialog_rl.training.ppo.losses``."""

from __future__ import annotations

import math

import pytest
import torch

from radialog_rl.training.ppo.losses import (
    compute_token_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    gather_logprobs,
    has_eos,
    last_token_mask,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_kl,
    policy_loss,
    response_mask_from_eos,
    value_loss,
)

NAN = float("nan")


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, t(b, a.dtype) if not isinstance(b, torch.Tensor) else b,
                               atol=atol, rtol=0)


# ------------------------------------------------------------------ masked statistics

# Masked elements 1, 2, 3, 4 (the 100/NaN positions are masked out): mean 2.5; deviations
# -1.5, -0.5, 0.5, 1.5; squares sum to 5; biased var 5/4 = 1.25; unbiased 5/3.
X = t([[1.0, 2.0, 100.0], [3.0, 4.0, NAN]])
M = t([[1, 1, 0], [1, 1, 0]], torch.bool)


def test_masked_mean_whole_and_per_row():
    close(masked_mean(X, M), 2.5)
    close(masked_mean(X, M, dim=1), [1.5, 3.5])  # (1+2)/2, (3+4)/2
    close(masked_mean(X, M.float()), 2.5)  # float masks work the same


def test_masked_mean_empty_is_nan():
    assert torch.isnan(masked_mean(t([1.0, 2.0]), t([0, 0], torch.bool)))


def test_masked_var_bessel():
    close(masked_var(X, M, unbiased=False), 1.25)
    close(masked_var(X, M), 5.0 / 3.0)  # 1.25 * n/(n-1) = 1.25 * 4/3


def test_masked_var_too_few_elements():
    with pytest.raises(ValueError):
        masked_var(t([1.0, 2.0]), t([1, 0], torch.bool))
    close(masked_var(t([1.0, 2.0]), t([1, 0], torch.bool), unbiased=False), 0.0)
    with pytest.raises(ValueError):
        masked_var(t([1.0, 2.0]), t([0, 0], torch.bool), unbiased=False)


def test_masked_whiten():
    # (x - 2.5) / sqrt(5/3): 1/sqrt(5/3) = 0.7745967; masked positions come back as 0.
    expected = [[-1.1618950, -0.3872983, 0.0], [0.3872983, 1.1618950, 0.0]]
    out = masked_whiten(X, M)
    close(out, expected)
    assert not torch.isnan(out).any()
    # shift_mean=False keeps the original mean 2.5.
    close(masked_whiten(X, M, shift_mean=False),
          [[1.3381050, 2.1127017, 0.0], [2.8872983, 3.6618950, 0.0]])


# ------------------------------------------------------------------ log-probs and entropy

def test_gather_logprobs_hand_case_with_temperature():
    # logits [0, 2 ln 3] / T=2 -> [0, ln 3] -> softmax [1/4, 3/4].
    logits = t([[[0.0, 2 * math.log(3.0)], [0.0, 2 * math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    close(gather_logprobs(logits, tokens, temperature=2.0), [[math.log(0.75), math.log(0.25)]])
    # Output is float32 whatever the input dtype.
    assert gather_logprobs(logits, tokens).dtype == torch.float32


def _reference_logprobs(logits, tokens, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_logprobs_matches_fp64_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ref = _reference_logprobs(logits, tokens, temperature)
    for chunk in (1, 2, 5, 1000):
        out = gather_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    # Chunked equals unchunked (same fp32 arithmetic per row).
    torch.testing.assert_close(gather_logprobs(logits, tokens, temperature, chunk_size=2),
                               gather_logprobs(logits, tokens, temperature, chunk_size=1000))


def test_gather_logprobs_bf16():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 17, generator=g) * 2
    tokens = torch.randint(0, 17, (2, 4), generator=g)
    low = logits.bfloat16()
    out = gather_logprobs(low, tokens, temperature=0.9, chunk_size=3)
    assert out.dtype == torch.float32
    # Exact up to fp32 against the bf16-rounded logits; bf16 rounding vs the fp32 logits.
    torch.testing.assert_close(out.double(), _reference_logprobs(low, tokens, 0.9), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), _reference_logprobs(logits, tokens, 0.9), atol=5e-2, rtol=0)


def test_gather_logprobs_gradient():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    (gather_logprobs(logits, tokens, temperature=0.8, chunk_size=2) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (_reference_logprobs(logits, tokens, 0.8) * weights).sum().backward()
    # Our forward runs in fp32, hence the tolerance.
    torch.testing.assert_close(ours, logits.grad, atol=1e-5, rtol=0)


def test_gather_logprobs_bf16_gradient_dtype():
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    gather_logprobs(logits, torch.tensor([[0, 3]])).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # Uniform over 4: d logp_k / d z_j = 1[j=k] - 1/4.
    close(logits.grad.double(), [[[0.75, -0.25, -0.25, -0.25], [-0.25, -0.25, -0.25, 0.75]]])


def test_gather_logprobs_rejects_bad_arguments():
    with pytest.raises(ValueError):
        gather_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError):
        gather_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_entropy_from_logits():
    # Uniform over 4: ln 4 = 1.3862944. softmax([0, ln 3]) = [1/4, 3/4]:
    # H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351; same at T=2 with 2 ln 3.
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    close(entropy_from_logits(logits, chunk_size=1), [[1.3862944, 0.5623351]], atol=1e-5)
    scaled = t([[[0.0, 2 * math.log(3.0), -1e9, -1e9]]])
    close(entropy_from_logits(scaled, temperature=2.0), [[0.5623351]], atol=1e-5)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


# ------------------------------------------------------------------ KL and rewards

LOGP = t([-1.0, -2.0])
REF = t([-1.5, -1.0])  # logp - ref = [0.5, -1.0]; ref - logp = [-0.5, 1.0]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [0.5, -1.0]),
        ("abs", [0.5, 1.0]),
        ("mse", [0.125, 0.5]),  # 0.5 * 0.25, 0.5 * 1
        # exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5; exp(1) - 1 - 1 = 0.7182818
        ("k3", [0.1065307, 0.7182818]),
    ],
)
def test_per_token_kl(kind, expected):
    close(per_token_kl(LOGP, REF, kind), expected)


def test_per_token_kl_unknown_kind():
    with pytest.raises(ValueError):
        per_token_kl(LOGP, REF, "k2")


def test_last_token_mask_both_alignments():
    mask = t([[1, 1, 0], [0, 1, 1], [0, 0, 0]], torch.long)
    assert last_token_mask(mask).tolist() == [[False, True, False], [False, False, True],
                                              [False, False, False]]


def test_compute_token_rewards_right_and_left_aligned():
    # beta = 0.1, k1.
    # Row 0 right-aligned, mask [1,1,0]: kl [0.5, -1.0, 0] -> non-score [-0.05, 0.1, 0];
    #   score 2.0 on t=1 -> [-0.05, 2.1, 0].
    # Row 1 left-aligned, mask [0,1,1]: kl [0, 0.2, -0.1] -> non-score [0, -0.02, 0.01];
    #   score -1.0 on t=2 -> [0, -0.02, -0.99].
    logp = t([[-1.0, -2.0, -3.0], [-3.0, -0.5, -0.2]])
    ref = t([[-1.5, -1.0, -9.0], [-9.0, -0.7, -0.1]])
    mask = t([[1, 1, 0], [0, 1, 1]], torch.long)
    rewards, non_score, kl = compute_token_rewards(t([2.0, -1.0]), logp, ref, mask, beta=0.1)
    close(kl, [[0.5, -1.0, 0.0], [0.0, 0.2, -0.1]])
    close(non_score, [[-0.05, 0.1, 0.0], [0.0, -0.02, 0.01]])
    close(rewards, [[-0.05, 2.1, 0.0], [0.0, -0.02, -0.99]])


def test_compute_token_rewards_other_kind():
    # abs: |logp - ref| = [0.5, 1.0]; beta 0.2 -> [-0.1, -0.2]; score 3 on the last -> [-0.1, 2.8].
    rewards, _, kl = compute_token_rewards(t([3.0]), LOGP[None], REF[None], t([[1, 1]]), 0.2, "abs")
    close(kl, [[0.5, 1.0]])
    close(rewards, [[-0.1, 2.8]])


# ------------------------------------------------------------------ GAE

def test_gae_single_row_gamma_one():
    # gamma 1, lam 0.95, r [0.1, -0.2, 1.0], v [0.5, 0.3, 0.4]:
    # t2: delta = 1.0 + 0 - 0.4 = 0.6;            A2 = 0.6
    # t1: delta = -0.2 + 0.4 - 0.3 = -0.1;        A1 = -0.1 + 0.95*0.6 = 0.47
    # t0: delta = 0.1 + 0.3 - 0.5 = -0.1;         A0 = -0.1 + 0.95*0.47 = 0.3465
    # returns = A + v = [0.8465, 0.77, 1.0]
    adv, ret = gae(t([[0.1, -0.2, 1.0]]), t([[0.5, 0.3, 0.4]]), t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    close(adv, [[0.3465, 0.47, 0.6]])
    close(ret, [[0.8465, 0.77, 1.0]])


def test_gae_right_and_left_aligned_rows():
    # Row 0, mask [1,1,0,0] (9/7 are garbage at masked positions):
    #   t1: delta = 2.0 - 0.5 = 1.5; A1 = 1.5.  t0: delta = 0.5 + 0.5 - 1.0 = 0; A0 = 0.95*1.5 = 1.425
    #   returns [2.425, 2.0, 0, 0]
    # Row 1, mask [0,1,1,1]:
    #   t3: delta = 1.0 + 0.3 = 1.3; A3 = 1.3
    #   t2: delta = -0.5 - 0.3 - 0.1 = -0.9; A2 = -0.9 + 0.95*1.3 = 0.335
    #   t1: delta = 0.0 + 0.1 - 0.2 = -0.1; A1 = -0.1 + 0.95*0.335 = 0.21825
    #   returns [0, 0.41825, 0.435, 1.0]
    rewards = t([[0.5, 2.0, 9.0, 9.0], [9.0, 0.0, -0.5, 1.0]])
    values = t([[1.0, 0.5, 7.0, 7.0], [7.0, 0.2, 0.1, -0.3]])
    mask = t([[1, 1, 0, 0], [0, 1, 1, 1]], torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[1.425, 1.5, 0.0, 0.0], [0.0, 0.21825, 0.335, 1.3]])
    close(ret, [[2.425, 2.0, 0.0, 0.0], [0.0, 0.41825, 0.435, 1.0]])


def test_gae_discounted():
    # gamma 0.9, lam 0.5 (gamma*lam = 0.45), r [1, 0, 2], v [0.5, 1.0, 1.5]:
    # t2: delta = 2 - 1.5 = 0.5;                 A2 = 0.5
    # t1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;      A1 = 0.35 + 0.45*0.5 = 0.575
    # t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;       A0 = 1.4 + 0.45*0.575 = 1.65875
    adv, ret = gae(t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]]), t([[1, 1, 1]]), gamma=0.9, lam=0.5)
    close(adv, [[1.65875, 0.575, 0.5]])
    close(ret, [[2.15875, 1.575, 2.0]])


def test_gae_skips_gaps_and_is_detached():
    # mask [1,0,1], gamma 1, lam 0.5: t2: A2 = 2 - 1 = 1; t1 skipped;
    # t0: delta = 1 + v2 (1.0) - 0.5 = 1.5; A0 = 1.5 + 0.5*1 = 2.0; returns [2.5, 0, 2.0]
    values = t([[0.5, 9.0, 1.0]]).requires_grad_()
    adv, ret = gae(t([[1.0, 5.0, 2.0]]), values, t([[1, 0, 1]]), gamma=1.0, lam=0.5)
    close(adv, [[2.0, 0.0, 1.0]])
    close(ret, [[2.5, 0.0, 2.0]])
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------ policy loss

def _policy_case(advantage, ratio, eps=0.2):
    logp = t([[math.log(ratio)]]).requires_grad_()
    out = policy_loss(logp, t([[0.0]]), t([[advantage]]), t([[1]]), clip_range=eps)
    out[0].backward()
    return out, logp.grad.item()


@pytest.mark.parametrize(
    "advantage, ratio, loss, clipped, grad",
    [
        # A>0, r>1+eps: max(-2*1.5, -2*1.2) = -2.4 (clipped, no gradient)
        (2.0, 1.5, -2.4, 1.0, 0.0),
        # A>0, r<1-eps: max(-2*0.5, -2*0.8) = -1.0 (unclipped, d(-A r)/dlogp = -A r = -1.0)
        (2.0, 0.5, -1.0, 0.0, -1.0),
        # A<0, r<1-eps: max(0.5, 0.8) = 0.8 (clipped)
        (-1.0, 0.5, 0.8, 1.0, 0.0),
        # A<0, r>1+eps: max(1.5, 1.2) = 1.5 (unclipped, grad = -A r = 1.5)
        (-1.0, 1.5, 1.5, 0.0, 1.5),
    ],
)
def test_policy_loss_regimes(advantage, ratio, loss, clipped, grad):
    (value, clip_frac, _, ratio_mean), g = _policy_case(advantage, ratio)
    assert value.item() == pytest.approx(loss)
    assert clip_frac.item() == clipped
    assert ratio_mean.item() == pytest.approx(ratio)
    assert g == pytest.approx(grad)


def test_policy_loss_ratio_one():
    # r = 1 everywhere: loss = -mean(A) = -(1 - 3 + 5)/3 = -1; nothing clipped; approx KL 0.
    logp = t([[-1.0, -2.0, -0.5, -4.0]])
    adv = t([[1.0, -3.0, 5.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    loss, clip_frac, approx_kl, ratio_mean = policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-1.0)
    assert clip_frac.item() == 0.0
    assert approx_kl.item() == 0.0
    assert ratio_mean.item() == pytest.approx(1.0)


def test_policy_loss_mixed_batch():
    # The four regimes above in one row plus a masked-out garbage token:
    # loss = mean(-2.4, -1.0, 0.8, 1.5) = -1.1/4 = -0.275; clip_frac = 2/4.
    # approx_kl = 0.5 * mean(ln1.5^2, ln2^2, ln2^2, ln1.5^2) = 0.5 * (0.1644019 + 0.4804530)/2
    #           = 0.1612137; ratio_mean = (1.5 + 0.5 + 0.5 + 1.5)/4 = 1.
    # grad: per-token gradient / 4 = [0, -1.0/4, 0, 1.5/4].
    ratios = [1.5, 0.5, 0.5, 1.5, 3.0]
    logp = t([[math.log(r) for r in ratios]]).requires_grad_()
    adv = t([[2.0, 2.0, -1.0, -1.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, clip_frac, approx_kl, ratio_mean = policy_loss(logp, torch.zeros(1, 5, dtype=torch.float64),
                                                         adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.275)
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.1612137, abs=1e-7)
    assert ratio_mean.item() == pytest.approx(1.0)
    close(logp.grad, [[0.0, -0.25, 0.0, 0.375, 0.0]])
    assert not clip_frac.requires_grad and not approx_kl.requires_grad


# ------------------------------------------------------------------ value loss

def test_value_loss():
    # c = 0.2. Per token (v, v_old, R) -> clip(v) -> (v-R)^2, (clip-R)^2 -> max:
    # (1.0, 0.9, 2.0) -> 1.0 -> 1.00, 1.00 -> 1.00  (inside the band: not clipped)
    # (1.5, 1.0, 2.0) -> 1.2 -> 0.25, 0.64 -> 0.64  (clipped)
    # (0.5, 1.0, 0.0) -> 0.8 -> 0.25, 0.64 -> 0.64  (clipped)
    # (0.5, 1.0, 2.0) -> 0.8 -> 2.25, 1.44 -> 2.25  (unclipped)
    # loss = 0.5 * (1 + 0.64 + 0.64 + 2.25)/4 = 0.56625; clip_frac 0.5
    # grad = 0.5 * 2 (v - R) / 4 on unclipped tokens: [-0.25, 0, 0, -0.375]
    values = t([[1.0, 1.5, 0.5, 0.5, 99.0]]).requires_grad_()
    old = t([[0.9, 1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 2.0, 0.0, 2.0, -99.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, clip_frac = value_loss(values, old, returns, mask, clip_range_value=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.56625)
    assert clip_frac.item() == pytest.approx(0.5)
    close(values.grad, [[-0.25, 0.0, 0.0, -0.375, 0.0]])


def test_value_loss_at_old_values():
    # v = v_old: clipping is a no-op; loss = 0.5 * mean((v - R)^2) = 0.5 * (1 + 4)/2 = 1.25
    v = t([[1.0, 2.0]])
    loss, clip_frac = value_loss(v, v.clone(), t([[2.0, 0.0]]), t([[1, 1]]))
    assert loss.item() == pytest.approx(1.25)
    assert clip_frac.item() == 0.0


# ------------------------------------------------------------------ explained variance

def test_explained_variance():
    # R = [1,2,3,4] (biased var 1.25); R - v = [0,0,0,1]: mean 0.25, biased var
    # (3*0.0625 + 0.5625)/4 = 0.1875; EV = 1 - 0.1875/1.25 = 0.85. Masked garbage ignored.
    values = t([[1.0, 2.0, 3.0, 3.0, NAN]])
    returns = t([[1.0, 2.0, 3.0, 4.0, 1e6]])
    mask = t([[1, 1, 1, 1, 0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)


def test_explained_variance_constant_returns_is_zero():
    assert explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]])).item() == 0.0


# ------------------------------------------------------------------ response masks

def test_response_mask_from_eos():
    eos, pad = 2, 0
    ids = torch.tensor([
        [5, 6, 2, 0, 0],  # EOS in the middle: through the EOS inclusive
        [5, 6, 7, 8, 9],  # no EOS: all tokens
        [2, 0, 0, 2, 0],  # EOS first: only the EOS
        [5, 0, 0, 0, 0],  # no EOS, padded (another stopping criterion)
    ])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    mask = response_mask_from_eos(ids, eos)
    assert mask.dtype == torch.long
    assert mask.tolist() == expected
    # With the pad id, row 3 ends before its first pad.
    expected[3] = [1, 0, 0, 0, 0]
    assert response_mask_from_eos(ids, eos, pad_token_id=pad).tolist() == expected
    assert has_eos(ids, eos).tolist() == [True, False, True, False]


def test_response_mask_pad_equal_to_eos():
    # pad == eos: the first EOS is kept, the padding after it is not.
    ids = torch.tensor([[5, 2, 2, 2]])
    assert response_mask_from_eos(ids, 2, pad_token_id=2).tolist() == [[1, 1, 0, 0]]


def test_gather_logprobs_saves_no_fp32_vocabulary_tensor():
    # Autograd keeps only the bf16 logits, the ids and an fp32 [B, T] logsumexp: no fp32 [.., V].
    saved = []
    logits = torch.randn(2, 6, 50).bfloat16().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = gather_logprobs(logits, torch.zeros(2, 6, dtype=torch.long), chunk_size=2)
    assert out.requires_grad
    assert all(not (x.dtype == torch.float32 and x.shape[-1] == 50) for x in saved)
