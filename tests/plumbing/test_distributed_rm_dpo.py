"""torchrun on CPU with gloo for train_rm.py and train_dpo.py: two processes give the records and
the weights of one process with the same --batch-size (a global batch, split over the ranks).

Tolerance. The ranks' forward passes see other batch shapes than the single process, so the
gradients differ in fp32 rounding, and Adam turns that into weight differences of up to ~1.5e-5
here where a gradient entry nearly cancels (m / sqrt(v) is about its sign): one process that only
re-batches DPO's reference pass (--eval-batch-size 1, 3 or 7) differs from itself as much. A
weighting error (a repeated pair counted as real, say) moves weights by ~lr = 1e-3, and a loss
scale error, which Adam would mostly hide, shows in every step's loss and grad_norm, compared to
1e-4 relative (they agree to ~1e-6)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_model, tiny_config, write_tiny_gguf
from minicai.io.checkpoint import load_model, load_scalar_model
from test_distributed import ROOT, assert_same_weights, run


@pytest.fixture(scope="module")
def untied_gguf(tmp_path_factory):
    """The tiny model with its own LM head: a reward model never uses it, and DDP must not wait
    for its gradient."""
    return write_tiny_gguf(tmp_path_factory.mktemp("untied") / "untied.gguf",
                           random_model(tiny_config(tie_embeddings=False)))


def test_reward_model_two_processes_equal_one(untied_gguf, tmp_path):
    """Labelling (killed after a batch per rank), then reward-model training (killed right after
    its first checkpoint), resumed each time, under torchrun: the same preferences.jsonl, byte for
    byte, and the same reward model as one uninterrupted process with the same --batch-size (a
    global batch: 2 ranks x 2 pairs). The kills come from the launcher tests/interrupt.py."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a risky request, number {i}" for i in range(9)))

    def args(out, script=str(ROOT / "train_rm.py")):
        return [script, "--policy", str(untied_gguf), "--feedback-model", "policy", "--out", str(out),
                "--prompts", str(prompts),
                "--held-out-fraction", "0", "--n-prompts", "9", "--constitution", "hhh", "--max-new-tokens", "6",
                "--gen-batch-size", "2", "--judge-batch-size", "4", "--epochs", "3", "--lr", "1e-3",
                "--pair-val-fraction", "0.3", "--score-batch-size", "3", "--device", "cpu", "--batch-size", "4"]

    def killed(mode, out, *extra):
        return run([str(ROOT / "tests" / "interrupt.py"), mode, "1", *args(out), *extra], 2, tmp_path)

    one, two = tmp_path / "one", tmp_path / "two"
    run(args(one), 1, tmp_path)
    # 9 prompts in batches of 2: rank 0 labels batches 0, 2, 4 and rank 1 batches 1, 3; killed
    # after one batch each, the rank files hold the records of prompts 0-3, not yet merged
    killed("labelling", two)
    shards = sorted(p.name for p in two.glob("preferences.rank*"))
    assert "preferences.rank0.jsonl" in shards and "preferences.rank1.jsonl" in shards
    assert not (two / "preferences.jsonl").exists() and not (two / "rm").exists()
    # what the next run merges first (infra.labelling.merge_rank_files, on a copy): a prefix of the full file
    import shutil

    import train_rm
    from minicai.infra import cli, labelling

    peek = tmp_path / "peek"
    shutil.copytree(two, peek)
    labelling.merge_rank_files(peek / "preferences.jsonl",
                              train_rm.select_prompts(cli.parse(train_rm.Args, args(peek)[1:]).label, 0), 2)
    part, full = (peek / "preferences.jsonl").read_bytes(), (one / "preferences.jsonl").read_bytes()
    assert part and len(part) < len(full) and full.startswith(part)
    assert not list(peek.glob("*.rank*"))
    # the rerun merges the rank files, labels the rest, trains, and is killed after its first
    # checkpoint, at step 2 of 3 (--save-every may change between the runs of a folder)
    killed("checkpoint", two, "--save-every", "2")
    assert not list(two.glob("*.rank*"))
    assert (two / "preferences.jsonl").read_bytes() == full
    assert json.loads((two / "rm" / "train_state.json").read_text())["step"] == 2
    assert not (two / "summary.json").exists()
    assert "resuming reward-model training at step 2" in run(args(two), 2, tmp_path).stdout
    assert (one / "preferences.jsonl").read_bytes() == (two / "preferences.jsonl").read_bytes()
    assert len((one / "preferences.jsonl").read_text().splitlines()) >= 6
    assert sorted(p.name for p in two.glob("preferences*")) == sorted(p.name for p in one.glob("preferences*"))
    m1, _, info1 = load_scalar_model(one / "rm")
    m2, _, info2 = load_scalar_model(two / "rm")
    base, _, _ = load_model(str(untied_gguf))
    base = {f"trunk.{k}": v for k, v in base.state_dict().items()}
    s1, s2 = m1.state_dict(), m2.state_dict()
    # The Bradley-Terry loss sees only reward differences, so the head's proj.bias has no gradient
    # in exact arithmetic: only rounding moves it (Adam makes that up to ~lr per step), and the
    # normalisation folds it into head.bias. Compare the normalised reward's offset instead.
    offsets = [s.pop("head.proj.bias") * s["head.gain"] + s.pop("head.bias") for s in (s1, s2)]
    torch.testing.assert_close(offsets[0], offsets[1], atol=1e-5, rtol=1e-4)
    assert_same_weights(s1, s2, base)  # trunk, head.proj.weight, gain
    assert torch.equal(m1.trunk.lm_head.weight, base["trunk.lm_head.weight"])  # unused, frozen
    r1, r2 = info1["result"], info2["result"]
    assert r1["held_out"]["pairs"] > 0 and r1["held_out"]["pairs"] == r2["held_out"]["pairs"]
    for key in ("reward_mean_before_normalising", "reward_std_before_normalising"):
        assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    assert r1["held_out"]["loss"] == pytest.approx(r2["held_out"]["loss"], rel=1e-4, abs=1e-6)
    rows = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):  # the global loss and statistics, not rank 0's share
        for key in ("loss", "reward_margin", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_two_processes_equal_one(tiny_gguf, tmp_path, mode):
    """DPO under torchrun (DDP, or FSDP2 with --fsdp), killed right after its first checkpoint
    (step 1; the launcher tests/interrupt.py) and resumed, ends with the policy of one
    uninterrupted process with the same --batch-size (a global batch). --eval-batch-size 2 leaves
    the ranks unequal numbers of evaluation batches (5 vs 4 training pairs), which FSDP's
    collective forwards must survive."""
    prefs = tmp_path / "prefs.jsonl"
    words = "the cat sat on a mat and then it ran off to see what was over there".split()
    prefs.write_text("".join(json.dumps({"prompt": f"question {i}: the {words[i]}?",
                                         "response_a": " ".join(words[i:i + 3 + i % 4]) + " zebra",
                                         "response_b": " ".join(words[i + 1:i + 5]), "p_a": [1.0, 0.9, 0.3][i % 3]})
                             + "\n" for i in range(13)))

    def args(out):
        return [str(ROOT / "train_dpo.py"), "--preferences", str(prefs), "--policy", str(tiny_gguf), "--out", str(out),
                "--beta", "0.5", "--lr", "1e-3", "--epochs", "2", "--grad-accum", "2", "--warmup", "0.1",
                "--pair-val-fraction", "0.3", "--eval-every", "2", "--eval-batch-size", "2", "--device", "cpu",
                "--batch-size", "4"]

    one, two = tmp_path / "one", tmp_path / "two"
    run(args(one), 1, tmp_path)
    # 2 ranks x 2 pairs = the global micro-batch of 4; 9 training pairs make micro-batches of
    # 4, 4 and 1 per epoch: for the single pair, rank 1 computes a repeated pair with weight 0
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    run([str(ROOT / "tests" / "interrupt.py"), "checkpoint", "1", *args(two), *fsdp, "--save-every", "1"], 2, tmp_path)
    assert not (two / "model").exists()
    assert json.loads((two / "ckpt" / "train_state.json").read_text())["step"] == 1
    assert "resuming DPO at step 1" in run(args(two) + fsdp, 2, tmp_path).stdout
    m1, _, _ = load_model(str(one / "model"))
    m2, _, _ = load_model(str(two / "model"))
    base, _, _ = load_model(str(tiny_gguf))
    assert_same_weights(m1.state_dict(), m2.state_dict(), base.state_dict())
    ref = [load_file(str(o / "ref_logprobs.safetensors")) for o in (one, two)]
    for k in ("a", "b"):  # gathered from the ranks' shares in pair order
        torch.testing.assert_close(ref[0][k], ref[1][k], atol=1e-5, rtol=1e-6)
    rows = [[json.loads(x) for x in (o / "dpo_metrics.jsonl").read_text().splitlines()] for o in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "val/loss"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    s1, s2 = (json.loads((o / "dpo_summary.json").read_text()) for o in (one, two))
    assert (s1["train_pairs"], s1["held_out_pairs"], s2["world_size"]) == (9, 4, 2)
    assert s1["train"]["loss"] == pytest.approx(s2["train"]["loss"], rel=1e-4)
