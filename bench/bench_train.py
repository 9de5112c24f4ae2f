"""Training-step speed on the embedded model: tokens/s, MFU against this machine's measured matmul
peak, and HF transformers on the same weights and batch (when the optional extra is installed).

    python bench/bench_train.py [--batch 8] [--seq 256] [--steps 3] [--no-hf]

One step = forward + backward + AdamW update of all weights on a (batch, seq) batch of token ids,
next-token loss on every position; fp32, then bf16 autocast (weights and optimizer stay fp32).
Each side runs the way its users train: ours is train_sl.py's path, model(ids, targets=) (the LM head
fused with the cross-entropy, losses.linear_cross_entropy); HF is model(input_ids, labels=) (logits,
then its loss). Both use fused AdamW (torch.optim.AdamW(fused=True)), the default optimizer of HF's
Trainer on torch >= 2.8 and of our scripts. --plain-loss times ours through full logits instead.
MFU = 6 * N * tokens/s / peak, N = parameters in matrix products (the tied embedding counted once,
as the LM head; attention's own score/value FLOPs are left out, ~3% at seq 256), peak = the best of
a few square 2048^3 GEMMs in that dtype, measured in the same run; "model-shape GEMM" is the best
rate of the model's own MLP products at this batch (inner size 576), a roof for these shapes.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from minicai.infra.checkpoint import load_model, save_hf


def gemm_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def model_gemm_peak(dtype, tokens: int, dim: int, hidden: int, reps: int = 5) -> float:
    """Best GFLOP/s of the model's own largest products at this batch: (tokens, dim) x (dim, hidden),
    then (tokens, hidden) x (hidden, dim), as the MLP does. A roof for these thin shapes (inner
    size 576 here), which run well below the square-GEMM peak."""
    x, w1, w2 = torch.randn(tokens, dim).to(dtype), torch.randn(dim, hidden).to(dtype), torch.randn(hidden, dim).to(dtype)
    (x @ w1) @ w2
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        (x @ w1) @ w2
        best = min(best, time.perf_counter() - t)
    return 2 * 2 * tokens * dim * hidden / best / 1e9


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def ours(model, ids, bf16: bool, plain_loss: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)  # (B, T) position t predicts token t+1

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if plain_loss:
                logits = model(ids)  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            else:
                loss = model(ids, targets=targets) / targets[:, :-1].numel()  # fused head + loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf(folder, ids, bf16: bool):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True)  # HF Trainer's default on torch >= 2.8

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers even if installed")
    ap.add_argument("--plain-loss", action="store_true",
                    help="ours through full (B, T, V) logits + F.cross_entropy, as HF (isolates the fused loss)")
    args = ap.parse_args()
    model, tok, _ = load_model(None)
    model.train()
    n_params = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)
    ids = torch.randint(3, model.cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    have_hf = False
    if not args.no_hf:
        try:
            import transformers  # noqa: F401

            have_hf = True
        except ImportError:
            pass
    tmp = tempfile.TemporaryDirectory()
    folder = str(save_hf(f"{tmp.name}/m", model, tok)) if have_hf else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq}; "
          f"N = {n_params / 1e6:.1f}M matmul parameters")
    print(f"{'mode':6} {'ours tok/s':>11} {'HF tok/s':>9} {'x HF':>6} {'peak GFLOP/s':>13} {'MFU':>6} "
          f"{'model-shape GEMM':>17} {'MFU vs it':>10}")
    for name, bf16 in (("fp32", False), ("bf16", True)):
        peak = gemm_peak(torch.bfloat16 if bf16 else torch.float32)
        shape_peak = model_gemm_peak(torch.bfloat16 if bf16 else torch.float32, tokens, model.cfg.dim,
                                     model.cfg.hidden_dim)
        t_ours = time_steps(ours(model, ids, bf16, args.plain_loss), args.steps)
        t_hf = time_steps(hf(folder, ids, bf16), args.steps) if have_hf else None
        ours_tps = tokens / t_ours
        mfu = 6 * n_params * ours_tps / (peak * 1e9)
        hf_s = f"{tokens / t_hf:9.1f} {t_hf / t_ours:6.2f}" if t_hf else f"{'-':>9} {'-':>6}"
        mfu_shape = 6 * n_params * ours_tps / (shape_peak * 1e9)
        print(f"{name:6} {ours_tps:11.1f} {hf_s} {peak:13.1f} {100 * mfu:5.1f}% {shape_peak:17.1f} "
              f"{100 * mfu_shape:9.1f}%", flush=True)


if __name__ == "__main__":
    main()
