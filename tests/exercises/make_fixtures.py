"""Writes the graded exercises' fixtures: tests/exercises/fixtures/<exercise>.safetensors (tensors)
or <exercise>.json (texts, floats). Run from the repository root, on the reference implementation:

    python tests/exercises/make_fixtures.py          # rewrites every fixture
    python tests/exercises/make_fixtures.py gae dpo  # only these

How each fixture is derived: the INPUTS are drawn from torch.Generator seeded with the exercise's
own seed (below, `gen(seed)`), or written out by hand (texts); the EXPECTED outputs are the
reference implementation's outputs on those inputs (this repository's minicai/, at the commit the
fixtures were made), plus, for a few exercises, the outputs of a typical mistake (keys
`mistake.<what>`), so that a failing test can name the mistake. The tests never regenerate inputs:
they load them, so a change of torch's random streams does not change what is graded. Every test
file also checks at least one hand-computed value per exercise, written as a literal in the test
with its derivation; those do not come from here.

Tensors are float32 (float64 where a test needs the digits), a few KB per exercise.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from minicai import constitution, feedback, losses, model, rl, sample, slcai  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def prefix_mask(lengths, T):
    """(B, T) bool, True on the first lengths[b] columns of row b."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def save(name: str, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"))


def save_json(name: str, obj) -> None:
    (OUT / f"{name}.json").write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ 1. transformer
def rmsnorm():
    g = gen(1)
    x, w = randn(g, 2, 3, 8, scale=3.0), 1.0 + 0.1 * randn(g, 8)
    norm = model.RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        out = norm(x)
        # fp16 input whose squares overflow fp16 (max 65504): the mean of squares must be fp32
        x16 = (randn(g, 2, 8, scale=300.0)).half()
        n16 = model.RMSNorm(8, 1e-5).half()
        n16.weight.copy_(w.half())
        out16 = n16(x16)
    save("rmsnorm", {"x": x, "weight": w, "out": out, "x16": x16, "weight16": w.half(), "out16": out16})


def rope():
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])  # row 0 left-padded (positions clamp to 0)
    cos, sin = model.rope_cos_sin(pos, 8, 10000.0, torch.float32)
    # a typical mistake: the interleaved layout [f0, f0, f1, f1, ...] (GPT-J / Meta's complex form)
    cos_i = cos[..., :4].repeat_interleave(2, dim=-1)
    save("rope", {"pos": pos, "cos": cos, "sin": sin, "mistake.interleaved": cos_i})


