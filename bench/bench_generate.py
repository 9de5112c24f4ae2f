"""Decode speed on the embedded model, beside the machine's bandwidth bound and HF transformers.

    python bench/bench_generate.py [--dtypes float32 bfloat16] [--variants plain int8] [--new-tokens 128] [--no-hf]

Prints, for each dtype and variant (plain = the model as loaded; int8, fused, int8+fused = the
load-time transforms of minicai/io/quant.py, which generation-only stages may use):
  * batch-1 greedy decode tok/s (128 new tokens, EOS ignored so every run has the same length),
  * batch-16 sampling tok/s (temperature 1, 64 new tokens each, EOS ignored),
  * the bandwidth bound: weight bytes read per batch-1 decoded token (int8 codes and bf16 scales for
    the int8 variants) / this machine's read GB/s, measured
    in the same run by streaming a 512 MiB tensor (a batch-1 decoder cannot beat it),
  * HF transformers' generate() on the same weights (our HF-format save of the dequantized GGUF),
    when the optional extra is installed (pip install -e '.[hf]'), and our speed as a ratio of it.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from minicai.io.checkpoint import load_model, save_hf
from minicai.io.quant import FastLinear, apply_quantize
from minicai.infra.fast import compiled_decode_one_token
from minicai.sample import generate

PROMPT = "Write a long story about a dragon who learns to paint."


def read_bandwidth_gbs(dtype=torch.float32, mib: int = 512, reps: int = 5) -> float:
    """Best-of-reps read bandwidth: a matrix-vector product over a `mib` MiB matrix."""
    n = mib * 1024 * 1024 // torch.finfo(dtype).bits * 8
    m = torch.ones(n // 1024, 1024, dtype=dtype)
    v = torch.ones(1024, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mv(m, v)
        best = min(best, time.perf_counter() - t)
    return m.numel() * m.element_size() / best / 1e9


def decode_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads: the int8 codes and scales of every FastLinear that
    takes one row through int8, every other parameter in full (the embedding counts once: it is the
    tied LM head; the lookup of one row is negligible)."""
    int8 = [m for m in model.modules() if isinstance(m, FastLinear) and m.max_rows >= 1]
    if not int8:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    small = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    return small + sum(m.q.numel() + m.s.numel() * m.s.element_size() for m in int8)


def timed(fn, reps: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ours(model, tok, new_tokens: int, batch: int, temperature: float, compile: bool = False) -> float:
    ids = tok.render([{"role": "user", "content": PROMPT}], add_generation_prompt=True)[0]
    dt = timed(lambda: generate(model, [ids] * batch, new_tokens, temperature=temperature, seed=0, pad_id=tok.pad_id,
                                decode=compiled_decode_one_token() if compile else None))  # the warm-up call compiles
    return batch * new_tokens / dt


def hf(folder, tok, dtype, new_tokens: int, batch: int, temperature: float) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = tok.render([{"role": "user", "content": PROMPT}], add_generation_prompt=True)[0]
    x = torch.tensor([ids] * batch)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_id,
              do_sample=temperature > 0)
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        dt = timed(lambda: m.generate(x, attention_mask=torch.ones_like(x), **kw))
    return batch * new_tokens / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128, help="batch-1 tokens (batch 16 uses half)")
    ap.add_argument("--variants", nargs="+", default=["plain", "int8", "fused", "int8+fused"],
                    help="plain, and the load-time transforms of minicai/io/quant.py (apply_quantize modes)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers even if installed")
    ap.add_argument("--compile", action="store_true",
                    help="our decode step through torch.compile (infra.fast.compiled_decode_one_token); "
                         "compile time is not counted")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tmp = tempfile.TemporaryDirectory()
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model, tok, _ = load_model(None, dtype=dtype)
        h1 = h16 = None
        if not args.no_hf:
            folder = save_hf(f"{tmp.name}/{name}", model, tok)
            h1 = hf(str(folder), tok, dtype, args.new_tokens, 1, 0.0)
            h16 = hf(str(folder), tok, dtype, args.new_tokens // 2, 16, 1.0)
        gbs = read_bandwidth_gbs(dtype)
        for variant in args.variants:
            m = apply_quantize(model, "none" if variant == "plain" else variant)
            wb = decode_bytes(m)
            b1 = ours(m, tok, args.new_tokens, 1, 0.0, args.compile)
            b16 = ours(m, tok, args.new_tokens // 2, 16, 1.0, args.compile)
            rows.append((name, variant, b1, h1, b16, h16, gbs * 1e9 / wb, gbs, wb))
            print(f"  {name} {variant}: b1 {b1:.1f}, b16 {b16:.1f} tok/s", flush=True)
            del m
    print(f"\n{'dtype':9} {'variant':10} {'b1 greedy':>10} {'HF b1':>8} {'x HF':>6} {'b1 bound':>9} {'% bound':>8} "
          f"{'b16 sample':>11} {'HF b16':>8} {'x HF':>6}   (tok/s; read GB/s; weight MB read per token)")
    for name, variant, b1, h1, b16, h16, bound, gbs, wb in rows:
        r1 = f"{b1 / h1:6.2f}" if h1 else "     -"
        r16 = f"{b16 / h16:6.2f}" if h16 else "     -"
        f = lambda v: f"{v:8.1f}" if v else "       -"  # noqa: E731
        print(f"{name:9} {variant:10} {b1:10.1f} {f(h1)} {r1} {bound:9.1f} {100 * b1 / bound:7.0f}% {b16:11.1f} "
              f"{f(h16)} {r16}   ({gbs:.1f} GB/s; {wb / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
