"""Graded: part 6, PPO (minicai/rl.py): KL estimators, per-token rewards, GAE, whitening, the
clipped policy and value losses, the adaptive KL controller. Every (B, T) function must ignore
padding: the tests put garbage (1e6, inf) there and expect the same result."""
import math

import pytest
import torch

from grading import check, check_float, garbage_on, load, mistakes
from minicai import rl

ex = pytest.mark.exercise


# ------------------------------------------------------------------------------ kl_estimators
@ex("kl_estimators")
def test_kl_estimators_match_the_fixture():
    fx = load("kl_estimators")
    for kind in ("k1", "k2", "k3"):
        check(rl.kl_per_token(fx["logp"], fx["ref_logp"], kind), fx[kind], f"kl_per_token({kind!r}) (B, T)")
    for kind in ("k1", "k2", "k3"):
        check(rl.kl_per_token(fx["near"], fx["near_ref"], kind), fx[f"near_{kind}"],
              f"kl_per_token({kind!r}) with pi_ref / pi within 0.2% of 1: precision (for k3 compute r - 1 as "
              "torch.expm1(log r); exp(log r) - 1 loses the digits)", atol=1e-10, rtol=1e-3)
    with pytest.raises(ValueError):
        rl.kl_per_token(fx["logp"], fx["ref_logp"], "k4")


@ex("kl_estimators")
def test_kl_estimators_hand_values():
    # pi = 0.5, pi_ref = 0.25: log r = log(pi_ref / pi) = log 0.5 = -0.6931472
    # k1 = -log r = 0.6931472; k2 = (log r)^2 / 2 = 0.2402265; k3 = (r - 1) - log r = -0.5 + 0.6931472 = 0.1931472
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    check_float(rl.kl_per_token(logp, ref, "k1"), 0.6931472, "k1 hand value (sign: k1 = logp - ref_logp)")
    check_float(rl.kl_per_token(logp, ref, "k2"), 0.2402265, "k2 hand value")
    check_float(rl.kl_per_token(logp, ref, "k3"), 0.1931472, "k3 hand value (r = pi_ref / pi, not pi / pi_ref)")


# ------------------------------------------------------------------------------ token_rewards
@ex("token_rewards")
def test_token_rewards_match_the_fixture():
    fx = load("token_rewards")
    s, kl, m = fx["score"], fx["kl"], fx["mask"]
    check(rl.per_token_rewards(s, kl, m, 0.1, "last"), fx["last"], "per_token_rewards(reward_at='last')",
          known=mistakes(fx))
    check(rl.per_token_rewards(s, kl, m, 0.1, "eos_plus_one"), fx["eos_plus_one"],
          "per_token_rewards(reward_at='eos_plus_one')")
    got = rl.per_token_rewards(s, garbage_on(kl, m, float("inf")), m, 0.1, "last")
    check(got, fx["last"], "per_token_rewards: masking: inf KL at padding positions changed the result "
                           "(use torch.where, not kl * mask)")


@ex("token_rewards")
def test_token_rewards_hand_values():
    # kl = [0.1, 0.2, 0.3, pad], beta = 0.5, score 2: -beta * kl = [-0.05, -0.1, -0.15, 0];
    # 'last': the score at the last real token (column 2): [-0.05, -0.1, 1.85, 0];
    # 'eos_plus_one': at the first padding column (3): [-0.05, -0.1, -0.15, 2.0]
    kl, m = torch.tensor([[0.1, 0.2, 0.3, 7.0]]), torch.tensor([[True, True, True, False]])
    check(rl.per_token_rewards(torch.tensor([2.0]), kl, m, 0.5, "last"), torch.tensor([[-0.05, -0.1, 1.85, 0.0]]),
          "per_token_rewards hand value, 'last'")
    check(rl.per_token_rewards(torch.tensor([2.0]), kl, m, 0.5, "eos_plus_one"),
          torch.tensor([[-0.05, -0.1, -0.15, 2.0]]), "per_token_rewards hand value, 'eos_plus_one'")


# ------------------------------------------------------------------------------ gae
@ex("gae")
def test_gae_matches_the_fixture():
    fx = load("gae")
    r, v, m = fx["rewards"], fx["values"], fx["mask"]
    adv, ret = rl.gae(r, v, m, 0.99, 0.95)
    check(adv, fx["adv"], "gae advantages (gamma=0.99, lam=0.95)")
    check(ret, fx["returns"], "gae returns = advantages + values (0 on padding)")
    adv, ret = rl.gae(r, v, m, 1.0, 1.0)
    check(adv, fx["adv_g1l1"], "gae advantages (gamma=1, lam=1)")
    check(ret, fx["returns_g1l1"], "gae returns (gamma=1, lam=1)")
    adv, ret = rl.gae(garbage_on(r, m), garbage_on(v, m), m, 0.99, 0.95)
    check(adv, fx["adv"], "gae: masking: values/rewards at padding positions changed the advantages "
                          "(the value after the last real token is 0)")
    check(ret, fx["returns"], "gae: masking: padding changed the returns")


