"""DPO on the AI-labelled preferences: the alternative to reward model + PPO (Rafailov et al. 2023).

    python train_dpo.py --preferences runs/rm/preferences.jsonl --policy runs/sl/model --out runs/dpo
    torchrun --nproc_per_node 4 train_dpo.py ...    (data-parallel: minicai/infra/distributed.py)

Data. The preferences JSONL that train_rm.py writes (minicai/feedback.py): prompt, response_a,
response_b and the soft label p_a = P(response_a is better), from the labeller's order-swapped,
principle-ensembled multiple-choice answers. Files with only TRL's chosen/rejected (strings with a
"prompt" field, or message lists with the prompt as the first user turn) work too, with p = 1.

Loss (Rafailov et al. 2023, eq. 7), per pair with winner w and loser l:
    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
    loss(w, l) = -log sigmoid(beta * h)
With a soft label p = P(a is better), the expected loss under the label (conservative DPO,
Mitchell 2023; TRL's label_smoothing with eps = 1 - p): p * loss(a, b) + (1 - p) * loss(b, a).
log pi(y) is summed over the response tokens only (the assistant reply and its end-of-turn
marker, tokenizer.render's mask), never the prompt. The reference pi_ref is the frozen starting
policy; its log-probs are computed once, before training, and kept in OUT/ref_logprobs.safetensors.
The implicit reward of a response is beta * (log pi(y) - log pi_ref(y)) (Rafailov et al. §5).

Training: AdamW, linear warmup + cosine decay (train.lr_at), gradient accumulation and clipping,
optional bf16 autocast (weights stay fp32). Pairs are split by prompt into training and held-out
pairs with the salt train_rm.py uses ("minicai-rm"), so with the same --val-fraction the held-out
pairs are the reward model's and the two accuracies can be compared. OUT/dpo_metrics.jsonl has one
row per optimizer step with TRL's names (loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; "chosen" = the side with
p >= 1/2) and val/* rows every --eval-every steps. Checkpoints (OUT/ckpt: HF folder + optimizer
state) are written atomically; rerunning the same command resumes. The final policy is OUT/model.

Under torchrun (as train_sl.py) the policy is wrapped in DistributedDataParallel: a micro-batch
takes --batch-size pairs per rank (a global micro-batch of batch-size x ranks, cut by the same plan
as one process with that batch size), so N ranks with --batch-size B train the same policy as one
process with --batch-size N*B. The reference log-probs and the held-out statistics are computed on
a share per rank and gathered. Rank 0 alone logs, prints and writes checkpoints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from minicai.infra import distributed
from minicai.infra.checkpoint import EMBEDDED_NAME, load_model
from minicai.infra.data import PREFERENCE_SPLIT_SALT, Prompt, split
from minicai.infra.files import read_preferences
from minicai.sample import pad
from minicai.losses import next_token_targets
from minicai.infra.train import (MetricsLog, check_finite, length_buckets, load_train_state, lr_at,
                           prepare_run_dir, run_cli, save_checkpoint)
from minicai.infra.utils import InputError, add_device_args, atomic_write_bytes, atomic_write_json, resolve_device


# ------------------------------------------------------------------------------ the loss
def dpo_loss(pi_a: torch.Tensor, pi_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor,
             p_a: torch.Tensor | float, beta: float) -> torch.Tensor:
    """Soft-label DPO loss per pair, (B,). pi_*, ref_* (B,) sequence log-probs of responses a and b
    under the policy and the reference; p_a (B,) or float = P(a is better).

    h = (pi_a - ref_a) - (pi_b - ref_b)                                   (Rafailov et al. 2023, eq. 7)
    L = p * -log sigmoid(beta h) + (1 - p) * -log sigmoid(-beta h)        (cDPO / TRL label_smoothing)
    dL/dh = beta * (sigmoid(beta h) - p): raising log pi(a) lowers the loss when p > sigmoid(beta h)."""
    p = torch.as_tensor(p_a, dtype=pi_a.dtype, device=pi_a.device)
    h = (pi_a - ref_a) - (pi_b - ref_b)  # (B,)
    # logsigmoid, not log(sigmoid): stable for large |beta h|
    return -(p * F.logsigmoid(beta * h) + (1.0 - p) * F.logsigmoid(-beta * h))  # (B,)


# ------------------------------------------------------------------------------ data
def tokenize(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of [user: prompt, assistant: response]; mask = the reply and its end marker."""
    return tok.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], device, autocast) -> torch.Tensor:
    """Sum of log pi over the response tokens of each (ids, mask): (N,) fp32.
    Position t predicts ids[:, t + 1], so token t+1 counts when mask[t + 1] is 1; only those
    positions go through the LM head (model(..., per_token=True)), not the prompt's."""
    ids, att = pad([s[0] for s in seqs], 0, "right", device)  # (N, T), pad id irrelevant (masked)
    resp = pad([s[1] for s in seqs], 0, "right", device)[0]  # (N, T) 1 on response tokens
    targets = next_token_targets(ids, resp)  # (N, T) response tokens only
    with autocast():
        logp = model(ids, att, targets=targets, per_token=True)  # (n,) fp32, row-major over targets != -100
    rows = torch.nonzero(targets != -100)[:, 0]  # (n,) the sequence of each predicted token
    return torch.zeros(len(seqs), device=logp.device).index_add(0, rows, logp)  # (N,)


