"""Time one PPO iteration of train_ppo.py on the embedded model, phase by phase.

    python bench/bench_ppo.py [--iterations 3] [--value-model shared separate] [--bf16] [--reward-model PATH]

Setting (the issue's): 8 prompts x up to 64 new tokens, 4 PPO epochs, one minibatch, fp32 weights,
policy = reference = SmolLM2-135M-Instruct (embedded), a 135M reward model. Without --reward-model
the reward model is a stand-in of the same size and cost: the embedded trunk with a random reward
head (its scores are meaningless; only the time matters here).

The script runs train_ppo.main itself (the code being measured is the training loop, not a copy)
for --iterations iterations and reads the per-phase times it logs in metrics.jsonl:
  rollout            batched generation (static KV cache, left padding)
  score/ref/values   reward model + reference + policy/value forwards over prompt + response
  update             GAE + 4 epochs of forward/backward/Adam
The first iteration is a warm-up (allocator, oneDNN kernel selection) and is reported apart; the
figure is the mean of the others. Model loading is not counted.

Reference figure, QUOTED FROM THE ISSUE and not measured here: TRL 0.19 PPOTrainer with HF
transformers 4.53, fp32, on 2 cores, about 67 s per iteration in this setting. TRL's PPOTrainer
uses a separate value model (--value-model separate is the like-for-like comparison).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ppo  # noqa: E402
from minicai.infra.checkpoint import load_model, save_hf  # noqa: E402
from minicai.model import ScalarHead  # noqa: E402

TRL_QUOTED_S = 67.0
PHASES = [("rollout", "time/rollout"), ("score/ref/values", "time/score_ref_values"), ("update", "time/update"),
          ("iteration (total)", "time/iteration")]


def stand_in_rm(folder: Path) -> Path:
    """The embedded model's trunk with a random reward head, N(0, 1/sqrt(C+1)): a bench stand-in."""
    trunk, tok, _ = load_model(None)
    torch.manual_seed(0)
    head = ScalarHead(trunk.cfg.dim, init_std=1.0 / (trunk.cfg.dim + 1) ** 0.5)
    return save_hf(folder, trunk, tok, heads={"reward": head}, meta={"note": "bench stand-in, random head"})


def run(value_model: str, rm: Path, out: Path, args) -> list[dict]:
    argv = ["--out", str(out), "--overwrite", "--reward-model", str(rm), "--iterations", str(args.iterations),
            "--batch-size", "8", "--max-new-tokens", "64", "--ppo-epochs", "4", "--num-minibatches", "1",
            "--value-model", value_model, "--save-every", "1000000", "--sample-every", "1000000", "--device", "cpu",
            "--seed", str(args.seed)] + (["--bf16"] if args.bf16 else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    with contextlib.redirect_stdout(io.StringIO()):
        train_ppo.main(argv)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3, help="iterations per setting; the first is a warm-up")
    ap.add_argument("--value-model", nargs="+", default=["shared", "separate"], choices=["shared", "separate"])
    ap.add_argument("--reward-model", default=None, help="a real reward model folder (default: a same-size stand-in)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32); the issue's figure is fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, 2 here)")
    args = ap.parse_args()
    if args.iterations < 2:
        ap.error("--iterations must be at least 2 (the first one is a warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average before the run {os.getloadavg()[0]:.2f}")
    print(f"setting: 8 prompts x up to 64 new tokens, 4 PPO epochs, 1 minibatch, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, embedded SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp:
        rm = Path(args.reward_model) if args.reward_model else stand_in_rm(Path(tmp) / "rm")
        print(f"reward model: {rm if args.reward_model else 'stand-in (embedded trunk + random head, same cost)'}")
        for vm in args.value_model:
            rows = run(vm, rm, Path(tmp) / f"ppo-{vm}", args)
            timed = rows[1:]
            print(f"\n--value-model {vm}  (mean of {len(timed)} iterations after 1 warm-up; "
                  f"mean response length {sum(r['response/length'] for r in timed) / len(timed):.1f} tokens)")
            for name, key in PHASES:
                mean = sum(r[key] for r in timed) / len(timed)
                print(f"  {name:<18} {mean:7.2f} s   (warm-up {rows[0][key]:6.2f} s)")
            it = sum(r["time/iteration"] for r in timed) / len(timed)
            print(f"  quoted from the issue, NOT measured in this run: TRL 0.19 PPOTrainer, transformers 4.53, fp32, "
                  f"2 cores: ~{TRL_QUOTED_S:.0f} s/iteration -> ratio {TRL_QUOTED_S / it:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
