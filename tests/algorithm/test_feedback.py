"""AI feedback: the option log-probs, order averaging, chain of thought, the resumable
preferences file, and the HHH-style evaluation. (The soft-label loss and its gradient against the
hand formula for p = 1, 0.5, 0 are in tests/algorithm/test_losses.py, test_pairwise_loss_value_and_gradient_by_hand.)"""
import json
import math
from pathlib import Path

import pytest
import torch

from minicai.constitution import ANSWERS, GENERIC_CONTRAST, LabelShot, Principle, label_shots
from minicai.io.constitution_files import load_constitution
from minicai.io.data import Prompt
from minicai.feedback import (ANSWER_CUE, COT_CLAMP, COT_CUE, judge_context, judge_pairs, option_logprobs,
                              option_tokens, shot_answer)
from minicai.eval.hhh import evaluate_hhh, main as feedback_main, read_hhh
from minicai.infra.labelling import dropped_path, label_prompts
from minicai.io.files import read_preferences
from minicai.sample import stable_seed
from conftest import Killed, kill_after
from minicai.errors import InputError

HHH = Path(__file__).resolve().parents[1] / "data" / "hhh_small.jsonl"
COMPS = ["Choose the response that is less harmful.", "Choose the kinder response."]
PRINCIPLES = [Principle(f"p{i}", "", "", c) for i, c in enumerate(COMPS)]


def test_option_tokens_split_at_the_letter(tiny):
    _, tok = tiny
    prefix, a, b = option_tokens(tok)
    assert tok.encode(ANSWERS[0]) == prefix + [a] + tok.encode(ANSWERS[0])[len(prefix) + 1:]
    assert tok.decode([a]) == "A" and tok.decode([b]) == "B"


def test_judge_context_layout(tiny):
    _, tok = tiny
    ids = judge_context(tok, "Human: hi", "Choose the better one.", "one", "two")
    text = tok.decode(ids, skip_special=False)
    assert text.endswith("Options:\n (A) one\n (B) two<|im_end|>\n<|im_start|>assistant\nThe answer is:")
    assert text.count(ANSWER_CUE) == 1 and "<|im_start|>user\nConsider the following conversation" in text


SHOT = LabelShot("Human: Can I borrow your ladder?", "Choose the kinder response.", ("Sure, here it is.", "No. Go away."),
                 0, "The reply is curt and unkind.")


def test_worked_examples_come_first_as_question_and_answer_turns(tiny):
    """--few-shot-labels (paper section 4.1): each worked example is a user question and an assistant
    answer before the real question, rendered by the chat template; no shots = the plain layout."""
    _, tok = tiny
    assert shot_answer(SHOT) == "The answer is: (A)"
    assert shot_answer(SHOT, COT_CUE) == ("Let's think step by step: In option (B), the reply is curt and unkind."
                                          "\nSo the answer is: (A)")
    ids = judge_context(tok, "Human: hi", "Choose the better one.", "one", "two", shots=(SHOT,))
    text = tok.decode(ids, skip_special=False)
    shot_q = ("Consider the following conversation between a human and an assistant:\n\nHuman: Can I borrow your "
              "ladder?\n\nChoose the kinder response. Options:\n (A) Sure, here it is.\n (B) No. Go away.")
    assert text.endswith(f"<|im_start|>user\n{shot_q}<|im_end|>\n<|im_start|>assistant\nThe answer is: (A)<|im_end|>\n"
                         "<|im_start|>user\nConsider the following conversation between a human and an assistant:\n\n"
                         "Human: hi\n\nChoose the better one. Options:\n (A) one\n (B) two<|im_end|>\n"
                         "<|im_start|>assistant\nThe answer is:")
    assert judge_context(tok, "Human: hi", "C.", "one", "two", shots=()) == judge_context(tok, "Human: hi", "C.", "one", "two")


def test_label_shots_of_the_default_constitution_alternate_the_right_answer():
    const = load_constitution("default")
    shots = label_shots(const)
    assert len(shots) == len(const.few_shot) == 4
    assert [s.better for s in shots] == [0, 1, 0, 1]  # the right answer is (A), (B), (A), (B)
    for s, ex in zip(shots, const.few_shot):
        assert s.options[s.better] == ex.revision and s.options[1 - s.better] == ex.response
        assert s.conversation == f"Human: {ex.prompt}" and s.reasoning == ex.critique
        assert s.comparison == const.principle(ex.principle).comparison


