"""PPO math for RLHF / RL-CAI: pure functions on (B, T) response tensors.

Conventions shared by every function here:

- B rows (episodes) x T response positions. `mask` (bool or 0/1 float) is True on the real
  response tokens of a row (the stop token included) and False on padding. Real tokens are a
  *prefix* of each row (right padding inside the response block); functions that rely on it check it.
- Values at padding positions are never read: they may hold garbage (INVALID_LOGPROB, 1e6, inf)
  without changing any result or gradient.
- Reductions are token-level means over every real token of the batch (`masked_mean`), as in
  OpenAI lm-human-preferences, TRL and summarize_from_feedback_details.

Sources: Schulman et al. 2016 (GAE, arXiv 1506.02438), Schulman et al. 2017 (PPO, arXiv 1707.06347),
Ziegler et al. 2019 (arXiv 1909.08593; openai/lm-human-preferences train_policy.py), TRL
trl/experimental/ppo/ppo_trainer.py, vwxyzjn/summarize_from_feedback_details ppo.py, CleanRL ppo.py,
DeepSpeed-Chat dschat/rlhf/ppo_trainer.py. See also docs of each function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------


def upcast_fp32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32 for softmax-type math; fp32/fp64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _where(mask: Tensor, x: Tensor) -> Tensor:
    """x on real tokens, 0 on padding (robust to inf/NaN garbage, unlike x * mask)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_prefix_mask(mask: Tensor) -> None:
    """Raise ValueError unless every row's real tokens are a prefix of the row (B, T)."""
    m = mask.bool()
    # a True after a False anywhere in a row = not a prefix (e.g. left-padded responses)
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("mask must be right-padded: each row's real tokens must be a prefix of the row")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, denominator: Tensor | float | None = None) -> Tensor:
    """Mean of x over real tokens: all of them (dim=None, a 0-d tensor) or along `dim`.
    summarize_from_feedback_details ppo.py masked_mean; TRL trl/trainer/utils.py masked_mean.
    denominator (dim=None only): divide the masked sum by this count instead of mask.sum(); a
    data-parallel loss passes the global count (infra.distributed.loss_denominator), so that its
    gradient is that of one process holding the whole batch."""
    m = mask.to(x.dtype)
    if dim is None:
        return _where(mask, x).sum() / (m.sum() if denominator is None else denominator)
    return _where(mask, x).sum(dim) / m.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of x over all real tokens (two-pass). unbiased=False divides by n (OpenAI
    lm-human-preferences core.py whiten uses tf.nn.moments, biased); unbiased=True divides by
    n - 1 (TRL / summarize_from_feedback_details masked_var, Bessel's correction)."""
    mean = masked_mean(x, mask)
    centered = _where(mask, x - mean)  # (B, T), 0 on padding (keeps gradients finite too)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            raise ValueError("unbiased masked_var needs at least 2 real tokens (use a larger minibatch)")
        # Bessel's correction: TRL trl/trainer/utils.py masked_var
        var = var * n / (n - 1)
    return var


# exercise
def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    unbiased: bool = False,
    eps: float = 1e-8,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Whiten x over real tokens; padding positions come back as 0.
    stats: optional precomputed (mean, var), e.g. all-reduced across ranks (see infra/ppo.py: masked_moments).
    shift_mean=False adds the mean back (used for rewards: scale only, keep the sign/offset).
    """
    if stats is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    else:
        mean, var = stats
    # OpenAI lm-human-preferences core.py whiten; TRL masked_whiten: (x - mean) * rsqrt(var + eps)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _where(mask, out)


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(target - pred) / Var(target) over real tokens (biased variances); 1 = perfect
    value function, 0 = no better than a constant, < 0 = worse. CleanRL ppo.py explained_var."""
    return 1.0 - masked_var(target - pred, mask) / masked_var(target, mask)


# --------------------------------------------------------------------------------------------
# log-probs, entropy, KL
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(tokens) under softmax(logits / temperature), in (at least) fp32: logits (B, T, V), tokens (B, T)
    -> (B, T). logits[:, t] must be the logits that produced tokens[:, t] (already shifted).
    `temperature` must be the rollout's sampling temperature, or the first PPO ratio is not 1
    (TRL https://github.com/huggingface/trl/issues/2358, OpenRLHF
    https://github.com/OpenRLHF/OpenRLHF/pull/853)."""
    logp = F.log_softmax(upcast_fp32(logits) / temperature, dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logits (B, T, V) -> (B, T).
    H = logsumexp(l) - sum_v softmax(l)_v * l_v (TRL trl/trainer/utils.py entropy_from_logits)."""
    logits = upcast_fp32(logits)
    p = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)  # (B, T)


# exercise
def kl_per_token(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (B, T) -> (B, T).

    Schulman 2020, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html), with the
    tokens sampled from pi and r = pi_ref / pi = exp(ref_logp - logp):
      k1 = -log r = logp - ref_logp     unbiased, can be negative per token (TRL/OpenAI default)
      k2 = 0.5 * (log r)^2              biased, >= 0, low variance
      k3 = (r - 1) - log r              unbiased, >= 0 (used by OpenRLHF/GRPO as "k3")
    Note: minChatGPT computes k3 with the ratio inverted (r = pi / pi_ref), which is not an
    unbiased estimator of KL(pi || pi_ref) under samples from pi.
    """
    log_r = ref_logp - logp  # (B, T)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        # expm1 keeps (r - 1) accurate for r near 1
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


# --------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------

REWARD_AT = ("last", "eos_plus_one")


def score_index(mask: Tensor, reward_at: str = "last") -> Tensor:
    """(B,) column of the (B, T) reward tensor that receives the sequence-level score.

    "last" (default; DeepSpeed-Chat, OpenAI lm-human-preferences): the last real response token.
    "eos_plus_one" (TRL ppo_trainer.py: `sequence_lengths + 1` where it is < T): the first padding
    position after the last real token; a full-length row (no padding left) falls back to its
    last real token, exactly as TRL's torch.where does.
    """
    if reward_at not in REWARD_AT:
        raise ValueError(f"reward_at must be one of {REWARD_AT}, got {reward_at!r}")
    check_prefix_mask(mask)
    lengths = mask.bool().sum(-1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("every row needs at least one real response token")
    last = lengths - 1  # (B,)
    if reward_at == "last":
        return last
    T = mask.shape[-1]
    return torch.where(lengths < T, lengths, last)  # (B,)


def gae_mask(mask: Tensor, reward_at: str = "last") -> Tensor:
    """Bool (B, T): the positions GAE and the value loss must run over so that the score is not
    dropped. For "last" it is `mask`; for "eos_plus_one" it also includes the score column (TRL's
    ~padding_mask_p1, used for values/returns). The policy loss always uses `mask` itself."""
    m = mask.bool().clone()  # (B, T)
    idx = score_index(mask, reward_at)  # (B,)
    m[torch.arange(m.shape[0], device=m.device), idx] = True
    return m


# exercise
def per_token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float, reward_at: str = "last") -> Tensor:
    """Dense rewards (B, T): r_t = -beta * KL_t on real tokens, 0 on padding, plus the score (B,)
    at `score_index(mask, reward_at)`. Ziegler et al. 2019 eq. 2 (R = r - beta * KL);
    OpenAI lm-human-preferences train_policy.py compute_rewards; TRL ppo_trainer.py.
    With reward_at="eos_plus_one", run GAE over `gae_mask(mask, reward_at)`, not `mask`."""
    # Ziegler et al. 2019 eq. 2 / OpenAI compute_rewards: r_t = -beta * KL_t, + score at one column
    rewards = _where(mask, -beta * kl)  # (B, T)
    idx = score_index(mask, reward_at)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)  # (B,)
    rewards[rows, idx] += score.to(rewards.dtype)
    return rewards


# --------------------------------------------------------------------------------------------
# generalized advantage estimation
# --------------------------------------------------------------------------------------------


# exercise
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, the textbook backward loop (slow, obviously correct).
    rewards, values, mask (B, T) -> (advantages, returns), each (B, T) and 0 on padding.

    Schulman et al. 2016 eq. 16 (recursive form), CleanRL ppo.py, TRL ppo_trainer.py:
      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    The value after the last real token is 0 (the episode ends there); returns = A + V.
    """
    m = mask.bool()
    B, T = rewards.shape
    r, v = _where(m, rewards), _where(m, values)  # (B, T) garbage on padding -> 0
    mf = m.to(r.dtype)
    adv = torch.zeros_like(r)  # (B, T)
    next_adv = torch.zeros_like(r[:, 0])  # (B,)
    next_value = torch.zeros_like(r[:, 0])  # (B,)
    next_mask = torch.zeros_like(r[:, 0])  # (B,) m_T = 0: nothing after the tensor
    for t in reversed(range(T)):
        # Schulman et al. 2016 eq. 16 (recursive form); TRL ppo_trainer.py / CleanRL ppo.py GAE loop
        delta = r[:, t] + gamma * next_value * next_mask - v[:, t]  # (B,)
        next_adv = delta + gamma * lam * next_mask * next_adv  # (B,)
        adv[:, t] = next_adv * mf[:, t]  # 0 on padding
        next_value, next_mask = v[:, t], mf[:, t]
    returns = _where(m, adv + v)
    return adv, returns


# --------------------------------------------------------------------------------------------
# critic-free advantages: k samples per prompt, the other samples are the baseline
# --------------------------------------------------------------------------------------------

ADVANTAGES = ("gae", "rloo", "grpo")
"""train_ppo.py --advantage: GAE with a learned value (PPO), the leave-one-out baseline (RLOO), the
group-normalised reward (GRPO)."""


def group_differences(rewards: Tensor, k: int) -> Tensor:
    """(B,) sequence rewards of B = n * k rows, rows g*k ... g*k + k - 1 being k samples of prompt g
    -> (n, k, k): D[g, i, j] = R_{g,i} - R_{g,j}. Both baselines below are means of these
    differences, so k equal rewards give advantages that are exactly 0 (a difference of equal
    floats is 0; a mean of equal floats need not be the float itself)."""
    if k < 2 or rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rows are not groups of k = {k} >= 2 samples")
    r = rewards.reshape(-1, k)  # (n, k): row g = prompt g's k samples
    return r[:, :, None] - r[:, None, :]  # (n, k, k)


# exercise
def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740, eq. 5; Kool et al. 2019):
    A_i = R_i - 1/(k-1) sum_{j != i} R_j = 1/(k-1) sum_j (R_i - R_j) (the j = i term is 0).
    rewards (B,) in groups of k consecutive rows -> (B,). TRL rloo_trainer.py computes the same
    baseline as (sum - R_i) / (k - 1) on a (k, n) layout; ours is (n, k), prompt-major."""
    return (group_differences(rewards, k).sum(-1) / (k - 1)).reshape(-1)  # (n, k) -> (B,)


# exercise
def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, arXiv 2402.03300, §4.1.2):
    A_i = (R_i - mean(R)) / (std(R) + eps) within each group of k; std with Bessel's correction and
    eps = 1e-4 as TRL grpo_trainer.py (`rewards.view(-1, G).std(dim=1)`, `+ 1e-4`).
    R_i - mean(R) = 1/k sum_j (R_i - R_j). rewards (B,) in groups of k consecutive rows -> (B,)."""
    dev = group_differences(rewards, k).mean(-1)  # (n, k): R_i - mean(R)
    std = (dev.pow(2).sum(-1, keepdim=True) / (k - 1)).sqrt()  # (n, 1) unbiased std of the group
    return (dev / (std + eps)).reshape(-1)  # (B,)


def sequence_advantages(adv: Tensor, mask: Tensor) -> Tensor:
    """One advantage per sequence (B,) on every real token of its row (B, T), 0 on padding: the
    critic-free methods give each token of a response the response's advantage."""
    return _where(mask, adv[:, None].expand(mask.shape).to(torch.float32))  # (B, T)


# --------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------


# exercise
def policy_loss(
    logp_new: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor, clip: float,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7), as a loss to minimise; (B, T) inputs.
    A token mean: the masked sum divided by `denominator` (default: the real tokens of this batch;
    a data-parallel rank passes infra.distributed.loss_denominator, see masked_mean).
    Returns (loss, stats); stats are detached 0-d tensors, token means with the same denominator:
      approxkl   0.5 * mean((logp_new - logp_old)^2): the k2 estimator of KL(old || new)
                 (OpenAI lm-human-preferences train_policy.py, summarize_from_feedback_details)
      clipfrac   fraction of real tokens where the clipped term is the active one
      ratio_mean, ratio_var  (biased variance) of pi_new / pi_old over real tokens. ratio_var
                 centres on this batch's own mean: across ranks its sum is the token-weighted mean
                 of the ranks' variances (the within-rank part of the global variance)
    """
    m = mask.bool()
    # mask the log-ratio first: garbage on padding never reaches exp() or the gradient
    log_ratio = _where(m, logp_new - logp_old)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _where(m, adv)
    # Schulman et al. 2017 eq. 7: L = -E[min(r A, clip(r, 1-eps, 1+eps) A)] = E[max(-r A, -clip(r) A)]
    pg_losses = -adv * ratio  # (B, T)
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), m, denominator=denominator)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m, denominator=denominator),
            # OpenAI / TRL: pg_clipfrac = mean(pg_losses2 > pg_losses)
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), m, denominator=denominator),
            "ratio_mean": masked_mean(ratio, m, denominator=denominator),
            # masked_var's two-pass formula (biased), divided by the same denominator
            "ratio_var": masked_mean(_where(m, ratio - masked_mean(ratio, m)) ** 2, m, denominator=denominator),
        }
    return loss, stats


# exercise
def value_loss(
    v_new: Tensor, v_old: Tensor, returns: Tensor, mask: Tensor, clip_v: float,
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (OpenAI lm-human-preferences train_policy.py; TRL ppo_trainer.py):
      0.5 * mean(max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2))
    over real tokens; the mean divides by `denominator` (default: the real tokens of this batch).
    stats: vf_clipfrac (fraction where the clipped term is larger, same denominator), detached."""
    m = mask.bool()
    v_new, v_old, returns = _where(m, v_new), _where(m, v_old), _where(m, returns)
    # OpenAI lm-human-preferences train_policy.py loss(); TRL ppo_trainer.py vf_losses1/2
    v_clipped = v_old + torch.clamp(v_new - v_old, -clip_v, clip_v)  # (B, T)
    vf_losses1 = (v_new - returns) ** 2  # (B, T)
    vf_losses2 = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), m, denominator=denominator)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(v_new.dtype), m, denominator=denominator)}
    return loss, stats


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, denominator: Tensor | float | None = None) -> Tensor:
    """The KL term of GRPO's loss (Shao et al. 2024, arXiv 2402.03300, eqs. 3-4): the token mean of
    the k3 estimate of KL(pi || pi_ref) (`kl_per_token`), differentiable in logp; (B, T) -> 0-d.
    The caller multiplies it by beta. denominator: as in policy_loss."""
    return masked_mean(kl_per_token(logp, ref_logp, "k3"), mask, denominator=denominator)


# --------------------------------------------------------------------------------------------
# KL coefficient
# --------------------------------------------------------------------------------------------


class KLController:
    """The KL penalty coefficient beta. target=None: fixed beta (TRL default, 0.05).
    target set: adaptive (Ziegler et al. 2019 §2.2; OpenAI lm-human-preferences train_policy.py
    AdaptiveKLController): after each batch of n_steps episodes with mean KL `current_kl`,
      e = clip(current_kl / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(value), target, horizon

    # exercise
    def update(self, current_kl: float, n_steps: int) -> float:
        """After a batch of n_steps episodes whose mean KL was current_kl: the new beta (the
        formula above; unchanged with a fixed beta)."""
        if self.target is not None:
            e = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + e * n_steps / self.horizon
        return self.value
