"""DPO on the AI-labelled preferences: the alternative to reward model + PPO (Rafailov et al. 2023).

    python train_dpo.py --preferences runs/rm/preferences.jsonl --policy runs/sl/model --out runs/dpo
    torchrun --nproc_per_node 4 train_dpo.py ...    (data-parallel: minicai/infra/distributed.py)

Data. The preferences JSONL that train_rm.py writes (minicai/infra/labelling.py): prompt, response_a,
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
pairs as train_rm.py splits them (data.split_pairs), so with the same --pair-val-fraction the
held-out pairs are the reward model's and the two accuracies can be compared. OUT/dpo_metrics.jsonl has one
row per optimizer step with TRL's names (loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; "chosen" = the side with
p >= 1/2) and val/* rows every --eval-every steps. Checkpoints (OUT/ckpt: HF folder + optimizer
state) are written atomically; rerunning the same command resumes. The final policy is OUT/model.

Lines marked `# [dist]` exist for torchrun alone (in one process they change nothing): skip them
on a first reading.
Under torchrun (as train_sl.py) the policy is wrapped in DistributedDataParallel (or sharded, with
--fsdp): a micro-batch of --batch-size pairs, cut by the same plan as in one process, is split over
the ranks, so any number of processes trains the policy one process would. The reference log-probs
and the held-out statistics are computed on a share per rank and gathered. Rank 0 alone logs,
prints and writes checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from minicai.infra import cli, distributed
from minicai.io.checkpoint import EMBEDDED_NAME, load_model
from minicai.io.data import split_pairs
from minicai.io.files import atomic_write_bytes, atomic_write_json, read_preferences, warn
from minicai.infra.train import (MetricsLog, adamw_resumed, bf16_autocast, check_finite, drop_checkpoint,
                                 length_buckets, lr_at, open_run, save_checkpoint, save_final, start, warmup_steps)
from minicai.infra.cli import run_cli
from minicai.errors import InputError
from minicai.losses import dpo_loss, dpo_statistics
from minicai.rl import logprobs_from_logits
from minicai.sample import pad


@dataclass
class Args:
    run: cli.RunArgs = field(default_factory=cli.RunArgs)
    optim: cli.OptimArgs = field(default_factory=lambda: cli.OptimArgs(lr=5e-6, warmup=0.1, batch_size=4, grad_accum=2))
    preferences: str = field(default=None, metadata={"required": True, "metavar": "FILE"})
    """preferences JSONL (train_rm.py's OUT/preferences.jsonl, or TRL chosen/rejected)"""
    policy: str = field(default=EMBEDDED_NAME, metadata={"model": "lm"})
    """starting policy (the SL-CAI model): HF folder, .gguf or 'smollm2-135m' (the embedded one)"""
    ref: str = field(default=None, metadata={"model": "lm"})
    """frozen reference policy (default: --policy, as in the DPO paper)"""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16"), **cli.IGNORE})
    """weight dtype; auto = float32 (training keeps fp32 weights; --bf16 autocasts the compute)"""
    labels: str = field(default="soft", metadata={"choices": ("soft", "hard")})
    """soft: the expected loss under p_a (cDPO); hard: p_a > 1/2 -> 1, < 1/2 -> 0, ties dropped"""
    label_smoothing: float = field(default=0.0, metadata={"range": "[0, 0.5)"})
    """eps: p <- p (1 - eps) + (1 - p) eps (TRL label_smoothing, cDPO); 0 = none"""
    pair_val_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of prompts whose pairs are held out (data.split_pairs: train_rm.py's split, with its --pair-val-fraction)"""
    max_len: int = field(default=1024, metadata=cli.AT_LEAST_1)
    """pairs with a longer sequence are skipped"""
    beta: float = field(default=0.1, metadata=cli.POSITIVE)
    """DPO beta: strength of the implicit KL to the reference"""
    epochs: int = field(default=2, metadata=cli.AT_LEAST_1)
    """passes over the training pairs"""
    eval_every: int = field(default=10, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """held-out statistics every N optimizer steps"""
    eval_batch_size: int = field(default=8, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """pairs per forward and process for the reference and held-out passes"""


# ------------------------------------------------------------------------------ data
def tokenize(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of [user: prompt, assistant: response]; mask = the reply and its end marker."""
    return tok.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def make_pairs(records: list[dict], tok, args: Args) -> tuple[list[dict], int]:
    """Tokenized pairs with their label p (hard or soft, smoothed); (pairs, number skipped as too long)."""
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
    return pairs, skipped


def pair_logps(model, pairs: list[dict], idx: list[int], device, autocast) -> torch.Tensor:
    """log pi of both sides of pairs idx, in one forward: (B, 2)."""
    lp = sequence_logps(model, [pairs[i]["ta"] for i in idx] + [pairs[i]["tb"] for i in idx], device, autocast)
    return torch.stack([lp[:len(idx)], lp[len(idx):]], 1)  # (B, 2)


def pair_labels(pairs: list[dict], idx, device) -> tuple[torch.Tensor, ...]:
    """ref_a, ref_b, p of pairs idx, (B,) each."""
    return torch.tensor([[pairs[i]["ref_a"], pairs[i]["ref_b"], pairs[i]["p"]] for i in idx], device=device).unbind(1)


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], device, autocast) -> torch.Tensor:
    """Sum of log pi over the response tokens of each (ids, mask): (N,) fp32.
    Position t predicts ids[:, t + 1], so token t+1 counts when mask[t + 1] is 1; the log-softmax
    (rl.logprobs_from_logits) runs on those positions' logits only, not the prompt's."""
    ids, att = pad([s[0] for s in seqs], 0, "right", device)  # (N, T), pad id irrelevant (masked)
    keep = pad([s[1] for s in seqs], 0, "right", device)[0][:, 1:].bool()  # (N, T-1) response tokens
    with autocast():
        logits = model(ids, att)[:, :-1]  # (N, T-1, V)
    logp = logprobs_from_logits(logits[keep], ids[:, 1:][keep])  # (n, V), (n,) -> (n,) row-major over keep
    rows = torch.nonzero(keep)[:, 0]  # (n,) the sequence of each predicted token
    return torch.zeros(len(seqs), device=logp.device).index_add(0, rows, logp)  # (N,)


@torch.no_grad()
def score_pairs(model, pairs: list[dict], batch_size: int, device, autocast,
                d: distributed.Dist = distributed.Dist()) -> torch.Tensor:
    """log pi of both sides of every pair, (N, 2) in pair order, without autograd. Each rank scores
    every world-th pair; all gather the results (a collective: every rank calls it). Every rank
    runs the same number of forwards (rank 0's, which holds the most pairs): under --fsdp each
    forward is a collective too (it all-gathers the sharded weights); a rank with no pairs left
    scores pair 0 and drops the result."""
    was_training = model.training
    model.eval()
    mine = distributed.shard(list(range(len(pairs))), d)  # [dist]
    n_batches = math.ceil(math.ceil(len(pairs) / d.world) / batch_size)
    rows = []
    for s in tqdm(range(0, n_batches * batch_size, batch_size), desc="scoring pairs", unit="batch", leave=False,
                  disable=not d.main):
        idx = mine[s:s + batch_size]
        rows.append(pair_logps(model, pairs, idx or [0], device, autocast)[:len(idx)])  # (b, 2)
    model.train(was_training)
    return distributed.gather_uneven(torch.cat(rows) if rows else torch.zeros(0, 2, device=device), d)  # [dist] (N, 2)


def attach_reference(pairs: list[dict], model, args: Args, out: Path, resuming: bool, device, dtype, autocast,
                     d: distributed.Dist) -> None:
    """Set x["ref_a"], x["ref_b"] of every pair: read from OUT/ref_logprobs.safetensors when it was
    made for exactly these pairs, else computed (a share per rank) and saved there."""
    h = hashlib.sha256()  # ref_logprobs.safetensors belongs to exactly these tokenized pairs
    for x in pairs:
        h.update(json.dumps([x["ta"][0], x["tb"][0]]).encode())
    path, digest = out / "ref_logprobs.safetensors", h.hexdigest()
    cached = None
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("digest") == digest:
                cached = f.get_tensor("a"), f.get_tensor("b")
    if cached is not None:
        ref_a, ref_b = cached
    else:
        if resuming:
            raise InputError(f"{path}: missing or made for other pairs; cannot resume, pass --overwrite")
        ref_model = model if args.ref in (None, args.policy) else load_model(args.ref, dtype=dtype, device=device)[0]
        ref = score_pairs(ref_model, pairs, args.eval_batch_size, device, autocast, d).cpu()  # (N, 2)
        ref_a, ref_b = ref[:, 0].contiguous(), ref[:, 1].contiguous()
        del ref_model
        check_finite(torch.cat([ref_a, ref_b]), "a reference log-prob", 0)
        if d.main:
            atomic_write_bytes(path, safetensors_bytes({"a": ref_a.contiguous(), "b": ref_b.contiguous()},
                                                       metadata={"digest": digest}))
    for x, a, b in zip(pairs, ref_a.tolist(), ref_b.tolist()):
        x["ref_a"], x["ref_b"] = a, b


def train_step(net, opt, train: list[dict], micro: list[list[int]], args: Args, device, autocast,
               d: distributed.Dist, lr: float, step: int) -> tuple[float, float, tuple]:
    """One optimizer step over the global micro-batches `micro` (each split over the ranks by
    rank_share; a repeated pair, n_real, adds nothing). The loss is the pair mean over the whole
    step: every micro-batch's summed loss over distributed.loss_denominator of the step's real
    pairs, so N ranks give one process's gradient. Returns (the step's global loss, the gradient
    norm before clipping, the step's (pi_a, pi_b, ref_a, ref_b, p) columns of all ranks)."""
    for group in opt.param_groups:
        group["lr"] = lr
    shares = [distributed.rank_share(idx, d) for idx in micro]  # [dist]
    denominator = distributed.loss_denominator(torch.ones(sum(n for _, n in shares), device=device), d)
    loss_sum, rows = torch.zeros((), device=device), []
    for mine, n_real in shares:
        (pi_a, pi_b), (ref_a, ref_b, p) = pair_logps(net, train, mine, device, autocast).unbind(1), \
            pair_labels(train, mine, device)
        loss = dpo_loss(pi_a[:n_real], pi_b[:n_real], ref_a[:n_real], ref_b[:n_real], p[:n_real], args.beta,
                        denominator)
        loss.backward()
        loss_sum += loss.detach()
        rows.append(torch.stack([pi_a.detach(), pi_b.detach(), ref_a, ref_b, p], 1)[:n_real])  # (b, 5)
    loss_sum = distributed.all_reduce_sum(loss_sum, d) / d.world  # [dist] the step's global pair-mean loss
    check_finite(loss_sum, "the DPO loss", step)
    gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.optim.max_grad_norm)
    check_finite(gnorm, "the gradient norm", step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum.item(), gnorm.item(), distributed.gather_uneven(torch.cat(rows), d).unbind(1)  # [dist]


def evaluate(model, pairs, batch_size, beta, device, autocast, d: distributed.Dist = distributed.Dist()) -> dict:
    """DPO loss and TRL statistics over all `pairs` ({} if there are none); a collective."""
    if not pairs:
        return {}
    pi = score_pairs(model, pairs, batch_size, device, autocast, d)  # (N, 2)
    cols = (*pi.unbind(1), *pair_labels(pairs, range(len(pairs)), pi.device))
    return {"loss": dpo_loss(*cols, beta).item(), "pairs": len(pairs), **dpo_statistics(*cols, beta)}


# ------------------------------------------------------------------------------ the script
def run_dpo(args: Args, model, tok, train: list, val: list, out: Path, resuming: bool, device, autocast,
            d: distributed.Dist) -> int:
    """Train on `train` (resuming from OUT/ckpt), with the fixed batch plan (epoch e bucketed with
    Random(seed + e)), each micro-batch of the plan a global one; writes OUT/model. Returns the steps."""
    ckpt = out / "ckpt"
    plan = [b for e in range(args.epochs) for b in length_buckets([len(x["ta"][0]) + len(x["tb"][0]) for x in train],
                                                                  args.optim.batch_size, random.Random(args.run.seed + e))]
    total = math.ceil(len(plan) / args.optim.grad_accum)
    warmup = warmup_steps(args.optim.warmup, total)
    # DDP, or FSDP2 with --fsdp (fully_shard replaces the parameters by sharded DTensors, so the
    # parameter list is taken after wrapping); every parameter gets a gradient (the LM head gives
    # the log-probs). Fused AdamW (HF Trainer's default) unless the parameters are DTensors.
    net = distributed.wrap(model, d, fsdp=args.run.fsdp)  # [dist]
    opt, step = adamw_resumed(net, model, args.optim, ckpt, resuming, d, args.run.fsdp, what="DPO", total=total)
    log = MetricsLog(out / "dpo_metrics.jsonl", resume_step=step if step else None) if d.main else None

    def save(folder, s, with_state):
        save_checkpoint(folder, model, tok, opt, s, {"stage": "dpo", "policy": args.policy, "step": s,
                                                    "beta": args.beta}, d, fsdp=args.run.fsdp, with_state=with_state,
                        extra={"total": total})

    model.train()
    bar = tqdm(total=total, initial=step, desc="DPO", unit="step", disable=not d.main)
    while step < total:
        lr = lr_at(step, total, args.optim.lr, warmup)
        micro = plan[step * args.optim.grad_accum:(step + 1) * args.optim.grad_accum]
        loss, gnorm, cols = train_step(net, opt, train, micro, args, device, autocast, d, lr, step)
        step += 1
        row = {"step": step, "epoch": (step - 1) * args.optim.grad_accum // (len(plan) // args.epochs),
               "loss": loss, **dpo_statistics(*cols, args.beta), "lr": lr, "grad_norm": gnorm}
        if val and (step % args.eval_every == 0 or step == total):
            ev = evaluate(model, val, args.eval_batch_size, args.beta, device, autocast, d)
            row.update({f"val/{k}": v for k, v in ev.items() if k != "pairs"})
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", margin=f"{row['rewards/margins']:.3f}")
        bar.update(1)
        if step % args.run.save_every == 0 and step < total:
            save(ckpt, step, True)
    bar.close()
    save_final(save, model, ckpt, out, step)
    return step


def main(argv=None) -> int:
    args = cli.parse(Args, argv, description=__doc__)
    t_start = time.time()  # every flag's range and the model specs were checked by cli.parse
    device, dtype, d = start(args.run, "float32" if args.dtype == "auto" else args.dtype)  # [dist] process group
    notes = {}  # bad input fails before anything is written
    records = read_preferences(Path(args.preferences), notes, warn if d.main else None)
    out = open_run(args, Args, d)
    autocast = bf16_autocast(device, args.run.bf16)
    torch.manual_seed(args.run.seed)
    ckpt, final = out / "ckpt", out / "model"
    if (final / "config.json").exists() and (out / "dpo_summary.json").exists():
        if d.main:
            print(f"DPO already done: {final}")
        distributed.finish(d)  # [dist]
        return 0
    resuming = (ckpt / "train_state.json").exists()
    model, tok, _ = load_model(str(ckpt) if resuming else args.policy, dtype=dtype, device=device)
    pairs, skipped = make_pairs(records, tok, args)
    attach_reference(pairs, model, args, out, resuming, device, dtype, autocast, d)  # once: the frozen start
    train, val = split_pairs(pairs, args.pair_val_fraction)  # by prompt, as train_rm.py
    if not train:
        raise InputError(f"{args.preferences}: all {len(pairs)} pairs are held out; lower --pair-val-fraction")
    if d.main:
        print(f"DPO: {len(train)} training pairs, {len(val)} held-out pairs ({skipped} too long)")
    steps = run_dpo(args, model, tok, train, val, out, resuming, device, autocast, d)
    ev_train = evaluate(model, train, args.eval_batch_size, args.beta, device, autocast, d)
    ev_val = evaluate(model, val, args.eval_batch_size, args.beta, device, autocast, d)
    summary = {"steps": steps, "train_pairs": len(train), "held_out_pairs": len(val), "skipped_too_long": skipped,
               "dropped_identical": notes["identical_dropped"], "torn_last_line_dropped": notes["torn_last_line"],
               "train": ev_train, "held_out": ev_val, "held_out_accuracy": ev_val.get("rewards/accuracies"),
               "world_size": d.world, "wall_seconds_this_run": time.time() - t_start}
    if d.main:
        atomic_write_json(out / "dpo_summary.json", summary)
        print(json.dumps({k: summary[k] for k in ("steps", "train_pairs", "held_out_pairs", "held_out_accuracy")}
                         | {"train_margin": ev_train.get("rewards/margins")}))
        drop_checkpoint(ckpt, args.run.keep_checkpoint)
    distributed.finish(d)  # [dist]
    return 0


def command() -> int:
    """The installed command (pyproject.toml's [project.scripts]): main with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
