"""Opt-in fast paths: the same numbers as the plain code in minicai/, computed with less memory.

FusedSFTLoss is train_sl.py --fused-ce: the SFT loss of losses.sft_loss (summed here; the caller
divides), with the LM head fused into the cross-entropy so that the (N, V) logits of the predicted
positions are never held in fp32, and the (B, T, V) logits of the whole batch never exist.
tests/algorithm/test_losses.py checks linear_cross_entropy against F.cross_entropy (values and both
gradients) and tests/algorithm/test_train_sl.py one SFT step with and without it; bench/bench_train.py says
what it buys.

linear_logprobs is train_ppo.py --fused-logprobs: PPO's per-token log-probs and entropies of the
response tokens (infra.ppo.response_forward's plain route: full logits, rl.logprobs_from_logits,
rl.entropy_from_logits) with the LM head fused in the same way.

gae_vectorized is GAE as one matmul (rl.gae is the loop it equals; tests/algorithm/test_rl.py);
compiled_decode_one_token is sample.decode_one_token through torch.compile, passed in at the entry point
(generate(decode=compiled_decode_one_token()) when --compile asks: gpt-fast compiles in main).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..rl import _where, check_prefix_mask
from ..sample import decode_one_token


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
    (tests/algorithm/test_losses.py checks values and both gradients). Under autocast the matrix products run
    in the autocast dtype (bf16), the softmax in fp32, as with autocast + F.cross_entropy."""
    dt = h.device.type
    dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)


class _LinearLogprobs(torch.autograd.Function):
    """PPO's per-token log-probs and entropies through the LM head, for h (N, C), W (V, C), tokens
    t (N,), temperature T, with z_i = W h_i / T (the tempered logits of row i):
        logp_i = z_i[t_i] - logsumexp(z_i)             (rl.logprobs_from_logits)
        H_i    = logsumexp(z_i) - sum_v p_iv z_iv     (rl.entropy_from_logits; p_i = softmax(z_i))
    and the gradient of logp only (the entropy is a statistic, as in train_ppo's plain path):
        dlogp_i/d(W h_i) = (onehot(t_i) - p_i) / T
        dL/dh_i = g_i (onehot(t_i) - p_i) / T W,   dL/dW = sum_i g_i (onehot(t_i) - p_i)^T h_i / T
    with g_i = dL/dlogp_i known only in backward. The logits are made once in the compute dtype
    and overwritten in place by (onehot - p) / T, one (N, V) buffer; the fp32 softmax runs a chunk
    of rows at a time (fp64 inputs: fp64). No fp32 (N, V) logits, no division by T, no log-softmax output and no
    log-softmax backward exist (the plain path makes five (N, V) fp32 tensors)."""

    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, chunk, dtype):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):  # explicit dtypes below
            hc, wc = h.to(dtype), weight.to(dtype)
            z = hc @ wc.T  # (N, V) logits in the compute dtype; becomes (onehot - p) / T below
            N = z.shape[0]
            sd = torch.promote_types(z.dtype, torch.float32)  # the softmax's dtype: fp32 (fp64 stays fp64), as rl.upcast_fp32
            buf = torch.empty(min(chunk, N), z.shape[1], dtype=sd, device=h.device)  # (n, V)
            logp = torch.empty(N, dtype=sd, device=h.device)
            ent = torch.empty(N, dtype=sd, device=h.device)
            for s in range(0, N, chunk):
                zc = buf[:min(chunk, N - s)].copy_(z[s:s + chunk]).div_(temperature)  # (n, V) fp32 z / T
                t = tokens[s:s + chunk, None]  # (n, 1)
                m = zc.amax(dim=-1, keepdim=True)  # (n, 1) for a stable exp
                target = zc.gather(1, t) - m  # (n, 1) z_t - m
                zc.sub_(m)  # z - m
                e = zc.exp()  # (n, V) exp(z - m)
                total = e.sum(dim=-1, keepdim=True)  # (n, 1)
                lse = total.log()  # (n, 1) logsumexp(z) - m
                logp[s:s + chunk] = (target - lse).squeeze(1)
                p = e.div_(total)  # (n, V) softmax(z)
                ent[s:s + chunk] = (lse - (p * zc).sum(-1, keepdim=True)).squeeze(1)  # shifts by m cancel
                if need:
                    p.neg_().scatter_add_(1, t, torch.ones_like(target)).div_(temperature)  # (onehot - p) / T
                    z[s:s + chunk].copy_(p)
        ctx.save_for_backward(hc if need else None, wc if need else None, z if need else None)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hc, wc, dz = ctx.saved_tensors
        with torch.autocast(hc.device.type, enabled=False):
            g = dz * grad_logp.to(dz.dtype)[:, None]  # (N, V) dL/d(W h) = g_i (onehot - p_i) / T
            grad_h = (g @ wc).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None  # (N, C)
            grad_w = (g.T @ hc).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None  # (V, C)
        return grad_h, grad_w, None, None, None, None


