"""PPO math against brute force, numpy, and hand-computed values; padding holds garbage throughout."""
import math

import numpy as np
import pytest
import torch

from minicai.infra.fast import gae_vectorized
from minicai.infra.ppo import masked_moments, mean_var_from_moments
from minicai.rl import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    gae_mask,
    kl_loss,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    score_index,
    value_loss,
)

GARBAGE = 1e6


def ragged_mask(lengths, T):
    """(B, T) bool, True on the first lengths[b] positions of row b."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def random_batch(lengths, T, seed, dtype=torch.float64, garbage=GARBAGE):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(lengths, T)
    rewards = torch.randn(len(lengths), T, generator=g, dtype=dtype)
    values = torch.randn(len(lengths), T, generator=g, dtype=dtype)
    rewards[~mask] = garbage
    values[~mask] = garbage
    return rewards, values, mask


def brute_force_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_s = r_s + gamma V_{s+1} - V_s, V_L = 0; plain floats."""
    B, T = len(lengths), rewards.shape[1]
    adv = [[0.0] * T for _ in range(B)]
    for b, L in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()
        delta = [r[s] + gamma * (v[s + 1] if s + 1 < L else 0.0) - v[s] for s in range(L)]
        for t in range(L):
            adv[b][t] = sum((gamma * lam) ** l * delta[t + l] for l in range(L - t))
    return torch.tensor(adv, dtype=torch.float64)


LENGTHS = [5, 8, 1, 3, 8, 6]  # includes full-length rows (T = 8) and a single-token row