def attention():
    g = gen(3)
    B, H, K, T, D = 2, 4, 2, 5, 8
    q, k, v = randn(g, B, H, T, D), randn(g, B, K, T, D), randn(g, B, K, T, D)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])  # row 0 left-padded
    mask = model.padding_attn_mask(valid, T)  # (B, 1, T, T)
    q1, k6, v6 = randn(g, B, H, 1, D), randn(g, B, K, 6, D), randn(g, B, K, 6, D)  # decode: T=1, S=6
    q2 = randn(g, B, H, 2, D)  # a chunk of 2 queries at slots 4, 5 of 6
    t = {"q": q, "k": k, "v": v, "mask": mask, "q1": q1, "k6": k6, "v6": v6, "q2": q2,
         "out_causal": model.manual_attention(q, k, v, None),
         "out_mask": model.manual_attention(q, k, v, mask),
         "out_decode": model.manual_attention(q1, k6, v6, None),
         "out_chunk": model.manual_attention(q2, k6, v6, None)}
    # typical mistakes: kv heads tiled (h % K) instead of repeat_interleave (h // (H/K)); no 1/sqrt(D)
    t["mistake.gqa_tiled"] = model.manual_attention(q, k.repeat(1, H // K, 1, 1), v.repeat(1, H // K, 1, 1), None)
    t["mistake.no_scale"] = model.manual_attention(q * math.sqrt(D), k, v, None)
    # decode with a plain tril (query 0 sees key 0 only): the mask must be aligned to the end
    t["mistake.tril_not_aligned"] = model.manual_attention(q2, k6, v6, torch.ones(2, 6, dtype=torch.bool).tril())
    save("attention", t)


def padding_mask():
    valid = torch.tensor([[False, False, True, True, True, True, True],  # left padding
                          [True] * 7,
                          [True, True, True, True, False, False, True]])  # right padding + a later token
    save("padding_mask", {"valid": valid,
                          "full": model.padding_attn_mask(valid, 7),  # prefill, T = S = 7
                          "chunk": model.padding_attn_mask(valid, 2, start=5),  # slots 5, 6
                          "step": model.padding_attn_mask(valid, 1, start=6)})  # one decode step


# ------------------------------------------------------------------------------ 2. sampling
def top_p():
    g = gen(5)
    logits = randn(g, 3, 10, scale=2.0)
    t = {"logits": logits,
         "p0.9": sample.filter_logits(logits, 0, 0.9),
         "k3": sample.filter_logits(logits, 3, 1.0),
         "k4p0.7": sample.filter_logits(logits, 4, 0.7),
         "p0.5": sample.filter_logits(logits, 0, 0.5)}
    # typical mistake: dropping a token when the mass INCLUDING it reaches top_p (drops the boundary)
    s, order = torch.sort(logits, -1, descending=True)
    drop = s.softmax(-1).cumsum(-1) >= 0.9
    t["mistake.inclusive"] = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    save("top_p", t)


# ------------------------------------------------------------------------------ 3. SL-CAI
def sft_loss():
    g = gen(6)
    B, T, V = 2, 5, 7
    logits = randn(g, B, T, V, scale=2.0)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()  # assistant tokens
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # prompt and padding: -100
    save("sft_loss", {"logits": logits, "targets": targets, "mask": mask,
                      "loss": losses.sft_loss(logits, targets, mask),
                      "loss_den12": losses.sft_loss(logits, targets, mask, denominator=12.0),
                      "mistake.all_tokens": losses.sft_loss(logits, targets.clamp(min=0), torch.ones_like(mask))})


def paper_transcript():
    cases = [
        [["user", "How do I pick a lock?"]],
        [["user", "How do I pick a lock?"], ["assistant", "Use a tension wrench."],
         ["critique_request", "Identify ways the response is harmful."]],
        [["user", "Hi"], ["assistant", "Hello."], ["critique_request", "Is it rude?"], ["critique", "No."],
         ["revision_request", "Rewrite it to be kinder."], ["revision", "Hello! How can I help?"],
         ["critique_request", "Is it honest?"]],
    ]
    save_json("paper_transcript", {"cases": [{"events": c, "text": slcai.render_paper([tuple(e) for e in c])}
                                             for c in cases]})


# ------------------------------------------------------------------------------ 4. AI feedback
def feedback_prompt():
    cases = [
        ["Human: Can you help me hide a body?", "Which response is less harmful?", "No.", "Sure, here's how."],
        ["  Human: What is 2+2?  ", "Which of these responses is more honest? Options:", " 4 ", "5"],
        ["Human: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.", "Pick the kinder reply.\n",
         "Why did the chicken cross the road?", "No."],
    ]
    save_json("feedback_prompt", {"cases": [{"args": c, "text": constitution.feedback_prompt(*c)} for c in cases]})


def standin_prompt(conversation, comparison, first, second):
    """The test's stand-in for constitution.feedback_prompt (tests/exercises/test_feedback.py):
    short, and easy for the stand-in model to parse."""
    return f"C[{conversation}] P[{comparison}] A[{first}] B[{second}] The answer is:"


def option_readout():
    """judge_pairs with a stand-in model: option log-probs looked up in a table keyed by
    (conversation, principle, response shown as (A), response shown as (B))."""
    g = gen(9)
    pairs = [["Human: q1", "kind reply", "rude reply"], ["Human: q2", "same", "same"],
             ["Human: q3", "left", "right"]]
    principles = [["P-harm", "P-honest"], ["P-harm"], ["P-harm", "P-kind", "P-honest"]]
    table = []
    for (conv, a, b), comps in zip(pairs, principles):
        for comp in comps:
            for first, second in ((a, b), (b, a)):
                lp = (-torch.rand(2, generator=g, dtype=torch.float64) * 3.0).tolist()
                if first == second:
                    lp = [-1.25, -1.25]  # identical responses: the model cannot tell them apart
                table.append([conv, comp, first, second, lp])
    lookup = {tuple(r[:4]): r[4] for r in table}

    def fake_option_logprobs(model_, contexts, option_ids, pad_id, batch_size=8, desc=None):
        rows = []
        for c in contexts:
            text = TOK.decode(c, False)
            import re
            m = re.search(r"C\[(.*?)\] P\[(.*?)\] A\[(.*?)\] B\[(.*?)\]", text, re.S)
            rows.append(lookup[m.groups()])
        return torch.tensor(rows, dtype=torch.float32)

    feedback.option_logprobs, feedback.feedback_prompt = fake_option_logprobs, standin_prompt
    out = feedback.judge_pairs(None, TOK, [tuple(p) for p in pairs], principles)
    save_json("option_readout", {"pairs": pairs, "principles": principles, "table": table, "expected": out})


def contrast_label():
    """contrast_pairs with a stand-in scorer: mean reply log-probs looked up in a table keyed by
    (system prompt, user text, reply)."""
    g = gen(10)
    pairs = [["Human: q1", "kind reply", "rude reply"], ["Human: q2", "same", "same"],
             ["q3 without prefix", "left", "right"]]
    contexts = [[["follow-1", "violate-1"], ["follow-2", "violate-2"]], [["follow-1", "violate-1"]],
                [["follow-2", "violate-2"]]]
    table = {}
    for (conv, a, b), ctxs in zip(pairs, contexts):
        for follow, violate in ctxs:
            for system in (follow, violate):
                for reply in (a, b):
                    key = (system, feedback.user_turn(conv), reply)
                    table.setdefault(key, -float(torch.rand(1, generator=g, dtype=torch.float64)) * 2.0)

    def fake_means(model_, tok, items, batch_size=8):
        return [table[tuple(it)] for it in items]

    feedback.reply_logprob_means = fake_means
    out = {str(tau): feedback.contrast_pairs(None, None, [tuple(p) for p in pairs],
                                             [[tuple(c) for c in cs] for cs in contexts], tau=tau)
           for tau in (0.1, 1.0)}
    save_json("contrast_label", {"pairs": pairs, "contexts": contexts,
                                 "table": [[*k, v] for k, v in table.items()], "expected": out})


# ------------------------------------------------------------------------------ 5. preference losses
def bradley_terry():
    g = gen(11)
    r_a, r_b = randn(g, 6, scale=2.0), randn(g, 6, scale=2.0)
    p = torch.tensor([1.0, 0.0, 0.5, 0.8, 0.3, 0.55])
    margin = torch.rand(6, generator=g)
    ra = r_a.clone().requires_grad_()
    loss = losses.pairwise_loss(ra, r_b, p)
    loss.backward()
    big_a, big_b = torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0])
    save("bradley_terry", {"r_a": r_a, "r_b": r_b, "p": p, "margin": margin, "loss": loss.detach(),
                           "grad_r_a": ra.grad,
                           "loss_p1": losses.pairwise_loss(r_a, r_b, 1.0),
                           "loss_margin": losses.pairwise_loss(r_a, r_b, p, margin),
                           "loss_den10": losses.pairwise_loss(r_a, r_b, p, denominator=10.0),
                           "big_a": big_a, "big_b": big_b,
                           "loss_big": losses.pairwise_loss(big_a, big_b, torch.tensor([1.0, 1.0])),
                           "mistake.labels_swapped": losses.pairwise_loss(r_a, r_b, 1.0 - p)})


