"""Graded: part 5, preference losses (minicai/losses.py): the soft-label Bradley-Terry loss of
the reward model and the DPO loss."""
import pytest
import torch

from grading import check, check_float, load, mistakes
from minicai import losses

ex = pytest.mark.exercise


# ------------------------------------------------------------------------------ bradley_terry
@ex("bradley_terry")
def test_bradley_terry_matches_the_fixture():
    fx = load("bradley_terry")
    r_a = fx["r_a"].clone().requires_grad_()
    loss = losses.pairwise_loss(r_a, fx["r_b"], fx["p"])
    check(loss, fx["loss"], "pairwise_loss (soft labels p)", known=mistakes(fx))
    loss.backward()
    check(r_a.grad, fx["grad_r_a"], "pairwise_loss gradient dL/dr_a (= (sigmoid(d) - p) / B)")
    check(losses.pairwise_loss(fx["r_a"], fx["r_b"], 1.0), fx["loss_p1"], "pairwise_loss(p_a=1.0 as a float)")
    check(losses.pairwise_loss(fx["r_a"], fx["r_b"], fx["p"], fx["margin"]), fx["loss_margin"],
          "pairwise_loss with a margin: d = r_a - r_b - margin")
    check(losses.pairwise_loss(fx["r_a"], fx["r_b"], fx["p"], denominator=10.0), fx["loss_den10"],
          "pairwise_loss(denominator=10): the summed loss divided by 10")
    big = losses.pairwise_loss(fx["big_a"], fx["big_b"], torch.tensor([1.0, 1.0]))
    assert torch.isfinite(big), "pairwise_loss: non-finite for |d| = 200: use F.logsigmoid, not log(sigmoid)"
    check(big, fx["loss_big"], "pairwise_loss at |d| = 200 (stability)", atol=1e-6)


@ex("bradley_terry")
def test_bradley_terry_hand_values():
    # d = r_a - r_b = 1. p = 1: L = -log sigmoid(1) = log(1 + e^-1) = 0.3132617;
    # p = 1/2: L = (0.3132617 + (-log sigmoid(-1) = 1.3132617)) / 2 = 0.8132617;
    # margin 1, p = 1: d = 0, L = log 2 = 0.6931472. dL/dr_a at p = 1: sigmoid(1) - 1 = -0.2689414.
    r_a, r_b = torch.tensor([1.0], requires_grad=True), torch.tensor([0.0])
    loss = losses.pairwise_loss(r_a, r_b, 1.0)
    check_float(loss, 0.3132617, "pairwise_loss(r_a=1, r_b=0, p=1)")
    loss.backward()
    check_float(r_a.grad.item(), -0.2689414, "pairwise_loss gradient at p=1 (sign: raising r_a lowers the loss)")
    check_float(losses.pairwise_loss(r_a.detach(), r_b, 0.5), 0.8132617, "pairwise_loss(p=1/2)")
    check_float(losses.pairwise_loss(r_a.detach(), r_b, 1.0, 1.0), 0.6931472, "pairwise_loss(margin=1)")


# ------------------------------------------------------------------------------ dpo
@ex("dpo")
def test_dpo_matches_the_fixture():
    fx = load("dpo")
    pi_a = fx["pi_a"].clone().requires_grad_()
    loss = losses.dpo_loss(pi_a, fx["pi_b"], fx["ref_a"], fx["ref_b"], fx["p"], beta=0.1)
    check(loss, fx["loss"], "dpo_loss(beta=0.1, soft labels)", known=mistakes(fx))
    loss.backward()
    check(pi_a.grad, fx["grad_pi_a"], "dpo_loss gradient dL/dpi_a (= beta (sigmoid(beta h) - p) / B)")
    check(losses.dpo_loss(fx["pi_a"], fx["pi_b"], fx["ref_a"], fx["ref_b"], 1.0, beta=0.5), fx["loss_beta0.5_p1"],
          "dpo_loss(beta=0.5, p_a=1.0 as a float)")
    check(losses.dpo_loss(fx["pi_a"], fx["pi_b"], fx["ref_a"], fx["ref_b"], fx["p"], beta=0.1, denominator=10.0),
          fx["loss_den10"], "dpo_loss(denominator=10)")


@ex("dpo")
def test_dpo_hand_values():
    # log pi_a - log ref_a = 1, log pi_b - log ref_b = -1: h = 2; beta = 1/2: beta h = 1.
    # p = 1: L = -log sigmoid(1) = 0.3132617; p = 0: -log sigmoid(-1) = 1.3132617;
    # dL/dpi_a at p = 1: beta (sigmoid(1) - 1) = 0.5 * -0.2689414 = -0.1344707.
    pi_a = torch.tensor([-10.0], requires_grad=True)
    pi_b, ref_a, ref_b = torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    loss = losses.dpo_loss(pi_a, pi_b, ref_a, ref_b, 1.0, beta=0.5)
    check_float(loss, 0.3132617, "dpo_loss(h=2, beta=0.5, p=1)")
    loss.backward()
    check_float(pi_a.grad.item(), -0.1344707, "dpo_loss gradient (sign: raising log pi(a) lowers the loss)")
    check_float(losses.dpo_loss(pi_a.detach(), pi_b, ref_a, ref_b, 0.0, beta=0.5), 1.3132617, "dpo_loss(p=0)")