@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [0.95, 1.0, 0.0])
def test_gae_equals_brute_force_sum(gamma, lam):
    rewards, values, mask = random_batch(LENGTHS, 8, seed=int(gamma * 100 + lam * 10))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = brute_force_gae(rewards, values, LENGTHS, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-10)
    assert torch.allclose(ret, torch.where(mask, expected + values, 0.0), atol=1e-10)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())
    # the vectorized twin, and a float 0/1 mask, give the same answer
    adv_v, ret_v = gae_vectorized(rewards, values, mask.double(), gamma, lam)
    assert torch.allclose(adv_v, adv, atol=1e-10) and torch.allclose(ret_v, ret, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_gae_vectorized_equals_loop_random(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, T = 7, 33
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    gamma, lam = [1.0, 0.99, 0.9][seed % 3], [0.95, 1.0, 0.0, 0.5, 0.7][seed]
    rewards, values, mask = random_batch(lengths, T, seed, dtype=torch.float32, garbage=float("nan"))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_v, ret_v = gae_vectorized(rewards, values, mask, gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(adv_v).all()
    assert torch.allclose(adv_v, adv, atol=1e-4) and torch.allclose(ret_v, ret, atol=1e-4)


def test_gae_monte_carlo_case_lambda_gamma_one():
    rewards, values, mask = random_batch(LENGTHS, 8, seed=7)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    for b, L in enumerate(LENGTHS):
        r = rewards[b, :L].tolist()
        for t in range(L):
            # A_t = sum_{t' >= t} r_t' - V_t;  returns = reward-to-go
            assert adv[b, t].item() == pytest.approx(sum(r[t:]) - values[b, t].item(), abs=1e-10)
            assert ret[b, t].item() == pytest.approx(sum(r[t:]), abs=1e-10)


def test_gae_vectorized_rejects_left_padding():
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="prefix"):
        gae_vectorized(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0, 0.95)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_var_whiten_match_numpy_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    lengths, T = [3, 7, 1, 5], 7
    mask = ragged_mask(lengths, T)
    x = 3.0 + 2.0 * torch.randn(4, T, generator=g, dtype=torch.float64)
    x[~mask] = GARBAGE
    real = x[mask].numpy()
    assert masked_mean(x, mask).item() == pytest.approx(real.mean(), abs=1e-12)
    rows = masked_mean(x, mask, dim=1)
    assert rows.tolist() == pytest.approx([x[b, :L].mean().item() for b, L in enumerate(lengths)], abs=1e-12)
    for unbiased, ddof in [(False, 0), (True, 1)]:
        assert masked_var(x, mask, unbiased).item() == pytest.approx(np.var(real, ddof=ddof), abs=1e-12)
        w = masked_whiten(x, mask, unbiased=unbiased)
        expected = (real - real.mean()) / np.sqrt(np.var(real, ddof=ddof) + 1e-8)
        assert np.allclose(w[mask].numpy(), expected, atol=1e-10)
        assert bool((w[~mask] == 0).all())
    # the float 0/1 mask is the same mask
    assert torch.allclose(masked_whiten(x, mask.double()), masked_whiten(x, mask))


def test_masked_whiten_shift_mean_false_keeps_the_mean():
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([4, 2, 6], 6)
    x = 5.0 + 3.0 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    x[~mask] = GARBAGE
    w = masked_whiten(x, mask, shift_mean=False)
    real = x[mask].numpy()
    assert masked_mean(w, mask).item() == pytest.approx(real.mean(), abs=1e-10)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    expected = (real - real.mean()) / np.sqrt(real.var() + 1e-8) + real.mean()
    assert np.allclose(w[mask].numpy(), expected, atol=1e-10)


def test_whiten_with_summed_moments_equals_whole_batch():
    """What a data-parallel caller does: moments per shard, all_reduce (here: a sum), whiten."""
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([4, 2, 6, 3, 6, 1], 6)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x[~mask] = GARBAGE
    shards = [masked_moments(x[:2], mask[:2]), masked_moments(x[2:], mask[2:])]
    s, ss, n = (sum(parts) for parts in zip(*shards))
    assert n.item() == mask.sum().item()
    for unbiased in (False, True):
        stats = mean_var_from_moments(s, ss, n, unbiased)
        assert stats[1].item() == pytest.approx(masked_var(x, mask, unbiased).item(), abs=1e-10)
        full = masked_whiten(x, mask, unbiased=unbiased)
        part = masked_whiten(x[2:], mask[2:], unbiased=unbiased, stats=stats)
        assert torch.allclose(part, full[2:], atol=1e-10)


def test_unbiased_var_needs_two_tokens():
    with pytest.raises(ValueError):
        masked_var(torch.ones(1, 3), ragged_mask([1], 3), unbiased=True)


def test_explained_variance():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([5, 3, 2], 5)
    target = torch.randn(3, 5, generator=g, dtype=torch.float64)
    pred = target.clone()
    pred[~mask] = GARBAGE
    assert explained_variance(pred, target, mask).item() == pytest.approx(1.0)
    const = torch.full_like(target, masked_mean(target, mask).item())
    assert explained_variance(const, target, mask).item() == pytest.approx(0.0, abs=1e-12)
    real_t = target[mask].numpy()
    noisy = target + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    expected = 1 - np.var(real_t - noisy[mask].numpy()) / np.var(real_t)
    assert explained_variance(noisy, target, mask).item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- KL, entropy, log-probs


def test_kl_estimators_hand_values_and_signs():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # r = pi_ref / pi = 0.5:  k1 = -log r = log 2;  k2 = 0.5 (log 0.5)^2;  k3 = (0.5 - 1) - log 0.5
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(0.5) ** 2)
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 - math.log(0.5))
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(0.1931471805599453)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    for kind in ("k1", "k2", "k3"):
        assert bool((kl_per_token(a, a, kind) == 0).all())
    assert bool((kl_per_token(a, b, "k3") >= 0).all()) and bool((kl_per_token(a, b, "k2") >= 0).all())
    with pytest.raises(ValueError):
        kl_per_token(a, b, "k4")


def test_k1_k3_are_unbiased_for_kl_pi_ref():
    """Sampling tokens from pi, mean(k1) and mean(k3) estimate KL(pi || pi_ref) = sum pi log(pi/pi_ref)."""
    pi = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum().item()
    g = torch.Generator().manual_seed(0)
    tok = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logp, ref_logp = pi.log()[tok], ref.log()[tok]
    assert exact == pytest.approx(0.7 * math.log(7) + 0.3 * math.log(1 / 3))  # 1.033
    assert kl_per_token(logp, ref_logp, "k1").mean().item() == pytest.approx(exact, abs=0.02)
    assert kl_per_token(logp, ref_logp, "k3").mean().item() == pytest.approx(exact, abs=0.02)
    # minChatGPT's inverted ratio (r = pi / pi_ref) estimates E_pi[pi / pi_ref] - 1 - KL = 4.0 - 1.033
    inverted = kl_per_token(ref_logp, logp, "k3").mean().item()
    assert inverted == pytest.approx(4.0 - exact, abs=0.1)


def test_entropy_from_logits():
    V = 8
    logits = torch.zeros(2, 3, V)
    assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(V)))
    peaked = torch.full((1, 1, V), -1e4)
    peaked[..., 2] = 0.0
    assert entropy_from_logits(peaked).abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 4, V, generator=g, dtype=torch.float64)
    p = r.softmax(-1)
    assert torch.allclose(entropy_from_logits(r), -(p * p.log()).sum(-1), atol=1e-12)


