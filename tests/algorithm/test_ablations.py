"""The SL-CAI ablations' formulas (minicai/experiments/ablations.py) and the slcai.py additions they need:
direct revision (no critique) and principle subsets. Expected values are derived by hand."""
import math
import random

import pytest
import torch

from conftest import one_line_error
from minicai import slcai
from minicai.constitution import Constitution, Principle
from minicai.experiments.ablations import (distinct_principles, fmt_interval, fmt_share, mean_interval, measure,
                                           prompt_diversity, response_after)
from minicai.io.constitution_files import load_constitution
from minicai.io.data import Prompt
from minicai.errors import InputError
from minicai.metrics import share
from minicai.experiments.ablations import principle_subset
from minicai.slcai import traces


def test_mean_interval_hand_values():
    m = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd sqrt((1 + 0 + 1) / 2) = 1, half = 1.96 / sqrt(3)
    assert m["n"] == 3 and m["mean"] == pytest.approx(2.0) and m["sd"] == pytest.approx(1.0)
    assert m["low"] == pytest.approx(2.0 - 1.1316065, abs=1e-6) and m["high"] == pytest.approx(3.1316065, abs=1e-6)
    assert mean_interval([5.0]) == {"mean": 5.0, "low": None, "high": None, "sd": None, "n": 1}
    assert mean_interval([])["mean"] is None and mean_interval([])["n"] == 0
    m = mean_interval([-1.0, 1.0], z=1.0)  # sd = sqrt(2), half = sqrt(2) / sqrt(2) = 1
    assert (m["low"], m["high"]) == (pytest.approx(-1.0), pytest.approx(1.0))


def test_prompt_diversity_hand_values():
    # prompt 1: bigrams (a b) (b a) (a b) | (a b) (b c): 3 distinct of 5 = 0.6
    # prompt 2: (x y) | (x y): 1 distinct of 2 = 0.5;  prompt 3: single words, no bigram: left out
    d = prompt_diversity([["a b a b", "A b c"], ["x y", "x y"], ["a", "b"]], n=2)
    assert d["per_prompt"] == [pytest.approx(0.6), pytest.approx(0.5), None]
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.55)
    half = 1.96 * math.sqrt(2 * 0.05 ** 2) / math.sqrt(2)  # sd of (0.6, 0.5) = sqrt(0.005)
    assert d["high"] - d["mean"] == pytest.approx(half)
    # unigrams of prompt 2: x y x y -> 2 distinct of 4
    assert prompt_diversity([["x y", "x y"]], n=1)["mean"] == pytest.approx(0.5)
    # samples that repeat each other are less diverse than samples that do not
    same = prompt_diversity([["the cat sat on the mat"] * 4], 2)["mean"]
    varied = prompt_diversity([["the cat sat", "a dog ran far", "birds fly high up", "fish swim deep"]], 2)["mean"]
    assert same == pytest.approx(5 / 20) and varied == pytest.approx(1.0)


def test_distinct_principles_and_response_after():
    rec = {"id": "p", "initial": "first", "rounds": [{"principle": "a", "revision": "one"},
                                                     {"principle": "b", "revision": "two"}]}
    other = {"id": "p", "initial": "x", "rounds": [{"principle": "a", "revision": "y"}]}
    assert [response_after(rec, k) for k in range(3)] == ["first", "one", "two"]
    one_line_error(lambda: response_after(rec, 3), "prompt p", "no revision 3")
    # prompt 1 drew {a, b} over its two samples, prompt 2 drew {a}: mean (2 + 1) / 2
    assert distinct_principles([[rec, other], [other, other]]) == pytest.approx(1.5)
    assert distinct_principles([]) is None


def test_formatting_hand_values():
    assert fmt_share(share([True, False, False, False])) == "1/4 25% [5-70]"  # Wilson 95%: 0.0456, 0.6994
    assert fmt_share(share([])) == "-"
    assert fmt_interval(mean_interval([1.0, 2.0, 3.0])) == "2.00 [0.87, 3.13]"
    assert fmt_interval(mean_interval([0.5]), signed=True) == "+0.50"
    assert fmt_interval(mean_interval([-1.0, 1.0], z=1.0), digits=1, signed=True) == "+0.0 [-1.0, +1.0]"


def principles(k):
    return [Principle(f"p{i}", f"critique {i}", f"revise {i}", f"compare {i}") for i in range(k)]


def test_principle_subset_is_the_first_n_of_a_seeded_shuffle():
    const = Constitution("c", principles(5), [], "test")
    order = list(range(5))
    random.Random(7).shuffle(order)  # the stdlib's shuffle of the indices, not principle_subset's output
    assert [p.name for p in principle_subset(const, 3, 7).principles] == [f"p{i}" for i in order[:3]]
    subsets = [principle_subset(const, n, 7).principles for n in (1, 2, 4)]
    assert subsets[0] == subsets[1][:1] and subsets[1] == subsets[2][:2]  # nested
    assert len({p.name for p in subsets[2]}) == 4  # drawn without repeats
    assert principle_subset(const, 0, 7) is const and principle_subset(const, 5, 7) is const
    assert principle_subset(const, 9, 7) is const
    assert len({tuple(p.name for p in principle_subset(const, 2, s).principles) for s in range(10)}) > 1  # seed matters
    assert const.principles == principles(5)  # the original list is not shuffled in place
    one_line_error(lambda: principle_subset(const, -1, 0), "must be >= 0")
    from minicai.constitution import FewShot
    shots = [FewShot(f"q{i}", "r", "c", "v", f"p{i}") for i in range(5)]
    sub = principle_subset(Constitution("c", principles(5), shots, "test"), 2, 7)
    assert [f.principle for f in sub.few_shot] == [f"p{i}" for i in sorted(order[:2])]  # the kept principles' examples


