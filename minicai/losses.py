"""Supervised losses: the reward (preference) model's pairwise loss and the SFT loss (a plain
version on logits, and a fused LM-head + cross-entropy that never holds the (N, V) logits).

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


def pairwise_loss(r_a: Tensor, r_b: Tensor, p_a: Tensor | float, margin: Tensor | float = 0.0) -> Tensor:
    """Soft-label Bradley-Terry loss, averaged over the batch: r_a, r_b (B,) scalar rewards,
    p_a (B,) or a float in [0, 1] = probability that A is preferred, margin (B,) or float.

    With d = r_a - r_b - margin and P(A > B) = sigmoid(d) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1):
      L = -[p * log sigmoid(d) + (1 - p) * log sigmoid(-d)]
    p = 1 gives TRL's -log sigmoid(r_chosen - r_rejected - margin) (trl/trainer/reward_trainer.py).
    Per pair, dL/dr_a = sigmoid(d) - p = -dL/dr_b.
    """
    p = torch.as_tensor(p_a, dtype=r_a.dtype, device=r_a.device)
    d = r_a - r_b - margin  # (B,)
    # logsigmoid is stable for large |d| (log(sigmoid(d)) underflows to -inf)
    loss = -(p * F.logsigmoid(d) + (1.0 - p) * F.logsigmoid(-d))  # (B,)
    return loss.mean()


def pairwise_accuracy(r_a: Tensor, r_b: Tensor, p_a: Tensor | float) -> Tensor:
    """Fraction of decisive pairs (p != 0.5) where the model agrees with the label:
    mean of [(r_a > r_b) == (p > 0.5)]; NaN if no pair is decisive. A tie r_a == r_b counts as
    preferring B (TRL's accuracy is mean(r_chosen > r_rejected))."""
    p = torch.as_tensor(p_a, dtype=r_a.dtype, device=r_a.device).expand_as(r_a)  # (B,)
    decisive = p != 0.5  # (B,)
    correct = ((r_a > r_b) == (p > 0.5)).to(r_a.dtype)  # (B,)
    return masked_mean(correct, decisive)


def center_reward_penalty(r_a: Tensor, r_b: Tensor, coef: float) -> Tensor:
    """coef * mean((r_a + r_b)^2), added to the pairwise loss to keep rewards centred on 0 (the BT
    loss only sees differences). TRL RewardConfig.center_rewards_coefficient, from Eisenstein et al.
    2023 (arXiv 2312.09244) eq. 2."""
    return coef * ((r_a + r_b) ** 2).mean()


def sft_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy on the masked (assistant) tokens only, averaged over those tokens
    (token-level mean over the whole batch).

    logits (B, T, V), targets (B, T), mask (B, T) bool/0-1. The caller has already shifted:
    logits[:, t] is the prediction for targets[:, t], i.e. for input ids (B, L)
        logits = model(ids)[:, :-1]; targets = ids[:, 1:]; mask = assistant_mask[:, 1:]
    Targets at masked-out positions are ignored (they may be pad ids or -100).
    """
    m = mask.bool()
    safe_targets = torch.where(m, targets, torch.zeros_like(targets))  # (B, T) any valid id
    nll = F.cross_entropy(
        upcast_fp32(logits).flatten(0, 1), safe_targets.flatten(), reduction="none"
    ).view_as(targets)  # (B*T, V), (B*T,) -> (B, T)
    return masked_mean(nll, m)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[t_i] for h (N, C), W (V, C), targets t (N,), a chunk of rows at
    a time. The gradients are made in the forward, chunk by chunk, from the usual identity
        dL/dz_i = softmax(z_i) - onehot(t_i)        (z_i = W h_i, the logits of row i)
        dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T
    so only a (chunk, V) block of logits exists at any time, in place of the (N, V) logits, their
    fp32 copy, the log-softmax and its backward (Liger-Kernel's fused linear cross-entropy, Hsu et
    al. 2024, arXiv 2410.10989, does the same in Triton). backward only scales them by dL/dloss."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # explicit dtypes below
            hc, wc = h.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hc) if need else None  # (N, C)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need else None  # (V, C)
            for s in range(0, h.shape[0], chunk):
                z = (hc[s:s + chunk] @ wc.T).float()  # (n, V) fp32 logits of this chunk
                t = targets[s:s + chunk]  # (n,)
                lse = torch.logsumexp(z, dim=-1)  # (n,)
                loss += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
                if need:
                    g = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, in place of the logits
                    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0  # - onehot(t)
                    g = g.to(dtype)
                    grad_h[s:s + chunk] = g @ wc  # (n, C)
                    grad_w += (g.T @ hc[s:s + chunk]).float()  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.h_dtype), (grad_w * grad_loss).to(grad_w.dtype), None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Summed next-token NLL through the LM head without materialising the logits:
    h (N, C) final hidden states, weight (V, C) the LM head, targets (N,) -> 0-d fp32 sum over rows
    of -log softmax(h @ weight.T)[target]. Equal to
        F.cross_entropy((h @ weight.T).float(), targets, reduction="sum")
    (tests/test_losses.py checks values and both gradients). Under autocast the matrix products run
    in the autocast dtype (bf16), the softmax in fp32, as with autocast + F.cross_entropy."""
    dt = h.device.type
    dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)