def test_logprobs_from_logits_uses_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 9, (2, 5), generator=g)
    for temp in (1.0, 0.7):
        expected = torch.distributions.Categorical(logits=logits / temp).log_prob(tokens)
        assert torch.allclose(logprobs_from_logits(logits, tokens, temp), expected, atol=1e-12)
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens, 1.0))
    assert logprobs_from_logits(logits.to(torch.bfloat16), tokens).dtype == torch.float32


# ---------------------------------------------------------------- per-token rewards


def test_per_token_rewards_score_column_both_conventions():
    T = 5
    mask = ragged_mask([3, 5, 1], T)  # row 1 is full length
    kl = torch.ones(3, T)
    kl[~mask] = GARBAGE
    score = torch.tensor([10.0, 20.0, 30.0])
    assert score_index(mask, "last").tolist() == [2, 4, 0]
    # first padding position after the last real token; the full-length row falls back to its last
    assert score_index(mask, "eos_plus_one").tolist() == [3, 4, 1]
    last = per_token_rewards(score, kl, mask, beta=0.1, reward_at="last")
    expected_last = torch.tensor([
        [-0.1, -0.1, 9.9, 0.0, 0.0],
        [-0.1, -0.1, -0.1, -0.1, 19.9],
        [29.9, 0.0, 0.0, 0.0, 0.0],
    ])
    assert torch.allclose(last, expected_last)
    eos1 = per_token_rewards(score, kl, mask, beta=0.1, reward_at="eos_plus_one")
    expected_eos1 = torch.tensor([
        [-0.1, -0.1, -0.1, 10.0, 0.0],
        [-0.1, -0.1, -0.1, -0.1, 19.9],
        [-0.1, 30.0, 0.0, 0.0, 0.0],
    ])
    assert torch.allclose(eos1, expected_eos1)
    assert gae_mask(mask, "last").equal(mask)
    assert gae_mask(mask, "eos_plus_one").equal(ragged_mask([4, 5, 2], T))


def test_eos_plus_one_score_reaches_gae_through_gae_mask():
    mask = ragged_mask([2, 4], 4)
    score, kl = torch.tensor([1.0, 2.0]), torch.zeros(2, 4)
    rewards = per_token_rewards(score, kl, mask, beta=0.1, reward_at="eos_plus_one")
    zeros = torch.zeros(2, 4)
    adv, _ = gae(rewards, zeros, gae_mask(mask, "eos_plus_one"), 1.0, 1.0)
    assert adv[:, 0].tolist() == [1.0, 2.0]
    # with the plain mask the score of row 0 (in a padding column) would be dropped
    assert gae(rewards, zeros, mask, 1.0, 1.0)[0][0, 0].item() == 0.0


def test_score_index_rejects_bad_masks():
    with pytest.raises(ValueError, match="prefix"):
        score_index(torch.tensor([[False, True, True]]))
    with pytest.raises(ValueError, match="at least one"):
        score_index(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError):
        score_index(torch.tensor([[True, False]]), "eos")


# ---------------------------------------------------------------- PPO losses


# (ratio, advantage) -> (per-token loss, clipped?) for clip eps = 0.2, by hand:
#   loss = max(-A r, -A clip(r, 0.8, 1.2))
HAND_PG = [
    (1.5, 1.0, -1.2, True),   # max(-1.5, -1.2): the clipped term is active
    (1.5, -1.0, 1.5, False),  # max(1.5, 1.2)
    (0.5, 1.0, -0.5, False),  # max(-0.5, -0.8)
    (0.5, -1.0, 0.8, True),   # max(0.5, 0.8)
    (1.1, 2.0, -2.2, False),  # inside the clip range: both terms -2.2
]


@pytest.mark.parametrize("ratio, adv, expected, clipped", HAND_PG)
def test_policy_loss_hand_values(ratio, adv, expected, clipped):
    logp_new = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, stats = policy_loss(logp_new, torch.zeros(1, 1, dtype=torch.float64),
                              torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), 0.2)
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)
    assert stats["approxkl"].item() == pytest.approx(0.5 * math.log(ratio) ** 2)
    loss.backward()
    # d/dlogp of -A r = -A r; the clipped branch is constant in logp
    assert logp_new.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio)