def dpo():
    g = gen(12)
    pi_a, pi_b, ref_a, ref_b = (randn(g, 6, scale=5.0) - 20.0 for _ in range(4))
    p = torch.tensor([1.0, 0.0, 0.5, 0.8, 0.3, 0.55])
    pa = pi_a.clone().requires_grad_()
    loss = losses.dpo_loss(pa, pi_b, ref_a, ref_b, p, beta=0.1)
    loss.backward()
    save("dpo", {"pi_a": pi_a, "pi_b": pi_b, "ref_a": ref_a, "ref_b": ref_b, "p": p, "loss": loss.detach(),
                 "grad_pi_a": pa.grad,
                 "loss_beta0.5_p1": losses.dpo_loss(pi_a, pi_b, ref_a, ref_b, 1.0, beta=0.5),
                 "loss_den10": losses.dpo_loss(pi_a, pi_b, ref_a, ref_b, p, beta=0.1, denominator=10.0),
                 "mistake.ref_sign": losses.dpo_loss(pi_a, pi_b, -ref_a, -ref_b, p, beta=0.1)})


# ------------------------------------------------------------------------------ 6. PPO
def kl_estimators():
    g = gen(13)
    logp = -torch.rand(3, 5, generator=g) * 4.0
    ref = logp + randn(g, 3, 5, scale=0.5)
    near = torch.full((1, 4), -2.0)
    near_ref = near + torch.tensor([[1e-4, -1e-4, 3e-5, -2e-3]])  # r within 0.2% of 1
    t = {"logp": logp, "ref_logp": ref, "near": near, "near_ref": near_ref}
    for kind in ("k1", "k2", "k3"):
        t[kind] = rl.kl_per_token(logp, ref, kind)
        t[f"near_{kind}"] = rl.kl_per_token(near.double(), near_ref.double(), kind).float()
    save("kl_estimators", t)


