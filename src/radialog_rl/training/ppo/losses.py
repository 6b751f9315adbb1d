"""Pure PPO math for language models: masked statistics, log-probs, KL, rewards, GAE and the losses.

Every function here is pure: tensors in, tensors out, no model and no trainer state. The tensors are
per *response token*: ``[B, T]`` where row ``b`` holds one sampled response (or the response slice of
query ⊕ response) and ``mask`` ``[B, T]`` (bool, int or float holding 0/1) marks the positions that
are generated tokens. Masks may be right-aligned (trailing padding after EOS) or left-aligned
(leading zeros); positions where the mask is 0 may hold anything, even NaN, and never leak into a
result.

References
----------
* Huang et al., "The N Implementation Details of RLHF with PPO" (2023/2024), and the legacy (≤0.11)
  TRL ``PPOTrainer`` step that it describes: per-token KL rewards, score on the last token, GAE with
  gamma=1 / lambda=0.95, whitened advantages, clipped policy and value losses.
* Schulman et al., "Proximal Policy Optimization Algorithms" (2017): the clipped surrogate.
* Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  (2016): GAE.
* Schulman, "Approximating KL Divergence" (blog note, 2020): the k1/k2/k3 estimators.
"""

from __future__ import annotations

from typing import Any

import torch

#: Token positions per chunk in :func:`gather_logprobs` / :func:`entropy_from_logits`. With a
#: 32k vocabulary one chunk is 256 x 32000 x 4 B = 33 MB of fp32 temporaries.
DEFAULT_CHUNK_SIZE = 256

KL_KINDS = ("k1", "abs", "mse", "k3")


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: ``[B, T]`` (any shape broadcastable with ``mask``), floating point.
        mask: same shape, bool/int/float 0/1.
        dim: reduce over this dimension only (e.g. ``1`` gives a per-row mean ``[B]``); ``None``
            reduces over every element.

    Returns:
        A 0-dim tensor (``dim=None``) or the reduced tensor. An empty mask (or a row with no
        masked element when ``dim`` is given) yields NaN (0/0): that is deliberate, so a bug that
        produces an empty response shows up instead of silently becoming 0.
    """
    m = mask.bool()
    # torch.where instead of x * mask: masked-out positions may hold inf/NaN (0 * inf = NaN).
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum() / m.sum()
    return total.sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked elements (the whole batch), as a 0-dim tensor.

    The biased variance ``mean((x - mean)^2)`` is computed over the masked elements; with
    ``unbiased=True`` it is multiplied by the Bessel factor ``n / (n - 1)`` where ``n = mask.sum()``,
    exactly as the legacy TRL ``masked_var`` does.

    Raises:
        ValueError: if the mask is empty, or holds a single element with ``unbiased=True`` (the
            Bessel factor would divide by zero). This reads ``n`` on the host (one sync).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = int(mask.bool().sum().item())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element")
    if unbiased:
        if n < 2:
            raise ValueError("masked_var: the unbiased variance needs at least 2 masked elements")
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of all its masked elements.

    Used for the advantages (Huang et al. detail: whiten over the whole batch, not per row).

    Args:
        x: ``[B, T]`` floating point.
        mask: ``[B, T]`` 0/1.
        shift_mean: ``True`` returns ``(x - mean) / sqrt(var + eps)`` (zero mean, unit variance).
            ``False`` keeps the original mean: ``(x - mean) / sqrt(var + eps) + mean`` (legacy TRL
            semantics: only the spread is rescaled).
        eps: added to the variance before the square root.

    Returns:
        ``[B, T]`` with masked-out positions set to 0.

    Raises:
        ValueError: fewer than 2 masked elements (see :func:`masked_var`).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------
# Log-probs and entropy without a full fp32 log-softmax
# ---------------------------------------------------------------------------------------------


def _chunks(batch: int, length: int, chunk_size: int):
    """Yield ``(b, t0, t1)`` covering every token position of a ``[batch, length]`` grid."""
    for b in range(batch):
        for t0 in range(0, length, chunk_size):
            yield b, t0, min(t0 + chunk_size, length)


class _ChunkedTokenLogProb(torch.autograd.Function):
    """``log softmax(logits / T)[token]`` computed chunk by chunk, forward *and* backward.

    Why a custom autograd function: a plain chunked loop would still let autograd keep every
    chunk's fp32 copy for the backward pass (``logsumexp`` saves its input), i.e. the full fp32
    ``[B, T, V]`` tensor we set out to avoid. Here the forward saves only the original logits (the
    same storage the model already holds), the tokens and the fp32 ``logsumexp`` ``[B, T]``; the
    backward recomputes ``softmax`` one chunk at a time and writes ``(onehot - softmax) / T`` into a
    single gradient tensor of the logits' own dtype.
    """

    @staticmethod
    def forward(ctx: Any, logits, tokens, temperature, chunk_size):  # type: ignore[override]
        batch, length, _ = logits.shape
        out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b, t0, t1 in _chunks(batch, length, chunk_size):
            z = logits[b, t0:t1].float() / temperature  # [c, V] fp32, one chunk only
            lse[b, t0:t1] = torch.logsumexp(z, dim=-1)
            chosen = z.gather(-1, tokens[b, t0:t1, None]).squeeze(-1)
            out[b, t0:t1] = chosen - lse[b, t0:t1]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        batch, length, _ = logits.shape
        for b, t0, t1 in _chunks(batch, length, chunk_size):
            g = grad_out[b, t0:t1].float()  # [c]
            probs = torch.exp(logits[b, t0:t1].float() / temperature - lse[b, t0:t1, None])
            chunk_grad = -probs * g[:, None]  # d logp_k / d z_j = 1[j=k] - p_j
            chunk_grad.scatter_add_(-1, tokens[b, t0:t1, None], g[:, None])
            grad[b, t0:t1] = (chunk_grad / temperature).to(logits.dtype)
        return grad, None, None, None


def _check_chunking(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def gather_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probabilities of the chosen tokens under ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, T, V]`` in any floating dtype (bf16/fp16/fp32); position ``t`` must already be
            the logit that *predicts* ``tokens[:, t]`` (i.e. the caller shifted by one).
        tokens: ``[B, T]`` integer ids in ``[0, V)``. Masked-out positions must still hold a valid id
            (e.g. the pad id); their log-prob is computed and should be masked by the caller.
        temperature: the sampling temperature (Huang et al. detail: divide in every pass).
        chunk_size: token positions processed at once.

    Returns:
        ``[B, T]`` float32, differentiable w.r.t. ``logits``.

    Memory: a full-vocabulary fp32 log-softmax of the batch would be ``B*T*V*4`` bytes (12 x 350 x
    32000 x 4 B = 540 MB, plus as much again for autograd). We only need the chosen entry, which
    equals ``z[token] - logsumexp(z)``, so each chunk of ``chunk_size`` positions is cast to fp32,
    reduced to its logsumexp and freed before the next; the backward pass is chunked too (see
    ``_ChunkedTokenLogProb``). Reference: Huang et al. / legacy TRL ``logprobs_from_logits``,
    rewritten for memory.
    """
    _check_chunking(temperature, chunk_size)
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B,T,V] and tokens [B,T], got {tuple(logits.shape)} "
                         f"and {tuple(tokens.shape)}")
    return _ChunkedTokenLogProb.apply(logits, tokens.long(), float(temperature), int(chunk_size))


