"""Graded: part 7, critic-free advantages (minicai/rl.py): RLOO and GRPO, k samples per prompt in
consecutive rows."""
import pytest
import torch

from grading import check, load
from minicai import rl

ex = pytest.mark.exercise


@ex("rloo")
def test_rloo_matches_the_fixture():
    fx = load("rloo")
    for k in (2, 3, 4):
        check(rl.rloo_advantages(fx["rewards"], k), fx[f"k{k}"], f"rloo_advantages(k={k}) (B,): groups are consecutive rows")


@ex("rloo")
def test_rloo_hand_values():
    # k = 2, rewards [1, 2 | 3, 4]: A_i = R_i - (the other sample) = [-1, 1, -1, 1]
    # k = 3, rewards [1, 2, 6]: A_1 = 1 - (2 + 6)/2 = -3, A_2 = 2 - (1 + 6)/2 = -1.5, A_3 = 6 - (1 + 2)/2 = 4.5
    check(rl.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([-1.0, 1.0, -1.0, 1.0]),
          "rloo hand value, k=2")
    check(rl.rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]), "rloo hand value, k=3")
    # equal rewards: every advantage is exactly 0 (a mean of equal floats need not be the float itself)
    got = rl.rloo_advantages(torch.full((3,), 0.1), 3)
    assert torch.equal(got, torch.zeros(3)), f"rloo: equal rewards must give exact zeros, got {got.tolist()}"


@ex("grpo")
def test_grpo_matches_the_fixture():
    fx = load("grpo")
    for k in (2, 3, 4):
        check(rl.grpo_advantages(fx["rewards"], k), fx[f"k{k}"], f"grpo_advantages(k={k}) (B,)",
              known={"biased_std (use Bessel's correction, k - 1)": fx["mistake.biased_std"]} if k == 4 else None)


@ex("grpo")
def test_grpo_hand_values():
    # rewards [1, 2, 6]: mean 3, deviations [-2, -1, 3], unbiased std sqrt((4 + 1 + 9) / 2) = sqrt 7 = 2.6457513;
    # A = deviation / (sqrt 7 + 1e-4) = [-0.7559004, -0.3779502, 1.1338506]
    check(rl.grpo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-0.7559004, -0.3779502, 1.1338506]),
          "grpo hand value, k=3")
    got = rl.grpo_advantages(torch.full((4,), 0.1), 2)
    assert torch.equal(got, torch.zeros(4)), f"grpo: equal rewards must give exact zeros, got {got.tolist()}"