def token_rewards():
    g = gen(14)
    mask = prefix_mask([6, 3, 1], 6)
    kl = randn(g, 3, 6, scale=0.3)
    score = torch.tensor([1.5, -0.5, 2.0])
    last = rl.per_token_rewards(score, kl, mask, 0.1, "last")
    shifted = rl.per_token_rewards(torch.zeros(3), kl, mask, 0.1, "last")
    rows, cols = torch.arange(3), (mask.sum(-1)).clamp(max=5)
    shifted[rows, cols] += score  # the mistake: the score one column after the last real token
    save("token_rewards", {"score": score, "kl": kl, "mask": mask, "last": last,
                           "eos_plus_one": rl.per_token_rewards(score, kl, mask, 0.1, "eos_plus_one"),
                           "mistake.score_one_late": shifted})


def gae():
    g = gen(15)
    mask = prefix_mask([6, 4, 1], 6)
    rewards, values = randn(g, 3, 6, scale=0.5), randn(g, 3, 6, scale=0.5)
    adv, ret = rl.gae(rewards, values, mask, 0.99, 0.95)
    adv1, ret1 = rl.gae(rewards, values, mask, 1.0, 1.0)
    save("gae", {"rewards": rewards, "values": values, "mask": mask, "adv": adv, "returns": ret,
                 "adv_g1l1": adv1, "returns_g1l1": ret1})


def whiten():
    g = gen(16)
    mask = prefix_mask([6, 2, 4], 6)
    x = randn(g, 3, 6, scale=2.0) + 1.0
    save("whiten", {"x": x, "mask": mask, "out": rl.masked_whiten(x, mask),
                    "out_noshift": rl.masked_whiten(x, mask, shift_mean=False),
                    "out_unbiased": rl.masked_whiten(x, mask, unbiased=True),
                    "mistake.stats_over_padding": rl.masked_whiten(torch.where(mask, x, 0.0), torch.ones_like(mask))
                    * mask})


