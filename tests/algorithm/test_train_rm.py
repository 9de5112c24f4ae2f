"""Reward model: the score is read at the last real token whatever the padding, the model learns a
synthetic preference, training resumes and stops cleanly, and the whole script runs end to end.
(The soft-label loss and its gradient against the hand formula for p = 1, 0.5, 0 are tested in
tests/algorithm/test_losses.py, test_pairwise_loss_value_and_gradient_by_hand; not repeated here.)"""
import json
import random

import pytest
import torch

import train_rm
from conftest import Killed, kill_after
from minicai.infra import labelling
from minicai.io.checkpoint import load_model, load_scalar_model
from minicai.io.data import Prompt, split
from minicai.feedback import reward_input
from minicai.model import ScalarModel, last_token_scores
from minicai.model import ScalarHead
from minicai.sample import pad
from minicai.infra.cli import run_cli
from minicai.errors import InputError
from train_rm import main as train_rm_main

WORDS = "the cat sat on a mat and then it ran off to see what was over there by the old red barn".split()
MARKER = "zebra"


def test_reward_input_ends_at_the_end_of_turn_marker(tiny):
    _, tok = tiny
    ids = reward_input(tok, "hi", "hello")
    assert tok.decode(ids, skip_special=False).endswith("<|im_start|>assistant\nhello<|im_end|>")


