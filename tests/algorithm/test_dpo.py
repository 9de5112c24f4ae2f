"""DPO: the loss and its gradient against hand-derived values, the preference readers, a tiny-model
run that raises the chosen-vs-rejected margin, resume == uninterrupted, and clean errors."""
import json
import math
import random

import pytest
import torch

from minicai.io.checkpoint import load_model
from minicai.infra.cli import run_cli
from minicai.errors import InputError
from minicai.io.files import read_preferences
from minicai.losses import dpo_loss
from train_dpo import evaluate, main as dpo_main, score_pairs, sequence_logps, tokenize

# ------------------------------------------------------------------------------ the loss by hand
BETA = 0.1
PI_A, REF_A, PI_B, REF_B = -10.0, -12.0, -11.0, -10.0  # h = (-10 + 12) - (-11 + 10) = 3, beta h = 0.3


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("p", [1.0, 0.8, 0.5, 0.0])
def test_dpo_loss_and_gradient_by_hand(p):
    pi = torch.tensor([PI_A, PI_B], dtype=torch.float64, requires_grad=True)
    loss = dpo_loss(pi[:1], pi[1:], torch.tensor([REF_A], dtype=torch.float64),
                    torch.tensor([REF_B], dtype=torch.float64), p, BETA)
    # -log sigmoid(x) = softplus(-x): loss = p softplus(-0.3) + (1 - p) softplus(0.3)
    assert loss.item() == pytest.approx(p * softplus(-0.3) + (1 - p) * softplus(0.3), abs=1e-12)
    if p == 1.0:
        assert loss.item() == pytest.approx(0.5543552444, abs=1e-9)  # log(1 + e^-0.3)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(-0.3))  # sigmoid(beta h) = 0.5744425
    # dL/d log pi(a) = beta (sigmoid(beta h) - p) = -dL/d log pi(b)
    assert pi.grad[0].item() == pytest.approx(BETA * (sig - p), abs=1e-12)
    assert pi.grad[1].item() == pytest.approx(-BETA * (sig - p), abs=1e-12)
    if p == 1.0:  # the winner is pushed up, the loser down
        assert pi.grad[0] < 0 < pi.grad[1]


def per_pair(*cols, beta):
    """dpo_loss of each pair alone, (B,)."""
    return torch.stack([dpo_loss(*(c[i:i + 1] for c in cols), beta) for i in range(len(cols[0]))])


def test_dpo_loss_is_symmetric_and_log2_at_the_reference():
    z = torch.zeros(3)
    assert torch.allclose(per_pair(z, z, z, z, torch.tensor([1.0, 0.3, 0.5]), beta=0.5), torch.full((3,), math.log(2)))
    a, b, ra, rb = torch.randn(4, 5).unbind(0)
    p = torch.rand(5)
    torch.testing.assert_close(per_pair(a, b, ra, rb, p, beta=0.2), per_pair(b, a, rb, ra, 1 - p, beta=0.2))


def test_dpo_loss_is_the_pair_mean_or_the_sum_over_a_denominator():
    a, b, ra, rb = torch.randn(4, 5).unbind(0)
    p = torch.rand(5)
    each = per_pair(a, b, ra, rb, p, beta=0.3)
    torch.testing.assert_close(dpo_loss(a, b, ra, rb, p, 0.3), each.mean())
    # a data-parallel rank holding 2 of a step's 8 pairs on 2 ranks divides by 8 / 2 (loss_denominator)
    torch.testing.assert_close(dpo_loss(a[:2], b[:2], ra[:2], rb[:2], p[:2], 0.3, denominator=4.0), each[:2].sum() / 4)


def test_sequence_logps_sum_only_the_response_tokens(tiny):
    model, tok = tiny
    ids, mask = tokenize(tok, "hi there", "hello")
    long_ids, long_mask = tokenize(tok, "a much longer prompt than the other", "ok")
    with torch.no_grad():
        got = sequence_logps(model, [(ids, mask), (long_ids, long_mask)], "cpu", torch.no_grad)  # padded batch
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)  # (T-1, V), unpadded
    want = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
    assert got[0].item() == pytest.approx(want, abs=1e-4)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "hello<|im_end|>"


# ------------------------------------------------------------------------------ reading preferences