def red(n):
    return [Prompt(f"red team prompt number {i}", "test", "red-team") for i in range(n)]


def test_a_one_principle_subset_is_the_only_one_drawn(tiny):
    model, tok = tiny
    sub = principle_subset(load_constitution("hhh"), 1, 3)
    recs = [r for b in traces(model, tok, red(3), sub, rounds=3, batch_size=2, max_new_tokens=3) for r in b]
    assert {r["principle"] for rec in recs for r in rec["rounds"]} == {sub.principles[0].name}
    assert all(r["critique_request"] == sub.principles[0].critique for rec in recs for r in rec["rounds"])


def capture_prompts(monkeypatch, tok):
    """Record the decoded prompt of every row the sampler is asked to continue."""
    seen, real = [], slcai.generate

    def spy(model, ids, *a, **kw):
        seen.append([tok.decode(x, skip_special=False) for x in ids])
        return real(model, ids, *a, **kw)
    monkeypatch.setattr(slcai, "generate", spy)
    return seen


def test_direct_revision_skips_the_critique(tiny, monkeypatch):
    model, tok = tiny
    const = load_constitution("hhh")
    kw = dict(rounds=2, batch_size=4, max_new_tokens=4, temperature=1.0, seed=5)
    seen = capture_prompts(monkeypatch, tok)
    critiqued = [r for b in traces(model, tok, red(2), const, **kw) for r in b]
    assert len(seen) == 5  # initial, then critique + revision per round
    seen.clear()
    direct = [r for b in traces(model, tok, red(2), const, critique=False, **kw) for r in b]
    assert len(seen) == 3  # initial, then one revision per round
    for c, d in zip(critiqued, direct):
        assert d["initial"] == c["initial"]  # the same seeds: the same initial response
        assert [r["principle"] for r in d["rounds"]] == [r["principle"] for r in c["rounds"]]  # the same draws
        assert [sorted(r) for r in d["rounds"]] == [["principle", "revision", "revision_request"]] * 2
        assert d["final"] == d["rounds"][-1]["revision"]
        for r in d["rounds"]:
            assert r["revision_request"] == const.principle(r["principle"]).revision
    # the second revision's prompt: user, assistant, revision request, revision, revision request
    last = seen[-1][0]
    assert last.count("<|im_start|>user") == 3 and last.count("<|im_start|>assistant") == 3
    assert not any(p.critique in last for p in const.principles)
    assert direct[0]["rounds"][0]["revision"] in last


def test_direct_revision_in_the_paper_format(tiny):
    model, tok = tiny
    const = load_constitution("hhh")
    recs = [r for b in traces(model, tok, red(1), const, rounds=1, fmt="paper", critique=False, max_new_tokens=3)
            for r in b]
    assert list(recs[0]["rounds"][0]) == ["principle", "revision_request", "revision"]


def test_direct_revision_with_a_quoted_critic_is_refused(tiny):
    model, tok = tiny
    gen = traces(model, tok, red(1), load_constitution("hhh"), critique=False, critic=(model, tok))
    one_line_error(lambda: next(gen), "critic_layout 'chat'")
    recs = next(traces(model, tok, red(1), load_constitution("hhh"), rounds=1, critique=False, critic=(model, tok),
                       critic_layout="chat", max_new_tokens=3))
    assert len(recs[0]["rounds"]) == 1


def test_measure_reads_the_reward_at_the_last_token(tiny_rm):
    from minicai.feedback import reward_input
    from minicai.io.checkpoint import load_scalar_model

    rm, rm_tok, _ = load_scalar_model(tiny_rm, head="reward")
    prompts = [Prompt("How do I hurt someone?", "test", "red-team"), Prompt("Hi", "test", "red-team")]
    texts = ["I can't help with that because it is illegal.", "Sure, here it is."]
    m = measure(rm, rm_tok, prompts, texts, batch_size=2, substrings=("I can't",))
    with torch.no_grad():  # one unpadded sequence at a time, the score at its last position
        want = [float(rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1])
                for ids in (reward_input(rm_tok, p.text, t) for p, t in zip(prompts, texts))]
    assert m["scores"] == [pytest.approx(w, abs=1e-5) for w in want]
    assert m["rm"]["mean"] == pytest.approx(sum(want) / 2, abs=1e-5)
    h = m["harmlessness"]
    assert (h["explained_refusal"]["k"], h["evasive_refusal"]["k"], h["compliance"]["k"]) == (1, 0, 1)
    assert h["refusal_loose"]["k"] == 1 and h["compliance"]["n"] == 2
    assert m["words"] == pytest.approx((9 + 4) / 2)