def test_score_is_read_at_the_last_real_token_for_left_and_right_padding(tiny):
    model, tok = tiny
    head = ScalarHead(model.cfg.dim, init_std=0.1)
    seqs = [reward_input(tok, "hi", "hello there"), reward_input(tok, "a longer question?", "x"),
            reward_input(tok, "q", "one two three four five six")]
    assert len({len(s) for s in seqs}) == 3
    with torch.no_grad():
        alone = torch.stack([last_token_scores(ScalarModel(model, head), torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])  # (3,) no padding at all
        right = last_token_scores(ScalarModel(model, head), *pad(seqs, tok.pad_id, "right"))
        left = last_token_scores(ScalarModel(model, head), *pad(seqs, tok.pad_id, "left"))
        # the score must come from the last token: head(h) at that token in an unpadded forward
        h = model.padded_forward(torch.tensor([seqs[0]]), torch.ones(1, len(seqs[0]), dtype=torch.long), hidden=True)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert alone[0].item() == pytest.approx(head(h)[0, -1].item(), abs=1e-6)


def synthetic_preferences(path, n, seed=0):
    """Pairs where the response containing MARKER is preferred (p = 1 or 0.9, on a random side)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good = rng.sample(WORDS, rng.randint(3, 6))
            good.insert(rng.randint(0, len(good)), MARKER)
            bad = rng.sample(WORDS, rng.randint(4, 7))
            good, bad = " ".join(good), " ".join(bad)
            p = rng.choice([1.0, 0.9])
            a_good = rng.random() < 0.5
            rec = {"prompt": f"question {i}: what about the {rng.choice(WORDS)}?",
                   "response_a": good if a_good else bad, "response_b": bad if a_good else good,
                   "p_a": p if a_good else 1 - p}
            f.write(json.dumps(rec) + "\n")
    return path


RM = ["--epochs", "2", "--lr", "2e-3", "--batch-size", "16", "--warmup", "2", "--score-batch-size", "64"]


def test_reward_model_learns_a_synthetic_preference(tiny_gguf, tmp_path):
    prefs = synthetic_preferences(tmp_path / "prefs.jsonl", 150)
    out = tmp_path / "run"
    assert train_rm_main(["--out", str(out), "--policy", str(tiny_gguf), "--preferences", str(prefs), *RM]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pairs"] >= 20
    assert summary["held_out_accuracy"] >= 0.9, summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["reward_model"]["steps"] and "val_accuracy" in rows[-1]
    # the saved model reproduces the accuracy and its rewards are normalised on the responses
    model, tok, info = load_scalar_model(out / "rm")
    assert info["rm_stage"] == "done"
    recs = [json.loads(x) for x in prefs.read_text().splitlines()]
    seqs = list(dict.fromkeys(tuple(reward_input(tok, r["prompt"], r[s])) for r in recs
                              for s in ("response_a", "response_b")))
    with torch.no_grad():
        r = last_token_scores(model, *pad([list(s) for s in seqs], tok.pad_id, "right"))
    assert r.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert r.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # a finished run is not trained again
    assert train_rm_main(["--out", str(out), "--policy", str(tiny_gguf), "--preferences", str(prefs), *RM]) == 0


def test_interrupted_training_resumes_to_the_same_model(tiny_gguf, tmp_path, monkeypatch):
    """Killed right after its first checkpoint (step 2), then rerun: the model and the metrics
    steps of the uninterrupted run."""
    prefs = synthetic_preferences(tmp_path / "prefs.jsonl", 24)
    args = ["--policy", str(tiny_gguf), "--preferences", str(prefs), "--epochs", "2", "--lr", "1e-3",
            "--batch-size", "8"]
    assert train_rm_main(["--out", str(tmp_path / "full"), *args]) == 0
    kill_after(monkeypatch, train_rm, "save_checkpoint")
    with pytest.raises(Killed):
        train_rm_main(["--out", str(tmp_path / "part"), *args, "--save-every", "2"])
    monkeypatch.undo()
    assert json.loads((tmp_path / "part" / "rm" / "train_state.json").read_text())["step"] == 2
    assert not (tmp_path / "part" / "summary.json").exists()
    assert train_rm_main(["--out", str(tmp_path / "part"), *args]) == 0
    a, _, _ = load_scalar_model(tmp_path / "full" / "rm")
    b, _, _ = load_scalar_model(tmp_path / "part" / "rm")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    full_rows = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in part_rows] == [json.loads(x)["step"] for x in full_rows]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_gguf, tmp_path, monkeypatch):
    prefs = synthetic_preferences(tmp_path / "prefs.jsonl", 40)
    calls = {"n": 0}
    real_loss = train_rm.pairwise_loss

    def loss_going_nan(r_a, r_b, p, **kw):
        calls["n"] += 1
        loss = real_loss(r_a, r_b, p, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_rm, "pairwise_loss", loss_going_nan)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="loss became nan at step 2"):
        train_rm_main(["--out", str(out), "--policy", str(tiny_gguf), "--preferences", str(prefs),
                       "--batch-size", "8", "--save-every", "1"])
    meta = json.loads((out / "rm" / "minicai.json").read_text())
    assert meta["step"] == 2 and "rm_stage" not in meta
    model, _, _ = load_scalar_model(out / "rm")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_infinite_lr_never_overwrites_the_checkpoint(tiny_gguf, tmp_path):
    prefs = synthetic_preferences(tmp_path / "prefs.jsonl", 40)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="became"):  # 1e39: inf in float32 (--lr inf itself is refused by its range)
        train_rm_main(["--out", str(out), "--policy", str(tiny_gguf), "--preferences", str(prefs),
                       "--batch-size", "8", "--save-every", "1", "--lr", "1e39", "--warmup", "0"])
    assert not (out / "rm").exists()  # the first step already broke the weights: nothing was saved


def test_empty_pair_file_is_a_clear_error(tiny_gguf, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["--out", str(tmp_path / "run"), "--policy", str(tiny_gguf), "--preferences", str(empty)]
    assert run_cli(train_rm_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty.jsonl: no preference pairs" in err and len(err.splitlines()) == 1


def test_end_to_end_feedback_then_reward_model(tiny_gguf, tmp_path, monkeypatch):
    """Both stages from the command line on the tiny model, killed in stage 1 right after the first
    batch of preferences reached the file, then rerun."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--policy", str(tiny_gguf), "--feedback-model", "policy", "--constitution", "hhh",
            "--n-prompts", "10",
            "--max-new-tokens", "6", "--gen-batch-size", "4", "--epochs", "1", "--batch-size", "4",
            "--pair-val-fraction", "0.3"]
    with monkeypatch.context() as mp:  # the preference appender of label_prompts' module
        kill_after(mp, labelling, "append_jsonl")
        with pytest.raises(Killed):
            train_rm_main(argv)
    assert len((out / "preferences.jsonl").read_text().splitlines()) == 4
    assert not (out / "rm").exists()
    assert train_rm_main(argv) == 0
    recs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feedback"]["pairs"] == len(recs) and summary["feedback"]["pairs"] + \
        summary["feedback"]["dropped_identical"] == 10
    assert summary["train_pairs"] + summary["held_out_pairs"] == len(recs)
    assert set(summary["seconds"]) >= {"feedback_s", "reward_model_s", "normalise_s"}
    held = set(split([Prompt(r["prompt"], "", "red-team") for r in recs], 0.2)[1])
    assert not held  # the project's evaluation prompts are never used
    assert (out / "rm" / "reward_head.safetensors").exists()
    with pytest.raises(InputError, match="field 'n_prompts'"):  # a changed config is refused
        train_rm_main(argv[:9] + ["11"] + argv[10:])


