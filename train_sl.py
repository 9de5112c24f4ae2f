"""SL-CAI: critique -> revision traces, then supervised fine-tuning on the final revisions.

    python train_sl.py --out runs/sl --n-prompts 32 --rounds 2
    python train_sl.py --out runs/cd --route distill --critic-model qwen2.5-coder-1.5b   # context distillation

Route distill (Askell et al. 2021 §2.2) replaces the critique/revision rounds: the teacher
(--critic-model, or the policy itself) answers each prompt under the constitution's few-shot
exchanges, optionally --best-of k times with the AI labeller keeping one, and SFT trains the policy
on the answer without that context (slcai.distill). Everything after stage 1 is the same.

Stage 1 (minicai/slcai.py) writes OUT/traces.jsonl: for each training prompt the initial response
and every round's principle, critique and revision (resumable, one record per finished prompt).
Stage 2 fine-tunes the model on (prompt, final revision) in its chat format, with the loss on the
assistant tokens only, and writes OUT/model (an HF-format folder). Held-out prompts (data.split)
are never used here: they are kept for evaluation. Rerunning the same command resumes: finished
prompts are skipped and SFT continues from OUT/ckpt.

The standard-SFT baseline: `--target initial --traces SL_OUT/traces.jsonl` fine-tunes on the
initial responses of an SL-CAI run's traces (the same prompts, samples, steps and optimizer, no
critique and no revision), so the two policies differ by the revisions alone (pipeline --baseline sft).

The SFT loss is losses.sft_loss on the model's logits; --fused-ce computes the same loss without
them (infra/fast.FusedSFTLoss; bench/bench_train.py compares the two). Under torchrun
(infra/distributed.py) a micro-batch of --batch-size sequences is split over the ranks, so any
number of processes trains the model one process would. Lines marked `# [dist]` exist for torchrun alone (in one process they change nothing): skip them
on a first reading.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from minicai.errors import InputError
from minicai.feedback import draw, ensemble_labels, scorers_of
from minicai.infra import cli, distributed
from minicai.infra.fast import FusedSFTLoss
from minicai.infra.labelling import DEFAULT, feedback_principles, load_judges
from minicai.infra.train import (MetricsLog, adamw_resumed, bf16_autocast, check_finite, drop_checkpoint,
                                 length_buckets, lr_at, open_run, save_checkpoint, save_final, start, to_device,
                                 warmup_steps)
from minicai.infra.cli import run_cli
from minicai.infra.devices import resolve_device
from minicai.io.files import atomic_write_json, atomic_write_text
from minicai.io.checkpoint import EMBEDDED_NAME, load_model, load_tokenizer
from minicai.io.constitution_files import load_constitution
from minicai.io.data import Prompt, check_prompt_lengths, load_prompts, mix, split
from minicai.io.traces import load_done, run_slcai
from minicai.losses import sft_loss
from minicai.sample import pad


@dataclass
class Args:
    run: cli.RunArgs = field(default_factory=cli.RunArgs)
    optim: cli.OptimArgs = field(default_factory=lambda: cli.OptimArgs(lr=2e-5, warmup=5, batch_size=4, grad_accum=2))
    model: str = field(default=EMBEDDED_NAME, metadata={"model": "lm"})
    """base model: .gguf, HF folder or 'smollm2-135m' (the embedded one)"""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16"), **cli.IGNORE})
    """weight dtype; auto = float32 (training keeps fp32 weights; --bf16 autocasts the compute)"""
    constitution: str = "default"
    """'default', 'hhh', or a .toml/.json file"""
    comparisons: str = None
    """JSON list of RL principles (with an Anthropic-format constitution)"""
    prompts: list[str] = field(default=None, metadata={"repeat": True})
    """red-team prompt source (repeatable): a .jsonl/.csv/.txt file, do-not-answer, harmbench, builtin-red-team (default)"""
    helpful: list[str] = field(default=None, metadata={"repeat": True})
    """helpfulness prompt source (repeatable; default builtin-helpful)"""
    helpful_fraction: float = field(default=0.25, metadata=cli.SHARE)
    """share of helpfulness prompts in the SL mix (answered once, not revised)"""
    n_prompts: int = field(default=32, metadata=cli.AT_LEAST_0)
    """red-team prompts to use (after the held-out split); 0 = all"""
    held_out_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of prompts kept for evaluation, never trained on (split by hash)"""
    rounds: int = field(default=4, metadata=cli.AT_LEAST_1)
    """critique/revision rounds per prompt (paper: 4)"""
    format: str = field(default="chat", metadata={"choices": ("chat", "paper")})
    """chat: requests as user turns in the model's chat format; paper: raw Human/Assistant transcript"""
    route: str = field(default="revise", metadata={"choices": ("revise", "distill")})
    """revise: critique -> revision rounds, SFT on the last revision (the paper's SL-CAI, §3.1); distill:
    context distillation (Askell et al. 2021 §2.2), the teacher answers under the constitution's few-shot
    exchanges and SFT trains on the answer without them (slcai.distill)"""
    few_shot: bool = True
    """the constitution's few-shot examples in front of every critique and revision request (route revise;
    the paper's prompts; --no-few-shot: none)"""
    critic_model: str = field(default=None, metadata={"model": "lm"})
    """model that writes the critiques and revisions (route revise) or the answers under the context (route
    distill): a distilled SL-CAI, e.g. qwen2.5-coder-1.5b; default: --model itself, as in the paper"""
    best_of: int = field(default=1, metadata={"range": "[1, 16]"})
    """route distill: the teacher's answers per prompt; with more than 1 the AI labeller (--judge) keeps one"""
    judge: list[str] = field(default=None, metadata={"repeat": True, "model": "feedback"})
    """route distill with --best-of > 1: the feedback model(s) that pick the answer, as train_rm.py
    --feedback-model (MODEL or MODEL:ab / :contrast; default: infra.labelling.DEFAULT's ensemble)"""
    judge_principles: int = field(default=2, metadata=cli.AT_LEAST_1)
    """comparison principles drawn per judged pair (best-of-k), as train_rm.py --principles-per-pair"""
    critic_dtype: str = field(default="fast", metadata={"choices": ("fast", "float32", "bfloat16")})
    """weights of --critic-model: fast = bfloat16 on CUDA or a CPU with bf16 matrix instructions"""
    gen_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "fast")})
    """weights of --model while it writes the traces: float32 = the weights being trained; bfloat16 = a
    bf16 copy of them (about 2x faster sampling on a CPU with bf16 matrix units, bench/bench_generate.py);
    fast = bfloat16 on CUDA or such a CPU, else float32. SFT always trains the --dtype weights"""
    gen_batch_size: int = field(default=8, metadata=cli.AT_LEAST_1)
    """prompts generated together"""
    max_new_tokens: int = field(default=96, metadata=cli.AT_LEAST_1)
    """tokens per response, critique or revision"""
    temperature: float = field(default=0.7, metadata=cli.AT_LEAST_0)
    """sampling temperature of the generations (0 = greedy)"""
    epochs: float = field(default=2.0, metadata=cli.POSITIVE)
    """passes over the revisions"""
    max_len: int = field(default=512, metadata=cli.AT_LEAST_1)
    """truncate training sequences to this many tokens"""
    val_fraction: float = field(default=0.1, metadata=cli.SHARE)
    """share of revisions held out for the SFT loss (not the held-out prompts of --held-out-fraction)"""
    eval_every: int = field(default=10, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """held-out loss every N optimizer steps"""
    fused_ce: bool = field(default=False, metadata=cli.IGNORE)
    """the SFT loss through infra/fast.FusedSFTLoss (LM head fused with the cross-entropy, no (B, T, V) logits): the same loss and gradients as the plain losses.sft_loss, less memory"""
    target: str = field(default="revision", metadata={"choices": ("revision", "initial")})
    """what SFT trains on: revision = each prompt's final revision (SL-CAI); initial = the initial response
    (the standard-SFT baseline: no critique, no revision)"""
    traces: str = None
    """read the traces of the selected prompts from this traces.jsonl (another run's, e.g. SL-CAI's for
    the baseline) instead of generating them"""
    skip_sft: bool = field(default=False, metadata=cli.NOT_CONFIG)
    """only generate the traces"""


# ------------------------------------------------------------------------------ stage 1: traces
def select_prompts(args: Args) -> list:
    """Training prompts: the train side of the hash split, n red-team prompts plus helpful ones."""
    red = [p for spec in (args.prompts or ["builtin-red-team"]) for p in load_prompts(spec, "red-team")]
    helpful = [p for spec in (args.helpful or ["builtin-helpful"]) for p in load_prompts(spec, "helpful")]
    red, _ = split(red, args.held_out_fraction)
    helpful, _ = split(helpful, args.held_out_fraction)
    if len(args.prompts or []) > 1:  # several sources: --n-prompts draws from all of them, not the first
        random.Random(args.run.seed).shuffle(red)
    if args.n_prompts:
        red = red[:args.n_prompts]
    if not red:
        raise InputError("--prompts: no red-team prompts left for training after the held-out split")
    prompts = mix(red, helpful, args.helpful_fraction, random.Random(args.run.seed)) if args.helpful_fraction else red
    check_prompt_lengths(prompts, *load_tokenizer(args.model))  # a too-long one: its file and line, before any run
    return prompts


def route_options(args: Args, critic, prefer) -> dict:
    """slcai.traces' (route revise) or slcai.distill's (route distill) keyword arguments from the flags."""
    common = dict(batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, seed=args.run.seed)
    if args.route == "distill":
        return dict(teacher=critic, k=args.best_of, prefer=prefer, **common)
    return dict(rounds=args.rounds, fmt=args.format, few_shot=args.few_shot, critic=critic, **common)


def labeller(args: Args, device, policy, tok, critic=None) -> callable:
    """--best-of > 1: prefer(pairs) -> [p(a better)], the AI labeller of train_rm.py (feedback.ensemble_labels
    of the --judge models, --judge-principles comparison principles drawn per pair, both orders)."""
    judges = load_judges(args.judge or DEFAULT["feedback_models"], resolve_device(args.run.device, args.critic_dtype)[1],
                         device, reuse={args.model: (policy, tok), **({args.critic_model: critic} if critic else {})})
    principles = feedback_principles(args.constitution)
    m = min(args.judge_principles, len(principles))

    def prefer(pairs):
        comps = [draw(principles, m, args.run.seed, "best-of", conv, a, b) for conv, a, b in pairs]
        return [lab["p_a"] for lab in ensemble_labels(judges, pairs, comps, scorers_of(DEFAULT["labeller"]))]
    return prefer


def generate_traces(args: Args, model, tok, critic, prompts: list, constitution, out: Path,
                    d: distributed.Dist, prefer=None) -> list[dict]:
    """SL traces of `prompts` into OUT/traces.jsonl (resumable), one record per prompt in prompt
    order: critique -> revision (route revise) or the teacher's answer under the context (route
    distill). Prompts are sharded over ranks; each prompt's text depends only on its own seed, so
    any number of ranks writes the same records."""
    trace = out / "traces.jsonl"
    model.eval()
    with torch.no_grad():
        finished = load_done(trace)  # read once, not once per prompt
        mine = [p for p in distributed.shard(prompts, d) if p.id not in finished]  # [dist]
        run_slcai(model, tok, mine, constitution, trace if d.world == 1 else out / f"traces.rank{d.rank}.jsonl",
                  route=args.route, **route_options(args, critic, prefer))
    distributed.barrier(d)  # [dist]
    if d.world > 1 and d.main:  # merge the shards into traces.jsonl, in prompt order
        done = load_done(trace)
        for r in range(d.world):
            done.update(load_done(out / f"traces.rank{r}.jsonl"))
        atomic_write_text(trace, "".join(json.dumps(done[p.id], ensure_ascii=False) + "\n" for p in prompts))
        for r in range(d.world):
            (out / f"traces.rank{r}.jsonl").unlink(missing_ok=True)
    distributed.barrier(d)  # [dist]
    done = load_done(trace)
    return [done[p.id] for p in prompts]


def read_traces(path: Path, prompts: list) -> list[dict]:
    """--traces: the records of `prompts` from another run's traces.jsonl, in prompt order; a prompt
    missing there is an error naming the file (run it with the same prompt flags and --seed)."""
    if not path.is_file():
        raise InputError(f"--traces {path}: no such file")
    done = load_done(path)
    missing = [p for p in prompts if p.id not in done]
    if missing:
        raise InputError(f"{path}: no trace of {len(missing)} of the {len(prompts)} selected prompts (first: "
                         f"{missing[0].text[:60]!r}); use the same --n-prompts, --prompts, --helpful-fraction and "
                         f"--seed as the run that wrote it")
    return [done[p.id] for p in prompts]


# ------------------------------------------------------------------------------ stage 2: SFT
TARGET_FIELD = {"revision": "final", "initial": "initial"}
"""--target -> the trace record's field SFT trains on."""


def sft_examples(records: list[dict], tok, max_len: int, field_: str = "final") -> list[tuple[list[int], list[int]]]:
    """(ids, mask) for (prompt, record[field_]: the final revision or the initial response) in the chat
    format; mask = assistant tokens."""
    out = []
    for r in records:
        ids, mask = tok.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[field_]}])
        out.append((ids[:max_len], mask[:max_len]))
    return out


