"""Labelling speed of the feedback model: option log-probs (prefill only) in tokens/s and as a share
of this machine's bf16 GEMM peak, per batch size, for today's route and the improved one, in one run.

    python bench/bench_feedback.py [--model qwen2.5-coder-1.5b] [--pairs 8] [--batch 4 8 16]
                                   [--small smollm2-135m] [--threads N]

Contexts: the pipeline's A/B question (feedback.judge_context + the options' shared prefix) on our
own hand-labelled pairs (minicai/evaldata/labelled_pairs.jsonl: prompt, chosen, rejected), two
principles of the default constitution drawn per pair (feedback.draw, as the pipeline does), both
orders: 4 contexts per pair, as judge_pairs builds them. Variants, each on the same contexts:
  today     the option_logprobs of commit 64a1a8c, verbatim (reference_option_logprobs below):
            length-sorted batches, full padded forward of every row, the LM head cast to fp32
            on every batch;
  cast1     option_logprobs(shared_prefix=False): the same forward, the fp32 head cast once per call;
  prefix    option_logprobs(shared_prefix=True): each group's shared prefix prefilled once into a
            KV cache, copied to its rows, only the suffixes run (feedback.prefix_last_hidden).
FLOPs. N = parameters in the trunk's matrix products (q, k, v, o, gate, up, down; not the embedding),
L layers, H*D = attention width, V x C the LM head. A context of T tokens needs
    F(T) = 2 N T + 2 L (H D) T^2 + 2 V C
(2 N T the trunk's products; attention q k^T and p v are 2 * 2 L H D per query-key pair over the
T^2 / 2 causal pairs; the fp32 LM head on the last token only). 'full-eq GFLOP/s' = sum F(T) over the
unique contexts / wall time: the same work for every variant, so it is the speed; 'exec GFLOP/s' =
what was run (padding included; the prefix route runs fewer tokens; attention counted over every
key slot, as the masked kernels compute it). % peak = full-eq / the best 2048^3 bf16 GEMM of this
run (bench_train.gemm_peak); 'shape GEMM' = the model's own MLP products at (batch x 256 tokens)
(bench_train.model_gemm_peak), a roof for these thin shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import gemm_peak, model_gemm_peak  # noqa: E402

from minicai.feedback import draw, judge_context, option_logprobs, option_tokens, shared_prefix_groups  # noqa: E402
from minicai.io.checkpoint import load_model  # noqa: E402
from minicai.io.constitution_files import load_constitution  # noqa: E402
from minicai.model import last_real_index  # noqa: E402
from minicai.sample import pad  # noqa: E402

PAIRS = Path(__file__).resolve().parents[1] / "minicai" / "evaldata" / "labelled_pairs.jsonl"


@torch.no_grad()
def reference_option_logprobs(model, contexts, option_ids, pad_id, batch_size=8):
    """option_logprobs as of commit 64a1a8c (the reference): full forward, head cast per batch."""
    uniq = list(dict.fromkeys(tuple(c) for c in contexts))
    row = {c: i for i, c in enumerate(uniq)}
    order = sorted(range(len(uniq)), key=lambda i: len(uniq[i]))
    out = torch.empty(len(uniq), 2)
    device = model.embed_tokens.weight.device
    cols = torch.tensor(option_ids, device=device)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = pad([list(uniq[r]) for r in rows], pad_id, "right", device)  # (B, T)
        h = model.padded_forward(ids, mask, hidden=True)  # (B, T, C)
        h_last = h[torch.arange(len(rows), device=device), last_real_index(mask)]  # (B, C)
        w = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight  # (V, C)
        logp = F.linear(h_last.float(), w.float()).log_softmax(-1)  # (B, V)
        out[rows] = logp[:, cols].cpu()  # (B, 2)
    return out[[row[tuple(c)] for c in contexts]]  # (N, 2)


def build_contexts(tok, n_pairs: int, seed: int = 0) -> list[list[int]]:
    """4 contexts per pair (2 principles x both orders), as judge_pairs builds them."""
    principles = load_constitution("default").principles
    prefix, _, _ = option_tokens(tok)
    out = []
    for line in PAIRS.read_text().splitlines()[:n_pairs]:
        r = json.loads(line)
        for q in draw(principles, 2, seed, "principles", r["id"]):
            conv = f"Human: {r['prompt']}"
            out.append(judge_context(tok, conv, q.comparison, r["chosen"], r["rejected"]) + prefix)
            out.append(judge_context(tok, conv, q.comparison, r["rejected"], r["chosen"]) + prefix)
    return out


def model_counts(model) -> tuple[int, int, int, int, int]:
    """(N trunk matmul parameters, L, H*D, V, C)."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.layers.named_parameters() if name.endswith("proj.weight"))
    return n, cfg.n_layers, cfg.n_heads * cfg.head_dim, cfg.vocab_size, cfg.dim


