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


def next_token_targets(ids: Tensor, mask: Tensor) -> Tensor:
    """The targets of Transformer.forward(ids, attn_mask, targets=): position t predicts
    ids[:, t + 1], counted where mask[:, t + 1] is set (the assistant reply, say); -100 where
    nothing is predicted, the last column included. ids, mask (B, T) -> (B, T) long."""
    return F.pad(torch.where(mask[:, 1:].bool(), ids[:, 1:], -100), (0, 1), value=-100)  # (B, T)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[t_i] for h (N, C), W (V, C), targets t (N,). The gradients are
    made in the forward, from the usual identity
        dL/dz_i = softmax(z_i) - onehot(t_i)        (z_i = W h_i, the logits of row i)
        dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T
    The logits are made and turned into dL/dz in place, in one (N, V) buffer of the compute dtype;
    the fp32 softmax runs a chunk of rows at a time in one reused fp32 buffer. Nothing else of size
    (N, V) is allocated: no fp32 copy of the logits, no log-softmax output, no log-softmax
    backward (Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv 2410.10989, fuses
    the same steps in Triton). backward only scales the saved gradients by dL/dloss."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # explicit dtypes below
            hc, wc = h.to(dtype), weight.to(dtype)
            z = hc @ wc.T  # (N, V) logits in the compute dtype, overwritten by dL/dz below
            buf = torch.empty(min(chunk, z.shape[0]), z.shape[1], dtype=torch.float32, device=h.device)  # (n, V)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, z.shape[0], chunk):
                zc = buf[:min(chunk, z.shape[0] - s)].copy_(z[s:s + chunk])  # (n, V) fp32 logits
                t = targets[s:s + chunk, None]  # (n, 1)
                target_logit = zc.gather(1, t)  # (n, 1)
                m = zc.amax(dim=-1, keepdim=True)  # (n, 1) for a stable exp
                total = zc.sub_(m).exp_().sum(dim=-1, keepdim=True)  # (n, 1) sum of exp(z - m)
                loss += (m + total.log() - target_logit).sum()  # log-sum-exp - z_t
                if need:
                    zc.div_(total).scatter_add_(1, t, torch.full_like(target_logit, -1.0))  # softmax - onehot
                    z[s:s + chunk].copy_(zc)
            grad_h = (z @ wc).to(h.dtype) if need else None  # (N, C)
            grad_w = (z.T @ hc).to(weight.dtype) if need else None  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int = 128) -> Tensor:
    """Summed next-token NLL through the LM head without materialising the logits:
    h (N, C) final hidden states, weight (V, C) the LM head, targets (N,) -> 0-d fp32 sum over rows
    of -log softmax(h @ weight.T)[target]. Equal to
        F.cross_entropy((h @ weight.T).float(), targets, reduction="sum")
    (tests/test_losses.py checks values and both gradients). Under autocast the matrix products run
    in the autocast dtype (bf16), the softmax in fp32, as with autocast + F.cross_entropy."""
    dt = h.device.type
    dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)
