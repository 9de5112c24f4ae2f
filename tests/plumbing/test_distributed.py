"""torchrun on CPU with gloo: two processes give the same result as one with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import json

import pytest
import torch

from minicai.io.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int) -> list[str]:
    """torchrun's command line for nproc processes on this machine. --standalone lets the
    rendezvous pick a free port itself (a port chosen here could be taken before torchrun binds it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def run(args, nproc: int, cwd: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [*torchrun(nproc), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp+fused-ce"])
def test_sft_two_processes_equal_one(tiny_gguf, tmp_path, mode):
    """train_sl.py under torchrun (DDP, FSDP2, and FSDP2 with the fused loss, whose LM head weight is
    used in FusedSFTLoss's forward: the module distributed.wrap then shards) against one process
    with the same flags and --batch-size (a global batch: 2 ranks x 2 sequences)."""
    prompts = tmp_path / "p.txt"
    # DDP: 5 prompts in global micro-batches of 4 leave a batch of 1, smaller than the world: the
    # second rank then holds a weight-0 repeat (distributed.rank_share)
    n = 5 if mode == "ddp" else 8
    prompts.write_text("\n".join(f"a risky request, number {i}" for i in range(n)))
    flags = ["--fused-ce"] if mode.endswith("fused-ce") else []

    def args(out):
        return [str(ROOT / "train_sl.py"), "--model", str(tiny_gguf), "--out", str(out), "--prompts", str(prompts),
                "--helpful-fraction", "0", "--held-out-fraction", "0", "--constitution", "hhh", "--rounds", "1",
                "--max-new-tokens", "6", "--gen-batch-size", "4", "--n-prompts", str(n), "--epochs", "2",
                "--lr", "1e-3", "--warmup", "1", "--val-fraction", "0", "--grad-accum", "2", "--batch-size", "4", *flags]

    run(args(tmp_path / "one"), 1, tmp_path)
    run(args(tmp_path / "two") + (["--fsdp"] if mode.startswith("fsdp") else []), 2, tmp_path)
    a = (tmp_path / "one" / "traces.jsonl").read_text()
    b = (tmp_path / "two" / "traces.jsonl").read_text()
    assert a == b  # sharded generation writes the same records
    # every step's loss and gradient norm: a loss-scaling mistake shows here even where Adam hides it
    rows = [[json.loads(x) for x in (tmp_path / o / "sft_metrics.jsonl").read_text().splitlines()] for o in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) > 0
    for r1, r2 in zip(*rows):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4) and r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    m1, _, _ = load_model(str(tmp_path / "one" / "model"))
    m2, _, _ = load_model(str(tmp_path / "two" / "model"))
    base, _, _ = load_model(str(tiny_gguf))
    assert_same_weights(m1.state_dict(), m2.state_dict(), base.state_dict())


WEIGHT_ATOL = 5e-5
"""Weights of N processes vs 1: the ranks' forwards see other batch shapes, so gradients differ in
fp32 rounding, and Adam (m / sqrt(v), about the sign of the gradient) turns a rounding difference
in a gradient entry that nearly cancels into a weight difference of up to ~lr/100 (3e-6 seen at
lr 1e-3). A weighting mistake moves weights by ~lr; loss-scale mistakes, which Adam mostly hides,
are caught by comparing every step's loss and gradient norm."""
OUTLIER_ATOL, OUTLIER_SHARE = 4 * WEIGHT_ATOL, 1e-3
"""The near-cancelling entries themselves: on an AVX2-only AMD EPYC (2026-12-06) DPO's 2-process run
ends with 1 entry of 8,192 in layers.0.mlp.down_proj 8.6e-5 away (lr 1e-3; the tensor's median
difference 3e-9). So up to a share OUTLIER_SHARE of a tensor's entries (at least one) may differ
by up to OUTLIER_ATOL = lr/5: a weighting mistake moves most entries by ~lr, far past both."""


def assert_same_weights(a, b, base, atol=WEIGHT_ATOL):
    """a and b (the same keys) agree within fp tolerance (WEIGHT_ATOL; a few near-cancelling entries
    within OUTLIER_ATOL), and training moved them away from base (keys base lacks, e.g. a new head,
    are not measured) by more than 20x that, so the comparison means something. State dicts in, the
    largest move out."""
    assert a.keys() == b.keys()
    moved = 0.0
    for k, v in a.items():
        off = ~torch.isclose(v, b[k], atol=atol, rtol=1e-5)  # entries past the fp tolerance
        worst = (v - b[k]).abs().max().item()
        assert int(off.sum()) <= max(1, int(OUTLIER_SHARE * v.numel())) and worst <= 4 * atol, \
            (k, worst, int(off.sum()))
        if k in base:
            moved = max(moved, (v - base[k]).abs().max().item())
    assert moved > 20 * atol, moved
    return moved


def test_assert_same_weights_tells_rounding_from_a_weighting_mistake():
    """One near-cancelling entry of 8,192 off by 8.6e-5 passes; every entry off by lr = 1e-3 (a
    weighting mistake), two outliers where the share allows one, or one outlier past lr/5, fail."""
    base = {"w": torch.zeros(8192)}
    a = {"w": torch.full((8192,), 0.01)}
    near = {"w": a["w"].clone()}
    near["w"][7] += 8.6e-5
    assert_same_weights(a, near, base)
    for bad in (a["w"] + 1e-3, a["w"].clone().index_fill_(0, torch.arange(9), 0.01 + 6e-5),
                a["w"].clone().index_fill_(0, torch.tensor([3]), 0.01 + 2.5e-4)):
        with pytest.raises(AssertionError):
            assert_same_weights(a, {"w": bad}, base)


@pytest.mark.parametrize("variant", ["shared", "separate", "rloo"])
def test_ppo_two_processes_equal_one(eos_gguf, tiny_rm, tmp_path, variant):
    """A tiny PPO run (2 iterations x 2 epochs x 2 minibatches of a global batch of 8) under torchrun
    with 2 gloo processes ends with the weights and metrics of the same run in one process: rollouts
    are sampled per global row seed, rewards/advantages are whitened with all-reduced statistics and
    each rank's losses divide their masked sums by the minibatch's global token count / 2
    (distributed.loss_denominator). "separate" also covers the value model, per-minibatch advantage
    whitening, reward whitening and the GRPO-style KL loss. The policy stops early on about half of
    its rows, so the ranks hold different token counts and the denominator matters. "rloo": groups of
    k = 2 rows, which lie on different ranks (rows r, r + 2, ...): the batch is gathered before the
    leave-one-out baseline is taken."""
    from safetensors.torch import load_file

    extra = (["--reward-token", "he"] if variant == "shared" else
             ["--reward-token", "he", "--advantage", "rloo", "--k", "2"] if variant == "rloo" else
             ["--reward-model", str(tiny_rm), "--value-model", "separate", "--whiten-advantages", "minibatch",
              "--whiten-rewards", "--kl-penalty", "loss"])

    def args(out):
        return [str(ROOT / "train_ppo.py"), "--policy", str(eos_gguf), "--out", str(out), "--iterations", "2",
                "--batch-size", "8", "--num-minibatches", "2", "--ppo-epochs", "2", "--max-new-tokens", "8",
                "--lr", "1e-3", "--sample-every", "1000", "--device", "cpu", *extra]

    run(args(tmp_path / "one"), 1, tmp_path)
    run(args(tmp_path / "two"), 2, tmp_path)
    rows = [[json.loads(x) for x in (tmp_path / o / "metrics.jsonl").read_text().splitlines()] for o in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    for r1, r2 in zip(*rows):  # the same rollouts, scores, KL and advantages-driven losses
        for key in ("objective/scores", "objective/kl", "response/length", "loss/policy", "grad_norm",
                    *(["val/mean"] if variant != "rloo" else [])):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-5), key
    m1, _, _ = load_model(str(tmp_path / "one" / "model"))
    m2, _, _ = load_model(str(tmp_path / "two" / "model"))
    base, _, _ = load_model(str(eos_gguf))
    assert_same_weights(m1.state_dict(), m2.state_dict(), base.state_dict())
    lengths = [r["response/length"] for r in rows[0]]
    assert min(lengths) < 8  # some rows stopped early: unequal token shares
    if variant == "rloo":
        return
    if variant == "shared":
        heads = [load_file(str(tmp_path / o / "model" / "value_head.safetensors")) for o in ("one", "two")]
    else:
        heads = [load_file(str(tmp_path / o / "model" / "value_model.safetensors")) for o in ("one", "two")]
    for k, v in heads[0].items():
        assert torch.allclose(v, heads[1][k], atol=WEIGHT_ATOL, rtol=1e-5), k


def test_ppo_batch_must_split_evenly_over_ranks(tiny_gguf, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*torchrun(2), str(ROOT / "train_ppo.py"), "--policy", str(tiny_gguf), "--out",
           str(tmp_path / "o"), "--reward-token", "he", "--batch-size", "6", "--num-minibatches", "2",
           "--device", "cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "must be a multiple of --num-minibatches x processes (2 x 2)" in r.stderr