def full_eq_flops(contexts, counts) -> float:
    """sum over unique contexts of F(T) = 2 N T + 2 L (H D) T^2 + 2 V C (module docstring)."""
    n, L, HD, V, C = counts
    return sum(2 * n * len(c) + 2 * L * HD * len(c) ** 2 + 2 * V * C for c in set(map(tuple, contexts)))


class TrunkCounter:
    """Wraps model.trunk to count what runs: tokens B*T (padding included) and attention query-key
    slot pairs B*T*(start+T)."""

    def __init__(self, model):
        self.model, self.orig, self.tokens, self.pairs = model, model.trunk, 0, 0

        def trunk(idx, pos=None, mask=None, cache=None, start=0):
            B, T = idx.shape
            self.tokens += B * T
            self.pairs += B * T * (start + T)
            return self.orig(idx, pos, mask, cache, start)

        model.trunk = trunk

    def reset(self):
        self.tokens = self.pairs = 0

    def exec_flops(self, counts, rows: int) -> float:
        n, L, HD, V, C = counts
        return 2 * n * self.tokens + 4 * L * HD * self.pairs + 2 * V * C * rows


def run_variant(name, model, tok, contexts, bs, counts, counter, peak):
    prefix, a, b = option_tokens(tok)
    fn = {"today": lambda: reference_option_logprobs(model, contexts, (a, b), tok.pad_id, bs),
          "cast1": lambda: option_logprobs(model, contexts, (a, b), tok.pad_id, bs, shared_prefix=False),
          "prefix": lambda: option_logprobs(model, contexts, (a, b), tok.pad_id, bs, shared_prefix=True)}[name]
    counter.reset()
    t = time.perf_counter()
    lp = fn()
    wall = time.perf_counter() - t
    uniq = len(set(map(tuple, contexts)))
    real = sum(len(c) for c in set(map(tuple, contexts)))
    feq = full_eq_flops(contexts, counts) / wall / 1e9
    ex = counter.exec_flops(counts, uniq) / wall / 1e9
    print(f"{name:7} {bs:5d} {wall:8.1f} {real / wall:9.1f} {counter.tokens:8d} {feq:11.1f} {ex:11.1f} "
          f"{100 * feq / peak:7.1f}% {100 * ex / peak:7.1f}%", flush=True)
    return lp, wall


