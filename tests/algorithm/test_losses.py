"""Reward-model pairwise loss and SFT loss against hand-computed values and independent routes."""
import math

import pytest
import torch
import torch.nn.functional as F

from minicai.infra.fast import FusedSFTLoss, linear_cross_entropy
from minicai.losses import pairwise_accuracy, pairwise_loss, sft_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# r_a = 2, r_b = 1 -> d = 1:  log sigmoid(1) = -log(1 + e^-1) = -0.31326168751822286,
#                             log sigmoid(-1) = -log(1 + e) = -1.3132616875182228
@pytest.mark.parametrize(
    "p, expected",
    [(1.0, 0.31326168751822286), (0.5, 0.8132616875182228), (0.0, 1.3132616875182228)],
)
def test_pairwise_loss_value_and_gradient_by_hand(p, expected):
    d = 1.0
    by_math = -(p * math.log(sigmoid(d)) + (1 - p) * math.log(sigmoid(-d)))
    assert by_math == pytest.approx(expected, abs=1e-15)
    r_a = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    r_b = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    loss = pairwise_loss(r_a, r_b, p)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # dL/dr_a = -[p * sigmoid(-d) - (1 - p) * sigmoid(d)] = sigmoid(d) - p;  dL/dr_b = -dL/dr_a
    g = -(p * sigmoid(-d) - (1 - p) * sigmoid(d))
    assert g == pytest.approx({1.0: -0.2689414213699951, 0.5: 0.2310585786300049, 0.0: 0.7310585786300049}[p])
    assert r_a.grad.item() == pytest.approx(g, abs=1e-12)
    assert r_b.grad.item() == pytest.approx(-g, abs=1e-12)


def test_pairwise_loss_batch_mean_and_per_pair_labels():
    r_a = torch.tensor([2.0, -0.5, 0.3], dtype=torch.float64, requires_grad=True)
    r_b = torch.tensor([1.0, 1.5, 0.3], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    loss = pairwise_loss(r_a, r_b, p)
    per_pair, grads = [], []
    for a, b, pi in zip([2.0, -0.5, 0.3], [1.0, 1.5, 0.3], [1.0, 0.5, 0.0]):
        d = a - b
        per_pair.append(-(pi * math.log(sigmoid(d)) + (1 - pi) * math.log(sigmoid(-d))))
        grads.append((sigmoid(d) - pi) / 3)  # the mean divides by B = 3
    assert loss.item() == pytest.approx(sum(per_pair) / 3, abs=1e-12)
    loss.backward()
    assert r_a.grad.tolist() == pytest.approx(grads, abs=1e-12)
    assert r_b.grad.tolist() == pytest.approx([-g for g in grads], abs=1e-12)


def test_pairwise_loss_is_trl_loss_at_p1_with_margin():
    g = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(16, generator=g), torch.randn(16, generator=g)
    margin = torch.rand(16, generator=g)
    trl = -F.logsigmoid(r_c - r_r - margin).mean()
    assert torch.allclose(pairwise_loss(r_c, r_r, 1.0, margin), trl, atol=1e-6)
    assert torch.allclose(pairwise_loss(r_c, r_r, torch.ones(16)), -F.logsigmoid(r_c - r_r).mean(), atol=1e-6)
    # hand value with a scalar margin: -log sigmoid(2 - 1 - 0.5) = log(1 + e^-0.5)
    one = pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), 1.0, margin=0.5)
    assert one.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    # swapping A and B with p -> 1 - p gives the same loss
    assert torch.allclose(pairwise_loss(r_c, r_r, 0.8), pairwise_loss(r_r, r_c, 0.2), atol=1e-6)


def test_pairwise_loss_is_stable_for_large_differences():
    loss = pairwise_loss(torch.tensor([100.0]), torch.tensor([0.0]), 0.0)  # -log sigmoid(-100) = 100
    assert torch.isfinite(loss) and loss.item() == pytest.approx(100.0, rel=1e-6)