def linear_logprobs(h: Tensor, weight: Tensor, tokens: Tensor, temperature: float = 1.0,
                    chunk: int = 128) -> tuple[Tensor, Tensor]:
    """train_ppo.py --fused-logprobs: log-probs of `tokens` and entropies under
    softmax(h @ weight.T / temperature) without the fp32 logits. h (N, C) hidden states before each
    token, weight (V, C) the LM head, tokens (N,) -> (logp (N,) fp32 with a gradient, entropy (N,)
    fp32 without). Equal to
        z = h @ weight.T;  rl.logprobs_from_logits(z, tokens, T), rl.entropy_from_logits(z.float() / T)
    (tests/algorithm/test_ppo.py checks the values and both gradients). Under autocast the matrix
    products run in the autocast dtype (bf16), the softmax in fp32, as on the plain path."""
    dt = h.device.type
    dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else h.dtype
    return _LinearLogprobs.apply(h, weight, tokens, float(temperature), chunk, dtype)


class FusedSFTLoss(nn.Module):
    """A Transformer whose forward is the summed SFT loss, through linear_cross_entropy. It is a
    module (not a function beside the model) so that distributed.wrap can wrap it in place of the
    model: under FSDP2 a sharded module's parameters are whole only inside its own forward, and the
    LM head weight is used here, after the trunk. It holds no parameters of its own: its state is
    the model's (checkpoints save the model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        """The model's blocks: distributed.wrap shards each block, then this module (the rest)."""
        return self.model.layers

    def forward(self, ids: Tensor, attn_mask: Tensor, mask: Tensor) -> Tensor:
        """ids, attn_mask (B, T) a padded batch; mask (B, T) the tokens to predict (assistant
        tokens), as losses.sft_loss's caller passes them before shifting. Returns the summed NLL of
        those tokens, 0-d fp32: sft_loss(model(ids, attn_mask)[:, :-1], ids[:, 1:], mask[:, 1:])
        times its denominator. Only the predicted positions go through the LM head."""
        h = self.model.padded_forward(ids, attn_mask, hidden=True)[:, :-1]  # (B, T-1, C) position t predicts t+1
        keep = mask[:, 1:].bool()  # (B, T-1)
        return linear_cross_entropy(h[keep], self.model.head_weight, ids[:, 1:][keep])  # (n, C), (n,) -> 0-d


def gae_vectorized(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE without a Python loop: A_t = sum_{s >= t} (gamma * lam)^(s - t) * delta_s, written as
    one matmul with a (T, T) upper-triangular discount matrix (Schulman et al. 2016 eq. 16,
    the closed form). Needs prefix masks, so that delta_s = 0 on padding ends each row's sum.
    Same outputs as `gae` (tested); O(B * T^2), fine for response lengths of a few hundred."""
    check_prefix_mask(mask)
    m = mask.bool()
    r, v = _where(m, rewards), _where(m, values)  # (B, T)
    T = r.shape[1]
    next_v = F.pad(v[:, 1:], (0, 1))  # (B, T) V_{t+1}, 0 after the end (and 0 on padding)
    delta = _where(m, r + gamma * next_v - v)  # (B, T)
    idx = torch.arange(T, device=r.device)
    lag = idx[None, :] - idx[:, None]  # (T, T) lag[t, s] = s - t
    disc = torch.where(lag >= 0, (gamma * lam) ** lag.clamp_min(0).to(r.dtype), 0.0)  # (T, T), 0^0 = 1
    # Schulman et al. 2016 eq. 16: A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}
    adv = delta @ disc.T  # (B, T): adv[b, t] = sum_s delta[b, s] * disc[t, s]
    adv = _where(m, adv)
    return adv, _where(m, adv + v)


_compiled_decode = None


def compiled_decode_one_token():
    """decode_one_token through torch.compile (inductor), compiled once per process on first use.
    dynamic=True: the cache slot and the mask length grow by one each step, and batch sizes
    vary, so the step is traced with symbolic sizes instead of recompiling every step. Numerics
    match eager up to fused-kernel rounding (tests/algorithm/test_sample.py, slow). Compiling takes about a
    minute on a 2-core CPU and needs a C++ compiler (CPU) or Triton (CUDA); it pays off on long
    generations only (docs/benchmarks.md)."""
    global _compiled_decode
    if _compiled_decode is None:
        _compiled_decode = torch.compile(decode_one_token, dynamic=True)
    return _compiled_decode