@ex("gae")
def test_gae_hand_values():
    # two real tokens, gamma = 0.9, lam = 0.8, rewards [0, 1], values [0.5, 0.5], then padding:
    #   t=1: delta = 1 + 0.9 * 0 - 0.5 = 0.5 (nothing after the last token)      A_1 = 0.5
    #   t=0: delta = 0 + 0.9 * 0.5 - 0.5 = -0.05;  A_0 = -0.05 + 0.9 * 0.8 * 0.5 = 0.31
    #   returns = A + V = [0.81, 1.0]; padding 0
    r, v = torch.tensor([[0.0, 1.0, 1e6]]), torch.tensor([[0.5, 0.5, 1e6]])
    adv, ret = rl.gae(r, v, torch.tensor([[True, True, False]]), 0.9, 0.8)
    check(adv, torch.tensor([[0.31, 0.5, 0.0]]), "gae hand value: advantages")
    check(ret, torch.tensor([[0.81, 1.0, 0.0]]), "gae hand value: returns")


# ------------------------------------------------------------------------------ whiten
@ex("whiten")
def test_whiten_matches_the_fixture():
    fx = load("whiten")
    x, m = fx["x"], fx["mask"]
    check(rl.masked_whiten(x, m), fx["out"], "masked_whiten (biased variance over real tokens)", known=mistakes(fx))
    check(rl.masked_whiten(x, m, shift_mean=False), fx["out_noshift"], "masked_whiten(shift_mean=False)")
    check(rl.masked_whiten(x, m, unbiased=True), fx["out_unbiased"], "masked_whiten(unbiased=True)")
    check(rl.masked_whiten(garbage_on(x, m), m), fx["out"], "masked_whiten: masking: padding values changed the result")


@ex("whiten")
def test_whiten_hand_values():
    # real tokens [1, 3]: mean 2, biased variance ((1-2)^2 + (3-2)^2) / 2 = 1 -> [-1, 1] (eps 1e-8 aside);
    # shift_mean=False adds the mean back: [1, 3]; unbiased variance 2 -> [-1/sqrt 2, 1/sqrt 2] = [-0.7071068, 0.7071068]
    x, m = torch.tensor([[1.0, 3.0, 1e6]]), torch.tensor([[True, True, False]])
    check(rl.masked_whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), "masked_whiten hand value")
    check(rl.masked_whiten(x, m, shift_mean=False), torch.tensor([[1.0, 3.0, 0.0]]), "masked_whiten(shift_mean=False)")
    check(rl.masked_whiten(x, m, unbiased=True), torch.tensor([[-0.7071068, 0.7071068, 0.0]]),
          "masked_whiten(unbiased=True)")


# ------------------------------------------------------------------------------ clipped_policy
@ex("clipped_policy")
def test_clipped_policy_matches_the_fixture():
    fx = load("clipped_policy")
    m = fx["mask"]
    lp = fx["logp_new"].clone().requires_grad_()
    loss, stats = rl.policy_loss(lp, fx["logp_old"], fx["adv"], m, 0.2)
    check(loss, fx["loss"], "policy_loss (clip=0.2)", known={"min_instead_of_max_of_the_two_losses":
                                                             fx["mistake.min_of_losses"]})
    loss.backward()
    check(lp.grad, fx["grad_logp_new"], "policy_loss gradient d loss / d logp_new (0 where the clip is active)")
    for k in ("approxkl", "clipfrac", "ratio_mean", "ratio_var"):
        assert k in stats, f"policy_loss: stats: missing {k!r}"
        check(stats[k], fx[f"stat.{k}"], f"policy_loss stats[{k!r}]")
    check(rl.policy_loss(fx["logp_new"], fx["logp_old"], fx["adv"], m, 0.2, denominator=10.0)[0], fx["loss_den10"],
          "policy_loss(denominator=10)")
    g = garbage_on(fx["logp_new"], m).requires_grad_()
    loss2, _ = rl.policy_loss(g, fx["logp_old"], garbage_on(fx["adv"], m, float("inf")), m, 0.2)
    check(loss2, fx["loss"], "policy_loss: masking: garbage log-probs/advantages at padding changed the loss")
    loss2.backward()
    assert torch.isfinite(g.grad).all(), "policy_loss: masking: non-finite gradient from padding (mask the log-ratio before exp)"