@torch.no_grad()
def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``[B, T, V]`` any floating dtype.
        temperature: sampling temperature (> 0).
        chunk_size: token positions per fp32 chunk (memory: see :func:`gather_logprobs`).

    Returns:
        ``[B, T]`` float32, **detached** (a diagnostic, as in legacy TRL's ``entropy`` stat; it is
        not meant as a differentiable bonus). Mask it with :func:`masked_mean`.
    """
    _check_chunking(temperature, chunk_size)
    batch, length, _ = logits.shape
    out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
    for b, t0, t1 in _chunks(batch, length, chunk_size):
        logp = torch.log_softmax(logits[b, t0:t1].float() / temperature, dim=-1)
        out[b, t0:t1] = -(logp.exp() * logp).sum(-1)
    return out


# ---------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------


def per_token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(policy || reference)`` from the sampled tokens' log-probs.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampled tokens under policy / reference.
        kind: ``"k1"``: ``logp - ref`` (unbiased, can be negative; the legacy TRL default);
            ``"abs"``: ``|logp - ref|``; ``"mse"``: ``0.5 * (logp - ref)^2`` (Schulman's k2);
            ``"k3"``: ``exp(ref - logp) - 1 - (ref - logp)`` (Schulman's k3: unbiased and >= 0).

    Returns:
        ``[B, T]``, unmasked (mask it yourself or use :func:`compute_token_rewards`).

    Raises:
        ValueError: unknown ``kind``.
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "k3":
        return torch.expm1(-diff) + diff  # exp(r) - 1 - r with r = ref - logp; expm1 for precision
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: True only at the last position of each row where ``mask`` is non-zero.

    Works for right-aligned, left-aligned and gapped masks; a row with no masked position is all
    False.
    """
    m = mask.bool()
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1, keepdim=True)
    return (positions == last) & m


