"""RL-CAI, first half: AI-feedback preference labels, then a reward model (Bai et al. 2022, §4.1).

    python train_rm.py --policy runs/sl/model --feedback-model runs/sl/model --out runs/rm
    torchrun --nproc_per_node 4 train_rm.py ...    (data-parallel: minicai/infra/distributed.py)

Stage 1, feedback (minicai/feedback.py): for each training prompt the policy (the SL-CAI model)
samples k responses; the feedback model reads the paper's multiple-choice prompt for every pair,
in both orders and under m principles drawn per pair, and gives a soft label p_a = P(response A is
better). One record per pair goes to OUT/preferences.jsonl (TRL's chosen/rejected layout
included), appended per batch; pairs of identical responses go to OUT/preferences.dropped.jsonl.
--preferences FILE skips this stage and trains on an existing file.

Stage 2, reward model: the trunk starts from --rm-init (default: the policy) with a new scalar
head, N(0, 1/sqrt(C+1)) (OpenAI lm-human-preferences). The reward of (prompt, response) is the
head's output at the assistant's end-of-turn token (feedback.reward_input / reward_scores). The
loss is the soft-label Bradley-Terry loss (losses.pairwise_loss); AdamW with warmup + cosine,
gradient clipping, optional bf16 autocast. The pairs of a share of the prompts (--rm-held-out,
split by prompt text) are held out; their accuracy is reported. Checkpoints (OUT/rm, an HF folder
plus reward_head.safetensors and the optimizer state) are written atomically; a NaN/inf loss,
reward or weight stops training and keeps the last good checkpoint.

Stage 3, normalisation: the rewards of the policy's responses in the preferences file get mean 0
and std 1 through the head's gain and bias (OpenAI lm-human-preferences: gain = 1/std,
bias = -mean/std; ScalarHead computes proj(h) * gain + bias). OUT/rm is then final.

Precision: --dtype sets the weights of the policy and the feedback model in stage 1 (bfloat16 is
about 3x faster than float32 on CPUs with AMX); the reward model always keeps fp32 weights, with
--bf16 for bf16 autocast in its forward and backward passes.

Prompts: the project-wide held-out prompts (data.split, never trained on anywhere) are removed
first; the rest is shuffled by --seed and the first --n-prompts are used. Rerunning the same
command resumes every stage. OUT/summary.json has the figures (held-out accuracy, how often the two
orders agree, dropped identical pairs, seconds per stage); OUT/metrics.jsonl the training curve.

Under torchrun (as train_sl.py): stage 1 splits the prompts over the ranks in whole batches of
--gen-batch-size (rank r labels batches r, r + world, ... into OUT/preferences.rank{r}.jsonl; rank 0
then merges them into preferences.jsonl in the order one process writes, and deletes them). Every
record depends only on the seed and its own prompt, and the forward passes see the same batches as
in one process, so any number of ranks writes the same file, byte for byte (more ranks than
batches leaves some idle: lower --gen-batch-size). Stage 2 trains the reward model with
DistributedDataParallel: a step takes --batch-size pairs per rank (a global batch of batch-size x
ranks, cut by the same plan as one process with that batch size), so N ranks with --batch-size B
train the same model as one process with --batch-size N*B (resume with the same number of ranks).
The held-out accuracy and the normalising statistics are computed on a share per rank and
gathered. Rank 0 alone logs, prints and writes checkpoints.
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

from minicai.infra import distributed
from minicai.infra.checkpoint import EMBEDDED_NAME, load_model, load_scalar_model
from minicai.constitution import load_constitution
from minicai.infra.data import PREFERENCE_SPLIT_SALT, Prompt, load_prompts, split
from minicai.feedback import DEFAULT as FEEDBACK_DEFAULT
from minicai.feedback import (LABELLERS, draw_principles, load_judges, dropped_path, ensemble_labels, label_prompts,
                              pair_keys, preference_stats, revision_pairs, reward_input,
                              scorers_of)
from minicai.infra.files import read_jsonl, read_preferences, write_jsonl
from minicai.sample import pad
from minicai.slcai import load_done
from minicai.losses import pairwise_accuracy, pairwise_loss
from minicai.model import ScalarHead, ScalarModel, last_token_scores
from minicai.infra.train import (MetricsLog, check_finite, length_buckets, load_train_state, lr_at, prepare_run_dir,
                           run_cli, save_checkpoint)
from minicai.infra.utils import InputError, add_device_args, atomic_write_json, atomic_write_text, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    g.add_argument("--policy", default=EMBEDDED_NAME,
                   help=f"model that writes the responses (the SL-CAI model): .gguf, HF folder or '{EMBEDDED_NAME}'")
    g.add_argument("--feedback-model", action="append", default=None,
                   help="model that labels the pairs, repeatable (an ensemble: soft labels averaged, the vote share "
                        f"recorded): .gguf, HF folder, '{EMBEDDED_NAME}', 'qwen2.5-coder-1.5b', or 'policy' (= --policy); "
                        f"default: the pipeline's ({', '.join(FEEDBACK_DEFAULT['feedback_models'])})")
    g.add_argument("--labeller", default=FEEDBACK_DEFAULT["labeller"], choices=LABELLERS,
                   help="ab: the paper's multiple choice, both orders; contrast: likelihood contrast under each "
                        "principle's follow/violate system prompts; ab+contrast: both, averaged; rlcd: one reply "
                        "sampled under a principle's follow prompt and one under its violate prompt, labelled by "
                        "provenance; revision: (initial response, final revision) pairs of --sl-traces "
                        f"(default: {FEEDBACK_DEFAULT['labeller']}; docs/results.md, 'Labeller ablation')")
    g.add_argument("--feedback-dtype", default="fast", choices=["fast", "float32", "bfloat16"],
                   help="weights of the feedback models other than the policy: fast = bfloat16 on CUDA or a CPU with "
                        "bf16 matrix instructions (the option logits stay fp32)")
    g.add_argument("--rescore", default=None, choices=["ab", "contrast", "ab+contrast"],
                   help="with --labeller rlcd or revision: label those pairs with this method instead of by provenance")
    g.add_argument("--sl-traces", default=None, metavar="FILE",
                   help="SL-CAI traces (train_sl.py's OUT/traces.jsonl) for --labeller revision")
    g.add_argument("--rm-init", default=None, help="initial weights of the reward model's trunk; default: --policy")
    g.add_argument("--constitution", default="default", help="'default', 'hhh', or a .toml/.json constitution file")
    g.add_argument("--comparisons", default=None,
                   help="JSON list of RL comparison principles (e.g. RLMadisonInstructions.json) for --constitution")
    g.add_argument("--prompts", action="append", default=None,
                   help="prompt source (repeatable): a .jsonl/.csv/.txt file, do-not-answer, harmbench, "
                        "builtin-red-team, builtin-helpful (default: the two built-in sets)")
    g.add_argument("--n-prompts", type=int, default=64,
                   help="prompts to use, after removing the held-out ones and shuffling by --seed; 0 = all")
    g.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="share of prompts kept for the project's evaluation, never used here (data.split)")
    g.add_argument("--preferences", default=None, metavar="FILE",
                   help="train on this preferences JSONL (prompt, response_a, response_b, p_a) and skip stage 1")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the prompt shuffle, the responses, the principles drawn and the RM's batches")
    g = p.add_argument_group("stage 1: responses and AI feedback")
    g.add_argument("--k", type=int, default=2, help="responses per prompt (every pair of them is labelled)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the responses")
    g.add_argument("--max-new-tokens", type=int, default=64, help="length limit of a response")
    g.add_argument("--principles-per-pair", type=int, default=FEEDBACK_DEFAULT["principles_per_pair"],
                   help="comparison principles drawn per pair (without replacement); the labels are averaged")
    g.add_argument("--cot", action="store_true",
                   help="chain-of-thought labels: reason first, then answer; probabilities clamped to 40-60%%")
    g.add_argument("--cot-max-new-tokens", type=int, default=64, help="reasoning length limit with --cot")
    g.add_argument("--gen-batch-size", type=int, default=8, help="prompts sampled together (k rows each)")
    g.add_argument("--judge-batch-size", type=int, default=8, help="feedback prompts per forward pass")
    g = p.add_argument_group("stage 2: reward model")
    g.add_argument("--epochs", type=int, default=2, help="passes over the training pairs")
    g.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.1, help="linear warmup, as a share of all steps, then cosine")
    g.add_argument("--batch-size", type=int, default=8,
                   help="pairs per optimizer step and process (under torchrun a step takes batch-size x ranks)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--max-len", type=int, default=1024, help="pairs with a longer sequence are skipped")
    g.add_argument("--rm-held-out", type=float, default=0.2,
                   help="share of prompts whose pairs are held out to measure the RM's accuracy (split by prompt)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (weights stay fp32)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end of each epoch)")
    g.add_argument("--score-batch-size", type=int, default=16, help="sequences per forward when evaluating/normalising")
    g = p.add_argument_group("running")
    g.add_argument("--overwrite", action="store_true", help="delete OUT if it holds a run with another config")
    g.add_argument("--stop-after-batches", type=int, default=None,
                   help="stop stage 1 after this many batches per rank (simulates an interrupted run; rerun to resume)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop stage 2 after this many optimizer steps, with a checkpoint (rerun to resume)")
    add_device_args(p)
    return p


def select_prompts(args) -> list[Prompt]:
    """The train side of data.split over all sources, shuffled by the seed, the first n."""
    specs = args.prompts or ["builtin-red-team", "builtin-helpful"]
    prompts = list({p.text: p for spec in specs for p in load_prompts(spec)}.values())  # dedupe across sources
    train, _ = split(prompts, args.held_out_fraction)
    random.Random(args.seed).shuffle(train)
    train = train[:args.n_prompts] if args.n_prompts else train
    if not train:
        raise InputError("--prompts: no prompts left after removing the held-out ones")
    return train


def tokenize_pairs(records: list[dict], tok, max_len: int) -> tuple[list[dict], int]:
    """Token ids of both sides of every pair (feedback.reward_input); pairs longer than max_len
    are skipped and counted."""
    pairs, skipped = [], 0
    for r in records:
        a, b = reward_input(tok, r["prompt"], r["response_a"]), reward_input(tok, r["prompt"], r["response_b"])
        if max(len(a), len(b)) > max_len:
            skipped += 1
            continue
        pairs.append({"prompt": r["prompt"], "a": a, "b": b, "p": float(r["p_a"])})
    return pairs, skipped


def merge_rank_files(pref_path: Path, prompts: list[Prompt], k: int, labeller: str = "ab") -> None:
    """Fold the per-rank files of a torchrun labelling run (preferences.rank{r}.jsonl and their
    .dropped files, also those a killed run left behind, whatever its world size) into
    preferences.jsonl and preferences.dropped.jsonl: one record per key, in the order one process
    writes them (prompt order, then pair order); then delete them. Rank 0 only."""
    shards = sorted(f for f in pref_path.parent.glob(f"{pref_path.stem}.rank*{pref_path.suffix}")
                    if not f.name.endswith(".dropped" + pref_path.suffix))
    if not shards:
        return
    order = {key: n for n, key in enumerate(key for p in prompts for key in pair_keys(p, k, labeller))}
    for target, parts in ((pref_path, shards), (dropped_path(pref_path), [dropped_path(f) for f in shards])):
        recs = {}
        for f in (target, *parts):
            for r in read_jsonl(f, "drop"):
                recs.setdefault(r.get("key"), r)  # a key in two files (a rerun after a crash): the same record
        if recs:
            rows = sorted(recs.values(), key=lambda r: order.get(r.get("key"), len(order)))
            write_jsonl(target, rows)
    for f in shards:
        f.unlink()
        dropped_path(f).unlink(missing_ok=True)


def write_revision_pairs(args, pref_path: Path, principles, judges, scorers) -> None:
    """--labeller revision: the SL-CAI traces' (initial response, final revision) pairs
    (feedback.revision_pairs), rescored by the ensemble with --rescore, written in one atomic step;
    the pairs the stated rule drops go to the .dropped file."""
    if not args.sl_traces:
        raise InputError("--labeller revision needs --sl-traces (train_sl.py's OUT/traces.jsonl)")
    traces = list(load_done(Path(args.sl_traces)).values())
    rows, dropped = revision_pairs(traces, args.seed)
    if not rows:
        raise InputError(f"{args.sl_traces}: no (initial, revision) pair left after the revision filter "
                         f"({len(dropped)} dropped)")
    if scorers:
        labels = ensemble_labels(judges, [(f"Human: {r['prompt']}", r["response_a"], r["response_b"]) for r in rows],
                                 draw_principles(principles, len(rows), args.principles_per_pair, args.seed,
                                                 "revision"), scorers, cot=args.cot, batch_size=args.judge_batch_size)
        for r, lab in zip(rows, labels):
            r.update(p_a_provenance=r["p_a"], **lab, labeller=f"revision+{args.rescore}")
    atomic_write_text(dropped_path(pref_path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped))
    atomic_write_text(pref_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def rewards(model, seqs: list[list[int]], pad_id, device, autocast) -> torch.Tensor:
    """The reward of each sequence: the ScalarModel's output at its last real token
    (model.last_token_scores, as PPO and the evaluation read it), (B,) fp32. model may be the DDP
    wrapper."""
    ids, mask = pad(seqs, pad_id, "right", device)  # (B, T)
    with autocast():
        return last_token_scores(model, ids, mask)  # (B,)


def pair_rewards(model, pairs, idx, pad_id, device, autocast):
    """Rewards of both sides of the pairs idx, in one forward: r_a (B,), r_b (B,), labels p (B,)."""
    r = rewards(model, [pairs[i]["a"] for i in idx] + [pairs[i]["b"] for i in idx], pad_id, device, autocast)  # (2B,)
    p = torch.tensor([pairs[i]["p"] for i in idx], device=device)  # (B,)
    return r[:len(idx)], r[len(idx):], p


@torch.no_grad()
def evaluate(model, pairs, batch_size, pad_id, device, autocast, d: distributed.Dist = distributed.Dist()) -> dict:
    """Soft-label loss and accuracy (vs p > 0.5, decisive labels only) over all `pairs`. Every
    rank scores every world-th pair (by length), then all gather the rewards (a collective: every
    rank calls it)."""
    if not pairs:
        return {"loss": None, "accuracy": None, "pairs": 0}
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["a"]) + len(pairs[i]["b"]))
    mine = distributed.shard(order, d)
    rows = [torch.stack(pair_rewards(model, pairs, mine[s:s + batch_size], pad_id, device, autocast), 1)
            for s in range(0, len(mine), batch_size)]  # (b, 3) each: r_a, r_b, p
    model.train(was_training)
    ra, rb, ps = distributed.gather_uneven(torch.cat(rows) if rows else torch.zeros(0, 3, device=device), d).unbind(1)  # (N,)
    acc = pairwise_accuracy(ra, rb, ps).item()
    return {"loss": pairwise_loss(ra, rb, ps).item(), "accuracy": None if math.isnan(acc) else acc,
            "pairs": len(pairs)}


@torch.no_grad()
def reward_stats(model, seqs, batch_size, pad_id, device, autocast,
                 d: distributed.Dist = distributed.Dist()) -> tuple[float, float]:
    """Mean and (population) std of the rewards of `seqs` (OpenAI's TF code uses the biased variance).
    Each rank scores every world-th sequence; the scores are gathered (a collective)."""
    model.eval()
    mine = distributed.shard(seqs, d)
    scores = [rewards(model, mine[s:s + batch_size], pad_id, device, autocast)
              for s in tqdm(range(0, len(mine), batch_size), desc="normalising", unit="batch", leave=False,
                            disable=not d.main)]
    r = distributed.gather_uneven((torch.cat(scores) if scores else torch.zeros(0, device=device))[:, None], d)[:, 0]  # (N,)
    return r.mean().item(), r.std(unbiased=False).item()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    if args.k < 2:
        raise InputError(f"--k {args.k}: need at least 2 responses per prompt")
    if args.batch_size < 1 or args.epochs < 1:
        raise InputError("--batch-size and --epochs must be at least 1")
    device, dtype = resolve_device(args.device, args.dtype)
    d = distributed.init(device)
    device = distributed.rank_device(device, d)
    config = {k: v for k, v in vars(args).items()
              if k not in ("overwrite", "stop_after_batches", "stop_after_steps", "score_batch_size",
                           "gen_batch_size", "judge_batch_size")}
    # bad input fails before anything is written (else the corrected command would meet a run
    # folder made with the bad file's name in its config)
    if args.preferences:
        read_preferences(Path(args.preferences))
    else:
        constitution = load_constitution(args.constitution, args.comparisons)
        prompts = select_prompts(args)
        if args.labeller == "revision" and not args.sl_traces:
            raise InputError("--labeller revision needs --sl-traces (train_sl.py's OUT/traces.jsonl)")
        if args.labeller == "revision" and not Path(args.sl_traces).is_file():
            raise InputError(f"{args.sl_traces}: SL-CAI traces file not found (--sl-traces)")
    out = Path(args.out)
    if d.main:
        prepare_run_dir(out, config, args.overwrite, parser=build_parser())
    distributed.barrier(d)
    policy_name = args.policy
    rm_init = args.rm_init or policy_name
    fb_names = [policy_name + n[len("policy"):] if n == "policy" or n.startswith("policy:") else n
                for n in (args.feedback_model or FEEDBACK_DEFAULT["feedback_models"])]
    if args.labeller in ("rlcd", "revision"):
        scorers = scorers_of(args.rescore) if args.rescore else []
    else:
        scorers = scorers_of(args.labeller)
    times = {}

    # ---------------------------------------------------------------- stage 1: AI feedback
    t0 = time.time()
    if args.preferences:
        pref_path = Path(args.preferences)
    else:
        pref_path = out / "preferences.jsonl"
        if d.main:
            merge_rank_files(pref_path, prompts, args.k, args.labeller)  # what a killed torchrun run left in rank files
        distributed.barrier(d)
        policy, policy_tok, _ = load_model(policy_name, dtype=dtype, device=device)
        fb_dtype = resolve_device(args.device, args.feedback_dtype)[1]
        judges = load_judges(fb_names, fb_dtype, device, reuse={policy_name: (policy, policy_tok)}) if scorers else []
        if args.labeller == "revision":
            mine, path = [], pref_path
            if d.main and not pref_path.exists():
                write_revision_pairs(args, pref_path, constitution.principles, judges, scorers)
        elif d.world == 1:
            mine, path = prompts, pref_path  # label_prompts itself skips the pairs already in the file
        else:
            # Whole batches of label_prompts' fixed cut (--gen-batch-size prompts) per rank, each rank
            # into its own file, skipping the batches already merged: the policy and the judge then
            # see exactly the batches of one process, so the labels agree to the last bit (a prompt-
            # by-prompt split changes the judge's padded batches, and p_a by ~1e-7).
            done = {r.get("key") for f in (pref_path, dropped_path(pref_path)) for r in read_jsonl(f, "drop")}
            batches = [prompts[s:s + args.gen_batch_size] for s in range(0, len(prompts), args.gen_batch_size)]
            mine = [p for b in distributed.shard(batches, d)
                    if any(key not in done for q in b for key in pair_keys(q, args.k, args.labeller)) for p in b]
            path = out / f"preferences.rank{d.rank}.jsonl"
        seconds = {"generate_s": 0.0, "judge_s": 0.0}
        if mine:
            seconds = label_prompts(policy, policy_tok, judges, mine, constitution.principles, path,
                                    labeller=args.labeller, rescore=args.rescore,
                                    k=args.k, m=args.principles_per_pair, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed,
                                    prompts_per_batch=args.gen_batch_size, judge_batch_size=args.judge_batch_size,
                                    cot=args.cot, cot_max_new_tokens=args.cot_max_new_tokens,
                                    limit_batches=args.stop_after_batches, progress=d.main)["seconds_this_run"]
        del policy, judges
        for k, v in seconds.items():  # the slowest rank's
            times[f"feedback_{k}"] = distributed.all_reduce_max(torch.tensor(v, device=device), d).item()
        distributed.barrier(d)
        if d.world > 1 and d.main:  # the rank files into preferences.jsonl, in prompt order
            merge_rank_files(pref_path, prompts, args.k, args.labeller)
        distributed.barrier(d)
        if d.main:
            stats = preference_stats(pref_path)
            print(f"feedback: {stats['pairs']} labelled pairs, {stats['dropped_identical']} identical pairs dropped, "
                  f"orders agree on {stats['order_agreement']} -> {pref_path}")
        if args.stop_after_batches is not None:
            if d.main:
                print("stopped after --stop-after-batches; rerun without it to continue")
            distributed.finish(d)
            return 0
    times["feedback_s"] = time.time() - t0
    records = read_preferences(pref_path)  # an empty file is an error here
    stats = preference_stats(pref_path)

    # ---------------------------------------------------------------- stage 2: reward model
    t0 = time.time()
    rm_dir = out / "rm"
    meta_path = rm_dir / "minicai.json"
    done_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if done_meta.get("rm_stage") == "done":
        if d.main:
            print(f"reward model already trained: {rm_dir}")
            times.update(done_meta.get("times", {}))
            write_summary(out, args, stats, done_meta["result"], times, t_start)
        distributed.finish(d)
        return 0

    torch.manual_seed(args.seed)
    resuming = (rm_dir / "train_state.json").exists()
    if resuming:
        rm, tok, _ = load_scalar_model(rm_dir, device=device)
    else:
        trunk, tok, _ = load_model(rm_init, dtype=torch.float32, device=device)  # fp32 master weights
        rm = ScalarModel(trunk, ScalarHead(trunk.cfg.dim, init_std=1 / math.sqrt(trunk.cfg.dim + 1)).to(device))
    if rm.trunk.lm_head is not None:
        # An untied LM head plays no part in the reward (hidden states -> ScalarHead): without a
        # gradient AdamW never moved it anyway, and frozen it is left out by DDP, which would
        # otherwise wait for its gradient (or need find_unused_parameters). It is still saved.
        rm.trunk.lm_head.requires_grad_(False)
    pairs, skipped = tokenize_pairs(records, tok, args.max_len)
    # the RM's own validation split, by prompt: all pairs of a prompt fall on the same side
    distinct = [Prompt(t, "", "red-team") for t in dict.fromkeys(r["prompt"] for r in records)]
    held_texts = {p.text for p in split(distinct, args.rm_held_out, salt=PREFERENCE_SPLIT_SALT)[1]}
    train = [x for x in pairs if x["prompt"] not in held_texts]
    val = [x for x in pairs if x["prompt"] in held_texts]
    if not train:
        raise InputError(f"{pref_path}: no training pairs left (all {len(pairs)} are held out or too long; "
                         f"lower --rm-held-out or raise --max-len)")
    global_batch = args.batch_size * d.world  # pairs per optimizer step, all ranks together
    steps_per_epoch = math.ceil(len(train) / global_batch)
    total = steps_per_epoch * args.epochs
    warmup = max(1, round(args.warmup * total)) if args.warmup > 0 else 0
    step = 0
    params = list(rm.parameters())  # the trunk's, then the head's (the optimizer layout of every checkpoint)
    ddp = distributed.wrap(rm, d)  # the one module whose forward gives the rewards: DDP averages its gradients
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one kernel (HF Trainer default)
    if resuming:
        step = load_train_state(rm_dir, opt)["step"]
        if d.main:
            print(f"resuming reward-model training at step {step}/{total} from {rm_dir}")
    rm.train()
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if step else None) if d.main else None
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    if d.main:
        print(f"reward model: {len(train)} training pairs, {len(val)} held-out pairs ({skipped} too long), "
              f"{total} steps")

    def save(s, extra_meta=None, with_state=True):
        save_checkpoint(rm_dir, rm.trunk, tok, opt, s, {"stage": "reward-model", "step": s, "rm_init": rm_init,
                                                       **(extra_meta or {})}, d, with_state=with_state,
                        extra={"total": total}, heads={"reward": rm.head})

    # The batch plan is fixed by the seed: epoch e is length-bucketed with Random(seed + e), so a
    # resumed run skips exactly the batches it has trained on. Each batch is a global one, split
    # over the ranks (rank_share).
    plan = [b for e in range(args.epochs)
            for b in length_buckets([len(x["a"]) + len(x["b"]) for x in train], global_batch,
                                    random.Random(args.seed + e))]
    bar = tqdm(total=total, initial=step, desc="reward model", unit="step", disable=not d.main)
    while step < total:
        lr = lr_at(step, total, args.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        mine, n_real = distributed.rank_share(plan[step], d)
        r_a, r_b, p = pair_rewards(ddp, train, mine, tok.pad_id, device, autocast)
        # This rank's pair-mean loss, weighted by its share of the global batch, times world size
        # because DDP averages gradients over ranks: the gradient is then that of the pair-mean
        # loss of one process over the whole global batch (train_sl.batch_loss, with pairs for
        # tokens; the global pair count is the batch's length, known to every rank from the plan).
        loss = pairwise_loss(r_a, r_b, p) * (n_real * d.world / len(plan[step]))
        reported = distributed.all_reduce_sum(loss.detach(), d) / d.world  # the global pair mean
        check_finite(torch.cat([r_a, r_b]), "a reward", step)
        check_finite(reported, "the reward-model loss", step)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        check_finite(gnorm, "the gradient norm", step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ga, gb, gp = distributed.gather_uneven(torch.stack([r_a.detach(), r_b.detach(), p], 1)[:n_real], d).unbind(1)  # (B,)
        acc = pairwise_accuracy(ga, gb, gp).item()
        row = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": reported.item(),
               "accuracy": None if math.isnan(acc) else acc, "lr": lr, "grad_norm": gnorm.item(),
               "reward_margin": (ga - gb).abs().mean().item()}
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch and val:
            ev = evaluate(rm, val, args.score_batch_size, tok.pad_id, device, autocast, d)
            row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
        if d.main:
            log.write(**row)
        bar.set_postfix(loss=f"{row['loss']:.3f}",
                        **({"val_acc": row["val_accuracy"]} if "val_accuracy" in row else {}))
        bar.update(1)
        stop_now = args.stop_after_steps is not None and step >= args.stop_after_steps and step < total
        if step < total and ((args.save_every and step % args.save_every == 0) or
                             (not args.save_every and end_of_epoch) or stop_now):
            save(step)
        if stop_now:
            bar.close()
            if d.main:
                print(f"stopped after --stop-after-steps at step {step}; rerun without it to continue")
            distributed.finish(d)
            return 0
    bar.close()
    rm.eval()
    ev_train = evaluate(rm, train, args.score_batch_size, tok.pad_id, device, autocast, d)
    ev_val = evaluate(rm, val, args.score_batch_size, tok.pad_id, device, autocast, d)
    times["reward_model_s"] = time.time() - t0

    # ---------------------------------------------------------------- stage 3: normalisation
    t0 = time.time()
    # The policy's samples: every distinct (prompt, response) in the preferences file.
    seqs = list(dict.fromkeys(tuple(s) for x in pairs for s in (x["a"], x["b"])))
    mean, std = reward_stats(rm, [list(s) for s in seqs], args.score_batch_size, tok.pad_id, device, autocast, d)
    check_finite(torch.tensor([mean, std]), "the reward statistics", step)
    # OpenAI lm-human-preferences (train_reward.py): target mean 0, std 1; gain = 1/std,
    # bias = -mean * gain, so that proj(h) * gain + bias = (r - mean) / std.
    gain = 1.0 / max(std, 1e-8)
    rm.head.gain.fill_(gain)
    rm.head.bias.fill_(-mean * gain)
    times["normalise_s"] = time.time() - t0
    result = {"train": ev_train, "held_out": ev_val, "steps": step, "skipped_too_long": skipped,
              "reward_mean_before_normalising": mean, "reward_std_before_normalising": std,
              "normalised_on": len(seqs)}
    save(step, {"rm_stage": "done", "result": result, "times": times, "policy": policy_name,
                "preferences": str(pref_path)}, with_state=False)
    if d.main:
        write_summary(out, args, stats, result, times, t_start)
    distributed.finish(d)
    return 0


def write_summary(out: Path, args, stats: dict, result: dict, times: dict, t_start: float) -> None:
    summary = {"held_out_accuracy": result["held_out"]["accuracy"], "held_out_pairs": result["held_out"]["pairs"],
               "train_accuracy": result["train"]["accuracy"], "train_pairs": result["train"]["pairs"],
               "held_out_loss": result["held_out"]["loss"], "feedback": stats, "reward_model": result,
               "seconds": {**times, "this_run": time.time() - t_start},
               "policy": args.policy, "feedback_model": args.feedback_model or args.policy,
               "rm_init": args.rm_init or args.policy, "cot": args.cot}
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("held_out_accuracy", "held_out_pairs", "train_accuracy")}
                     | {"order_agreement": stats["order_agreement"], "dropped_identical": stats["dropped_identical"],
                        "seconds": summary["seconds"]}))


if __name__ == "__main__":
    sys.exit(run_cli(main))