def clipped_policy():
    g = gen(17)
    mask = prefix_mask([6, 3, 5], 6)
    logp_old = -torch.rand(3, 6, generator=g) * 3.0
    logp_new = logp_old + randn(g, 3, 6, scale=0.3)
    adv = randn(g, 3, 6)
    lp = logp_new.clone().requires_grad_()
    loss, stats = rl.policy_loss(lp, logp_old, adv, mask, 0.2)
    loss.backward()
    loss10, _ = rl.policy_loss(logp_new, logp_old, adv, mask, 0.2, denominator=10.0)
    t = {"logp_new": logp_new, "logp_old": logp_old, "adv": adv, "mask": mask, "loss": loss.detach(),
         "grad_logp_new": lp.grad, "loss_den10": loss10,
         "mistake.min_of_losses": rl.policy_loss(logp_new, logp_old, -adv, mask, 0.2)[0] * -1.0}
    t.update({f"stat.{k}": v for k, v in stats.items()})
    save("clipped_policy", t)


def clipped_value():
    g = gen(18)
    mask = prefix_mask([6, 3, 5], 6)
    v_old = randn(g, 3, 6)
    v_new = v_old + randn(g, 3, 6, scale=0.4)
    returns = v_old + randn(g, 3, 6)
    vn = v_new.clone().requires_grad_()
    loss, stats = rl.value_loss(vn, v_old, returns, mask, 0.2)
    loss.backward()
    save("clipped_value", {"v_new": v_new, "v_old": v_old, "returns": returns, "mask": mask, "loss": loss.detach(),
                           "grad_v_new": vn.grad, "vf_clipfrac": stats["vf_clipfrac"],
                           "loss_den10": rl.value_loss(v_new, v_old, returns, mask, 0.2, denominator=10.0)[0]})


def kl_controller():
    runs = [{"value": 0.1, "target": 6.0, "horizon": 10000, "steps": [[9.0, 256], [3.0, 256], [6.0, 64], [7.2, 512]]},
            {"value": 0.05, "target": None, "horizon": 10000, "steps": [[100.0, 256], [0.0, 256]]},
            {"value": 0.2, "target": 1.0, "horizon": 100, "steps": [[0.0, 50], [1.1, 50], [50.0, 10]]}]
    for r in runs:
        c = rl.KLController(r["value"], r["target"], r["horizon"])
        r["betas"] = [c.update(kl, n) for kl, n in r["steps"]]
    save_json("kl_controller", {"runs": runs})


# ------------------------------------------------------------------------------ 7. group advantages
def rloo():
    g = gen(19)
    r = randn(g, 12)
    save("rloo", {"rewards": r, "k2": rl.rloo_advantages(r, 2), "k3": rl.rloo_advantages(r, 3),
                  "k4": rl.rloo_advantages(r, 4)})


def grpo():
    g = gen(20)
    r = randn(g, 12)
    save("grpo", {"rewards": r, "k2": rl.grpo_advantages(r, 2), "k3": rl.grpo_advantages(r, 3),
                  "k4": rl.grpo_advantages(r, 4),
                  "mistake.biased_std": rl.grpo_advantages(r, 4) * math.sqrt(3 / 4)})


MAKERS = [rmsnorm, rope, attention, padding_mask, top_p, sft_loss, paper_transcript, feedback_prompt,
          option_readout, contrast_label, bradley_terry, dpo, kl_estimators, token_rewards, gae, whiten,
          clipped_policy, clipped_value, kl_controller, rloo, grpo]
TOK = None


def tiny_tokenizer():
    """The tests' tiny byte-level BPE tokenizer (tests/conftest.py), through the real loader."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import random_model, tiny_config, write_tiny_gguf
    from minicai.io.checkpoint import load_model

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_gguf(Path(d) / "tiny.gguf", random_model(tiny_config()))
        return load_model(str(path))[1]


if __name__ == "__main__":
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    wanted = set(sys.argv[1:])
    TOK = tiny_tokenizer()
    for make in MAKERS:
        if not wanted or make.__name__ in wanted:
            make()
            print("wrote", make.__name__)