def compute_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
    kl_kind: str = "k1",
    score_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every response token plus the score on the last one.

    ``reward_t = -beta * kl_t`` on response tokens, and the row's task score is added on the last
    position where ``mask`` is 1 (Ziegler et al. 2019; Huang et al. detail; legacy TRL
    ``compute_rewards``). With ``score_mask`` (the optimised span, a subset of ``mask``) the score
    goes on the last position of ``score_mask`` instead, while the KL still covers all of ``mask``:
    a reward on the confidence statement, and every sampled token anchored to the reference.

    Args:
        scores: ``[B]`` task scores (after any normalisation, clipping or no-EOS penalty).
        logprobs, ref_logprobs: ``[B, T]`` sampled-token log-probs under the rollout policy and the
            reference model.
        mask: ``[B, T]`` response mask (left- or right-aligned): where the KL is charged.
        beta: KL coefficient (e.g. ``AdaptiveKLController.value``).
        kl_kind: see :func:`per_token_kl`.
        score_mask: ``[B, T]`` where the score's position is taken from (default ``mask``); a row
            whose ``score_mask`` is empty gets no score.

    Returns:
        ``(rewards, non_score_rewards, kl)``, each ``[B, T]`` with 0 at masked-out positions;
        ``non_score_rewards = -beta * kl`` and ``rewards = non_score_rewards + score on the last
        token``. All detached.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, per_token_kl(logprobs.detach(), ref_logprobs.detach(), kl_kind), zero)
    non_score = -beta * kl
    last = last_token_mask(m if score_mask is None else score_mask)
    rewards = non_score + torch.where(last, scores.detach().to(kl.dtype)[:, None], zero)
    return rewards, non_score, kl


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al. 2016).

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``, where
    "next" is the next position *with mask 1* in the same row: positions with mask 0 are skipped
    (they contribute nothing and receive 0), so leading zeros (left alignment), trailing padding and
    even gaps are handled. The episode ends at the last response token: the value after it is 0.

    Args:
        rewards: ``[B, T]`` per-token rewards (:func:`compute_token_rewards`).
        values: ``[B, T]`` value estimates from the rollout (old) value head.
        mask: ``[B, T]`` response mask.
        gamma: discount (1.0 for LM PPO).
        lam: GAE lambda (0.95).

    Returns:
        ``(advantages, returns)``, each ``[B, T]``, detached, 0 at masked-out positions;
        ``returns = advantages + values`` computed *before* any whitening (whiten the advantages
        afterwards with :func:`masked_whiten`; the returns stay as they are).
    """
    m = mask.bool()
    # Accumulate in fp32 at least (fp64 if given): a bf16 value head must not round the recursion.
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    rewards, values = rewards.detach().to(dtype), values.detach().to(dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        valid = m[:, t]
        advantages[:, t] = torch.where(valid, adv, torch.zeros_like(adv))
        # At a skipped position the running "next" quantities are carried through unchanged.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Losses and diagnostics
# ---------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (Schulman et al. 2017), averaged over all masked tokens.

    ``loss = masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` with
    ``r = exp(logprobs - old_logprobs)``.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (with grad).
        old_logprobs: ``[B, T]`` rollout log-probs (treated as constants).
        advantages: ``[B, T]`` (usually whitened; treated as constants).
        mask: ``[B, T]`` response mask.
        clip_range: ``eps``.

    Returns:
        ``(loss, clip_frac, approx_kl, ratio_mean)``, 0-dim tensors; only ``loss`` carries grad.
        ``clip_frac``: fraction of masked tokens where the clipped term is strictly larger (those
        tokens get no gradient). ``approx_kl = 0.5 * masked_mean((logp - old)^2)`` (Schulman's k2,
        as legacy TRL logs it; k3 ``masked_mean((r - 1) - log r)`` is an unbiased alternative).
        ``ratio_mean``: masked mean of ``r``.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return loss, clip_frac, approx_kl, ratio_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old ± c) - R)^2))``.

    Follows legacy TRL / Huang et al. (the ``vf_coef`` weighting is the caller's).

    Args:
        values: ``[B, T]`` current value head output (with grad).
        old_values: ``[B, T]`` rollout values (constants).
        returns: ``[B, T]`` GAE returns (constants).
        mask: ``[B, T]`` response mask.
        clip_range_value: ``c``.

    Returns:
        ``(loss, clip_frac)``: 0-dim tensors; ``clip_frac`` is the fraction of masked tokens where
        the clipped error is strictly larger.
    """
    old_values, returns = old_values.detach(), returns.detach()
    c = clip_range_value
    clipped_values = torch.clamp(values, old_values - c, old_values + c)
    err = (values - returns).square()
    err_clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clipped > err).float(), mask)
    return loss, clip_frac


