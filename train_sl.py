"""SL-CAI: critique -> revision traces, then supervised fine-tuning on the final revisions.

    python train_sl.py --out runs/sl --n-prompts 32 --rounds 2

Stage 1 (minicai/slcai.py) writes OUT/traces.jsonl: for each training prompt the initial response
and every round's principle, critique and revision (resumable, one record per finished prompt).
Stage 2 fine-tunes the model on (prompt, final revision) in its chat format, with the loss on the
assistant tokens only, and writes OUT/model (an HF-format folder). Held-out prompts (data.split)
are never used here: they are kept for evaluation. Rerunning the same command resumes: finished
prompts are skipped and SFT continues from OUT/ckpt.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from minicai.infra.checkpoint import EMBEDDED_NAME, load_model
from minicai.constitution import load_constitution
from minicai.infra.data import Prompt, load_prompts, mix, split
from minicai.infra import distributed
from minicai.losses import next_token_targets
from minicai.sample import pad
from minicai.slcai import load_done, run_slcai
from minicai.infra.train import (MetricsLog, to_device, check_finite, length_buckets, load_train_state, lr_at,
                           prepare_run_dir, run_cli, save_checkpoint)
from minicai.infra.utils import InputError, add_device_args, atomic_write_json, atomic_write_text, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    g.add_argument("--model", default=EMBEDDED_NAME, help=f"base model: .gguf, HF folder or '{EMBEDDED_NAME}'")
    g.add_argument("--constitution", default="default", help="'default', 'hhh', or a .toml/.json file")
    g.add_argument("--comparisons", default=None, help="JSON list of RL principles (with an Anthropic-format constitution)")
    g.add_argument("--prompts", action="append", default=None,
                   help="red-team prompt source (repeatable): a .jsonl/.csv/.txt file, do-not-answer, harmbench, "
                        "builtin-red-team (default)")
    g.add_argument("--helpful", action="append", default=None,
                   help="helpfulness prompt source (repeatable; default builtin-helpful)")
    g.add_argument("--helpful-fraction", type=float, default=0.25,
                   help="share of helpfulness prompts in the SL mix (answered once, not revised)")
    g.add_argument("--n-prompts", type=int, default=32, help="red-team prompts to use (after the held-out split); 0 = all")
    g.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="share of prompts kept for evaluation, never trained on (split by hash)")
    g = p.add_argument_group("critique -> revision generation")
    g.add_argument("--rounds", type=int, default=4, help="critique/revision rounds per prompt (paper: 4)")
    g.add_argument("--format", choices=["chat", "paper"], default="chat",
                   help="chat: requests as user turns in the model's chat format; paper: raw Human/Assistant transcript")
    g.add_argument("--few-shot", action="store_true", help="put the constitution's few-shot examples in front")
    g.add_argument("--critic-model", default=None,
                   help="model that writes the critiques and revisions (a distilled SL-CAI: e.g. qwen2.5-coder-1.5b); "
                        "default: --model itself, as in the paper")
    g.add_argument("--critic-dtype", default="fast", choices=["fast", "float32", "bfloat16"],
                   help="weights of --critic-model: fast = bfloat16 on CUDA or a CPU with bf16 matrix instructions")
    g.add_argument("--gen-batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument("--max-new-tokens", type=int, default=96, help="tokens per response, critique or revision")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the generations")
    g.add_argument("--seed", type=int, default=0, help="seed (per-prompt seeds are derived from it)")
    g = p.add_argument_group("supervised fine-tuning")
    g.add_argument("--epochs", type=float, default=2.0, help="passes over the revisions")
    g.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=5, help="linear warmup steps before cosine decay")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--max-len", type=int, default=512, help="truncate training sequences to this many tokens")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (weights stay fp32)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of revisions held out for the SFT loss")
    g.add_argument("--eval-every", type=int, default=10, help="held-out loss every N optimizer steps")
    g.add_argument("--save-every", type=int, default=20, help="checkpoint every N optimizer steps")
    g.add_argument("--skip-sft", action="store_true", help="only generate the traces")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters/gradients/optimizer state (FSDP2 fully_shard) instead of DDP")
    g.add_argument("--overwrite", action="store_true", help="delete OUT if it holds a run with another config")
    add_device_args(p)
    return p


def select_prompts(args) -> list:
    """Training prompts: the train side of the hash split, n red-team prompts plus helpful ones."""
    red = [p for spec in (args.prompts or ["builtin-red-team"]) for p in load_prompts(spec, "red-team")]
    helpful = [p for spec in (args.helpful or ["builtin-helpful"]) for p in load_prompts(spec, "helpful")]
    red, _ = split(red, args.held_out_fraction)
    helpful, _ = split(helpful, args.held_out_fraction)
    if args.n_prompts:
        red = red[:args.n_prompts]
    if not red:
        raise InputError("--prompts: no red-team prompts left for training after the held-out split")
    return mix(red, helpful, args.helpful_fraction, random.Random(args.seed)) if args.helpful_fraction else red


def sft_examples(records: list[dict], tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) for (prompt, final revision) in the chat format; mask = assistant tokens."""
    out = []
    for r in records:
        ids, mask = tok.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["final"]}])
        out.append((ids[:max_len], mask[:max_len]))
    return out


