"""Graded: part 4, AI feedback (minicai/constitution.py, minicai/feedback.py): the
multiple-choice prompt, the labeller's option read-out in both orders, the likelihood-contrast
label. The model is replaced by a stand-in that looks its answers up in the fixture's table, so
these tests grade the arithmetic and the bookkeeping, not a network."""
import math
import re

import pytest

from grading import check_float, check_text, load
from minicai import constitution, feedback

ex = pytest.mark.exercise


def standin_prompt(conversation, comparison, first, second):
    """Stands in for constitution.feedback_prompt (its own exercise), so that this file grades
    judge_pairs alone; short, and easy for the stand-in model to parse."""
    return f"C[{conversation}] P[{comparison}] A[{first}] B[{second}] The answer is:"


def standin_model(monkeypatch, tok, table):
    """Replace feedback.option_logprobs by a lookup of (conversation, principle, shown as (A),
    shown as (B)) -> [logp(A), logp(B)]; returns the list of calls."""
    import torch

    lookup = {tuple(r[:4]): r[4] for r in table}
    _, id_a, id_b = feedback.option_tokens(tok)
    calls = []

    def option_logprobs(model, contexts, option_ids, pad_id, batch_size=8, desc=None, **kw):
        assert tuple(option_ids) == (id_a, id_b), \
            f"judge_pairs: option ids: pass the letter ids of option_tokens(tok), {(id_a, id_b)}, got {option_ids}"
        rows = []
        for c in contexts:
            text = tok.decode(list(c), False)
            m = re.search(r"C\[(.*?)\] P\[(.*?)\] A\[(.*?)\] B\[(.*?)\]", text, re.S)
            assert m, f"judge_pairs: a context was not built by judge_context: {text[-120:]!r}"
            assert m.groups() in lookup, f"judge_pairs: a context asks about an unknown (pair, principle, order): {m.groups()}"
            rows.append(lookup[m.groups()])
        calls.append(len(contexts))
        return torch.tensor(rows, dtype=torch.float32)

    monkeypatch.setattr(feedback, "feedback_prompt", standin_prompt)
    monkeypatch.setattr(feedback, "option_logprobs", option_logprobs)
    return calls


def check_label(got: dict, want: dict, what: str):
    assert isinstance(got, dict), f"{what}: type: expected a dict per pair, got {type(got).__name__}"
    for key in ("p_a_first_order", "p_a_swapped_order", "p_a", "orders_agree", "per_principle"):
        assert key in got, f"{what}: missing key {key!r}"
    check_float(got["p_a_first_order"], want["p_a_first_order"],
                f"{what}: p_a_first_order (response_a shown as (A): sigmoid(logp(A) - logp(B)), mean over principles)")
    check_float(got["p_a_swapped_order"], want["p_a_swapped_order"],
                f"{what}: order swap: p_a_swapped_order (response_a shown as (B): sigmoid(logp(B) - logp(A)))")
    check_float(got["p_a"], want["p_a"], f"{what}: p_a (the mean of both orders)")
    assert got["orders_agree"] == want["orders_agree"], f"{what}: orders_agree: expected {want['orders_agree']}"
    assert len(got["per_principle"]) == len(want["per_principle"]), f"{what}: per_principle: one entry per principle"
    for g, w in zip(got["per_principle"], want["per_principle"]):
        assert g["principle"] == w["principle"], f"{what}: per_principle order: expected {w['principle']!r}"
        check_float(g["p_a_first_order"], w["p_a_first_order"], f"{what}: per_principle {w['principle']} first order")
        check_float(g["p_a_swapped_order"], w["p_a_swapped_order"], f"{what}: per_principle {w['principle']} swapped")


# ------------------------------------------------------------------------------ feedback_prompt
@ex("feedback_prompt")
def test_feedback_prompt_matches_the_fixture():
    for i, case in enumerate(load("feedback_prompt")["cases"]):
        check_text(constitution.feedback_prompt(*case["args"]), case["text"], f"feedback_prompt case {i}")


