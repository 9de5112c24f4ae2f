"""Graded: part 2, sampling (minicai/sample.py): top-k / top-p filtering."""
import math

import pytest
import torch

from grading import check, load, mistakes
from minicai import sample

ex = pytest.mark.exercise


@ex("top_p")
def test_top_p_matches_the_fixture():
    fx = load("top_p")
    x = fx["logits"]
    check(sample.filter_logits(x, 0, 0.9), fx["p0.9"], "filter_logits(top_p=0.9)", known=mistakes(fx))
    check(sample.filter_logits(x, 3, 1.0), fx["k3"], "filter_logits(top_k=3)")
    check(sample.filter_logits(x, 4, 0.7), fx["k4p0.7"], "filter_logits(top_k=4, top_p=0.7)")
    check(sample.filter_logits(x, 0, 0.5), fx["p0.5"], "filter_logits(top_p=0.5)")
    check(sample.filter_logits(x, 0, 1.0), x, "filter_logits(top_k=0, top_p=1) must leave logits unchanged")


@ex("top_p")
def test_top_p_hand_values():
    # p = [0.5, 0.3, 0.2]: the mass strictly before each token (sorted) is [0, 0.5, 0.8].
    # top_p = 0.6 drops the tokens whose preceding mass is >= 0.6: only the 0.2 token -> {0.5, 0.3} (0.8 >= 0.6)
    # top_p = 0.4 drops the 0.3 and 0.2 tokens (0.5 >= 0.4): only the most likely token is kept
    lg = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    inf = float("-inf")
    check(sample.filter_logits(lg, 0, 0.6), torch.tensor([[math.log(0.5), math.log(0.3), inf]]), "top_p=0.6 of [.5, .3, .2]")
    check(sample.filter_logits(lg, 0, 0.4), torch.tensor([[math.log(0.5), inf, inf]]), "top_p=0.4 of [.5, .3, .2]")
    check(sample.filter_logits(lg, 1, 1.0), torch.tensor([[math.log(0.5), inf, inf]]), "top_k=1 of [.5, .3, .2]")
    # the same distribution in another vocabulary order [0.2, 0.5, 0.3]: the kept set stays in vocab order
    perm = lg[:, [2, 0, 1]]
    check(sample.filter_logits(perm, 0, 0.6), torch.tensor([[inf, math.log(0.5), math.log(0.3)]]),
          "top_p=0.6 of [.2, .5, .3] (scatter the drop flags back to vocabulary order)")