def bench_model(spec, args, peak):
    t = time.perf_counter()
    model, tok, _ = load_model(spec, dtype=torch.bfloat16)
    model.eval()
    print(f"\n== {spec}: loaded in {time.perf_counter() - t:.0f} s, dtype {model.embed_tokens.weight.dtype}", flush=True)
    contexts = build_contexts(tok, args.pairs)
    counts = model_counts(model)
    lens = sorted(len(c) for c in contexts)
    uniq = list(dict.fromkeys(tuple(c) for c in contexts))
    print(f"{len(contexts)} contexts ({len(uniq)} unique) from {args.pairs} pairs, tokens {sum(lens)} "
          f"(min {lens[0]}, median {lens[len(lens) // 2]}, max {lens[-1]}); N = {counts[0] / 1e6:.0f}M trunk "
          f"matmul parameters, L {counts[1]}, H*D {counts[2]}, V {counts[3]}, C {counts[4]}")
    for bs in args.batch:
        groups = shared_prefix_groups(uniq, bs)
        run = sum(len(uniq[m[0]][:P]) + sum(len(uniq[i]) - P for i in m) for P, m in groups)
        print(f"  batch {bs}: {sum(1 for P, _ in groups if P)} shared-prefix groups, tokens to run (unpadded) "
              f"{run} of {sum(map(len, uniq))} ({100 * (1 - run / sum(map(len, uniq))):.0f}% saved)")
    shape = model_gemm_peak(torch.bfloat16, 8 * 256, model.cfg.dim, model.cfg.hidden_dim)
    print(f"bf16 model-shape GEMM (2048 x {model.cfg.dim} x {model.cfg.hidden_dim}): {shape:.1f} GFLOP/s "
          f"= {100 * shape / peak:.0f}% of the square peak")
    prefix, a, b = option_tokens(tok)
    option_logprobs(model, contexts[:2], (a, b), tok.pad_id, 2)  # warm-up: first-call allocations
    counter = TrunkCounter(model)
    print(f"{'variant':7} {'batch':>5} {'wall s':>8} {'tok/s':>9} {'exec tok':>8} {'full-eq GF/s':>11} "
          f"{'exec GF/s':>11} {'%peak':>8} {'%pk exec':>8}")
    ref_lp, margins = {}, {}
    for bs in args.batch:
        walls = {}
        for name in args.variants:
            if name == "cast1" and bs != args.batch[len(args.batch) // 2]:
                continue  # the head cast alone: at the middle batch size only
            lp, walls[name] = run_variant(name, model, tok, contexts, bs, counts, counter, peak)
            margins[name, bs] = lp[:, 0] - lp[:, 1]
            if name == "today":
                ref_lp[bs] = lp
            elif bs in ref_lp:
                d = (lp - ref_lp[bs]).abs().max().item()
                m = ((lp[:, 0] - lp[:, 1]) - (ref_lp[bs][:, 0] - ref_lp[bs][:, 1])).abs().max().item()
                print(f"        max |log-prob - today's| = {d:.4f}, max |margin - today's| = {m:.4f}")
        if "today" in walls:
            print("        speed-up vs today: " + ", ".join(f"{k} {walls['today'] / w:.2f}x"
                                                         for k, w in walls.items() if k != "today"))
    model.trunk = counter.orig
    # how far apart bf16 runs land anyway: today's route at two batch sizes (other GEMM shapes)
    bs0 = args.batch[0]
    if ("today", bs0) in margins:
        for (name, bs), m in margins.items():
            if (name, bs) != ("today", bs0):
                print(f"max |margin - today's at batch {bs0}|: {name} batch {bs} "
                      f"{(m - margins['today', bs0]).abs().max().item():.4f}")
    if args.fp32_check == spec or args.fp32_check == "all":
        del model
        m32, tok32, _ = load_model(spec, dtype=torch.float32)
        ref = reference_option_logprobs(m32, contexts, (a, b), tok32.pad_id, 8)
        r = ref[:, 0] - ref[:, 1]
        for (name, bs), m in margins.items():
            print(f"max |margin - fp32 today's| {name} batch {bs}: {(m - r).abs().max().item():.4f} "
                  f"(mean {(m - r).abs().mean().item():.4f}); label p = sigmoid(margin): max |dp| "
                  f"{(torch.sigmoid(m) - torch.sigmoid(r)).abs().max().item():.4f}")
        p32 = option_logprobs(m32, contexts, (a, b), tok32.pad_id, 8, shared_prefix=True)
        print(f"fp32 prefix vs fp32 today's: max |log-prob diff| {(p32 - ref).abs().max().item():.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="feedback model spec (load_model), loaded in bf16")
    ap.add_argument("--pairs", type=int, default=8, help="pairs of labelled_pairs.jsonl to judge (4 contexts each)")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8, 16], help="batch sizes (option_logprobs batch_size)")
    ap.add_argument("--variants", nargs="+", default=["today", "cast1", "prefix"], help="today, cast1, prefix")
    ap.add_argument("--small", default=None, help="also bench this model (e.g. smollm2-135m, the contrast member)")
    ap.add_argument("--fp32-check", default=None, help="model spec (or 'all') whose bf16 margins are compared "
                    "with an fp32 run of today's route (slow for the 1.5B model)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = gemm_peak(torch.bfloat16)
    print(f"bf16 GEMM peak (best 2048^3): {peak:.1f} GFLOP/s; 50% aim = {peak / 2:.1f}")
    bench_model(args.model, args, peak)
    if args.small:
        bench_model(args.small, args, peak)


if __name__ == "__main__":
    main()