def test_worked_examples_keep_the_label_exactly_symmetric(tiny):
    """The shots are the same in both orders, so swapping the options still mirrors the label and an
    identical pair is exactly 1/2; and they change the label (they are in the context)."""
    model, tok = tiny
    pairs = [("Human: hi", "hello", "bye"), ("Human: hi", "bye", "hello"), ("Human: q", "same", "same")]
    ab, ba, tie = judge_pairs(model, tok, pairs, [COMPS] * 3, shots=(SHOT,))
    assert ab["p_a"] == pytest.approx(1 - ba["p_a"], abs=1e-6) and tie["p_a"] == 0.5
    assert ab["p_a"] != judge_pairs(model, tok, pairs[:1], [COMPS])[0]["p_a"]


def test_option_logprob_equals_log_softmax_of_full_forward(tiny):
    """Batched, padded, read at the last real token == an unpadded full forward over context +
    shared prefix + the option letter, at the position that predicts the letter."""
    model, tok = tiny
    prefix, id_a, id_b = option_tokens(tok)
    contexts = [judge_context(tok, f"Human: {q}", COMPS[0], r1, r2) + prefix
                for q, r1, r2 in [("hi", "hello there", "go away"), ("a much longer question here?", "x", "y z"),
                                  ("q", "one two three four", "five")]]
    assert len({len(c) for c in contexts}) == 3  # padding is exercised
    lp = option_logprobs(model, contexts, (id_a, id_b), tok.pad_id, batch_size=3)  # (3, 2)
    for i, c in enumerate(contexts):
        for col, letter in enumerate((id_a, id_b)):
            full = torch.tensor([c + [letter]])  # (1, T+1)
            with torch.no_grad():
                ref = model(full)[0, len(c) - 1].float().log_softmax(-1)[letter]  # position predicting the letter
            assert lp[i, col].item() == pytest.approx(ref.item(), abs=1e-5)


def test_soft_label_is_two_way_softmax_of_option_logprobs(tiny):
    model, tok = tiny
    prefix, id_a, id_b = option_tokens(tok)
    lab = judge_pairs(model, tok, [("Human: hi", "hello", "bye")], [[COMPS[0]]])[0]
    lp = option_logprobs(model, [judge_context(tok, "Human: hi", COMPS[0], "hello", "bye") + prefix,
                                 judge_context(tok, "Human: hi", COMPS[0], "bye", "hello") + prefix],
                         (id_a, id_b), tok.pad_id)
    p_first = torch.softmax(lp[0], -1)[0].item()  # P(A) with "hello" as (A)
    p_swapped = torch.softmax(lp[1], -1)[1].item()  # P(B) with "hello" as (B)
    assert lab["p_a_first_order"] == pytest.approx(p_first, abs=1e-6)
    assert lab["p_a_swapped_order"] == pytest.approx(p_swapped, abs=1e-6)
    assert lab["p_a"] == pytest.approx((p_first + p_swapped) / 2, abs=1e-6)
    assert lab["orders_agree"] == ((p_first > 0.5) == (p_swapped > 0.5))


@pytest.mark.parametrize("cot", [False, True])
def test_identical_pair_gives_exactly_one_half(tiny, cot):
    model, tok = tiny
    labs = judge_pairs(model, tok, [("Human: hi", "same words", "same words"), ("Human: q", "x", "y")],
                       [COMPS, COMPS], cot=cot, cot_max_new_tokens=4)
    assert labs[0]["p_a"] == 0.5  # exactly
    assert labs[0]["p_a_first_order"] + labs[0]["p_a_swapped_order"] == 1.0


def test_swapping_a_and_b_mirrors_the_label(tiny):
    model, tok = tiny
    ab, ba = judge_pairs(model, tok, [("Human: hi", "hello", "bye"), ("Human: hi", "bye", "hello")], [COMPS, COMPS])
    assert ab["p_a"] == pytest.approx(1 - ba["p_a"], abs=1e-6)
    assert ab["p_a_first_order"] == pytest.approx(1 - ba["p_a_swapped_order"], abs=1e-6)


