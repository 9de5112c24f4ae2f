"""One PPO update step (step 6 of train_ppo.py) on the embedded model, its routes side by side.

    python bench/bench_ppo_update.py [--reps 3] [--dtypes fp32 bf16] [--value-model separate shared]

The step is what train_ppo.update runs once per minibatch: infra.ppo.PolicyValue's forward (policy
log-probs and entropies of the response tokens, values), a loss, backward, AdamW. Batch: the PPO
bench's setting, 8 rows x (46 prompt + 64 response) tokens, three rows with 5 tokens of left padding,
random token ids (the cost does not depend on the text). Routes, measured in the same run, each
the best of --reps steps after one warm-up, interleaved so that a noisy neighbour hits all alike:
  plain              full (B, G, V) logits + rl.logprobs_from_logits / rl.entropy_from_logits,
                     AdamW(foreach) -- train_ppo.py before session 7
  plain, fused AdamW AdamW(fused=True), the optimizer train_ppo.py uses now
  --fused-logprobs   infra.fast.linear_logprobs (LM head fused with the softmax) + fused AdamW
The ratios are against the plain route of the same run. Also printed: the step's model FLOPs
(6 * N * tokens for each trained model: N = 134.5M matrix parameters of the policy incl. the tied
LM head on the 64 response columns only; the value model without LM head) and the % of this run's
best 2048^3 GEMM in that dtype.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import gemm_peak  # noqa: E402  the best 2048^3 matmul, as every bench measures it

from minicai.io.checkpoint import load_model  # noqa: E402
from minicai.infra.ppo import PolicyValue  # noqa: E402
from minicai.model import ScalarHead, ScalarModel  # noqa: E402

B, P, G = 8, 46, 64


def step_flops(cfg, value_model: str) -> float:
    """Model FLOPs of one step: forward + backward = 6 FLOPs per parameter-token of the trunk over all
    B * (P + G) tokens, and of the LM head over the B * G response columns; a separate value model's
    trunk again (its scalar head is negligible)."""
    C, L, F, V = cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    trunk = L * (2 * C * C + 2 * C * kv + 3 * C * F)  # q, o; k, v; gate, up, down
    f = 6 * trunk * B * (P + G) + 6 * C * V * B * G
    return f + (6 * trunk * B * (P + G) if value_model == "separate" else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per route (best of), after one warm-up")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="fp32 weights, or bf16 autocast on fp32 weights (train_ppo.py --bf16)")
    ap.add_argument("--value-model", nargs="+", default=["separate"], choices=["separate", "shared"],
                    help="separate: a copy of the trunk with a scalar head (TRL's layout); shared: a head on the policy")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average before the run "
          f"{os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    policy, _, _ = load_model(None)
    seq = torch.randint(0, policy.cfg.vocab_size, (B, P + G))  # (B, P+G)
    att = torch.ones(B, P + G, dtype=torch.long)
    att[:3, :5] = 0  # left padding on three rows
    print(f"batch {B} x ({P} prompt + {G} response) tokens")
    for vm in args.value_model:
        value = ScalarModel(copy.deepcopy(policy), ScalarHead(policy.cfg.dim, init_std=0.02)) if vm == "separate" \
            else None
        head = ScalarHead(policy.cfg.dim) if vm == "shared" else None
        for dt in args.dtypes:
            bf16 = dt == "bf16"
            peak = gemm_peak(torch.bfloat16 if bf16 else torch.float32)
            routes = {}
            for name, fused, fused_opt in (("plain", False, False), ("plain, fused AdamW", False, True),
                                           ("--fused-logprobs", True, True)):
                pv = PolicyValue(policy, head, value, fused=fused)
                routes[name] = (pv, torch.optim.AdamW(pv.parameters(), lr=1e-7, eps=1e-5, fused=fused_opt))

            def step(pv, opt):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logp, values, _ = pv(seq, att, P, 0.7)  # (B, G) each
                loss = -logp.mean() + 0.1 * values.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            best = {k: float("inf") for k in routes}
            for k, (pv, opt) in routes.items():
                step(pv, opt)  # warm-up
            for _ in range(args.reps):
                for k, (pv, opt) in routes.items():
                    t = time.perf_counter()
                    step(pv, opt)
                    best[k] = min(best[k], time.perf_counter() - t)
            flops = step_flops(policy.cfg, vm)
            print(f"\n--value-model {vm}, {'bf16 autocast' if bf16 else 'fp32'}: {flops / 1e9:.0f} GFLOP per step, "
                  f"GEMM peak this run {peak:.0f} GFLOP/s")
            print(f"  {'route':<20} {'s/step':>7} {'vs plain':>9} {'% of peak':>10}")
            for k, s in best.items():
                print(f"  {k:<20} {s:7.2f} {best['plain'] / s:8.2f}x {100 * flops / s / 1e9 / peak:9.0f}%")
    print(f"\nload average after the run {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