def sft_data(records: list[dict], tok, args: Args, trace: Path) -> tuple[list, list]:
    """(train, val) examples of the non-empty --target texts (final revisions or initial responses),
    split by prompt hash (salt 'sft-val'); a tiny run whose examples all fall on the val side trains on
    them. The split depends on the prompts alone, so the baseline trains on the same prompts."""
    key = TARGET_FIELD[args.target]
    usable = [r for r in records if str(r.get(key, "")).strip()]  # an empty text teaches nothing
    if not usable:
        raise InputError(f"{trace}: no non-empty '{key}' texts to train on")
    _, val_side = split([Prompt(r["prompt"], r["source"], r["kind"]) for r in usable], args.val_fraction, salt="sft-val")
    val_texts = {p.text for p in val_side}
    train = sft_examples([r for r in usable if r["prompt"] not in val_texts], tok, args.max_len, key)
    val = sft_examples([r for r in usable if r["prompt"] in val_texts], tok, args.max_len, key)
    return train or val, val


def sft_net(model, d: distributed.Dist, args: Args) -> torch.nn.Module:
    """What the SFT step calls: the model (its forward gives logits for losses.sft_loss) or, with
    --fused-ce, FusedSFTLoss(model) (its forward gives the summed loss), wrapped for DDP/FSDP."""
    return distributed.wrap(FusedSFTLoss(model) if args.fused_ce else model, d, fsdp=args.run.fsdp)  # [dist]