def test_revision_and_rlcd_labellers_from_the_command_line(tiny_gguf, tmp_path):
    """--labeller revision trains on the SL-CAI traces' (initial, final) pairs, with the stated
    filter's drops in the .dropped file; --labeller rlcd samples its own provenance-labelled pairs."""
    traces = tmp_path / "traces.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"risky request {i}", "kind": "red-team", "initial": f"sure, step {i}",
             "rounds": [{"revision": f"I won't help with request {i}, because it could hurt someone."}],
             "final": f"I won't help with request {i}, because it could hurt someone."} for i in range(10)]
    rows.append({"id": "same", "prompt": "p", "kind": "red-team", "initial": "x", "rounds": [{}], "final": "X"})
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--policy", str(tiny_gguf), "--feedback-model", "policy", "--constitution", "hhh", "--epochs", "1",
              "--batch-size", "4", "--pair-val-fraction", "0.3"]
    out = tmp_path / "rev"
    assert train_rm_main(["--out", str(out), *common, "--labeller", "revision", "--sl-traces", str(traces)]) == 0
    recs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(recs) == 10 and all(r["labeller"] == "revision" and r["p_a"] in (0.0, 1.0) for r in recs)
    assert [json.loads(x)["key"] for x in (out / "preferences.dropped.jsonl").read_text().splitlines()] == \
        ["same:revision"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] + summary["held_out_pairs"] == 10
    out = tmp_path / "rlcd"
    assert train_rm_main(["--out", str(out), *common, "--labeller", "rlcd", "--n-prompts", "6",
                          "--max-new-tokens", "5", "--gen-batch-size", "3"]) == 0
    recs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert recs and all(r["key"].endswith(":rlcd") and r["p_a"] in (0.0, 1.0) for r in recs)


def test_train_step_accumulates_to_the_whole_batch_step(tiny_gguf, tmp_path):
    """train_step called directly: its loss is the pair-mean loss of the whole batch (evaluate's,
    losses.pairwise_loss over the batch's rewards), and two micro-batches of 3 (gradient
    accumulation, each summed loss divided by the step's pair count) move the weights as one
    micro-batch of 6 does. SGD, not Adam: Adam's first step is about lr * sign(g), which turns the
    rounding of near-zero gradient entries into lr-sized differences."""
    from contextlib import nullcontext

    from minicai.infra import distributed

    recs = [json.loads(x) for x in synthetic_preferences(tmp_path / "prefs.jsonl", 6).read_text().splitlines()]
    cpu, models, rows = torch.device("cpu"), [], []
    for micro in (6, 3):
        torch.manual_seed(0)  # the same new head
        rm, tok, resuming = train_rm.reward_model(tmp_path / "no-checkpoint", str(tiny_gguf), cpu)
        assert not resuming
        pairs, skipped = train_rm.tokenize_pairs(recs, tok, 1024)
        assert (len(pairs), skipped) == (6, 0)
        before = train_rm.evaluate(rm, pairs, 4, tok.pad_id, cpu, nullcontext)
        opt = torch.optim.SGD(list(rm.parameters()), lr=0.05)
        rm.train()
        row = train_rm.train_step(rm, opt, pairs, list(range(6)), micro, tok.pad_id, cpu, nullcontext,
                                  distributed.Dist(), 0, 1e9)
        assert row["loss"] == pytest.approx(before["loss"], abs=1e-5)
        assert row["accuracy"] == pytest.approx(before["accuracy"])
        models.append(rm)
        rows.append(row)
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-5)
    moved = 0.0
    base, _, _ = load_model(str(tiny_gguf))
    for (name, x), (_, y) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
        if name.startswith("trunk.") and name[6:] in base.state_dict():
            moved = max(moved, (x - base.state_dict()[name[6:]]).abs().max().item())
    assert moved > 1e-4  # the step moved the trunk: the comparison means something