@torch.no_grad()
def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``1 - Var(R - v) / Var(R)`` over the masked tokens (a value-head diagnostic).

    Both variances are biased (the Bessel factors would cancel). 1 is perfect, 0 is no better
    than predicting the mean, negative is worse.

    Returns:
        0-dim float tensor. **Choice:** when ``Var(R) == 0`` the ratio is undefined and 0.0 is
        returned (rather than NaN/inf), so logs and NaN guards stay clean.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns.item() == 0.0:
        return torch.zeros((), dtype=var_returns.dtype, device=var_returns.device)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ---------------------------------------------------------------------------------------------
# Response masks
# ---------------------------------------------------------------------------------------------


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int | None = None
) -> torch.Tensor:
    """Mask of the real response tokens: from the first generated token through the first EOS.

    Args:
        response_ids: ``[B, T]`` the generated ids only (right-padded, as ``generate`` returns them
            after slicing off the prompt).
        eos_token_id: the EOS id; the first EOS is *included* (it is a sampled action), everything
            after it is excluded. A row without EOS is all ones (it hit ``max_new_tokens``).
        pad_token_id: if given and different from ``eos_token_id``, the response also ends just
            before the first pad token (generation stopped by another criterion and ``generate``
            padded the finished row). Ignored when equal to ``eos_token_id``.

    Returns:
        ``[B, T]`` ``torch.long`` 0/1 (the dtype of an HF ``attention_mask``, so it concatenates
        with the prompt's), right-aligned.
    """
    is_eos = (response_ids == eos_token_id).long()
    # Number of EOS strictly before t; > 0 means the first EOS is behind us.
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos
    mask = eos_before == 0
    if pad_token_id is not None and pad_token_id != eos_token_id:
        mask &= torch.cumsum((response_ids == pad_token_id).long(), dim=-1) == 0
    return mask.long()


def has_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B]`` bool: whether each row of ``response_ids`` ``[B, T]`` contains ``eos_token_id``.

    For the optional penalty on responses that never terminate (Huang et al. detail).
    """
    return (response_ids == eos_token_id).any(dim=-1)


# ---------------------------------------------------------------------------------------------
# Group baselines and the KL term of the loss
# ---------------------------------------------------------------------------------------------


def rloo_advantages(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE-leave-one-out advantages: each sample's score minus the mean of the *other*
    valid samples drawn for the same prompt (Kool et al. 2019, "Buy 4 REINFORCE samples, get a
    baseline for free"; Ahmadian et al. 2024, "Back to basics", RLOO).

    The baseline is per prompt, so what is rewarded is doing better *than this prompt's other
    samples*: for a calibration reward, stating a higher confidence than usual on an image where
    the answer is right, a lower one where it is wrong. A learned value head must first learn the
    per-image expected score to give the same signal.

    Args:
        scores: ``[B]`` sequence scores, ``B = n_prompts * group_size``, grouped contiguously
            (rows ``g*K .. g*K+K-1`` share a prompt).
        group_size: ``K >= 2`` samples per prompt.
        valid: ``[B]`` bool; invalid (skipped) samples neither get an advantage (0) nor enter
            another sample's baseline. A valid sample with no valid sibling gets 0.

    Returns:
        ``[B]`` float32 advantages.
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [n_prompts * {group_size}], got {tuple(scores.shape)}")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    s = torch.where(valid, scores.float(), torch.zeros((), device=scores.device)).view(-1, group_size)
    v = valid.view(-1, group_size).float()
    others = v.sum(1, keepdim=True) - v  # valid siblings of each sample
    baseline = (s.sum(1, keepdim=True) - s) / others.clamp(min=1)
    adv = torch.where((v > 0) & (others > 0), s - baseline, torch.zeros_like(s))
    return adv.view(-1)


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: str = "k3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL to the reference as a differentiable loss term over ``mask`` (GRPO style: Shao et al.
    2024, "DeepSeekMath"; the KL enters the loss instead of the per-token rewards).

    Used when the policy loss is restricted to a span (the confidence statement) but every sampled
    token, answer and EOS included, must stay anchored to the reference: the reward-side penalty
    would only reach the tokens the policy loss covers.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (with grad).
        ref_logprobs: ``[B, T]`` reference log-probs (constants).
        mask: ``[B, T]`` the tokens to anchor (the whole response through EOS, less off-policy
            tokens).
        kind: an estimator of :func:`per_token_kl`; ``"k3"`` (default) is >= 0 with the gradient of
            the reverse KL for on-policy samples.

    Returns:
        ``(loss, mean_kl)``: 0-dim tensors, the masked mean; ``mean_kl`` is detached. An empty mask
        gives a zero loss that keeps the graph.
    """
    kl = per_token_kl(logprobs, ref_logprobs.detach(), kind)
    if not mask.bool().any():
        zero = (logprobs * 0.0).sum()
        return zero, zero.detach()
    loss = masked_mean(kl, mask)
    return loss, loss.detach()


