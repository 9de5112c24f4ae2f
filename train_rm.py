"""RL-CAI, first half: AI-feedback preference labels, then a reward model (Bai et al. 2022, §4.1).

    python train_rm.py --policy runs/sl/model --feedback-model runs/sl/model --out runs/rm
    torchrun --nproc_per_node 4 train_rm.py ...    (data-parallel: minicai/infra/distributed.py)

Stage 1, feedback (infra.labelling.label_pairs): the policy (the SL-CAI model) samples k responses per training
prompt; the feedback models label every pair with a soft p_a = P(response A is better) (the
paper's multiple choice in both orders under m principles drawn per pair, or --labeller's method:
minicai/feedback.py); one record per pair (TRL's chosen/rejected layout included) is appended per
batch to OUT/preferences.jsonl, pairs of identical responses to OUT/preferences.dropped.jsonl.
--preferences FILE skips this stage. --dtype sets the weights of stage 1 (bfloat16 is about 3x
faster than float32 on CPUs with AMX).
Stage 2, reward model (train_step, evaluate): the trunk of --rm-init (default: the policy) with a
new scalar head, N(0, 1/sqrt(C+1)) (OpenAI lm-human-preferences), read at the assistant's
end-of-turn token (feedback.reward_input, model.last_token_scores); the soft-label Bradley-Terry
loss (losses.pairwise_loss), AdamW, linear warmup (--warmup: a share of all steps, default a tenth)
then cosine, gradient clipping, fp32 weights with optional bf16 autocast (--bf16). The pairs of a
share of the prompts (--pair-val-fraction, data.split_pairs) are held out; their accuracy is
reported. Checkpoints (OUT/rm: an HF folder, reward_head.safetensors, the optimizer state;
--save-every 0: at each epoch's end) are written atomically; a NaN/inf loss, reward or weight stops
training and keeps the last good checkpoint.
Stage 3 (normalise): the rewards of the policy's responses in the preferences file get mean 0 and
std 1 through the head's gain and bias. OUT/rm is then final; OUT/summary.json has the figures
(held-out accuracy, order agreement, dropped pairs, seconds per stage), OUT/metrics.jsonl the curve.

Prompts: the project-wide held-out prompts (data.split, never trained on anywhere) are removed
first; the rest is shuffled by --seed and the first --n-prompts are used. Rerunning the same
command resumes every stage. Under torchrun any number of ranks writes the same preferences file,
byte for byte (label_pairs), and trains the same reward model as one process (train_step); the
evaluation and the normalising statistics are computed on a share per rank and gathered. Rank 0
alone logs, prints and writes checkpoints. Lines marked `# [dist]` exist for torchrun alone (in one process they change nothing): skip them
on a first reading.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from minicai.feedback import LABELLERS, reward_input
from minicai.infra import cli, distributed
from minicai.io.constitution_files import load_constitution
from minicai.infra.labelling import DEFAULT as FEEDBACK_DEFAULT, label_pairs, preference_stats
from minicai.infra.rm import check_args, reward_model, select_prompts, write_summary
from minicai.io.checkpoint import EMBEDDED_NAME
from minicai.io.data import split_pairs
from minicai.io.files import read_preferences, warn
from minicai.infra.train import (MetricsLog, adamw_resumed, bf16_autocast, check_finite, length_buckets, lr_at,
                                 open_run, save_checkpoint, start, warmup_steps)
from minicai.infra.cli import run_cli
from minicai.errors import InputError
from minicai.losses import pairwise_accuracy, pairwise_loss
from minicai.model import last_token_scores
from minicai.sample import pad


@dataclass
class LabelArgs:
    """stage 1: prompts, responses and AI feedback"""
    policy: str = field(default=EMBEDDED_NAME, metadata={"model": "lm"})
    """model that writes the responses (the SL-CAI model): .gguf, HF folder or the embedded model's name"""
    feedback_model: list[str] | None = field(default=None, metadata={"repeat": True, "model": "feedback"})
    """model that labels the pairs, repeatable (an ensemble: soft labels averaged, the vote share recorded): .gguf,
    HF folder, an embedded name, or 'policy' (= --policy); a ':ab' or ':contrast' suffix fixes its method;
    default: the pipeline's (infra.labelling.DEFAULT)"""
    labeller: str = field(default=FEEDBACK_DEFAULT["labeller"], metadata={"choices": LABELLERS})
    """ab: the paper's multiple choice, both orders; contrast: likelihood contrast under each principle's
    follow/violate system prompts; ab+contrast: both, averaged; rlcd: one reply sampled under a principle's follow
    prompt and one under its violate prompt, labelled by provenance; revision: (initial response, final revision)
    pairs of --sl-traces (docs/results.md, 'Labeller ablation')"""
    rescore: str | None = field(default=None, metadata={"choices": ("ab", "contrast", "ab+contrast")})
    """with --labeller rlcd or revision: label those pairs with this method instead of by provenance"""
    rlcd_context: str = field(default="principle", metadata={"choices": ("principle", "few-shot")})
    """with --labeller rlcd: principle = one reply under a principle's follow system prompt, one under its violate
    prompt; few-shot = one under the constitution's few-shot harmless context (the SL-CAI distillation context,
    slcai.distill_context) and one with no context, labelled by --rescore (needed: the AI labeller decides, not
    the provenance). The reward model never sees a context"""
    sl_traces: str | None = field(default=None, metadata={"metavar": "FILE"})
    """SL-CAI traces (train_sl.py's OUT/traces.jsonl) for --labeller revision"""
    constitution: str = "default"
    """'default', 'hhh', or a .toml/.json constitution file"""
    comparisons: str | None = None
    """JSON list of RL comparison principles (e.g. RLMadisonInstructions.json) for --constitution"""
    prompts: list[str] | None = field(default=None, metadata={"repeat": True})
    """prompt source (repeatable): a .jsonl/.csv/.txt file, do-not-answer, harmbench, builtin-red-team,
    builtin-helpful (default: the two built-in sets)"""
    n_prompts: int = field(default=64, metadata=cli.AT_LEAST_0)
    """prompts to use, after removing the held-out ones and shuffling by --seed; 0 = all"""
    held_out_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of prompts kept for the project's evaluation, never used here (data.split)"""
    preferences: str | None = field(default=None, metadata={"metavar": "FILE"})
    """train on this preferences JSONL (prompt, response_a, response_b, p_a; or TRL chosen/rejected) and skip stage 1"""
    k: int = field(default=2, metadata={"range": "[2, inf)"})
    """responses per prompt (every pair of them is labelled)"""
    temperature: float = field(default=1.0, metadata=cli.POSITIVE)
    """sampling temperature of the responses"""
    max_new_tokens: int = field(default=64, metadata=cli.AT_LEAST_1)
    """length limit of a response"""
    principles_per_pair: int = field(default=FEEDBACK_DEFAULT["principles_per_pair"], metadata=cli.AT_LEAST_1)
    """comparison principles drawn per pair (without replacement); the labels are averaged"""
    cot: bool = False
    """chain-of-thought labels: reason first, then answer; probabilities clamped to 40-60%%"""
    cot_max_new_tokens: int = field(default=64, metadata=cli.AT_LEAST_1)
    """reasoning length limit with --cot"""
    few_shot_labels: bool = False
    """put the constitution's worked examples of the labelling task before every A/B question
    (constitution.label_shots: its few-shot critique/revision examples, the revision the right answer, the better
    option (A) and (B) in turn; paper section 4.1); contrast members ignore them"""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16"), **cli.IGNORE})
    """weights of the policy (and of feedback models that are the policy); auto = bfloat16 on CUDA, float32 on CPU"""
    feedback_dtype: str = field(default="fast", metadata={"choices": ("fast", "float32", "bfloat16")})
    """weights of the other feedback models: fast = bfloat16 on CUDA or a CPU with bf16 matrix instructions"""
    gen_batch_size: int = field(default=8, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """prompts sampled together (k rows each)"""
    judge_batch_size: int = field(default=8, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """feedback prompts per forward pass"""


@dataclass
class RewardArgs:
    """stage 2: reward model"""
    rm_init: str | None = field(default=None, metadata={"model": "lm"})
    """initial weights of the reward model's trunk; default: --policy"""
    epochs: int = field(default=2, metadata=cli.AT_LEAST_1)
    """passes over the training pairs"""
    max_len: int = field(default=1024, metadata=cli.AT_LEAST_1)
    """pairs with a longer sequence are skipped"""
    pair_val_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of the labelled pairs' prompts held out to measure the reward model's accuracy (data.split_pairs)"""
    score_batch_size: int = field(default=16, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """sequences per forward when evaluating/normalising"""


@dataclass
class Args:
    run: cli.RunArgs = field(default_factory=lambda: cli.RunArgs(save_every=0))
    optim: cli.OptimArgs = field(default_factory=lambda: cli.OptimArgs(lr=1e-5, warmup=0.1, batch_size=8))
    label: LabelArgs = field(default_factory=LabelArgs)
    rm: RewardArgs = field(default_factory=RewardArgs)
    HELP = {"save_every": "checkpoint every N optimizer steps; 0 = at the end of each epoch",
            "batch_size": "pairs per micro-batch, all ranks together under torchrun"}
    RANGES = {"save_every": "[0, inf)"}


def tokenize_pairs(records: list[dict], tok, max_len: int) -> tuple[list[dict], int]:
    """Token ids of both sides of every pair (feedback.reward_input); pairs longer than max_len
    are skipped and counted."""
    pairs = [{"prompt": r["prompt"], "a": reward_input(tok, r["prompt"], r["response_a"]),
              "b": reward_input(tok, r["prompt"], r["response_b"]), "p": float(r["p_a"])} for r in records]
    kept = [x for x in pairs if max(len(x["a"]), len(x["b"])) <= max_len]
    return kept, len(pairs) - len(kept)


def rewards(model, seqs: list[list[int]], pad_id, device, autocast) -> torch.Tensor:
    """The reward of each sequence: the ScalarModel's output at its last real token
    (model.last_token_scores, as PPO and the evaluation read it), (B,) fp32. model may be the DDP
    wrapper."""
    ids, mask = pad(seqs, pad_id, "right", device)  # (B, T)
    with autocast():
        return last_token_scores(model, ids, mask)  # (B,)


def train_step(ddp, opt, pairs, batch, micro, pad_id, device, autocast, d, step: int, max_grad_norm: float) -> dict:
    """One optimizer step on the global batch `batch` (indices into pairs), in micro-batches of
    `micro` pairs (gradient accumulation), each split over the ranks (rank_share). Each rank's loss
    is the sum over its real pairs divided by loss_denominator (the global pair count of the step
    / world): after DDP's average the gradient is that of one process's pair-mean loss over the
    whole batch (a repeated pair, only when a micro-batch is smaller than the world, is left out).
    Returns the global loss, accuracy, margin and the gradient norm."""
    shares = [distributed.rank_share(batch[s:s + micro], d) for s in range(0, len(batch), micro)]  # [dist]
    real = torch.cat([torch.arange(len(idx), device=device) < n for idx, n in shares])  # (b,) this rank's
    denom = distributed.loss_denominator(real, d)
    loss_sum, kept = torch.zeros((), device=device), []
    for i, (idx, n) in enumerate(shares):
        with nullcontext() if d.world == 1 or i == len(shares) - 1 else ddp.no_sync():  # DDP syncs the last
            r = rewards(ddp, [pairs[j]["a"] for j in idx] + [pairs[j]["b"] for j in idx], pad_id, device, autocast)
            r_a, r_b, p = r[:len(idx)], r[len(idx):], torch.tensor([pairs[j]["p"] for j in idx], device=device)  # (B,)
            loss = pairwise_loss(r_a[:n], r_b[:n], p[:n], denominator=denom)
            reported = distributed.all_reduce_sum(loss.detach(), d)  # [dist] every rank, before any may stop
            check_finite(r, "a reward", step)
            check_finite(reported, "the reward-model loss", step)
            loss.backward()
        loss_sum += reported / d.world  # the global pair mean, summed over the micro-batches
        kept.append(torch.stack([r_a.detach(), r_b.detach(), p], 1)[:n])  # (n, 3)
    gnorm = torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], max_grad_norm)
    check_finite(gnorm, "the gradient norm", step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ga, gb, gp = distributed.gather_uneven(torch.cat(kept), d).unbind(1)  # [dist] (B,) each
    acc = pairwise_accuracy(ga, gb, gp).item()
    return {"loss": loss_sum.item(),
            "accuracy": None if math.isnan(acc) else acc, "grad_norm": gnorm.item(),
            "reward_margin": (ga - gb).abs().mean().item()}


@torch.no_grad()
def score_all(model, seqs: list[list[int]], batch_size, pad_id, device, autocast, d: distributed.Dist) -> torch.Tensor:
    """Rewards of all `seqs` (N,), in eval mode: sorted by length (less padding), every rank
    scores every world-th, and all gather them (a collective: every rank calls it)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    mine = distributed.shard([seqs[i] for i in order], d)  # [dist]
    scores = [rewards(model, mine[s:s + batch_size], pad_id, device, autocast)
              for s in tqdm(range(0, len(mine), batch_size), desc="scoring", leave=False, disable=not d.main)]
    model.train(was_training)
    r = distributed.gather_uneven((torch.cat(scores) if scores else torch.zeros(0, device=device))[:, None], d)[:, 0]  # [dist]
    return torch.empty_like(r).index_copy_(0, torch.tensor(order, device=r.device), r)  # back to seqs' order


def evaluate(model, pairs, batch_size, pad_id, device, autocast, d: distributed.Dist = distributed.Dist()) -> dict:
    """Soft-label loss and accuracy (vs p > 0.5, decisive labels only) over all `pairs` (a collective)."""
    if not pairs:
        return {"loss": None, "accuracy": None, "pairs": 0}
    r = score_all(model, [x["a"] for x in pairs] + [x["b"] for x in pairs], batch_size, pad_id, device, autocast, d)
    ra, rb, ps = r[:len(pairs)], r[len(pairs):], torch.tensor([x["p"] for x in pairs], device=r.device)  # (N,)
    acc = pairwise_accuracy(ra, rb, ps).item()
    return {"loss": pairwise_loss(ra, rb, ps).item(), "accuracy": None if math.isnan(acc) else acc,
            "pairs": len(pairs)}


@torch.no_grad()
def normalise(rm, pairs, batch_size, pad_id, device, autocast, d: distributed.Dist, step: int) -> dict:
    """Stage 3: the rewards of every distinct sequence of `pairs` (the policy's samples) to mean 0,
    std 1 through the head. OpenAI lm-human-preferences train_reward.py: gain = 1/std, bias =
    -mean * gain, so that proj(h) * gain + bias = (r - mean) / std; the population std, as its TF
    code uses (a collective)."""
    seqs = [list(s) for s in dict.fromkeys(tuple(s) for x in pairs for s in (x["a"], x["b"]))]
    r = score_all(rm, seqs, batch_size, pad_id, device, autocast, d)  # (N,)
    mean, std = r.mean().item(), r.std(unbiased=False).item()
    check_finite(torch.tensor([mean, std]), "the reward statistics", step)
    gain = 1.0 / max(std, 1e-8)
    rm.head.gain.fill_(gain)
    rm.head.bias.fill_(-mean * gain)
    return {"reward_mean_before_normalising": mean, "reward_std_before_normalising": std, "normalised_on": len(seqs)}


def check_labelling(a: LabelArgs, principles: list) -> None:
    """Stage 1's inputs that one flag alone cannot check (cli.parse checked each flag), before the
    run folder is made: --principles-per-pair against the constitution, and the default feedback
    models (infra.labelling.DEFAULT) when no --feedback-model is given."""
    if a.labeller != "revision" and a.principles_per_pair > len(principles):
        raise InputError(f"--principles-per-pair: {a.principles_per_pair} is not allowed (must be <= "
                         f"{len(principles)}, the comparison principles of --constitution {a.constitution})")
    if a.rlcd_context == "few-shot" and (a.labeller != "rlcd" or not a.rescore):
        raise InputError("--rlcd-context few-shot: needs --labeller rlcd and --rescore (ab, contrast or ab+contrast): "
                         "those pairs are labelled by the AI labeller, not by their provenance")
    if a.rlcd_context == "few-shot" and not load_constitution(a.constitution, a.comparisons).few_shot:
        raise InputError(f"--rlcd-context few-shot: --constitution {a.constitution} has no few-shot examples")
    if a.few_shot_labels and not load_constitution(a.constitution, a.comparisons).few_shot:
        raise InputError(f"--few-shot-labels: --constitution {a.constitution} has no few-shot examples")
    judged = a.rescore if a.labeller in ("rlcd", "revision") else a.labeller
    for spec in [] if a.feedback_model or not judged else FEEDBACK_DEFAULT["feedback_models"]:
        cli.check_model(spec, "feedback", "--feedback-model")


def main(argv=None) -> int:
    args = cli.parse(Args, argv, description=__doc__)
    t_start, run, a = time.time(), args.run, args.label
    check_args(args)
    device, dtype, d = start(run, a.dtype)  # [dist] process group
    # bad input fails before anything is written (else the corrected command would meet a run
    # folder made with the bad file's name in its config)
    notes, log = {}, warn if d.main else None
    if a.preferences:
        records = read_preferences(Path(a.preferences), notes, log)
    else:
        principles, prompts = load_constitution(a.constitution, a.comparisons).principles, select_prompts(a, run.seed)
        check_labelling(a, principles)
    out, times = open_run(args, Args, d), {}
    t0, pref_path = time.time(), Path(a.preferences or out / "preferences.jsonl")
    if not a.preferences:  # stage 1
        times.update(label_pairs(a, run.seed, pref_path, prompts, principles, d, device, dtype))
        records = read_preferences(pref_path, notes, log)  # an empty file is an error here
    stats = preference_stats(pref_path, records)
    stats["dropped_identical"] += notes["identical_dropped"]  # the labeller's and those in the file read
    if d.main and not a.preferences:
        print(f"feedback: {stats['pairs']} labelled pairs, {stats['dropped_identical']} identical pairs dropped, "
              f"orders agree on {stats['order_agreement']} -> {pref_path}")
    times["feedback_s"] = time.time() - t0
    meta_path = out / "rm" / "minicai.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("rm_stage") == "done":
        if d.main:
            print(f"reward model already trained: {meta_path.parent}")
        result, times = meta["result"], {**times, **meta.get("times", {})}
    else:  # stages 2 and 3
        result = train_reward_model(args, records, pref_path, out / "rm", d, device, times)
    if d.main:
        write_summary(out, args, stats, result, times, t_start)
    distributed.finish(d)  # [dist]
    return 0


def save(rm_dir: Path, rm, tok, opt, step: int, total: int, d, rm_init: str, done: dict | None = None) -> None:
    """The reward model to rm_dir (train.save_checkpoint: atomic, weights checked finite): with the
    optimizer state while training, without it once `done` (the final metadata) is given."""
    save_checkpoint(rm_dir, rm.trunk, tok, opt, step, {"stage": "reward-model", "step": step, "rm_init": rm_init,
                                                       **(done or {})}, d, with_state=done is None,
                    extra={"total": total}, heads={"reward": rm.head})


def train_reward_model(args: Args, records: list[dict], pref_path: Path, rm_dir: Path, d, device, times: dict) -> dict:
    """Stages 2 and 3 into rm_dir, resuming its checkpoint: the training loop (train_step; the
    held-out pairs evaluated at each epoch's end; checkpoints), the final evaluation, normalise,
    and the final checkpoint. Adds the seconds to `times`; returns the result for the summary."""
    t0, run, optim, rm_args = time.time(), args.run, args.optim, args.rm
    rm_init = rm_args.rm_init or args.label.policy
    torch.manual_seed(run.seed)
    rm, tok, resuming = reward_model(rm_dir, rm_init, device)
    pairs, skipped = tokenize_pairs(records, tok, rm_args.max_len)
    train, val = split_pairs(pairs, rm_args.pair_val_fraction)  # by prompt: a prompt's pairs on one side
    if not train:
        raise InputError(f"{pref_path}: no training pairs left (all {len(pairs)} are held out or too long; "
                         f"lower --pair-val-fraction or raise --max-len)")
    step_pairs = optim.batch_size * optim.grad_accum  # pairs per optimizer step, all ranks together
    steps_per_epoch = math.ceil(len(train) / step_pairs)
    total = steps_per_epoch * rm_args.epochs
    warmup = warmup_steps(optim.warmup, total)
    # The batch plan is fixed by the seed: epoch e is length-bucketed with Random(seed + e), so a
    # resumed run skips exactly the batches it has trained on, whatever the number of ranks.
    lengths = [len(x["a"]) + len(x["b"]) for x in train]
    plan = [b for e in range(rm_args.epochs)
            for b in length_buckets(lengths, step_pairs, random.Random(run.seed + e))]
    ddp = distributed.wrap(rm, d)  # [dist] the one module whose forward gives the rewards: DDP averages its gradients
    # the trunk's parameters, then the head's (the layout of every checkpoint); fused: one kernel (HF Trainer default)
    opt, step = adamw_resumed(rm, rm, optim, rm_dir, resuming, d, what="reward-model training", total=total)
    if d.main:
        print(f"reward model: {len(train)} training pairs, {len(val)} held-out pairs ({skipped} too long), "
              f"{total} steps")
    log = MetricsLog(rm_dir.parent / "metrics.jsonl", resume_step=step if step else None) if d.main else None
    autocast = bf16_autocast(device, run.bf16)
    rm.train()
    bar = tqdm(total=total, initial=step, desc="reward model", unit="step", disable=not d.main)
    while step < total:
        lr = lr_at(step, total, optim.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        row = train_step(ddp, opt, train, plan[step], optim.batch_size, tok.pad_id, device, autocast, d, step,
                         optim.max_grad_norm)
        step += 1
        row = {"step": step, "epoch": (step - 1) // steps_per_epoch, **row, "lr": lr}
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch and val:
            ev = evaluate(rm, val, rm_args.score_batch_size, tok.pad_id, device, autocast, d)
            row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: row[k] for k in ("val_accuracy",) if k in row})
        bar.update(1)
        if step < total and (step % run.save_every == 0 if run.save_every else end_of_epoch):
            save(rm_dir, rm, tok, opt, step, total, d, rm_init)
    bar.close()
    result = {"train": evaluate(rm, train, rm_args.score_batch_size, tok.pad_id, device, autocast, d),
              "held_out": evaluate(rm, val, rm_args.score_batch_size, tok.pad_id, device, autocast, d),
              "steps": step, "skipped_too_long": skipped}
    times["reward_model_s"], t0 = time.time() - t0, time.time()
    result.update(normalise(rm, pairs, rm_args.score_batch_size, tok.pad_id, device, autocast, d, step))  # stage 3
    times["normalise_s"] = time.time() - t0
    save(rm_dir, rm, tok, opt, step, total, d, rm_init, {"rm_stage": "done", "result": result, "times": times,
                                                         "policy": args.label.policy, "preferences": str(pref_path)})
    return result


def command() -> int:
    """The installed command (pyproject.toml's [project.scripts]): main with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