def test_reference_and_evaluation_passes_build_no_autograd_graph(tiny):
    """The reference log-probs and the held-out statistics (score_pairs) run without autograd: a
    graph kept per batch holds every batch's (N, T, V) logits alive (a real-size run grew by
    ~400 MB/s and was killed for memory when the reference pass lost its no_grad)."""
    model, tok = tiny
    pairs = [{"ta": tokenize(tok, f"q{i}", "a b c"), "tb": tokenize(tok, f"q{i}", "c d"), "p": 1.0}
             for i in range(3)]
    ref = score_pairs(model, pairs, 2, "cpu", lambda: torch.autocast("cpu", enabled=False))  # (N, 2)
    assert not ref.requires_grad and ref.shape == (3, 2)
    ref_a, ref_b = ref.unbind(1)
    for x, a, b in zip(pairs, ref_a.tolist(), ref_b.tolist()):
        x["ref_a"], x["ref_b"] = a, b
    ev = evaluate(model, pairs, 2, 0.1, "cpu", lambda: torch.autocast("cpu", enabled=False))
    assert ev["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference


def test_read_preferences_accepts_our_layout_and_trl_chosen_rejected(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "q1", "response_a": "a1", "response_b": "b1", "p_a": 0.3},
            {"prompt": "q2", "chosen": "c2", "rejected": "r2"},
            {"chosen": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "c3"}],
             "rejected": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "r3"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_preferences(f) == [rows[0], {"prompt": "q2", "response_a": "c2", "response_b": "r2", "p_a": 1.0},
                                   {"prompt": "q3", "response_a": "c3", "response_b": "r3", "p_a": 1.0}]


