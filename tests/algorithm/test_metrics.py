"""Diversity (distinct-n) and the alignment-depth KL, against hand-computed values."""
import math

import torch
import torch.nn.functional as F

from minicai.experiments.ablations import distinct_n, ngrams
from minicai.experiments.depth import mean_by_position, token_kl


def test_distinct_n_by_hand():
    assert ngrams("The cat sat", 2) == [("the", "cat"), ("cat", "sat")]
    # bigrams: [the cat, cat sat] + [the cat, cat ran] -> 3 distinct of 4
    assert distinct_n(["the cat sat", "The cat ran"], 2) == 3 / 4
    # identical samples: 2 distinct bigrams of 6
    assert distinct_n(["a b c d"] * 2, 2) == 3 / 6
    assert distinct_n(["a b c d"] * 2, 1) == 4 / 8
    assert distinct_n(["one", ""], 2) is None  # no bigram anywhere
    assert distinct_n(["x y", "z w"], 2) == 1.0


def test_token_kl_by_hand_and_against_a_loop():
    # two-token vocabulary, p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    lp = torch.log(torch.tensor([[[0.5, 0.5]]]))
    lq = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expect = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(token_kl(lp + 3.0, lq - 1.0).item() - expect) < 1e-6  # logits: any shift
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    loop = torch.tensor([[sum(F.softmax(a[i, t], -1)[v] * (F.log_softmax(a[i, t], -1)[v] - F.log_softmax(b[i, t], -1)[v])
                              for v in range(5)) for t in range(3)] for i in range(2)])
    assert torch.allclose(token_kl(a, b), loop, atol=1e-6)
    assert torch.allclose(token_kl(a, a), torch.zeros(2, 3), atol=1e-7)


def test_mean_by_position_skips_padding():
    x = torch.tensor([[1.0, 2.0, 9e9], [3.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    means, counts = mean_by_position(x, mask)
    assert means == [2.0, 2.0, None] and counts == [2, 1, 0]
