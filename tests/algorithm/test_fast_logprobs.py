"""train_ppo.py --fused-logprobs: infra.fast.linear_logprobs against a hand-derived value and against
its plain twin (full logits + rl.logprobs_from_logits / rl.entropy_from_logits): values, both
gradients, chunking, bf16 autocast, and one whole PPO iteration with and without the flag."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minicai.infra.fast import linear_logprobs  # noqa: E402
from minicai.infra.ppo import response_forward, rollout_batch  # noqa: E402
from minicai.rl import entropy_from_logits, logprobs_from_logits  # noqa: E402
from minicai.sample import generate  # noqa: E402

from test_ppo import Steps  # noqa: E402


def test_hand_derived_two_token_vocabulary():
    # W = I, h = (0, ln 3), T = 1: z = (0, ln 3), p = (1/4, 3/4). Token 1: logp = ln(3/4);
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4); d logp / dh = (onehot - p) W = (-1/4, 1/4); d logp / dW = (onehot - p)^T h.
    h = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    w = torch.eye(2, dtype=torch.float64, requires_grad=True)
    logp, ent = linear_logprobs(h, w, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-12)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-12)
    logp.sum().backward()
    assert h.grad[0].tolist() == pytest.approx([-0.25, 0.25], abs=1e-12)
    assert w.grad.flatten().tolist() == pytest.approx([0.0, -0.25 * math.log(3.0), 0.0, 0.25 * math.log(3.0)],
                                                      abs=1e-12)
    # temperature 2: z = (0, ln 3) / 2, p = (1, sqrt 3) / (1 + sqrt 3); gradient divided by T
    h2 = h.detach().clone().requires_grad_(True)
    logp2, _ = linear_logprobs(h2, w.detach(), torch.tensor([0]), temperature=2.0)
    s3 = math.sqrt(3.0)
    assert logp2.item() == pytest.approx(math.log(1 / (1 + s3)), abs=1e-12)
    logp2.sum().backward()
    p0 = 1 / (1 + s3)  # (onehot - p) / T with onehot = (1, 0): ((1 - p0) / 2, -(1 - p0) / 2)
    assert h2.grad[0].tolist() == pytest.approx([(1 - p0) / 2, -(1 - p0) / 2], abs=1e-12)


@pytest.mark.parametrize("chunk", [3, 128])
def test_equals_the_plain_twin_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    N, C, V, T = 10, 8, 37, 0.7
    h = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=torch.float64)

    logits = h @ w.T  # the plain twin
    ref_logp = logprobs_from_logits(logits, tokens, T)
    ref_ent = entropy_from_logits(logits.detach() / T)
    (ref_logp * upstream).sum().backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    logp, ent = linear_logprobs(h, w, tokens, T, chunk=chunk)
    (logp * upstream).sum().backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-12, rtol=0)  # fp64 in, fp64 softmax: equal up to rounding
    torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    torch.testing.assert_close(h.grad, ref_gh, atol=1e-12, rtol=1e-10)  # fp64 gradients: exact up to rounding
    torch.testing.assert_close(w.grad, ref_gw, atol=1e-12, rtol=1e-10)
    assert not ent.requires_grad


def test_response_forward_fused_equals_plain(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("hello there", "a", "the cat sat")]
    gen = generate(model, prompts, 10, temperature=0.7, stop_ids=tok.stop_ids, seed=3, pad_id=tok.pad_id)
    seq, attn, P = rollout_batch(gen)
    outs = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        out = response_forward(model, seq, attn, P, 0.7, entropy=True, fused=fused)
        out.logprobs[gen.mask].sum().backward()
        outs[fused] = out, [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)  # the session's shared tiny model leaves this test without gradients
    (plain, g_plain), (fused, g_fused) = outs[False], outs[True]
    # fp32: the same sums in another order; the log-probs are O(1), the tolerance is ~100 fp32 ulps
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.entropy, plain.entropy, atol=1e-5, rtol=0)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # both through bf16 matmuls, fp32 softmax
        a = response_forward(model, seq, attn, P, 0.7, fused=True).logprobs
        b = response_forward(model, seq, attn, P, 0.7).logprobs
    # the same bf16 logits on both routes, then fp32 softmax: only summation order differs
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_one_ppo_iteration_with_and_without_the_flag(tiny_gguf):
    runs = {}
    for extra in ((), ("--fused-logprobs",)):
        torch.manual_seed(0)
        steps = Steps(tiny_gguf, *extra)
        r, stats = steps.iteration(0)
        runs[extra] = r, stats, [p.detach().clone() for p in steps.m.trained.parameters()]
    (r0, s0, w0), (r1, s1, w1) = runs[()], runs[("--fused-logprobs",)]
    assert torch.equal(r0.seq, r1.seq)  # the same rollout (seeded per row)
    assert torch.equal(r1.logprobs, r1.ref_logprobs) and s1[0]["first_ratio_dev"] == 0.0  # exact at the start
    torch.testing.assert_close(r1.logprobs, r0.logprobs, atol=1e-5, rtol=0)
    for a, b in zip(s0, s1):
        torch.testing.assert_close(b["pg_loss"], a["pg_loss"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["entropy"], a["entropy"], atol=1e-5, rtol=1e-4)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # lr 1e-5 steps: tiny moves, equal to ~1e-7