def all_values_loss(
    value_logprobs: torch.Tensor, value_rewards: torch.Tensor, failure_rewards: torch.Tensor,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact expected reward of a stated confidence over every value it could take, as a loss
    (the "all-action" policy gradient for a small discrete action: Allen et al. 2017, "Mean Actor
    Critic"; Ciosek & Whiteson 2018, "Expected Policy Gradients").

    A sampled policy gradient learns from the one value the policy drew, ``(r(v) - b) * grad log
    pi(v)``; its noise is what a calibration reward drowns in (most answers are right, so most
    samples only say "higher"). When the reward of every value is known (a calibration reward is a
    function of the value and the answer's correctness), the expectation can be taken exactly:

        J = sum_v p(v) r(v) + (1 - sum_v p(v)) r_fail

    with ``p(v)`` the policy's probability of value ``v``'s complete tokens (value and closing)
    after the response's prefix, and ``r_fail`` the reward of a response whose statement does not
    parse: whatever else the policy could write there. The values' sequences are disjoint ("1}"
    and "10}" differ at their second token), so ``sum_v p(v) <= 1``. The gradient
    ``sum_v p(v) (r(v) - r_fail) grad log p(v)`` has no sampling noise in the value, only in the
    sampled answer that decides correctness. For a given image the maximiser states the ``v``
    maximising ``P(right) r(v, right) + P(wrong) r(v, wrong)``: ``v = 10 P(right)`` for a proper
    scoring rule such as the Brier-based ``quadratic_blend``.

    Why ``r_fail`` and not a distribution renormalised over the values: renormalised, a bad value
    can be made unlikely by breaking its closing (``"8"`` then anything but ``}``) at no cost, and
    the format leaks away (measured on the synthetic task: 94 % parse failures by step 20).

    ``entropy_coef`` ``alpha`` adds ``alpha * H(q)``, ``q`` = ``p`` renormalised over the values
    (entropy regularisation, Williams & Peng 1991; Mnih et al. 2016, A3C). Without it the exact
    gradient first moves every image to the batch's best single value, and a point mass has no
    gradient left (``p(v) (r(v) - r_fail)`` is 0 for every other value): measured, every image
    stated 9 by step 50 and stayed. With it the per-image optimum is ``q(v) ∝ exp(E[r(v)] /
    alpha)``, soft, whose most likely value is still the expected-reward maximiser (what
    value-level greedy decoding states).

    Args:
        value_logprobs: ``[B, V]`` log p of each value's tokens after the same prefix, with grad
            (``V = scale + 1``).
        value_rewards: ``[B, V]`` the (processed) reward the response would get with each value;
            constants.
        failure_rewards: ``[B]`` the reward of the response with an unparsable statement.
        entropy_coef: ``alpha >= 0``, the weight of the entropy bonus (reward units per nat).

    Returns:
        ``(loss, expected_reward, entropy, value_mass)``: ``loss = -mean_b (J_b + alpha H(q_b))``
        (0-dim, with grad); the detached mean ``J``, the mean entropy (nats) of ``p`` renormalised over the
        values, and the mean ``sum_v p(v)``.
    """
    if value_logprobs.shape != value_rewards.shape or value_logprobs.dim() != 2:
        raise ValueError(f"value_logprobs {tuple(value_logprobs.shape)} and value_rewards "
                         f"{tuple(value_rewards.shape)} must be the same [B, V]")
    if failure_rewards.shape != value_logprobs.shape[:1]:
        raise ValueError(f"failure_rewards must be [{value_logprobs.shape[0]}], got {tuple(failure_rewards.shape)}")
    logp = value_logprobs.float()
    p = logp.exp()
    mass = p.sum(-1)  # [B]
    fail = failure_rewards.detach().float()
    expected = (p * value_rewards.detach().float()).sum(-1) + (1.0 - mass) * fail  # [B]
    log_q = torch.log_softmax(logp, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    loss = -(expected + entropy_coef * entropy).mean()
    return loss, expected.mean().detach(), entropy.mean().detach(), mass.mean().detach()