def test_bad_flags_are_one_line_errors(tiny_gguf, tmp_path):
    prefs = synthetic_preferences(tmp_path / "prefs.jsonl", 4)
    base = ["--out", str(tmp_path / "run"), "--policy", str(tiny_gguf), "--preferences", str(prefs)]
    for extra, match in ((["--fsdp"], "--fsdp"), (["--grad-accum", "0"], "--grad-accum"), (["--k", "1"], r"--k: 1 is not allowed \(must be >= 2\)")):
        with pytest.raises(InputError, match=match):
            train_rm_main(base + extra)
    assert not (tmp_path / "run").exists()


def test_normalise_gives_mean_zero_and_std_one(tiny):
    """Stage 3 (OpenAI lm-human-preferences train_reward.py): gain = 1/std, bias = -mean/std, so the
    rewards of the distinct sequences of the pairs have mean 0 and population std 1 afterwards."""
    from contextlib import nullcontext

    from minicai.infra.distributed import Dist
    model, tok = tiny
    torch.manual_seed(0)
    rm = ScalarModel(model, ScalarHead(model.cfg.dim, init_std=0.5))
    seqs = [tok.encode(t) for t in ("a b c", "the cat", "sat on a mat", "x", "y z z y")]
    pairs = [{"a": seqs[i], "b": seqs[(i + 1) % 5]} for i in range(5)]
    with torch.no_grad():
        before = last_token_scores(rm, *pad(seqs, tok.pad_id, "right"))
        stats = train_rm.normalise(rm, pairs, 2, tok.pad_id, "cpu", nullcontext, Dist(), 0)
        after = last_token_scores(rm, *pad(seqs, tok.pad_id, "right"))
    assert stats["reward_mean_before_normalising"] == pytest.approx(before.mean().item(), abs=1e-6)
    assert before.std().item() > 0.01  # a real rescaling, not a no-op
    assert after.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert after.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_rlcd_with_the_few_shot_context_from_the_command_line(tiny_gguf, tmp_path):
    """--labeller rlcd --rlcd-context few-shot: train_rm.py builds the constitution's few-shot context
    (slcai.distill_context) and the AI labeller labels the pairs."""
    out = tmp_path / "run"
    argv = ["--out", str(out), "--policy", str(tiny_gguf), "--feedback-model", "policy", "--constitution", "hhh",
            "--labeller", "rlcd", "--rlcd-context", "few-shot", "--rescore", "contrast", "--n-prompts", "6",
            "--max-new-tokens", "4", "--gen-batch-size", "3", "--epochs", "1", "--batch-size", "2",
            "--pair-val-fraction", "0.3"]
    assert train_rm_main(argv) == 0
    recs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert recs and all(r["labeller"] == "rlcd-few-shot+contrast" and r["key"].endswith(":rlcd") for r in recs)
    assert all(0.0 < r["p_a"] < 1.0 and r["p_a_provenance"] in (0.0, 1.0) for r in recs)
    assert json.loads((out / "config.json").read_text())["rlcd_context"] == "few-shot"


def test_few_shot_labels_reach_every_a_b_question(tiny_gguf, tmp_path, monkeypatch):
    """--few-shot-labels: every labelling call gets the constitution's worked examples
    (constitution.label_shots); without the flag none does."""
    import minicai.infra.labelling as labelling
    from minicai.constitution import label_shots
    from minicai.io.constitution_files import load_constitution

    seen = []
    real = labelling.ensemble_labels

    def spy(*args, **kw):
        seen.append(kw.get("shots", ()))
        return real(*args, **kw)

    monkeypatch.setattr(labelling, "ensemble_labels", spy)
    for flag in ([], ["--few-shot-labels"]):
        seen.clear()
        argv = ["--out", str(tmp_path / f"run{len(flag)}"), "--policy", str(tiny_gguf), "--feedback-model", "policy",
                "--n-prompts", "6", "--max-new-tokens", "4", "--gen-batch-size", "3", "--epochs", "1",
                "--batch-size", "2", "--pair-val-fraction", "0.3", *flag]
        assert train_rm_main(argv) == 0
        want = tuple(label_shots(load_constitution("default"))) if flag else ()
        assert seen and all(tuple(s) == want for s in seen) and len(want) == (4 if flag else 0)
