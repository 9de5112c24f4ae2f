"""Supervised losses: the reward (preference) model's pairwise loss, the SFT loss on logits (the
fused LM-head + cross-entropy twin that never holds the logits is infra/fast.py) and the DPO loss.

Reward model. CAI's feedback model gives soft labels: p_a = P(response A is better), the
labeller's normalized probability of option (A), ensembled over principles (Bai et al. 2022 §4.1;
chain-of-thought labels clamped to 40-60%). The loss is the Bradley-Terry cross-entropy against
that soft target; with p_a = 1 it is exactly TRL's RewardTrainer loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .rl import upcast_fp32, masked_mean


# exercise
def pairwise_loss(r_a: Tensor, r_b: Tensor, p_a: Tensor | float, margin: Tensor | float = 0.0,
                  denominator: Tensor | float | None = None) -> Tensor:
    """Soft-label Bradley-Terry loss, averaged over the batch: r_a, r_b (B,) scalar rewards,
    p_a (B,) or a float in [0, 1] = probability that A is preferred, margin (B,) or float.
    denominator: the number of pairs to divide the summed loss by (default B; a data-parallel
    caller passes the global count, infra.distributed.loss_denominator).

    With d = r_a - r_b - margin and P(A > B) = sigmoid(d) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1):
      L = -[p * log sigmoid(d) + (1 - p) * log sigmoid(-d)]
    p = 1 gives TRL's -log sigmoid(r_chosen - r_rejected - margin) (trl/trainer/reward_trainer.py).
    Per pair, dL/dr_a = sigmoid(d) - p = -dL/dr_b.
    """
    p = torch.as_tensor(p_a, dtype=r_a.dtype, device=r_a.device)
    d = r_a - r_b - margin  # (B,)
    # logsigmoid is stable for large |d| (log(sigmoid(d)) underflows to -inf)
    loss = -(p * F.logsigmoid(d) + (1.0 - p) * F.logsigmoid(-d))  # (B,)
    return loss.sum() / (loss.numel() if denominator is None else denominator)


def pairwise_accuracy(r_a: Tensor, r_b: Tensor, p_a: Tensor | float) -> Tensor:
    """Fraction of decisive pairs (p != 0.5) where the model agrees with the label:
    mean of [(r_a > r_b) == (p > 0.5)]; NaN if no pair is decisive. A tie r_a == r_b counts as
    preferring B (TRL's accuracy is mean(r_chosen > r_rejected))."""
    p = torch.as_tensor(p_a, dtype=r_a.dtype, device=r_a.device).expand_as(r_a)  # (B,)
    decisive = p != 0.5  # (B,)
    correct = ((r_a > r_b) == (p > 0.5)).to(r_a.dtype)  # (B,)
    return masked_mean(correct, decisive)


# exercise
def sft_loss(logits: Tensor, targets: Tensor, mask: Tensor, denominator: Tensor | float | None = None) -> Tensor:
    """Next-token cross-entropy on the masked (assistant) tokens only: their summed NLL divided by
    `denominator`, by default their count: a token-level mean over the whole batch, the prompt
    left out (TRL SFTConfig assistant_only_loss). A data-parallel caller passes the global count
    (infra.distributed.loss_denominator), so that the gradient is the single process's.

    logits (B, T, V), targets (B, T), mask (B, T) bool/0-1. The caller has already shifted:
    logits[:, t] is the prediction for targets[:, t], i.e. for input ids (B, L)
        logits = model(ids, attn_mask)[:, :-1]; targets = ids[:, 1:]; mask = assistant_mask[:, 1:]
    Targets at masked-out positions are ignored (they may be pad ids or -100).
    (infra/fast.FusedSFTLoss computes the same sum without the logits: train_sl.py --fused-ce.)
    """
    m = mask.bool()
    safe_targets = torch.where(m, targets, torch.zeros_like(targets))  # (B, T) any valid id
    nll = F.cross_entropy(
        upcast_fp32(logits).flatten(0, 1), safe_targets.flatten(), reduction="none"
    ).view_as(targets)  # (B*T, V), (B*T,) -> (B, T)
    return masked_mean(nll, m, denominator=denominator)


# ------------------------------------------------------------------------------ DPO
# exercise
def dpo_loss(pi_a: Tensor, pi_b: Tensor, ref_a: Tensor, ref_b: Tensor,
             p_a: Tensor | float, beta: float, denominator: Tensor | float | None = None) -> Tensor:
    """Soft-label DPO loss, a mean over pairs: pi_*, ref_* (B,) sequence log-probs of responses a
    and b under the policy and the reference; p_a (B,) or float = P(a is better). denominator: the
    number of pairs to divide the summed loss by (default B; a data-parallel caller passes the
    global count, infra.distributed.loss_denominator).

    h = (pi_a - ref_a) - (pi_b - ref_b)                                   (Rafailov et al. 2023, eq. 7)
    L = p * -log sigmoid(beta h) + (1 - p) * -log sigmoid(-beta h)        (cDPO / TRL label_smoothing)
    dL/dh = beta * (sigmoid(beta h) - p): raising log pi(a) lowers the loss when p > sigmoid(beta h)."""
    p = torch.as_tensor(p_a, dtype=pi_a.dtype, device=pi_a.device)
    h = (pi_a - ref_a) - (pi_b - ref_b)  # (B,)
    # logsigmoid, not log(sigmoid): stable for large |beta h|
    loss = -(p * F.logsigmoid(beta * h) + (1.0 - p) * F.logsigmoid(-beta * h))  # (B,)
    return loss.sum() / (loss.numel() if denominator is None else denominator)


def dpo_statistics(pi_a: Tensor, pi_b: Tensor, ref_a: Tensor, ref_b: Tensor, p: Tensor, beta: float) -> dict:
    """TRL-named statistics, 'chosen' being the side with p >= 1/2: mean implicit rewards
    beta * (log pi - log pi_ref), their margin, the accuracy (chosen reward > rejected reward, over
    decisive pairs p != 1/2; None if none) and the mean log-probs."""
    a_first = p >= 0.5
    r_a, r_b = beta * (pi_a - ref_a), beta * (pi_b - ref_b)  # (B,)
    r_c, r_r = torch.where(a_first, r_a, r_b), torch.where(a_first, r_b, r_a)
    lp_c, lp_r = torch.where(a_first, pi_a, pi_b), torch.where(a_first, pi_b, pi_a)
    decisive = p != 0.5
    acc = (r_c > r_r)[decisive].float().mean().item() if bool(decisive.any()) else None
    return {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/accuracies": acc, "rewards/margins": (r_c - r_r).mean().item(),
            "logps/chosen": lp_c.mean().item(), "logps/rejected": lp_r.mean().item()}