@torch.no_grad()
def reference_logps(model, pairs: list[dict], batch_size: int, device, autocast,
                    d: distributed.Dist = distributed.Dist()) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of both sides of every pair, (N,), (N,) on the CPU, computed once. Each
    rank scores every world-th pair; all gather the results (a collective)."""
    model.eval()
    mine = distributed.shard(pairs, d)
    rows = []
    for s in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", unit="batch", leave=False,
                  disable=not d.main):
        chunk = mine[s:s + batch_size]
        lp = sequence_logps(model, [x["ta"] for x in chunk] + [x["tb"] for x in chunk], device, autocast)  # (2b,)
        rows.append(torch.stack([lp[:len(chunk)], lp[len(chunk):]], 1))  # (b, 2)
    ref = distributed.gather_uneven(torch.cat(rows) if rows else torch.zeros(0, 2, device=device), d).cpu()  # (N, 2)
    return ref[:, 0].contiguous(), ref[:, 1].contiguous()


def pair_batch(model, pairs: list[dict], idx: list[int], device, autocast):
    """Policy log-probs of both sides of pairs idx in one forward: (B,), (B,), plus ref a, ref b, p."""
    lp = sequence_logps(model, [pairs[i]["ta"] for i in idx] + [pairs[i]["tb"] for i in idx], device, autocast)
    ref_a = torch.tensor([pairs[i]["ref_a"] for i in idx], device=device)
    ref_b = torch.tensor([pairs[i]["ref_b"] for i in idx], device=device)
    p = torch.tensor([pairs[i]["p"] for i in idx], device=device)
    return lp[:len(idx)], lp[len(idx):], ref_a, ref_b, p


def pair_stats(pi_a, pi_b, ref_a, ref_b, p, beta) -> dict:
    """TRL-named statistics, 'chosen' being the side with p >= 1/2: mean implicit rewards
    beta * (log pi - log pi_ref), their margin, the accuracy (chosen reward > rejected reward, over
    decisive pairs p != 1/2; None if none) and the mean log-probs."""
    a_first = p >= 0.5
    r_a, r_b = beta * (pi_a - ref_a), beta * (pi_b - ref_b)  # (B,)
    r_c, r_r = torch.where(a_first, r_a, r_b), torch.where(a_first, r_b, r_a)
    lp_c, lp_r = torch.where(a_first, pi_a, pi_b), torch.where(a_first, pi_b, pi_a)
    decisive = p != 0.5
    acc = (r_c > r_r)[decisive].float().mean().item() if bool(decisive.any()) else None
    return {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/accuracies": acc, "rewards/margins": (r_c - r_r).mean().item(),
            "logps/chosen": lp_c.mean().item(), "logps/rejected": lp_r.mean().item()}


@torch.no_grad()
def evaluate(model, pairs, batch_size, beta, device, autocast, d: distributed.Dist = distributed.Dist()) -> dict:
    """DPO loss and TRL statistics over all `pairs` (None if there are none). Each rank scores
    every world-th pair; all gather the results (a collective: every rank calls it)."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    mine = distributed.shard(list(range(len(pairs))), d)
    # Every rank runs the same number of forwards (rank 0's, which holds the most pairs): with
    # --fsdp each forward is a collective (it all-gathers the sharded weights). A rank with no pairs
    # left scores pair 0 and drops the result.
    n_batches = math.ceil(math.ceil(len(pairs) / d.world) / batch_size)
    rows = []
    for s in range(0, n_batches * batch_size, batch_size):
        idx = mine[s:s + batch_size]
        out = torch.stack(pair_batch(model, pairs, idx or [0], device, autocast), 1)  # (b, 5): pi_a, pi_b, ref_a, ref_b, p
        rows.append(out[:len(idx)])
    model.train(was_training)
    pi_a, pi_b, ref_a, ref_b, p = distributed.gather_uneven(torch.cat(rows) if rows else torch.zeros(0, 5, device=device),
                                                d).unbind(1)  # (N,) each
    return {"loss": dpo_loss(pi_a, pi_b, ref_a, ref_b, p, beta).mean().item(), "pairs": len(pairs),
            **pair_stats(pi_a, pi_b, ref_a, ref_b, p, beta)}