def test_pairwise_accuracy_skips_ties_in_labels():
    r_a = torch.tensor([1.0, 0.0, 2.0, 5.0])
    r_b = torch.tensor([0.0, 1.0, 3.0, 5.0])
    p = torch.tensor([0.9, 0.2, 0.5, 1.0])
    # pair 0 right, pair 1 right (prefers B, label says B), pair 2 undecided (skipped),
    # pair 3 a reward tie counted as preferring B -> wrong
    assert pairwise_accuracy(r_a, r_b, p).item() == pytest.approx(2 / 3)
    assert pairwise_accuracy(r_a[:2], r_b[:2], 1.0).item() == pytest.approx(0.5)


def test_sft_loss_equals_loop_and_cross_entropy_on_masked_tokens():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    targets[~mask] = -100  # out-of-range ids on ignored positions must not matter
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                row = logits[b, t].tolist()
                lse = math.log(sum(math.exp(x) for x in row))
                total += lse - row[targets[b, t].item()]
                count += 1
    got = sft_loss(logits, targets, mask)
    assert got.item() == pytest.approx(total / count, abs=1e-10)
    assert torch.allclose(got, F.cross_entropy(logits[mask], targets[mask]), atol=1e-10)
    assert torch.allclose(sft_loss(logits, targets, mask.float()), got)
    # denominator: the masked sum over a given count (a data-parallel rank passes the global one)
    assert sft_loss(logits, targets, mask, denominator=4.0).item() == pytest.approx(total / 4, abs=1e-10)


def test_sft_loss_gradient_only_reaches_masked_positions():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    targets = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    sft_loss(logits, targets, mask).backward()
    assert bool((logits.grad[~mask] == 0).all()) and bool((logits.grad[mask].abs().sum(-1) > 0).all())


# ------------------------------------------------------------------------------ infra/fast.py: the fused twin
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(chunk):
    """The fused LM head + cross-entropy against the plain route (materialised logits), in float64
    so that only the algebra can differ: value and both gradients, with an upstream scale."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 9, 5, 13
    h = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    fused = linear_cross_entropy(h, w, t, chunk=chunk)
    (3.0 * fused).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = F.cross_entropy(h @ w.T, t, reduction="sum")
    (3.0 * plain).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)  # fused sums in fp32
    assert torch.allclose(gh, h.grad, atol=1e-12) and torch.allclose(gw, w.grad, atol=1e-12)


def test_linear_cross_entropy_hand_value():
    """h = [1, 0], W rows [1, 0], [0, 1], [0, 0]: logits (1, 0, 0); target 0 gives
    log(e + 2) - 1 = 0.5514447139, target 1 gives log(e + 2) = 1.5514447139."""
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    got = linear_cross_entropy(h, w, torch.tensor([0, 1]))
    assert got.item() == pytest.approx(0.5514447139 + 1.5514447139, abs=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_autocast_route():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, t, chunk=16)
        plain = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain.backward()
    assert fused.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)
    assert (gh - h.grad).abs().max() <= 0.02 * h.grad.abs().max()  # bf16 products on both routes
    assert (gw - w.grad).abs().max() <= 0.02 * w.grad.abs().max()


def test_fused_sft_loss_equals_sft_loss_on_logits(tiny):
    """FusedSFTLoss(model)(ids, attn_mask, mask) (train_sl.py --fused-ce) against the plain route:
    logits from model(ids, attn_mask), then sft_loss times its token count; padded batch, loss on
    some tokens only; value and the gradient of the (tied) LM head."""
    model, _ = tiny[:2]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 7), generator=g)
    att = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)  # assistant tokens
    fused = FusedSFTLoss(model)(ids, att, mask)
    fused.backward()
    g_fused = model.embed_tokens.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    plain = sft_loss(model(ids, att)[:, :-1], ids[:, 1:], mask[:, 1:]) * mask[:, 1:].sum()
    plain.backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(g_fused, model.embed_tokens.weight.grad, atol=1e-5)
    model.zero_grad(set_to_none=True)
    assert list(FusedSFTLoss(model).parameters()) == list(model.parameters())  # it owns no weights
    assert FusedSFTLoss(model).layers is model.layers  # what distributed.wrap shards block by block