def batch_loss(model, examples, idx, pad_id, autocast, d: distributed.Dist, n_real: int | None = None):
    """Token-mean SFT loss over the GLOBAL micro-batch (all ranks together).
    This rank holds `idx`; its summed NLL is divided by the global token count and multiplied by
    the world size because DDP averages gradients over ranks: the gradient then equals that of one
    process that sees the whole global batch. Items idx[n_real:] are repeats that only keep a rank
    busy (distributed.rank_share): they get no targets, so weight 0. Returns (loss to backpropagate,
    global mean loss)."""
    dev = next(model.parameters()).device
    ids, att = (to_device(x, dev) for x in pad([examples[i][0] for i in idx], pad_id))  # (B, T) ids, real tokens
    mask = to_device(pad([examples[i][1] for i in idx], 0)[0], dev)  # (B, T) assistant tokens
    targets = next_token_targets(ids, mask)  # (B, T) assistant tokens only; -100 = nothing to predict
    if n_real is not None:
        targets[n_real:] = -100
    n_global = distributed.all_reduce_sum((targets != -100).sum().float(), d)
    with autocast():
        # the summed NLL, through the fused LM head + cross-entropy (losses.linear_cross_entropy;
        # losses.sft_loss on model(ids, att) logits is its plain twin, tests/test_train_sl.py)
        nll = model(ids, att, targets=targets)
    loss = nll * d.world / n_global
    return loss, distributed.all_reduce_sum(nll.detach(), d) / n_global


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device, dtype = resolve_device(args.device, "float32" if args.dtype == "auto" else args.dtype)
    d = distributed.init(device)
    device = distributed.rank_device(device, d)
    torch.manual_seed(args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("overwrite", "skip_sft")}
    t0 = time.time()
    constitution = load_constitution(args.constitution, args.comparisons)  # bad input fails before
    prompts = select_prompts(args)  # anything is written
    out = Path(args.out)
    if d.main:
        prepare_run_dir(out, config, args.overwrite, parser=build_parser())
    distributed.barrier(d)
    model, tok, _ = load_model(args.model, dtype=dtype, device=device)
    critic = None
    if args.critic_model and args.critic_model != args.model and not (out / "sft_summary.json").exists():
        critic = load_model(args.critic_model, dtype=resolve_device(args.device, args.critic_dtype)[1],
                            device=device)[:2]

    # ---- stage 1: critique -> revision traces (prompts sharded over ranks; each prompt's text
    # depends only on its own seed, so any number of ranks writes the same records)
    trace = out / "traces.jsonl"
    model.eval()
    with torch.no_grad():
        finished = load_done(trace)  # read once, not once per prompt
        mine = [p for p in distributed.shard(prompts, d) if p.id not in finished]
        run_slcai(model, tok, mine, constitution, trace if d.world == 1 else out / f"traces.rank{d.rank}.jsonl",
                  rounds=args.rounds, fmt=args.format, few_shot=args.few_shot, batch_size=args.gen_batch_size,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                  critic=critic)
    del critic
    distributed.barrier(d)
    if d.world > 1 and d.main:  # merge the shards into traces.jsonl, in prompt order
        done = load_done(trace)
        for r in range(d.world):
            done.update(load_done(out / f"traces.rank{r}.jsonl"))
        atomic_write_text(trace, "".join(json.dumps(done[p.id], ensure_ascii=False) + "\n" for p in prompts))
        for r in range(d.world):
            (out / f"traces.rank{r}.jsonl").unlink(missing_ok=True)
    distributed.barrier(d)
    done = load_done(trace)
    records = [done[p.id] for p in prompts]
    gen_s = time.time() - t0
    if d.main:
        print(f"traces: {len(records)} prompts in {trace} ({gen_s:.0f}s this run)")
    if args.skip_sft or ((out / "model" / "config.json").exists() and (out / "sft_summary.json").exists()):
        if not args.skip_sft and d.main:
            print(f"SFT already done: {out / 'model'}")
        distributed.finish(d)
        return 0

    # ---- stage 2: SFT on the final revisions
    usable = [r for r in records if r["final"].strip()]  # an empty revision teaches nothing
    if not usable:
        raise InputError(f"{trace}: no non-empty revisions to train on")
    _, val_side = split([Prompt(r["prompt"], r["source"], r["kind"]) for r in usable], args.val_fraction, salt="sft-val")
    val_texts = {p.text for p in val_side}
    train = sft_examples([r for r in usable if r["prompt"] not in val_texts], tok, args.max_len)
    val = sft_examples([r for r in usable if r["prompt"] in val_texts], tok, args.max_len)
    train = train or val  # tiny runs: never an empty training set
    global_batch = args.batch_size * d.world  # sequences per micro-step, all ranks together
    steps_per_epoch = math.ceil(math.ceil(len(train) / global_batch) / args.grad_accum)
    total = max(1, round(steps_per_epoch * args.epochs))
    step = 0
    ckpt = out / "ckpt"
    if (ckpt / "train_state.json").exists():
        model, _, _ = load_model(str(ckpt), dtype=dtype, device=device)
    model.train()
    ddp = distributed.wrap(model, d, fsdp=args.fsdp)
    # fused AdamW (one kernel over all parameters; HF Trainer's default on torch >= 2.8); FSDP's
    # sharded DTensor parameters take the default implementation
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95),
                            fused=not args.fsdp)
    if (ckpt / "train_state.json").exists():
        apply = (lambda sd: distributed.load_full_optimizer_state(model, opt, sd)) if args.fsdp else None
        step = load_train_state(ckpt, opt, apply)["step"]
        if d.main:
            print(f"resuming SFT at step {step}/{total} from {ckpt}")
    log = MetricsLog(out / "sft_metrics.jsonl", resume_step=step if step else None) if d.main else None
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext

    def micro_batches():
        """The fixed sequence of global micro-batches (epoch e shuffled by Random(seed + e)); this
        rank takes every world-th sequence of each: (items, n_real) from distributed.rank_share (a
        batch smaller than the world size, only the last of an epoch, is repeated with weight 0)."""
        e = 0
        while True:
            for idx in length_buckets([len(x[0]) for x in train], global_batch, random.Random(args.seed + e)):
                yield distributed.rank_share(idx, d)
            e += 1

    def evaluate():
        model.eval()
        with torch.no_grad():  # every rank evaluates the whole (small) validation set
            losses = [batch_loss(model, val, list(range(i, min(i + args.batch_size, len(val)))), tok.pad_id,
                                 autocast, distributed.Dist())[1].item() for i in range(0, len(val), args.batch_size)]
        model.train()
        return sum(losses) / len(losses) if losses else float("nan")

    def save(folder, s, with_state):
        save_checkpoint(folder, model, tok, opt, s, {"stage": "sl-cai", "base": args.model, "step": s}, d,
                        fsdp=args.fsdp, with_state=with_state, extra={"total": total})

    batches = micro_batches()
    for _ in range(step * args.grad_accum):  # skip what the resumed run already trained on
        next(batches)
    bar = tqdm(total=total, initial=step, desc="SFT", unit="step", disable=not d.main)
    first_loss = None
    while step < total:
        lr = lr_at(step, total, args.lr, args.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            mine, n_real = next(batches)
            loss, reported = batch_loss(ddp, train, mine, tok.pad_id, autocast, d, n_real)
            (loss / args.grad_accum).backward()
            loss_sum += reported.item() / args.grad_accum
        check_finite(torch.tensor(loss_sum), "SFT loss", step)
        gnorm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        first_loss = loss_sum if first_loss is None else first_loss
        row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(gnorm)}
        if val and (step % args.eval_every == 0 or step == total):
            row["val_loss"] = evaluate()
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
        bar.update(1)
        if step % args.save_every == 0 and step < total:
            save(ckpt, step, True)
    bar.close()
    model.eval()
    save(ckpt, step, True)
    save(out / "model", step, False)
    summary = {"prompts": len(records), "train_examples": len(train), "val_examples": len(val), "steps": step,
               "world_size": d.world, "first_loss": first_loss, "final_val_loss": evaluate() if val else None,
               "generation_seconds_this_run": gen_s, "wall_seconds_this_run": time.time() - t0}
    if d.main:
        atomic_write_json(out / "sft_summary.json", summary)
        print(json.dumps(summary))
    distributed.finish(d)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