@ex("feedback_prompt")
def test_feedback_prompt_hand_value():
    # the released layout (evals/438HHHEvaluations.jsonl) without brackets; " Options:" appended to the principle
    want = ("Consider the following conversation between a human and an assistant:\n\n"
            "Human: Hi\n\nWhich is kinder? Options:\n (A) Hello!\n (B) Go away.\n\nThe answer is:")
    check_text(constitution.feedback_prompt("Human: Hi", "Which is kinder?", "Hello!", "Go away."), want,
               "feedback_prompt hand value")
    check_text(constitution.feedback_prompt(" Human: Hi ", "Which is kinder? Options:", " Hello! ", "Go away. "), want,
               "feedback_prompt strips every part and does not add a second 'Options:'")


# ------------------------------------------------------------------------------ option_readout
@ex("option_readout")
def test_option_readout_matches_the_fixture(tiny, monkeypatch):
    fx = load("option_readout")
    calls = standin_model(monkeypatch, tiny[1], fx["table"])
    got = feedback.judge_pairs(None, tiny[1], [tuple(p) for p in fx["pairs"]], fx["principles"])
    assert len(got) == len(fx["expected"]), f"judge_pairs: one label per pair: expected {len(fx['expected'])}, got {len(got)}"
    for i, (g, w) in enumerate(zip(got, fx["expected"])):
        check_label(g, w, f"judge_pairs pair {i}")
    assert got[1]["p_a"] == 0.5, f"judge_pairs: identical responses must get exactly p_a = 1/2, got {got[1]['p_a']!r}"
    assert calls == [12], f"judge_pairs: score all 2 x 6 contexts in ONE option_logprobs call, got calls of {calls}"


@ex("option_readout")
def test_option_readout_hand_values(tiny, monkeypatch):
    # one pair, one principle. A consistent model: a shown as (A): logp = [-0.5, -2.5], margin +2,
    # p = sigmoid(2) = 0.8807971; b shown as (A) (a is (B)): logp = [-2.5, -0.5], margin -2, so
    # P(a) = sigmoid(-(-2)) = 0.8807971. Both orders agree: p_a = 0.8807971.
    table = [["Human: q", "P", "good", "bad", [-0.5, -2.5]], ["Human: q", "P", "bad", "good", [-2.5, -0.5]]]
    standin_model(monkeypatch, tiny[1], table)
    got = feedback.judge_pairs(None, tiny[1], [("Human: q", "good", "bad")], [["P"]])[0]
    check_label(got, {"p_a_first_order": 0.8807971, "p_a_swapped_order": 0.8807971, "p_a": 0.8807971,
                      "orders_agree": True, "per_principle": [{"principle": "P", "p_a_first_order": 0.8807971,
                                                               "p_a_swapped_order": 0.8807971}]}, "consistent model")
    # A position-biased model that always says (A) with margin 2: first order 0.8807971, swapped
    # order sigmoid(-2) = 0.1192029; p_a = (0.8807971 + 0.1192029) / 2 = 1/2 exactly, orders disagree.
    table = [["Human: q", "P", "good", "bad", [-0.5, -2.5]], ["Human: q", "P", "bad", "good", [-0.5, -2.5]]]
    standin_model(monkeypatch, tiny[1], table)
    got = feedback.judge_pairs(None, tiny[1], [("Human: q", "good", "bad")], [["P"]])[0]
    check_float(got["p_a_swapped_order"], 0.1192029, "position-biased model: order swap: p_a_swapped_order")
    assert got["p_a"] == 0.5 and got["orders_agree"] is False, \
        f"position-biased model: the two orders must cancel to exactly p_a = 1/2, got {got['p_a']!r}"


