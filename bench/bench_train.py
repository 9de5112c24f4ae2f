"""Training-step speed on the embedded model: tokens/s, MFU against this machine's measured matmul
peak, and HF transformers on the same weights and batch (when the optional extra is installed).

    python bench/bench_train.py [--batch 8] [--seq 256] [--steps 3] [--threads N] [--no-hf]

One step = forward + backward + AdamW update of all weights on a (batch, seq) batch of token ids,
next-token loss on every position; fp32, then bf16 autocast (weights and optimizer stay fp32).
Ours runs both of train_sl.py's routes: plain (the default: losses.sft_loss on the (B, T, V)
logits of model(ids, attn_mask)) and fused (--fused-ce: infra/fast.FusedSFTLoss, the LM head fused
with the cross-entropy, no logits tensor), each with its seconds per step and its peak memory: the
growth of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs)
during the timed steps over the resident set after the warm-up step: activations, logits and
gradients, not the weights or the optimizer state. HF is model(input_ids, labels=) (logits, then
its loss). All use fused AdamW (torch.optim.AdamW(fused=True)), the default optimizer of HF's
Trainer on torch >= 2.8 and of our scripts.
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

from minicai.io.checkpoint import load_model, save_hf
from minicai.infra.fast import FusedSFTLoss
from minicai.losses import sft_loss


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


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak resident set to the current one (Linux >= 4.0); returns the current
    resident set in kB, or None where /proc is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def time_steps(step, steps: int) -> tuple[float, float | None]:
    """(seconds per step over `steps` steps after one warm-up step, peak MB of those steps above the
    resident set after the warm-up, which made the optimizer state; None where it cannot be measured)."""
    step()  # warm-up
    base = reset_peak_rss()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t) / steps
    peak = _proc_status_kb("VmHWM") if base is not None else None
    return per_step, (peak - base) / 1024 if peak is not None else None


def ours(model, ids, bf16: bool, fused: bool):
    """train_sl.py's step on ids, every position after the first predicted: batch_loss's two routes."""
    net = FusedSFTLoss(model) if fused else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    att, mask = torch.ones_like(ids), torch.ones_like(ids)  # (B, T) no padding, loss on every token

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                loss = net(ids, att, mask) / mask[:, 1:].sum()  # summed NLL / token count
            else:
                loss = sft_loss(net(ids, att)[:, :-1], ids[:, 1:], mask[:, 1:])  # (B, T-1, V) logits
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
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers even if installed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
          f"N = {n_params / 1e6:.1f}M matmul parameters; peak MB = growth of the peak resident set")
    print(f"{'mode':6} {'loss':6} {'s/step':>7} {'tok/s':>8} {'peak MB':>8} {'HF tok/s':>9} {'x HF':>6} "
          f"{'peak GFLOP/s':>13} {'MFU':>6} {'model-shape GEMM':>17} {'MFU vs it':>10}")
    for name, bf16 in (("fp32", False), ("bf16", True)):
        peak = gemm_peak(torch.bfloat16 if bf16 else torch.float32)
        shape_peak = model_gemm_peak(torch.bfloat16 if bf16 else torch.float32, tokens, model.cfg.dim,
                                     model.cfg.hidden_dim)
        t_hf = time_steps(hf(folder, ids, bf16), args.steps)[0] if have_hf else None
        for loss in ("fused", "plain"):  # fused first: memory the plain route frees may stay mapped
            t_ours, mem = time_steps(ours(model, ids, bf16, loss == "fused"), args.steps)
            ours_tps = tokens / t_ours
            mfu = 6 * n_params * ours_tps / (peak * 1e9)
            hf_s = f"{tokens / t_hf:9.1f} {t_hf / t_ours:6.2f}" if t_hf else f"{'-':>9} {'-':>6}"
            mem_s = f"{mem:8.0f}" if mem is not None else f"{'-':>8}"
            mfu_shape = 6 * n_params * ours_tps / (shape_peak * 1e9)
            print(f"{name:6} {loss:6} {t_ours:7.3f} {ours_tps:8.1f} {mem_s} {hf_s} {peak:13.1f} {100 * mfu:5.1f}% "
                  f"{shape_peak:17.1f} {100 * mfu_shape:9.1f}%", flush=True)


if __name__ == "__main__":
    main()