@ex("clipped_policy")
def test_clipped_policy_hand_values():
    # ratio = exp(log 1.5 - 0) = 1.5 on both tokens, clip 0.2 -> clip(r) = 1.2:
    #   A = +1: max(-1.5, -1.2) = -1.2 (the clipped term is active, gradient 0)
    #   A = -1: max(+1.5, +1.2) = +1.5 (unclipped, d/dlogp of -A r = 1.5)
    # loss = (-1.2 + 1.5) / 2 = 0.15; clipfrac = 1/2; approxkl = (log 1.5)^2 / 2 = 0.0822009;
    # ratio_mean 1.5; gradient [0, 1.5 / 2] = [0, 0.75]
    lp = torch.full((1, 2), math.log(1.5), requires_grad=True)
    loss, stats = rl.policy_loss(lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    check_float(loss, 0.15, "policy_loss hand value", atol=1e-6)
    check_float(stats["clipfrac"], 0.5, "policy_loss clipfrac hand value")
    check_float(stats["approxkl"], 0.0822009, "policy_loss approxkl hand value", atol=1e-6)
    check_float(stats["ratio_mean"], 1.5, "policy_loss ratio_mean hand value", atol=1e-6)
    loss.backward()
    check(lp.grad, torch.tensor([[0.0, 0.75]]), "policy_loss hand gradient")


# ------------------------------------------------------------------------------ clipped_value
@ex("clipped_value")
def test_clipped_value_matches_the_fixture():
    fx = load("clipped_value")
    m = fx["mask"]
    vn = fx["v_new"].clone().requires_grad_()
    loss, stats = rl.value_loss(vn, fx["v_old"], fx["returns"], m, 0.2)
    check(loss, fx["loss"], "value_loss (clip_v=0.2)")
    loss.backward()
    check(vn.grad, fx["grad_v_new"], "value_loss gradient d loss / d v_new")
    assert "vf_clipfrac" in stats, "value_loss: stats: missing 'vf_clipfrac'"
    check(stats["vf_clipfrac"], fx["vf_clipfrac"], "value_loss stats['vf_clipfrac']")
    check(rl.value_loss(fx["v_new"], fx["v_old"], fx["returns"], m, 0.2, denominator=10.0)[0], fx["loss_den10"],
          "value_loss(denominator=10)")
    got = rl.value_loss(garbage_on(fx["v_new"], m), garbage_on(fx["v_old"], m, -1e6), garbage_on(fx["returns"], m), m, 0.2)[0]
    check(got, fx["loss"], "value_loss: masking: padding values changed the loss")


@ex("clipped_value")
def test_clipped_value_hand_values():
    # token 1: V = 2, V_old = 1, R = 3, eps 0.2: V_clipped = 1.2; (2-3)^2 = 1 < (1.2-3)^2 = 3.24 -> 3.24 (clipped)
    # token 2: V = 1.1, V_old = 1, R = 3: V_clipped = 1.1; both (1.1-3)^2 = 3.61 (not clipped)
    # loss = 0.5 * (3.24 + 3.61) / 2 = 1.7125; vf_clipfrac = 1/2
    loss, stats = rl.value_loss(torch.tensor([[2.0, 1.1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 3.0]]),
                                torch.ones(1, 2, dtype=torch.bool), 0.2)
    check_float(loss, 1.7125, "value_loss hand value", atol=1e-6)
    check_float(stats["vf_clipfrac"], 0.5, "value_loss vf_clipfrac hand value")


# ------------------------------------------------------------------------------ kl_controller
@ex("kl_controller")
def test_kl_controller_matches_the_fixture():
    for i, run in enumerate(load("kl_controller")["runs"]):
        c = rl.KLController(run["value"], run["target"], run["horizon"])
        for j, ((kl, n), want) in enumerate(zip(run["steps"], run["betas"])):
            got = c.update(kl, n)
            check_float(got, want, f"KLController run {i} (target={run['target']}) update {j}: kl={kl}, n_steps={n}",
                        atol=0.0, rtol=1e-12)
            check_float(c.value, want, f"KLController run {i} update {j}: self.value must hold the new beta",
                        atol=0.0, rtol=1e-12)


@ex("kl_controller")
def test_kl_controller_hand_values():
    # beta = 0.1, target 6, horizon 10000. KL 9: e = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2,
    #   beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512;
    # then KL 5.7: e = 5.7/6 - 1 = -0.05, beta = 0.100512 * (1 - 0.05 * 1000 / 10000) = 0.10000944.
    # A fixed coefficient (target None) never changes.
    c = rl.KLController(0.1, 6.0, 10000)
    check_float(c.update(9.0, 256), 0.100512, "KLController hand value (clipped error)", atol=1e-12)
    check_float(c.update(5.7, 1000), 0.10000944, "KLController hand value (second update)", atol=1e-12)
    check_float(rl.KLController(0.05).update(100.0, 256), 0.05, "KLController with target=None is fixed", atol=0.0)