# ------------------------------------------------------------------------------ contrast_label
def standin_scorer(monkeypatch, table):
    lookup = {tuple(r[:3]): r[3] for r in table}
    calls = []

    def reply_logprob_means(model, tok, items, batch_size=8, **kw):
        for it in items:
            assert tuple(it) in lookup, ("contrast_pairs: masking of the prompt: items are (system prompt, "
                                         f"user_turn(conversation), reply); unknown item {tuple(it)!r}")
        calls.append(len(items))
        return [lookup[tuple(it)] for it in items]

    monkeypatch.setattr(feedback, "reply_logprob_means", reply_logprob_means)
    return calls


@ex("contrast_label")
def test_contrast_label_matches_the_fixture(monkeypatch):
    fx = load("contrast_label")
    calls = standin_scorer(monkeypatch, fx["table"])
    for tau, want in fx["expected"].items():
        got = feedback.contrast_pairs(None, None, [tuple(p) for p in fx["pairs"]],
                                      [[tuple(c) for c in cs] for cs in fx["contexts"]], tau=float(tau))
        assert len(got) == len(want), f"contrast_pairs: one label per pair, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert len(g["per_principle"]) == len(w["per_principle"]), f"contrast_pairs pair {i}: one entry per principle"
            for j, (gp, wp) in enumerate(zip(g["per_principle"], w["per_principle"])):
                assert gp["follow"] == wp["follow"], f"contrast_pairs pair {i} principle {j}: 'follow' is the follow prompt"
                check_float(gp["s_a"], wp["s_a"], f"contrast_pairs pair {i} principle {j}: sign: s_a = follow - violate")
                check_float(gp["s_b"], wp["s_b"], f"contrast_pairs pair {i} principle {j}: s_b")
                check_float(gp["p_a"], wp["p_a"], f"contrast_pairs pair {i} principle {j}: p_a, tau={tau}")
            check_float(g["p_a"], w["p_a"], f"contrast_pairs pair {i}: p_a (mean over principles), tau={tau}")
        assert got[1]["p_a"] == 0.5, f"contrast_pairs: identical replies must get exactly 1/2, got {got[1]['p_a']!r}"
    assert calls == [16, 16], f"contrast_pairs: score all 4 x 4 items in ONE reply_logprob_means call, got calls of {calls}"


@ex("contrast_label")
def test_contrast_label_hand_values(monkeypatch):
    # mean log-probs: a under follow -1.0, under violate -1.5 -> s(a) = 0.5;
    #                 b under follow -2.0, under violate -1.8 -> s(b) = -0.2; gap 0.7 nats per token.
    # tau = 1: p_a = sigmoid(0.7) = 0.6681878; tau = 0.1: sigmoid(7) = 0.9990889; swapping a, b: 1 - p_a exactly.
    table = [["F", "q", "a", -1.0], ["V", "q", "a", -1.5], ["F", "q", "b", -2.0], ["V", "q", "b", -1.8]]
    standin_scorer(monkeypatch, table)
    p1 = feedback.contrast_pairs(None, None, [("Human: q", "a", "b")], [[("F", "V")]], tau=1.0)[0]
    check_float(p1["per_principle"][0]["s_a"], 0.5, "contrast hand value: sign: s(a) = follow - violate", atol=1e-9)
    check_float(p1["per_principle"][0]["s_b"], -0.2, "contrast hand value: s(b)", atol=1e-9)
    check_float(p1["p_a"], 0.6681878, "contrast hand value, tau=1: sigmoid(0.7)")
    check_float(feedback.contrast_pairs(None, None, [("Human: q", "a", "b")], [[("F", "V")]], tau=0.1)[0]["p_a"],
                0.9990889, "contrast hand value, tau=0.1: sigmoid(7)")
    swapped = feedback.contrast_pairs(None, None, [("Human: q", "b", "a")], [[("F", "V")]], tau=1.0)[0]["p_a"]
    assert swapped == 1.0 - p1["p_a"], f"contrast: swapping a and b must give exactly 1 - p_a, got {swapped!r}"
    assert math.isclose(swapped, 0.3318122, abs_tol=1e-6)