def batch_loss(net, examples, idx, pad_id: int, autocast, d: distributed.Dist, n_real: int | None = None,
               fused: bool = False):
    """Token-mean SFT loss over the GLOBAL micro-batch (all ranks together): this rank holds `idx`,
    and its summed NLL is divided by distributed.loss_denominator (the global token count / world
    size, DDP averaging the ranks' gradients), so the gradient is that of one process holding the
    whole micro-batch. Items idx[n_real:] are repeats that only keep a rank busy
    (distributed.rank_share): their tokens are not counted. fused: net is FusedSFTLoss (sft_net).
    Returns (loss to backpropagate, global mean loss)."""
    dev = next(net.parameters()).device
    ids, att = (to_device(x, dev) for x in pad([examples[i][0] for i in idx], pad_id))  # (B, T) ids, real tokens
    mask = to_device(pad([examples[i][1] for i in idx], 0)[0], dev)  # (B, T) assistant tokens
    if n_real is not None:
        mask[n_real:] = 0
    denominator = distributed.loss_denominator(mask[:, 1:], d)  # tokens predicted: position t predicts t+1
    with autocast():
        if fused:
            loss = net(ids, att, mask) / denominator  # the summed NLL, through the fused LM head
        else:
            loss = sft_loss(net(ids, att)[:, :-1], ids[:, 1:], mask[:, 1:], denominator)  # (B, T-1, V) logits
    return loss, distributed.all_reduce_sum(loss.detach(), d) / d.world  # [dist]