def test_policy_loss_batch_mean_with_garbage_padding():
    mask = ragged_mask([3, 2], 3)
    logp_new = torch.full((2, 3), float("nan"), dtype=torch.float64)
    adv = torch.full((2, 3), GARBAGE, dtype=torch.float64)
    cells = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for (b, t), (ratio, a, _, _) in zip(cells, HAND_PG):
        logp_new[b, t], adv[b, t] = math.log(ratio), a
    logp_new.requires_grad_(True)
    loss, stats = policy_loss(logp_new, torch.zeros(2, 3, dtype=torch.float64), adv, mask, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    ratios = np.array([1.5, 1.5, 0.5, 0.5, 1.1])
    assert stats["ratio_mean"].item() == pytest.approx(ratios.mean())
    assert stats["ratio_var"].item() == pytest.approx(ratios.var())
    loss.backward()
    assert torch.isfinite(logp_new.grad).all() and logp_new.grad[1, 2].item() == 0.0


def test_policy_loss_ratio_one_when_logps_match():
    g = torch.Generator().manual_seed(0)
    mask = ragged_mask([4, 1, 3], 4)
    logp = torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2)
    assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_var"].item() == 0.0
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)


# (v_new, expected loss, clipped?) with v_old = 0, return R = 1, eps_v = 0.2, by hand:
#   0.5 * max((V - R)^2, (clip(V, -0.2, 0.2) - R)^2)
HAND_VF = [
    (0.1, 0.5 * 0.81, False),  # inside: both (0.1 - 1)^2 = 0.81
    (0.5, 0.5 * 0.64, True),   # max(0.25, (0.2 - 1)^2 = 0.64)
    (-0.5, 0.5 * 2.25, False),  # max((-0.5 - 1)^2 = 2.25, (-0.2 - 1)^2 = 1.44)
]


@pytest.mark.parametrize("v, expected, clipped", HAND_VF)
def test_value_loss_hand_values(v, expected, clipped):
    one = torch.ones(1, 1, dtype=torch.float64)
    loss, stats = value_loss(v * one, 0 * one, one, one.bool(), 0.2)
    assert loss.item() == pytest.approx(expected)
    assert stats["vf_clipfrac"].item() == (1.0 if clipped else 0.0)