# ------------------------------------------------------------------------------ the script
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    g.add_argument("--preferences", required=True, metavar="FILE",
                   help="preferences JSONL (train_rm.py's OUT/preferences.jsonl, or TRL chosen/rejected)")
    g.add_argument("--policy", default=EMBEDDED_NAME,
                   help=f"starting policy (the SL-CAI model): HF folder, .gguf or '{EMBEDDED_NAME}'")
    g.add_argument("--ref", default=None, help="frozen reference policy (default: --policy, as in the DPO paper)")
    g.add_argument("--labels", choices=["soft", "hard"], default="soft",
                   help="soft: the expected loss under p_a (cDPO); hard: p_a > 1/2 -> 1, < 1/2 -> 0, ties dropped")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="eps: p <- p (1 - eps) + (1 - p) eps (TRL label_smoothing, cDPO); 0 = none")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of prompts whose pairs are held out (same split as train_rm.py --rm-held-out)")
    g.add_argument("--max-len", type=int, default=1024, help="pairs with a longer sequence are skipped")
    g.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    g = p.add_argument_group("optimisation")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta: strength of the implicit KL to the reference")
    g.add_argument("--epochs", type=int, default=2, help="passes over the training pairs")
    g.add_argument("--lr", type=float, default=5e-6,
                   help="peak AdamW learning rate (TRL's DPOConfig default is 1e-6, for larger models)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.1, help="linear warmup as a share of all steps, then cosine")
    g.add_argument("--batch-size", type=int, default=4,
                   help="pairs per micro-batch and process (2x sequences per forward; under torchrun a "
                        "micro-batch takes batch-size x ranks)")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (weights stay fp32)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters/gradients/optimizer state (FSDP2 fully_shard) instead of DDP")
    g = p.add_argument_group("running")
    g.add_argument("--eval-every", type=int, default=10, help="held-out statistics every N optimizer steps")
    g.add_argument("--save-every", type=int, default=20, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="pairs per forward for reference/held-out passes")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop after this many optimizer steps, with a checkpoint (simulates a kill; rerun to resume)")
    g.add_argument("--overwrite", action="store_true", help="delete OUT if it holds a run with another config")
    add_device_args(p)
    return p


def pairs_digest(pairs: list[dict]) -> str:
    """SHA-256 of the tokenized pairs: ref_logprobs.safetensors belongs to exactly this data."""
    h = hashlib.sha256()
    for x in pairs:
        h.update(json.dumps([x["ta"][0], x["tb"][0]]).encode())
    return h.hexdigest()


def read_reference(path: Path, digest: str):
    """(ref_a, ref_b) saved by an earlier run for exactly these pairs, else None."""
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("digest") != digest:
            return None
        return f.get_tensor("a"), f.get_tensor("b")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    if args.batch_size < 1 or args.grad_accum < 1 or args.epochs < 1:
        raise InputError("--batch-size, --grad-accum and --epochs must be at least 1")
    if args.beta <= 0:
        raise InputError(f"--beta must be > 0, got {args.beta}")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise InputError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    device, dtype = resolve_device(args.device, "float32" if args.dtype == "auto" else args.dtype)
    d = distributed.init(device)
    device = distributed.rank_device(device, d)
    records = read_preferences(Path(args.preferences))  # bad input fails before anything is written
    config = {k: v for k, v in vars(args).items() if k not in ("overwrite", "stop_after_steps", "eval_batch_size")}
    out = Path(args.out)
    if d.main:
        prepare_run_dir(out, config, args.overwrite, parser=build_parser())
    distributed.barrier(d)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    torch.manual_seed(args.seed)
    ckpt, final = out / "ckpt", out / "model"
    if (final / "config.json").exists() and (out / "dpo_summary.json").exists():
        if d.main:
            print(f"DPO already done: {final}")
        distributed.finish(d)
        return 0
    resuming = (ckpt / "train_state.json").exists()
    model, tok, _ = load_model(str(ckpt) if resuming else args.policy, dtype=dtype, device=device)

    # ---- 1. pairs: labels, tokens, the train / held-out split by prompt
    pairs, skipped = [], 0
    for r in records:
        p = r["p_a"]
        if args.labels == "hard":
            if p == 0.5:
                continue  # a tie carries no hard preference
            p = 1.0 if p > 0.5 else 0.0
        p = p * (1 - args.label_smoothing) + (1 - p) * args.label_smoothing
        ta, tb = tokenize(tok, r["prompt"], r["response_a"]), tokenize(tok, r["prompt"], r["response_b"])
        if max(len(ta[0]), len(tb[0])) > args.max_len:
            skipped += 1
            continue
        pairs.append({"prompt": r["prompt"], "ta": ta, "tb": tb, "p": p})
    if not pairs:
        raise InputError(f"{args.preferences}: no usable pairs ({skipped} longer than --max-len {args.max_len})")

    # ---- 2. reference log-probs, once (the frozen starting policy), a share per rank
    ref_file = out / "ref_logprobs.safetensors"
    digest = pairs_digest(pairs)
    cached = read_reference(ref_file, digest)
    if cached is not None:
        ref_a, ref_b = cached
    else:
        if resuming:
            raise InputError(f"{ref_file}: missing or made for other pairs; cannot resume, pass --overwrite")
        ref_model = model if args.ref in (None, args.policy) else load_model(args.ref, dtype=dtype, device=device)[0]
        ref_a, ref_b = reference_logps(ref_model, pairs, args.eval_batch_size, device, autocast, d)
        del ref_model
        check_finite(torch.cat([ref_a, ref_b]), "a reference log-prob", 0)
        if d.main:
            atomic_write_bytes(ref_file, safetensors_bytes({"a": ref_a.contiguous(), "b": ref_b.contiguous()},
                                                           metadata={"digest": digest}))
    for x, a, b in zip(pairs, ref_a.tolist(), ref_b.tolist()):
        x["ref_a"], x["ref_b"] = a, b
    held = {p.text for p in split([Prompt(t, "", "red-team") for t in dict.fromkeys(x["prompt"] for x in pairs)],
                                  args.val_fraction, salt=PREFERENCE_SPLIT_SALT)[1]}
    train = [x for x in pairs if x["prompt"] not in held]
    val = [x for x in pairs if x["prompt"] in held]
    if not train:
        raise InputError(f"{args.preferences}: all {len(pairs)} pairs are held out; lower --val-fraction")

    # ---- 3. optimizer, schedule, the fixed batch plan (epoch e bucketed with Random(seed + e)); each
    # micro-batch of the plan is a global one, split over the ranks (rank_share)
    global_batch = args.batch_size * d.world  # pairs per micro-batch, all ranks together
    plan = [b for e in range(args.epochs) for b in length_buckets([len(x["ta"][0]) + len(x["tb"][0]) for x in train],
                                                                  global_batch, random.Random(args.seed + e))]
    total = math.ceil(len(plan) / args.grad_accum)
    warmup = max(1, round(args.warmup * total)) if args.warmup > 0 else 0
    # DDP, or FSDP2 with --fsdp (fully_shard replaces the parameters by sharded DTensors, so the
    # parameter list is taken after wrapping); every parameter gets a gradient (the LM head gives
    # the log-probs). Fused AdamW (HF Trainer's default) unless the parameters are DTensors.
    ddp = distributed.wrap(model, d, fsdp=args.fsdp)
    params = list(ddp.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=not args.fsdp)
    apply = (lambda sd: distributed.load_full_optimizer_state(model, opt, sd)) if args.fsdp else None
    step = load_train_state(ckpt, opt, apply)["step"] if resuming else 0
    if resuming and d.main:
        print(f"resuming DPO at step {step}/{total} from {ckpt}")
    log = MetricsLog(out / "dpo_metrics.jsonl", resume_step=step if step else None) if d.main else None
    if d.main:
        print(f"DPO: {len(train)} training pairs, {len(val)} held-out pairs ({skipped} too long), {total} steps")

    def save(folder, s, with_state):
        save_checkpoint(folder, model, tok, opt, s, {"stage": "dpo", "policy": args.policy, "step": s,
                                                    "beta": args.beta}, d, fsdp=args.fsdp, with_state=with_state,
                        extra={"total": total})

    # ---- 4. the loop
    model.train()
    bar = tqdm(total=total, initial=step, desc="DPO", unit="step", disable=not d.main)
    while step < total:
        lr = lr_at(step, total, args.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = plan[step * args.grad_accum:(step + 1) * args.grad_accum]
        n_pairs = sum(len(b) for b in micro)  # pairs in this step, all ranks together
        loss_sum, rows = torch.zeros((), device=device), []
        for idx in micro:
            mine, n_real = distributed.rank_share(idx, d)
            pi_a, pi_b, ref_a_b, ref_b_b, p = pair_batch(ddp, train, mine, device, autocast)
            # The pair-mean loss over the whole step: this rank's pairs' sum over the step's global
            # pair count, times world size because DDP averages gradients over ranks (train_sl.batch_loss
            # with pairs for tokens; the global count is known to every rank from the plan). A
            # repeated pair (n_real 0) adds a zero loss.
            loss = dpo_loss(pi_a, pi_b, ref_a_b, ref_b_b, p, args.beta)[:n_real].sum() * d.world / n_pairs
            loss.backward()
            loss_sum += loss.detach()
            rows.append(torch.stack([pi_a.detach(), pi_b.detach(), ref_a_b, ref_b_b, p], 1)[:n_real])  # (b, 5)
        loss_sum = distributed.all_reduce_sum(loss_sum, d) / d.world  # the step's global pair-mean loss
        check_finite(loss_sum, "the DPO loss", step)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        check_finite(gnorm, "the gradient norm", step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        cols = distributed.gather_uneven(torch.cat(rows), d).unbind(1)  # every rank's pairs of the step, (n_pairs,) each
        row = {"step": step, "epoch": (step - 1) * args.grad_accum // (len(plan) // args.epochs),
               "loss": loss_sum.item(), **pair_stats(*cols, args.beta), "lr": lr, "grad_norm": gnorm.item()}
        if val and (step % args.eval_every == 0 or step == total):
            ev = evaluate(model, val, args.eval_batch_size, args.beta, device, autocast, d)
            row.update({f"val/{k}": v for k, v in ev.items() if k != "pairs"})
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}")
        bar.update(1)
        stop_now = args.stop_after_steps is not None and step >= args.stop_after_steps and step < total
        if step < total and (step % args.save_every == 0 or stop_now):
            save(ckpt, step, True)
        if stop_now:
            bar.close()
            if d.main:
                print(f"stopped after --stop-after-steps at step {step}; rerun without it to continue")
            distributed.finish(d)
            return 0
    bar.close()
    model.eval()
    save(ckpt, step, True)
    save(final, step, False)
    ev_train = evaluate(model, train, args.eval_batch_size, args.beta, device, autocast, d)
    ev_val = evaluate(model, val, args.eval_batch_size, args.beta, device, autocast, d)
    summary = {"steps": step, "train_pairs": len(train), "held_out_pairs": len(val), "skipped_too_long": skipped,
               "train": ev_train, "held_out": ev_val, "held_out_accuracy": ev_val.get("rewards/accuracies"),
               "world_size": d.world, "wall_seconds_this_run": time.time() - t_start}
    if d.main:
        atomic_write_json(out / "dpo_summary.json", summary)
        print(json.dumps({k: summary[k] for k in ("steps", "train_pairs", "held_out_pairs", "held_out_accuracy")}
                         | {"train_margin": ev_train.get("rewards/margins")}))
    distributed.finish(d)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