def micro_batches(train: list, global_batch: int, seed: int, d: distributed.Dist):
    """The fixed sequence of global micro-batches (epoch e bucketed with Random(seed + e)); this
    rank takes every world-th sequence of each: (items, n_real) from distributed.rank_share (a
    batch smaller than the world size, only the last of an epoch, is repeated with weight 0)."""
    e = 0
    while True:
        for idx in length_buckets([len(x[0]) for x in train], global_batch, random.Random(seed + e)):
            yield distributed.rank_share(idx, d)  # [dist]
        e += 1


def train_step(net, opt, batches, train: list, pad_id: int, autocast, d: distributed.Dist, args: Args,
               lr: float, step: int) -> tuple[float, float]:
    """One optimizer step: --grad-accum micro-batches (each a token mean, averaged), clipping,
    AdamW. Returns (the step's global mean loss, the gradient norm before clipping)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for _ in range(args.optim.grad_accum):
        mine, n_real = next(batches)
        loss, reported = batch_loss(net, train, mine, pad_id, autocast, d, n_real, args.fused_ce)
        (loss / args.optim.grad_accum).backward()
        loss_sum += reported.item() / args.optim.grad_accum
    check_finite(torch.tensor(loss_sum), "SFT loss", step)
    gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.optim.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, float(gnorm)


def evaluate(net, val: list, pad_id: int, batch_size: int, autocast, fused: bool) -> float:
    """Mean SFT loss over the (small) validation set, which every rank evaluates whole; NaN if empty."""
    net = distributed.unwrap(net)  # no DDP hooks; an FSDP module is its own root
    net.eval()
    with torch.no_grad():
        losses = [batch_loss(net, val, list(range(i, min(i + batch_size, len(val)))), pad_id, autocast,
                             distributed.Dist(), fused=fused)[1].item() for i in range(0, len(val), batch_size)]
    net.train()
    return sum(losses) / len(losses) if losses else float("nan")


def run_sft(args: Args, model, tok, train: list, val: list, out: Path, d: distributed.Dist, device, dtype) -> dict:
    """Fine-tune on `train` (resuming from OUT/ckpt), write OUT/model; returns the summary fields."""
    global_batch = args.optim.batch_size  # sequences per micro-step, all ranks together
    total = max(1, round(math.ceil(math.ceil(len(train) / global_batch) / args.optim.grad_accum) * args.epochs))
    ckpt, step = out / "ckpt", 0
    resuming = (ckpt / "train_state.json").exists()
    if resuming:
        model = load_model(str(ckpt), dtype=dtype, device=device)[0]
    model.train()
    net = sft_net(model, d, args)
    opt, step = adamw_resumed(net, model, args.optim, ckpt, resuming, d, args.run.fsdp, (0.9, 0.95), "SFT", total)
    log = MetricsLog(out / "sft_metrics.jsonl", resume_step=step if step else None) if d.main else None
    autocast = bf16_autocast(device, args.run.bf16)

    def save(folder, s, with_state):
        save_checkpoint(folder, model, tok, opt, s, {"stage": "sl-cai", "base": args.model, "step": s}, d,
                        fsdp=args.run.fsdp, with_state=with_state, extra={"total": total})

    batches = micro_batches(train, global_batch, args.run.seed, d)
    for _ in range(step * args.optim.grad_accum):  # skip what the resumed run already trained on
        next(batches)
    bar = tqdm(total=total, initial=step, desc="SFT", unit="step", disable=not d.main)
    first_loss = None
    while step < total:
        lr = lr_at(step, total, args.optim.lr, warmup_steps(args.optim.warmup, total))
        loss, gnorm = train_step(net, opt, batches, train, tok.pad_id, autocast, d, args, lr, step)
        step += 1
        first_loss = loss if first_loss is None else first_loss
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm}
        if val and (step % args.eval_every == 0 or step == total):
            row["val_loss"] = evaluate(net, val, tok.pad_id, args.optim.batch_size, autocast, args.fused_ce)
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
        bar.update(1)
        if step % args.run.save_every == 0 and step < total:
            save(ckpt, step, True)
    bar.close()
    save_final(save, model, ckpt, out, step)
    return {"train_examples": len(train), "val_examples": len(val), "steps": step, "first_loss": first_loss,
            "final_val_loss": evaluate(net, val, tok.pad_id, args.optim.batch_size, autocast, args.fused_ce)
            if val else None}


def main(argv=None) -> int:
    args = cli.parse(Args, argv, description=__doc__)
    device, dtype, d = start(args.run, "float32" if args.dtype == "auto" else args.dtype)  # [dist] process group
    torch.manual_seed(args.run.seed)
    t0 = time.time()
    # bad input fails before anything is written (flags and model specs: cli.parse)
    constitution = load_constitution(args.constitution, args.comparisons)
    prompts = select_prompts(args)
    records = read_traces(Path(args.traces), prompts) if args.traces else None  # another run's (the SFT baseline)
    model, tok, _ = load_model(args.model, dtype=dtype, device=device)
    out = open_run(args, Args, d)
    sft_done = (out / "model" / "config.json").exists() and (out / "sft_summary.json").exists()
    critic = None
    if args.critic_model and args.critic_model != args.model and not sft_done and not args.traces:
        critic = load_model(args.critic_model, dtype=resolve_device(args.run.device, args.critic_dtype)[1],
                            device=device)[:2]

    if records is None:
        gen_dtype = resolve_device(args.run.device, args.gen_dtype)[1]
        writer = model if gen_dtype == model.embed_tokens.weight.dtype or sft_done else \
            copy.deepcopy(model).to(gen_dtype)  # --gen-dtype: a copy; the trained weights stay as loaded
        prefer = labeller(args, device, model, tok, critic) if args.route == "distill" and args.best_of > 1 else None
        records = generate_traces(args, writer, tok, critic, prompts, constitution, out, d, prefer)  # stage 1
        del writer
    del critic
    gen_s = time.time() - t0
    if d.main:
        print(f"traces: {len(records)} prompts in {out / 'traces.jsonl'} ({gen_s:.0f}s this run)")
    if args.skip_sft or sft_done:
        if sft_done and not args.skip_sft and d.main:
            print(f"SFT already done: {out / 'model'}")
        distributed.finish(d)  # [dist]
        return 0

    train, val = sft_data(records, tok, args, Path(args.traces) if args.traces else out / "traces.jsonl")  # stage 2
    summary = {"prompts": len(records), **run_sft(args, model, tok, train, val, out, d, device, dtype),
               "world_size": d.world, "generation_seconds_this_run": gen_s, "wall_seconds_this_run": time.time() - t0}
    if d.main:
        atomic_write_json(out / "sft_summary.json", summary)
        print(json.dumps(summary))
        drop_checkpoint(out / "ckpt", args.run.keep_checkpoint)
    distributed.finish(d)  # [dist]
    return 0


def command() -> int:
    """The installed command (pyproject.toml's [project.scripts]): main with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