def test_cot_probabilities_are_clamped(tiny):
    model, tok = tiny
    labs = judge_pairs(model, tok, [("Human: hi", "hello", "bye"), ("Human: q", "a", "b c")], [COMPS, COMPS[:1]],
                       cot=True, cot_max_new_tokens=4)
    for lab in labs:
        for x in lab["per_principle"]:
            for key in ("p_a_first_order", "p_a_swapped_order"):
                assert COT_CLAMP[0] - 1e-12 <= x[key] <= COT_CLAMP[1] + 1e-12


def prompts(n):
    return [Prompt(f"test prompt number {i}", "test", "red-team") for i in range(n)]


KW = dict(k=3, m=2, max_new_tokens=5, temperature=1.0, seed=7, prompts_per_batch=2, judge_batch_size=4)


def test_interrupted_labelling_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    principles = load_constitution("hhh").principles
    comps = [q.comparison for q in principles]
    judges = [("tiny", model, tok)]
    full = tmp_path / "full.jsonl"
    stats = label_prompts(model, tok, judges, prompts(5), principles, full, **KW)
    assert stats["pairs"] + stats["dropped_identical"] == 5 * 3  # k=3 -> 3 pairs per prompt
    part = tmp_path / "part.jsonl"
    from minicai.infra import labelling
    with monkeypatch.context() as mp, pytest.raises(Killed):
        kill_after(mp, labelling, "append_jsonl", 1)  # killed after its first batch reached the disk
        label_prompts(model, tok, judges, prompts(5), principles, part, **KW)
    assert 0 < len(part.read_text().splitlines()) < len(full.read_text().splitlines())
    with open(part, "a") as f:
        f.write('{"key": "torn-wri')  # a crash in the middle of a line
    label_prompts(model, tok, judges, prompts(5), principles, part, **KW)
    assert part.read_text() == full.read_text()
    again = label_prompts(model, tok, judges, prompts(5), principles, part, **KW)  # nothing left to do
    assert again["seconds_this_run"] == {"generate_s": 0.0, "judge_s": 0.0}
    assert {k: v for k, v in again.items() if k != "seconds_this_run"} == \
        {k: v for k, v in stats.items() if k != "seconds_this_run"}
    assert part.read_text() == full.read_text()

    recs = read_preferences(full)
    r = recs[0]
    assert r["key"] == f"{r['prompt_id']}:0-1" and r["prompt"] == "test prompt number 0"
    assert len(r["principles"]) == 2 and set(r["principles"]) <= set(comps)
    assert r["p_a"] == pytest.approx((r["p_a_first_order"] + r["p_a_swapped_order"]) / 2)
    for r in recs:  # TRL's implicit-prompt preference layout
        chosen, rejected = (r["response_a"], r["response_b"]) if r["p_a"] >= 0.5 else (r["response_b"], r["response_a"])
        assert r["chosen"] == [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": chosen}]
        assert r["rejected"][1] == {"role": "assistant", "content": rejected}


def test_identical_pairs_are_dropped_and_counted(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "prefs.jsonl"
    # greedy sampling: the k responses of a prompt are all the same text
    stats = label_prompts(model, tok, [("tiny", model, tok)], prompts(3), PRINCIPLES, path, **{**KW, "temperature": 0.0})
    assert stats["pairs"] == 0 and stats["dropped_identical"] == 9
    assert path.read_text() == ""
    assert len(dropped_path(path).read_text().splitlines()) == 9
    with pytest.raises(InputError, match="no preference pairs"):
        read_preferences(path)


def test_bad_arguments_are_clear_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(InputError, match="k=1"):
        label_prompts(model, tok, [("tiny", model, tok)], prompts(1), PRINCIPLES, tmp_path / "p.jsonl", k=1)
    with pytest.raises(InputError, match="m=3"):
        label_prompts(model, tok, [("tiny", model, tok)], prompts(1), PRINCIPLES, tmp_path / "p.jsonl", m=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "a", "response_b": "b", "p_a": 1.5}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 1: field 'p_a'"):
        read_preferences(bad)
    bad.write_text('{"prompt": "p"\n{"prompt": "q"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 1: not valid JSON"):
        read_preferences(bad)


def test_stable_seed_is_stable():
    assert stable_seed(0, "responses", "abc") == stable_seed(0, "responses", "abc")
    assert stable_seed(0, "responses", "abc") != stable_seed(1, "responses", "abc")
    assert stable_seed(3, "x") == 55917411692266  # fixed forever: reruns must reproduce old files


def test_hhh_evaluation_on_the_fixture(tiny, tiny_gguf, tmp_path):
    model, tok = tiny
    items = read_hhh(HHH)
    assert len(items) == 12 and items[0][0].startswith("Human: ") and items[-1][0].startswith("Human: ")
    res = evaluate_hhh([("tiny", model, tok)], items[:4])
    assert res["items"] == 4 and len(res["p_better"]) == 4
    assert res["accuracy"] == sum(p > 0.5 for p in res["p_better"]) / 4
    for key in ("single_order_accuracy", "better_first_accuracy", "better_second_accuracy", "accuracy"):
        assert 0.0 <= res[key] <= 1.0
    both = (res["better_first_accuracy"] + res["better_second_accuracy"]) / 2
    assert res["single_order_accuracy"] == pytest.approx(both)

    small = tmp_path / "hhh.jsonl"
    small.write_text("".join(line + "\n" for line in HHH.read_text().splitlines()[:2]))
    out = tmp_path / "res.json"
    assert feedback_main(["--hhh", str(small), "--model", str(tiny_gguf), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["items"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 1: needs a field 'rejected' or 'worse'"):
        read_hhh(bad)
    assert math.isfinite(res["mean_p_better"])


def test_hhh_check_with_worked_examples(tiny_gguf, tmp_path):
    small = tmp_path / "hhh.jsonl"
    small.write_text("".join(line + "\n" for line in HHH.read_text().splitlines()[:2]))
    runs = {}
    for flag in ([], ["--few-shot-labels"]):
        out = tmp_path / f"res{len(flag)}.json"
        assert feedback_main(["--hhh", str(small), "--model", str(tiny_gguf), "--out", str(out), *flag]) == 0
        runs[len(flag)] = json.loads(out.read_text())
    assert runs[0]["few_shot_labels"] == 0 and runs[1]["few_shot_labels"] == 4  # the default constitution's 4
    assert runs[0]["p_better"] != runs[1]["p_better"]
    with pytest.raises(InputError, match="--few-shot-labels: the constitution 'generic' has no few-shot examples"):
        feedback_main(["--hhh", str(small), "--model", str(tiny_gguf), "--constitution", "generic", "--few-shot-labels"])
    with pytest.raises(InputError, match="--few-shot-labels: no feedback model answers the A/B question"):
        feedback_main(["--hhh", str(small), "--model", str(tiny_gguf), "--labeller", "contrast", "--few-shot-labels"])


def test_hhh_check_on_bigbench_and_builtin_pairs(tiny_gguf, tmp_path, capsys):
    from test_yardstick import fixture_archive

    from minicai.eval.hhh import load_hhh

    arch = fixture_archive(tmp_path)
    out = tmp_path / "hhh.json"
    assert feedback_main(["--hhh", "bigbench", "--bigbench", str(arch), "--model", str(tiny_gguf),
                          "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["items"] == 8 and 0.0 <= res["accuracy"] <= 1.0
    assert list(res["per_category"]) == ["harmless", "helpful", "honest", "other"]
    assert sum(c["k"] for c in res["per_category"].values()) == round(res["accuracy"] * 8)
    printed = capsys.readouterr().out
    assert "harmless" in printed and "95% interval" in printed
    assert feedback_main(["--hhh", "bigbench", "--bigbench", str(arch), "--model", str(tiny_gguf), "--labeller",
                          "contrast", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["labeller"] == "contrast" and res["items"] == 8 and "order_agreement" not in res
    items, cats = load_hhh("builtin")
    assert len(items) == 48 and cats.count("harmless") == 32 and cats.count("helpful") == 16
    with pytest.raises(InputError, match="git clone --depth 1 https://github.com/google/BIG-bench"):
        load_hhh("bigbench", str(tmp_path / "missing.tar.gz"))


# ------------------------------------------------------------------------------ likelihood contrast

def test_contrast_equals_a_hand_computation_from_full_forwards(tiny):
    from minicai.feedback import CONTRAST_TAU, contrast_pairs

    model, tok = tiny
    follow, violate = "Be kind.", "Be rude."
    conv, a, b = "Human: hello there", "hi friend", "go away now"

    def mean_logp(system, reply):
        """Plain route: one unpadded forward of the whole chat, log-softmax, the reply's tokens."""
        ctx, _ = tok.render([{"role": "system", "content": system}, {"role": "user", "content": "hello there"}],
                            add_generation_prompt=True)
        full, mask = tok.render([{"role": "system", "content": system}, {"role": "user", "content": "hello there"},
                                 {"role": "assistant", "content": reply}])
        assert full[:len(ctx)] == ctx
        n = sum(mask) - 1  # reply tokens, without the end-of-turn marker
        with torch.no_grad():
            logp = model(torch.tensor([full])).double().log_softmax(-1)[0]  # (T, V)
        return sum(float(logp[len(ctx) - 1 + t, full[len(ctx) + t]]) for t in range(n)) / n

    s_a = mean_logp(follow, a) - mean_logp(violate, a)
    s_b = mean_logp(follow, b) - mean_logp(violate, b)
    want = 1 / (1 + math.exp(-(s_a - s_b) / CONTRAST_TAU))
    got = contrast_pairs(model, tok, [(conv, a, b)], [[(follow, violate)]])[0]
    assert got["per_principle"][0]["s_a"] == pytest.approx(s_a, abs=1e-5)
    assert got["p_a"] == pytest.approx(want, abs=1e-4)


def test_contrast_swap_is_exactly_one_minus_p_and_ties_are_exactly_half(tiny):
    from minicai.feedback import contrast_pairs

    model, tok = tiny
    ctxs = [("Be kind.", "Be rude."), ("Be honest.", "Lie freely.")]
    pairs = [("Human: q one", "alpha beta", "gamma"), ("Human: q two", "x y z", "the the the")]
    fwd = contrast_pairs(model, tok, pairs, [ctxs, ctxs[:1]], batch_size=3)
    rev = contrast_pairs(model, tok, [(c, b, a) for c, a, b in pairs], [ctxs, ctxs[:1]], batch_size=3)
    for f, r in zip(fwd, rev):
        assert r["p_a"] == 1.0 - f["p_a"] and f["p_a"] != 0.5
    same = contrast_pairs(model, tok, [("Human: q", "same reply", "same reply")], [ctxs])[0]
    assert same["p_a"] == 0.5 and all(p["p_a"] == 0.5 for p in same["per_principle"])


def test_p_from_centered_is_exactly_symmetric():
    from minicai.feedback import p_from_centered

    for c in (0.1234567, 1e-17, 0.4999999, 0.3, 0.0):
        assert p_from_centered(-c) == 1.0 - p_from_centered(c)
    assert p_from_centered(0.25) == 0.75 and p_from_centered(-0.25) == 0.25


# ------------------------------------------------------------------------------ ensembles, RLCD, revisions

@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """A second tiny model with other random weights, as a second feedback model."""
    from conftest import random_model, tiny_config, write_tiny_gguf

    from minicai.io.checkpoint import load_model

    path = write_tiny_gguf(tmp_path_factory.mktemp("second") / "second.gguf", random_model(tiny_config(), seed=5))
    return load_model(str(path))[:2]


def test_ensemble_averages_the_centred_labels_and_counts_votes(tiny, second):
    from minicai.feedback import contrast_pairs, ensemble_labels

    (m1, t1), (m2, t2) = tiny, second
    pairs = [("Human: q one", "alpha beta", "gamma"), ("Human: q two", "x y z", "the the the")]
    ps = [PRINCIPLES, PRINCIPLES[:1]]
    judges = [("one", m1, t1), ("two", m2, t2)]
    ens = ensemble_labels(judges, pairs, ps, ["ab", "contrast"])
    members = [judge_pairs(m1, t1, pairs, [[q.comparison for q in p] for p in ps]),
               contrast_pairs(m1, t1, pairs, [[q.contrast() for q in p] for p in ps]),
               judge_pairs(m2, t2, pairs, [[q.comparison for q in p] for p in ps]),
               contrast_pairs(m2, t2, pairs, [[q.contrast() for q in p] for p in ps])]
    for i, e in enumerate(ens):
        each = [mem[i]["p_a"] for mem in members]
        assert [x["p_a"] for x in e["members"]] == each
        assert [(x["model"], x["scorer"]) for x in e["members"]] == [("one", "ab"), ("one", "contrast"),
                                                                     ("two", "ab"), ("two", "contrast")]
        assert e["p_a"] == pytest.approx(sum(each) / 4, abs=1e-12)  # soft labels averaged
        assert e["votes_a"] == sum(p > 0.5 for p in each) / 4  # the majority vote, recorded
        ab = [members[0][i], members[2][i]]
        assert e["p_a_first_order"] == pytest.approx(sum(x["p_a_first_order"] for x in ab) / 2, abs=1e-12)
    swapped = ensemble_labels(judges, [(c, b, a) for c, a, b in pairs], ps, ["ab", "contrast"])
    for e, s in zip(ens, swapped):
        assert s["p_a"] == 1.0 - e["p_a"] and s["votes_a"] == 1.0 - e["votes_a"]
    one = ensemble_labels(judges[:1], pairs, ps, ["ab"])  # one member: its own label, unchanged up to the
    # rounding of 1/2 + (p - 1/2), which is exact for some p and one ulp off for others (seen on an AMX
    # machine, whose matmuls give other p than AVX2's)
    assert [x["p_a"] for x in one] == pytest.approx([x["p_a"] for x in members[0]], abs=1e-12)
    same = ensemble_labels(judges, [("Human: q", "same", "same")], [PRINCIPLES], ["ab", "contrast"])[0]
    assert same["p_a"] == 0.5 and same["votes_a"] == 0.5


def test_rlcd_pairs_are_labelled_by_provenance(tiny, tmp_path):
    from minicai.feedback import rlcd_responses
    from minicai.sample import generate

    model, tok = tiny
    principles = load_constitution("hhh").principles
    path = tmp_path / "rlcd.jsonl"
    stats = label_prompts(model, tok, [], prompts(4), principles, path, labeller="rlcd", **KW)
    recs = read_preferences(path) if stats["pairs"] else []
    assert stats["pairs"] + stats["dropped_identical"] == 4 and stats["pairs"] >= 3
    for r in recs:
        p = Prompt(r["prompt"], "test", "red-team")
        q = next(q for q in principles if q.comparison == r["principles"][0])
        good, bad = rlcd_responses(model, tok, [p], [q.contrast()], max_new_tokens=5, temperature=1.0, seed=7)[0]
        assert r["key"] == f"{p.id}:rlcd" and r["labeller"] == "rlcd"
        assert r["p_a"] == (1.0 if r["response_a"] == good else 0.0)  # the follow reply is the better one
        assert {r["response_a"], r["response_b"]} == {good, bad}
        assert r["prompt"] == p.text  # the contexts are not part of the conversation the RM sees
        # the follow reply really was sampled under the follow system prompt, with its row's seed
        ids = tok.render([{"role": "system", "content": q.follow}, {"role": "user", "content": p.text}],
                         add_generation_prompt=True)[0]
        ref = generate(model, [ids], 5, temperature=1.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                       seed=[stable_seed(7, "rlcd", p.id, "follow")])
        assert ref.texts(tok)[0].strip() == good
    assert {r["p_a"] for r in recs} <= {0.0, 1.0}
    rescored = tmp_path / "rescored.jsonl"
    label_prompts(model, tok, [("tiny", model, tok)], prompts(4), principles, rescored, labeller="rlcd",
                  rescore="contrast", **KW)
    for r, s in zip(recs, read_preferences(rescored)):
        assert s["p_a_provenance"] == r["p_a"] and s["response_a"] == r["response_a"]
        assert 0.0 < s["p_a"] < 1.0 and s["labeller"] == "rlcd+contrast"


def test_rlcd_few_shot_context_never_reaches_the_reward_model(tiny, tmp_path, monkeypatch):
    """RLCD with the SL-CAI context: row 2i is sampled under the constitution's few-shot context,
    row 2i + 1 under none; the AI labeller labels the pair (no provenance label), and what the
    reward model scores (feedback.reward_input) is the bare conversation, token for token."""
    from minicai import feedback, slcai
    from minicai.infra import labelling

    model, tok = tiny
    const = load_constitution("hhh")
    ctx = slcai.distill_context(const)
    ctx_ids = tok.render(ctx)[0]
    rows, judged = [], []
    real, real_labels = feedback.generate, labelling.ensemble_labels

    def spy(m, ids, *args, **kw):
        rows.extend(ids)
        return real(m, ids, *args, **kw)

    def spy_labels(judges, pairs, principles, *args, **kw):
        judged.extend((a, b, [q.comparison for q in ps]) for (_, a, b), ps in zip(pairs, principles))
        return real_labels(judges, pairs, principles, *args, **kw)
    monkeypatch.setattr(feedback, "generate", spy)
    monkeypatch.setattr(labelling, "ensemble_labels", spy_labels)
    path = tmp_path / "ctx.jsonl"
    stats = label_prompts(model, tok, [("tiny", model, tok)], prompts(4), const.principles, path, labeller="rlcd",
                          rescore="ab", rlcd_context=ctx, **KW)
    assert len(rows) == 8 and stats["pairs"] + stats["dropped_identical"] == 4
    for i, p in enumerate(prompts(4)):
        user = [{"role": "user", "content": p.text}]
        assert rows[2 * i] == tok.render(ctx + user, add_generation_prompt=True)[0]  # the follow row: the context
        assert rows[2 * i][:len(ctx_ids)] == ctx_ids
        assert rows[2 * i + 1] == tok.render(user, add_generation_prompt=True)[0]  # the other: none
    recs = read_preferences(path)
    assert recs and all(r["labeller"] == "rlcd-few-shot+ab" and r["p_a_provenance"] in (0.0, 1.0) for r in recs)
    assert all(0.0 < r["p_a"] < 1.0 for r in recs)  # the AI labeller's soft label, not the provenance
    # the record names the principles the labeller judged that very pair under
    assert [(r["response_a"], r["response_b"], r["principles"]) for r in recs] == judged
    assert all(len(r["principles"]) == KW["m"] for r in recs)
    shot_ids = [tok.encode(shot.prompt) for shot in const.few_shot]
    for r in recs:
        for resp in (r["response_a"], r["response_b"]):
            ids = feedback.reward_input(tok, r["prompt"], resp)
            bare = tok.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": resp}])[0]
            assert ids == bare[:len(ids)] and len(ids) < len(ctx_ids)
            text = tok.decode(ids)
            assert context_free(text, const) and not any(
                any(ids[j:j + len(s)] == s for j in range(len(ids))) for s in shot_ids)
    with pytest.raises(InputError, match="needs labeller rlcd and a rescore"):
        label_prompts(model, tok, [], prompts(2), const.principles, path, labeller="rlcd", rlcd_context=ctx, **KW)


def context_free(text: str, const) -> bool:
    """None of the context's texts (the system line, a few-shot prompt or revision) is in `text`."""
    from minicai.slcai import DISTILL_SYSTEM

    return all(x not in text for x in [DISTILL_SYSTEM] + [s.prompt for s in const.few_shot] +
               [s.revision for s in const.few_shot])


def test_revision_filter_and_pairs():
    from minicai.feedback import revision_filter, revision_pairs

    assert revision_filter("Sure, here is how.", "") == "empty revision"
    assert revision_filter("Sure, here is how.", "  sure, HERE is how. ") == "revision equals the initial response"
    refusal = "I can't help with that, because it could hurt someone."
    # no refusal detector decides (the measuring stick never chooses training data): both kept
    assert revision_filter(refusal, "Sure! First, get a crowbar.") is None
    assert revision_filter("Sure! First, get a crowbar.", refusal) is None
    traces = [{"id": "a", "prompt": "p1", "kind": "red-team", "initial": "Sure! First, get a crowbar.",
               "rounds": [{"revision": refusal}], "final": refusal},
              {"id": "b", "prompt": "p2", "kind": "red-team", "initial": "same", "rounds": [{}], "final": "Same"},
              {"id": "c", "prompt": "p3", "kind": "helpful", "initial": "x", "rounds": [], "final": "x"}]
    rows, dropped = revision_pairs(traces, seed=3)
    assert [d["key"] for d in dropped] == ["b:revision"] and len(rows) == 1
    r = rows[0]
    assert r["key"] == "a:revision" and {r["response_a"], r["response_b"]} == {refusal, traces[0]["initial"]}
    assert r["p_a"] == (1.0 if r["response_a"] == refusal else 0.0)  # the final revision is the chosen side
    sides = {revision_pairs([{**traces[0], "id": str(i)}], seed=3)[0][0]["p_a"] for i in range(20)}
    assert sides == {0.0, 1.0}  # which side the revision is shown on is a seeded coin, not always a


def test_principle_contrast_fields(tmp_path):
    c = load_constitution("hhh")
    assert all(q.follow and q.violate and q.contrast() == (q.follow, q.violate) for q in c.principles)
    assert Principle("x", "c", "r", "k").contrast() == GENERIC_CONTRAST
    bad = tmp_path / "c.toml"
    bad.write_text('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncomparison = "k"\nfollow = "f"\n')
    with pytest.raises(InputError, match=r"c.toml: principle\[1\] \(name 'a'\): field 'follow' needs field 'violate'"):
        load_constitution(str(bad))


def test_a_member_can_name_its_own_method(tiny, second):
    from minicai.feedback import contrast_pairs, ensemble_labels
    from minicai.infra.labelling import member_spec

    assert member_spec("qwen2.5-coder-1.5b:ab") == ("qwen2.5-coder-1.5b", ["ab"])
    assert member_spec("/m/x.gguf:ab+contrast") == ("/m/x.gguf", ["ab", "contrast"])
    assert member_spec("C:/models/x.gguf") == ("C:/models/x.gguf", None)  # not a method: part of the path
    (m1, t1), (m2, t2) = tiny, second
    pairs = [("Human: q", "alpha", "beta gamma")]
    ens = ensemble_labels([("one", m1, t1, ["ab"]), ("two", m2, t2, ["contrast"])], pairs, [PRINCIPLES],
                          ["ab", "contrast"])[0]
    want = [judge_pairs(m1, t1, pairs, [COMPS])[0]["p_a"],
            contrast_pairs(m2, t2, pairs, [[q.contrast() for q in PRINCIPLES]])[0]["p_a"]]
    assert [(x["model"], x["scorer"], x["p_a"]) for x in ens["members"]] == \
        [("one", "ab", want[0]), ("two", "contrast", want[1])]
    assert ens["p_a"] == pytest.approx(sum(want) / 2, abs=1e-12)


def test_revision_pairs_from_distilled_traces():
    """route distill records have no rounds: each (the policy's own answer, the teacher's kept
    answer) is a pair, red-team and helpful prompts alike, the teacher's answer the chosen side."""
    from minicai.feedback import revision_pairs

    traces = [{"id": "d1", "prompt": "p1", "kind": "red-team", "route": "distill", "initial": "Sure, step one.",
               "rounds": [], "candidates": ["No: it could hurt someone."], "chosen": 0,
               "final": "No: it could hurt someone."},
              {"id": "d2", "prompt": "p2", "kind": "helpful", "route": "distill", "initial": "Rice: boil it.",
               "rounds": [], "final": "Rinse the rice, then simmer it for 15 minutes."},
              {"id": "d3", "prompt": "p3", "kind": "red-team", "route": "distill", "initial": "Same text",
               "rounds": [], "final": "same text"},
              {"id": "r1", "prompt": "p4", "kind": "helpful", "initial": "x", "rounds": [], "final": "x"}]
    rows, dropped = revision_pairs(traces, seed=1)
    assert [r["key"] for r in rows] == ["d1:revision", "d2:revision"]
    assert [d["key"] for d in dropped] == ["d3:revision"]  # r1 (revise route, no rounds) is not a pair at all
    for r, t in zip(rows, traces):
        chosen = r["response_a"] if r["p_a"] == 1.0 else r["response_b"]
        assert chosen == t["final"] and {r["response_a"], r["response_b"]} == {t["initial"], t["final"]}
        assert r["kind"] == t["kind"]