def test_value_loss_batch_ignores_padding():
    mask = ragged_mask([2, 1], 2)
    v_new = torch.tensor([[0.1, 0.5], [-0.5, float("nan")]], dtype=torch.float64, requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0], [0.0, GARBAGE]], dtype=torch.float64)
    ret = torch.tensor([[1.0, 1.0], [1.0, GARBAGE]], dtype=torch.float64)
    loss, stats = value_loss(v_new, v_old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(sum(e for _, e, _ in HAND_VF) / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.isfinite(v_new.grad).all() and v_new.grad[1, 1].item() == 0.0


def test_losses_with_the_global_denominator_split_like_ranks_equal_the_whole_batch():
    """Data parallel as a denominator: rows split over 2 'ranks', each loss the rank's masked sum /
    (global count / 2) (infra.distributed.loss_denominator): the mean over ranks (DDP's gradient
    average) is the whole batch's loss, and so are the gradients and the token-mean statistics."""
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([5, 1, 8, 3, 7, 2], 8)  # unequal token counts per rank
    B, T = mask.shape
    new = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    old, ref, adv = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    v_new, v_old, ret = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    new[~mask] = GARBAGE

    def losses(rows, denominator):
        x, v = new[rows].clone().requires_grad_(True), v_new[rows].clone().requires_grad_(True)
        pg, st = policy_loss(x, old[rows], adv[rows], mask[rows], 0.2, denominator=denominator)
        vf, vst = value_loss(v, v_old[rows], ret[rows], mask[rows], 0.2, denominator=denominator)
        kl = kl_loss(x, ref[rows], mask[rows], denominator=denominator)
        (pg + 0.1 * vf + 0.5 * kl).backward()
        return torch.stack([pg, vf, kl, st["approxkl"], st["clipfrac"], st["ratio_mean"], vst["vf_clipfrac"]]), \
            x.grad, v.grad

    whole, gx, gv = losses(torch.arange(B), None)
    den = mask.sum() / 2  # the global count / world size
    parts = [losses(torch.arange(r, B, 2), den) for r in range(2)]
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, whole)
    for r in range(2):  # each rank's gradient / 2 (DDP averages) is the whole batch's gradient of its rows
        torch.testing.assert_close(parts[r][1][mask[r::2]] / 2, gx[r::2][mask[r::2]])
        torch.testing.assert_close(parts[r][2][mask[r::2]] / 2, gv[r::2][mask[r::2]])
    # the default denominator is the local count: one process is unchanged
    torch.testing.assert_close(losses(torch.arange(B), mask.sum())[0], whole)


def test_kl_loss_is_the_token_mean_of_k3():
    g = torch.Generator().manual_seed(4)
    mask = ragged_mask([3, 1], 4)
    logp, ref = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    logp[~mask] = float("nan")
    got = kl_loss(logp, ref, mask)
    r = torch.exp(ref - logp)[mask]
    torch.testing.assert_close(got, ((r - 1) - torch.log(r)).mean())  # Schulman 2020 k3, GRPO eq. 4
    assert kl_loss(ref, ref, mask).item() == 0.0


# ---------------------------------------------------------------- KL controller


def test_adaptive_kl_controller_hand_values():
    ctl = KLController(0.1, target=6.0)
    # e = clip(12 / 6 - 1, -0.2, 0.2) = 0.2;  beta = 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert ctl.value == pytest.approx(0.100512)
    ctl = KLController(0.1, target=6.0)
    ctl.update(6.6, 256)  # e = 0.1 (not clipped)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))
    ctl = KLController(0.1, target=6.0, horizon=1000)
    ctl.update(0.0, 100)  # e = clip(-1) = -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 1000))


def test_fixed_kl_controller_never_moves():
    ctl = KLController(0.05)
    for kl in (0.0, 6.0, 100.0):
        assert ctl.update(kl, 512) == 0.05


# ---- critic-free advantages (RLOO, GRPO) -------------------------------------------------------

def test_rloo_and_grpo_advantages_against_hand_computation_on_a_ragged_batch():
    from minicai.rl import grpo_advantages, rloo_advantages, sequence_advantages
    # two prompts, k = 3 samples each; responses of lengths 2, 4, 1 | 3, 3, 2 (ragged)
    rewards = torch.tensor([1.0, 4.0, 7.0, -1.0, 0.0, 4.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                         [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    # RLOO by hand: A_i = R_i - mean of the other two
    # group 1: 1 - (4+7)/2 = -4.5, 4 - (1+7)/2 = 0, 7 - (1+4)/2 = 4.5
    # group 2: -1 - (0+4)/2 = -3, 0 - (-1+4)/2 = -1.5, 4 - (-1+0)/2 = 4.5
    rloo = rloo_advantages(rewards, 3)
    assert torch.allclose(rloo, torch.tensor([-4.5, 0.0, 4.5, -3.0, -1.5, 4.5]))
    # GRPO by hand: group 1 mean 4, deviations -3, 0, 3, unbiased std sqrt(18/2) = 3
    # group 2 mean 1, deviations -2, -1, 3, unbiased std sqrt(14/2) = sqrt(7)
    grpo = grpo_advantages(rewards, 3)
    s7 = math.sqrt(7.0) + 1e-4
    expect = torch.tensor([-3 / 3.0001, 0.0, 3 / 3.0001, -2 / s7, -1 / s7, 3 / s7])
    assert torch.allclose(grpo, expect, atol=1e-6)
    # on tokens: the row's advantage on each real token, 0 on padding
    tok = sequence_advantages(rloo, mask)
    assert tok.shape == mask.shape
    assert torch.equal(tok[0], torch.tensor([-4.5, -4.5, 0.0, 0.0]))
    assert torch.equal(tok[2], torch.tensor([4.5, 0.0, 0.0, 0.0]))
    assert torch.equal(tok[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("value", [0.1, -3.7, 1e-3, 12345.678])
@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_k_identical_rewards_give_advantages_of_exactly_zero(value, k):
    from minicai.rl import grpo_advantages, rloo_advantages
    r = torch.full((2 * k,), value)
    assert torch.equal(rloo_advantages(r, k), torch.zeros(2 * k))
    assert torch.equal(grpo_advantages(r, k), torch.zeros(2 * k))


def test_group_advantages_sum_to_zero_and_reject_bad_groups():
    from minicai.rl import grpo_advantages, rloo_advantages
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    for f in (rloo_advantages, grpo_advantages):
        assert torch.allclose(f(r, 4).reshape(3, 4).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # GRPO's advantages have unit (unbiased) std within a group, up to eps
    a = grpo_advantages(r, 4, eps=0.0).reshape(3, 4)
    assert torch.allclose(a.std(1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        rloo_advantages(r, 5)  # 12 rows are not groups of 5
    with pytest.raises(ValueError):
        grpo_advantages(r, 1)