def test_read_preferences_trl_explicit_prompt_torn_tail_and_identical_pairs(tmp_path):
    """TRL's conversational layout with an explicit prompt ([user] beside [assistant] lists) and a
    string prompt beside message lists; a torn last line (no newline, cut in a UTF-8 character)
    is left out with one warning naming the line; identical pairs are left out and counted."""
    f = tmp_path / "p.jsonl"
    user = [{"role": "user", "content": "q1"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "c1"}],
             "rejected": [{"role": "assistant", "content": "r1"}], "source": "x"},
            {"prompt": "q2", "chosen": [{"role": "assistant", "content": "c2"}], "rejected": "r2"},
            {"prompt": "q3", "chosen": "same", "rejected": "same"},
            {"prompt": "q4", "response_a": "same", "response_b": "same", "p_a": 0.5}]
    f.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + '{"prompt": "caf\u00e9'.encode()[:-1])
    logged, notes = [], {}
    got = read_preferences(f, notes, logged.append)
    assert got == [{"source": "x", "prompt": "q1", "response_a": "c1", "response_b": "r1", "p_a": 1.0},
                   {"prompt": "q2", "response_a": "c2", "response_b": "r2", "p_a": 1.0}]
    assert notes == {"torn_last_line": 5, "identical_dropped": 2}
    assert logged == [f"warning: {f}: line 5: left out, a last line without a newline that is not valid JSON "
                      f"(a write cut off)", f"warning: {f}: left out 2 pair(s) whose two responses are the same text"]
    # the same bad last line followed by a newline is not a torn write: an error naming it
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"prompt": "q5",\n')
    with pytest.raises(InputError, match=r"p.jsonl: line 3: not valid JSON"):
        read_preferences(f, log=None)
    f.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(InputError, match=r"no preference pairs \(the file is empty or every pair is identical\)"):
        read_preferences(f, log=None)


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "q", "response_a": "a", "response_b": "b", "p_a": 1.5}, r"line 1: field 'p_a' must be a number"),
    ({"prompt": "q", "response_a": "a", "p_a": 0.5}, r"line 1: field 'response_b' is missing"),
    ({"prompt": "q", "text": "x"}, r"line 1: needs fields"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": "r"}, r"line 1: field 'chosen' needs a user turn"),
    ({"chosen": "c", "rejected": 3, "prompt": "q"}, r"line 1: field 'rejected' must be a string or a list"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "r"}]},
     r"line 1: fields 'chosen' and 'rejected' have different prompts"),
])
def test_bad_preference_records_are_one_line_errors(tmp_path, row, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl: " + msg):
        read_preferences(f)


# ------------------------------------------------------------------------------ tiny-model runs
WORDS = "the cat sat on a mat and then it ran off to see what was over there by the old red barn".split()


def synthetic_preferences(path, n, seed=0):
    """The response containing 'zebra' is preferred (p = 1 or 0.9, on a random side)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = rng.sample(WORDS, 4)
            good.insert(rng.randint(0, 4), "zebra")
            good, bad = " ".join(good), " ".join(rng.sample(WORDS, 5))
            p, a_good = rng.choice([1.0, 0.9]), rng.random() < 0.5
            f.write(json.dumps({"prompt": f"question {i}: the {rng.choice(WORDS)}?",
                                "response_a": good if a_good else bad, "response_b": bad if a_good else good,
                                "p_a": p if a_good else 1 - p}) + "\n")


def dpo_args(tiny_gguf, prefs, out, *extra):
    return ["--preferences", str(prefs), "--policy", str(tiny_gguf), "--out", str(out), "--beta", "0.5",
            "--lr", "2e-3", "--epochs", "3", "--batch-size", "4", "--grad-accum", "2", "--warmup", "0.1",
            "--eval-every", "3", "--save-every", "100", "--device", "cpu", *extra]


def test_dpo_raises_the_margin_on_training_pairs(tiny, tiny_gguf, tmp_path):
    base, tok = tiny
    prefs = tmp_path / "prefs.jsonl"
    synthetic_preferences(prefs, 24)
    assert run_cli(dpo_main, dpo_args(tiny_gguf, prefs, tmp_path / "run")) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "dpo_metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "lr", "grad_norm"} <= set(rows[0])
    assert any("val/rewards/accuracies" in r for r in rows)
    # the margin at the first step is ~0 (policy == reference); at the end it is clearly positive
    assert abs(rows[0]["rewards/margins"]) < 0.05 and rows[-1]["rewards/margins"] > 0.5
    # recompute on the saved policy: chosen gains log-prob relative to rejected, vs the base model
    trained, _, _ = load_model(str(tmp_path / "run" / "model"))
    pairs = read_preferences(prefs)
    with torch.no_grad():
        def logps(m, side):
            return sequence_logps(m, [tokenize(tok, x["prompt"], x[side]) for x in pairs], "cpu", torch.no_grad)
        h = (logps(trained, "response_a") - logps(base, "response_a")) - (logps(trained, "response_b") - logps(base, "response_b"))  # (N,)
    sign = torch.tensor([1.0 if x["p_a"] > 0.5 else -1.0 for x in pairs])
    assert (sign * h).mean() > 1.0 and ((sign * h) > 0).float().mean() > 0.8
    summary = json.loads((tmp_path / "run" / "dpo_summary.json").read_text())
    assert summary["held_out_pairs"] > 0 and summary["held_out_accuracy"] is not None


def test_resumed_run_equals_uninterrupted_run(tiny_gguf, tmp_path, monkeypatch):
    import train_dpo
    from conftest import Killed, kill_after

    prefs = tmp_path / "prefs.jsonl"
    synthetic_preferences(prefs, 12, seed=1)
    args = ["--epochs", "2"]
    assert run_cli(dpo_main, dpo_args(tiny_gguf, prefs, tmp_path / "full", *args)) == 0
    with monkeypatch.context() as mp, pytest.raises(Killed):  # "killed" right after the step-2 checkpoint
        kill_after(mp, train_dpo, "save_checkpoint", 1)
        run_cli(dpo_main, dpo_args(tiny_gguf, prefs, tmp_path / "part", *args, "--save-every", "2"))
    assert not (tmp_path / "part" / "model").exists()
    assert json.loads((tmp_path / "part" / "ckpt" / "train_state.json").read_text())["step"] == 2
    assert run_cli(dpo_main, dpo_args(tiny_gguf, prefs, tmp_path / "part", *args)) == 0
    full, _, _ = load_model(str(tmp_path / "full" / "model"))
    part, _, _ = load_model(str(tmp_path / "part" / "model"))
    for (k, v), w in zip(full.state_dict().items(), part.state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5, msg=k)
    def rows(d):
        return [json.loads(x) for x in (tmp_path / d / "dpo_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows("part")] == [r["step"] for r in rows("full")]
    assert [r["loss"] for r in rows("part")] == pytest.approx([r["loss"] for r in rows("full")], abs=1e-6)


def test_bad_arguments_exit_2(tiny_gguf, tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "q", "response_a": "a", "response_b": "b"}\n')
    assert run_cli(dpo_main, dpo_args(tiny_gguf, prefs, tmp_path / "x")) == 2
    assert "prefs.jsonl: line 1: field 'p_a' must be a number in [0, 1], got None" in capsys.readouterr().err
    assert run_cli(dpo_main, dpo_args(tiny_gguf, tmp_path / "nope.jsonl", tmp_path / "x")) == 2
    assert "nope.jsonl: preferences file not found" in capsys.readouterr().err
