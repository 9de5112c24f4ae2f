"""RL-CAI step: PPO against a reward (preference) model, with a KL penalty to the frozen reference.

    python train_ppo.py --out runs/ppo --reward-model runs/rm/rm --iterations 20

One visible loop, numbered like vwxyzjn/summarize_from_feedback_details ppo.py; the formulas are
in minicai/rl.py, the padded-batch plumbing in minicai/infra/ppo.py. Per iteration:

  1. rollout   sample one response per prompt from the policy (left-padded prompts, static KV
               cache); a row ends at its first stop token (Generation.mask covers it).
  2. score     reward model on prompt + response, read at the last real token; optional
               missing-EOS penalty (--no-eos-penalty, --no-eos-mode subtract|replace).
  3. forward   log-probs of the response under the policy and the frozen reference, at the
               rollout temperature; values.
  4. rewards   r_t = -beta * KL_t on real tokens, + score at the last token (or the one after it).
  5. GAE       advantages (gamma = 1, lambda = 0.95), returns = A + V, advantages whitened.
  6. PPO       epochs x minibatches of clipped policy loss + vf_coef * clipped value loss.
  7. log       metrics.jsonl, a few samples, checkpoints (HF folder + value head + optimizer).

Conventions on which the references disagree are switches (defaults first):
  --reward-at last|eos_plus_one       score at the last real token (OpenAI, DeepSpeed-Chat) or at the
                                      first padding column after it (TRL)
  --whiten-var unbiased|biased        Bessel-corrected variance (TRL) or not (OpenAI's TF code)
  --whiten-advantages batch|minibatch|none   once per batch (TRL) or in each minibatch (OpenAI)
  --kl-penalty reward|loss            -beta*KL in the per-token reward (Ziegler et al.; TRL) or
                                      beta * k3 KL added to the loss, no KL in the reward (GRPO)
  --kl-estimator k1|k3                the per-token KL estimate in the reward (k1: TRL/OpenAI)
  --no-eos-mode subtract|replace      TRL subtracts the penalty; summarize_from_feedback_details
                                      replaces the score with it
  --score-truncated close|as_is       the reward model reads a truncated response closed with the
                                      end-of-turn marker (as train_rm.py trained it) or as it is (TRL)
  --value-model shared|separate       value head on the policy trunk, or a copy of the reward model

Data parallel: `torchrun --nproc_per_node N train_ppo.py ...` (DistributedDataParallel; gloo on
CPU, NCCL on CUDA). --batch-size stays the global batch: rank r samples, scores and evaluates rows
r, r + N, ... (steps 1-5; the sampling seed of a row depends on its global index), rewards and
advantages are whitened with the global batch's statistics (all_reduce of sums), then the rollout
is gathered so that every rank holds the whole batch (B x (P + G) numbers: small). In step 6 rank r
takes every N-th row of each global minibatch; each rank's token-mean loss is weighted by its share
of the minibatch's tokens, so the DDP-averaged gradient is the gradient of the single-process loss.
The reference and reward models are frozen copies on every rank; rank 0 alone logs and writes.
tests/test_distributed.py checks that 2 processes give the weights of 1 process.

Rerunning the same command resumes from OUT/ckpt (iteration, weights, optimizer, beta); the
prompts, sampling seeds and minibatch order of iteration i depend only on --seed and i, so a
resumed run is the same run. Use --overwrite to start over.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minicai.infra import distributed
from minicai.infra.checkpoint import EMBEDDED_NAME, load_head, load_model, load_scalar_model, save_hf
from minicai.infra.data import load_prompts, split
from minicai.model import ScalarHead, ScalarModel
from minicai.infra.ppo import (EOS_PENALTY_MODES, PolicyValue, RewardModelScore, TokenReward, check_same_shapes,
                         check_same_tokenizer, end_of_turn_id, gather_generation, global_whiten_stats,
                         missing_eos_penalty, prompt_batch, response_forward, response_values, rollout_batch)
from minicai.rl import (REWARD_AT, KLController, explained_variance, gae_mask, gae_vectorized, kl_per_token,
                        masked_mean, masked_whiten, per_token_rewards, policy_loss, value_loss)
from minicai.sample import generate
from minicai.infra.train import MetricsLog, check_finite, load_train_state, prepare_run_dir, run_cli, save_train_state
from minicai.infra.utils import InputError, atomic_write_json, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    g.add_argument("--policy", default=EMBEDDED_NAME,
                   help=f"initial policy: an SL-CAI checkpoint (HF folder), a .gguf, or '{EMBEDDED_NAME}'")
    g.add_argument("--ref", default=None, help="frozen reference for the KL penalty (default: --policy)")
    g.add_argument("--reward-model", default=None,
                   help="reward model folder (train_rm.py output: an HF folder with reward_head.safetensors)")
    g.add_argument("--reward-token", default=None,
                   help="instead of a reward model, a synthetic reward for tests and teaching: +1 when the "
                        "response contains this text's single token, else 0")
    g.add_argument("--prompts", action="append", default=None,
                   help="prompt source (repeatable): .jsonl/.csv/.txt, do-not-answer, harmbench, builtin-red-team, "
                        "builtin-helpful (default: the two builtin sets)")
    g.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="share of prompts kept for evaluation and never trained on (data.split, by hash)")
    g = p.add_argument_group("1. rollout")
    g.add_argument("--iterations", type=int, default=20, help="PPO iterations (one batch of rollouts each)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="prompts (= episodes) per iteration, all ranks together under torchrun")
    g.add_argument("--max-new-tokens", type=int, default=48, help="response length cap")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; log-probs, KL and entropy use the same one (TRL, OpenAI: 0.7)")
    g = p.add_argument_group("2. score")
    g.add_argument("--no-eos-penalty", type=float, default=None,
                   help="penalty for responses that hit --max-new-tokens without a stop token (default: none)")
    g.add_argument("--no-eos-mode", choices=EOS_PENALTY_MODES, default="subtract",
                   help="subtract: score - penalty (TRL missing_eos_penalty); replace: score = penalty "
                        "(summarize_from_feedback_details penalty_reward_value, e.g. -1)")
    g.add_argument("--score-truncated", choices=["close", "as_is"], default="close",
                   help="how the reward model reads a response without a stop token: close = append the "
                        "end-of-turn marker to its input, as train_rm.py scored its training responses; as_is = "
                        "read at the last generated token (TRL)")
    g.add_argument("--score-clip", type=float, default=None,
                   help="clamp scores to [-c, c] (DeepSpeed-Chat 5, OpenRLHF 10; default: off, as TRL)")
    g = p.add_argument_group("4. rewards and KL")
    g.add_argument("--beta", type=float, default=0.05, help="KL coefficient (initial value if --kl-target)")
    g.add_argument("--kl-target", type=float, default=None,
                   help="adaptive KL controller target (OpenAI: 6 nats); default: fixed beta (TRL)")
    g.add_argument("--kl-horizon", type=int, default=10000, help="adaptive KL controller horizon (episodes)")
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1", help="per-token KL in the reward")
    g.add_argument("--kl-penalty", choices=["reward", "loss"], default="reward",
                   help="reward: r_t = -beta*KL_t (Ziegler et al., TRL); loss: beta * k3 KL term in the loss (GRPO)")
    g.add_argument("--reward-at", choices=REWARD_AT, default="last",
                   help="column that gets the score: the last real token, or the one after it (TRL)")
    g.add_argument("--whiten-rewards", action="store_true", help="scale the per-token rewards (OpenAI: on; TRL: off)")
    g = p.add_argument_group("5. advantages")
    g.add_argument("--gamma", type=float, default=1.0, help="discount")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    g.add_argument("--whiten-advantages", choices=["batch", "minibatch", "none"], default="batch",
                   help="whiten advantages once per batch (TRL) or per minibatch (OpenAI)")
    g.add_argument("--whiten-var", choices=["unbiased", "biased"], default="unbiased",
                   help="variance used by whitening: n-1 (TRL masked_var) or n (OpenAI tf.nn.moments)")
    g = p.add_argument_group("6. PPO update")
    g.add_argument("--ppo-epochs", type=int, default=4, help="passes over each batch")
    g.add_argument("--num-minibatches", type=int, default=1, help="minibatches per epoch")
    g.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (OpenAI 1e-5; TRL 3e-6)")
    g.add_argument("--lr-anneal", action="store_true", help="decay the learning rate linearly to 0")
    g.add_argument("--clip", type=float, default=0.2, help="policy ratio clip epsilon")
    g.add_argument("--clip-v", type=float, default=0.2, help="value clip epsilon")
    g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this")
    g.add_argument("--value-model", choices=["shared", "separate"], default="shared",
                   help="shared: a zero-init value head on the policy trunk (3 models resident); separate: "
                        "a trainable copy of the reward model (4 models; needs --reward-model)")
    g = p.add_argument_group("7. run")
    g.add_argument("--seed", type=int, default=0, help="seed of prompt order, sampling and minibatch order")
    g.add_argument("--save-every", type=int, default=5, help="checkpoint every N iterations (and at the end)")
    g.add_argument("--sample-every", type=int, default=5, help="print a few samples every N iterations")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for every forward (weights stay fp32)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is much faster when another job "
                        "holds a core (waiting OpenMP threads stall every step)")
    g.add_argument("--overwrite", action="store_true", help="delete OUT if it holds a run with another config")
    return p


def check_args(args, world: int = 1) -> None:
    if (args.reward_model is None) == (args.reward_token is None):
        raise InputError("give exactly one of --reward-model PATH and --reward-token TEXT")
    if args.value_model == "separate" and args.reward_model is None:
        raise InputError("--value-model separate copies the reward model: it needs --reward-model")
    for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "save_every",
                 "sample_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size % args.num_minibatches:
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of "
                         f"--num-minibatches {args.num_minibatches}")
    if args.batch_size % (args.num_minibatches * world):
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of --num-minibatches x processes "
                         f"({args.num_minibatches} x {world}): every rank takes the same share of each minibatch")
    if args.temperature <= 0:
        raise InputError("--temperature must be > 0: PPO needs the sampling distribution's log-probs")
    if args.kl_target is not None and args.kl_target <= 0:
        raise InputError("--kl-target must be > 0")


def main(argv=None, probe=None) -> int:
    """probe(stage, tensors): optional hook for tests and notebooks, called with the rollout's
    tensors ("rollout", after step 5) and each minibatch's ("minibatch")."""
    args = build_parser().parse_args(argv)
    device, _ = resolve_device(args.device, "float32")
    d = distributed.init(device)  # single process unless started by torchrun
    device = distributed.rank_device(device, d)
    check_args(args, d.world)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items() if k not in ("overwrite",)}
    # prompts: the train side of the hash split; read before the run folder is made, so a typo
    # in a path is an error without side effects
    prompts = [p for spec in (args.prompts or ["builtin-red-team", "builtin-helpful"]) for p in load_prompts(spec)]
    prompts, _ = split(prompts, args.held_out_fraction)
    if not prompts:
        raise InputError("--prompts: no prompts left for training after the held-out split")
    out = Path(args.out)
    if d.main:
        prepare_run_dir(out, config, args.overwrite, resume_keys_ignored=("device", "threads", "save_every",
                                                                           "sample_every"), parser=build_parser())
    distributed.barrier(d)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    unbiased = args.whiten_var == "unbiased"

    # ---- models: policy (trained), reference (frozen), reward (frozen), values (trained)
    ref_path = args.ref or args.policy
    policy, tok, _ = load_model(args.policy, device=device)
    if ref_path == args.policy:
        ref = copy.deepcopy(policy)  # the initial policy, frozen (the SL-CAI model in the paper)
    else:
        ref, ref_tok, _ = load_model(ref_path, device=device)
        check_same_shapes(policy, ref, "the reference", ref_path)
        check_same_tokenizer(tok, ref_tok, "the reference", ref_path)
    ref.requires_grad_(False)
    if args.reward_model is not None:
        rm, rm_tok, _ = load_scalar_model(args.reward_model, head="reward", device=device)
        check_same_tokenizer(tok, rm_tok, "the reward model", args.reward_model)
        rm.requires_grad_(False)
        reward_fn = RewardModelScore(rm, end_of_turn_id(tok) if args.score_truncated == "close" else None)
    else:
        ids = tok.encode(args.reward_token)
        if len(ids) != 1:
            raise InputError(f"--reward-token {args.reward_token!r} is {len(ids)} tokens, not one")
        reward_fn = TokenReward(ids[0])
    # Value function. Default "shared": a value head on the policy's own trunk, as in OpenAI
    # lm-human-preferences (policy.py: Model(scalar_heads=['value'])). On a CPU this keeps three
    # models resident instead of four (anchors.md pain point 6) and costs no extra forward or
    # backward: the policy's hidden states give logits and values at once (~35% less compute per
    # iteration). "separate": a trainable copy of the reward model, trunk and head, as in TRL and
    # summarize_from_feedback_details (values start as the RM's reading of each prefix).
    value_head, value_model = None, None
    if args.value_model == "shared":
        value_head = ScalarHead(policy.cfg.dim).to(device)  # zero init: V = 0 at the start (OpenAI)
    else:
        value_model = ScalarModel(copy.deepcopy(rm.trunk), copy.deepcopy(rm.head)).requires_grad_(True)
        value_model.trunk.lm_head = None  # never used by a value model (DDP needs every parameter used)
    trained = PolicyValue(policy, value_head, value_model)  # what the optimizer (and DDP) sees
    params = list(trained.parameters())
    ddp = distributed.wrap(trained, d)  # DDP under torchrun; the module itself in one process

    # ---- prompts (loaded above), rendered as one user turn
    prompt_ids = [tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0] for p in prompts]

    # summarize_from_feedback_details / OpenAI: Adam with eps 1e-5, one optimizer for policy and values
    opt = torch.optim.Adam(params, lr=args.lr, eps=1e-5)
    kl_ctl = KLController(args.beta, args.kl_target, args.kl_horizon)
    start = 0
    ckpt = out / "ckpt"
    if (ckpt / "train_state.json").exists():  # resume: weights, optimizer, iteration, beta
        loaded, _, _ = load_model(str(ckpt), device=device)
        policy.load_state_dict(loaded.state_dict())
        if value_head is not None:
            value_head.load_state_dict(load_head(ckpt, "value", policy.cfg.dim).state_dict())
        else:
            value_model.load_state_dict(load_file(str(ckpt / "value_model.safetensors")))
        state = load_train_state(ckpt, opt)
        start, kl_ctl.value = state["step"], state["beta"]
        if d.main:
            print(f"resuming at iteration {start}/{args.iterations} from {ckpt}")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None) if d.main else None

    def save(folder: Path, iteration: int, with_state: bool):
        """Rank 0 writes (every rank holds the same weights); the others wait for it."""
        if not d.main:
            distributed.barrier(d)
            return

        def extra(tmp):
            if value_model is not None:
                save_file({k: v.contiguous() for k, v in value_model.state_dict().items()},
                          str(tmp / "value_model.safetensors"))
            if with_state:
                save_train_state(tmp, opt, iteration, {"beta": kl_ctl.value})
        save_hf(folder, policy, tok, heads={"value": value_head} if value_head is not None else None,
                meta={"stage": "ppo", "iteration": iteration, "policy": args.policy, "ref": ref_path,
                      "reward_model": args.reward_model, "value_model": args.value_model}, extra=extra)
        distributed.barrier(d)

    bar = tqdm(range(start, args.iterations), initial=start, total=args.iterations, desc="PPO", unit="it",
               disable=not d.main)
    for it in bar:
        t0 = time.perf_counter()
        B, mb_size = args.batch_size, args.batch_size // args.num_minibatches
        # ---- 1. rollout: sample from the current policy. Prompts and seeds depend only on (seed, it);
        # under torchrun this rank samples rows `mine` of the batch (every row, in one process)
        idx = prompt_batch(len(prompts), B, it, args.seed)
        mine = distributed.shard(torch.arange(B), d)  # (b,) global row numbers of this rank's rows
        trained.eval()  # no dropout anywhere in this model; eval() only documents that it must be off
        with torch.no_grad(), autocast():
            gen = generate(policy, [prompt_ids[idx[b]] for b in mine], args.max_new_tokens,
                           temperature=args.temperature, stop_ids=tok.stop_ids,
                           seed=[args.seed * 1_000_003 + it * B + b for b in mine.tolist()], pad_id=tok.pad_id)
        gen = gather_generation(gen, [prompt_ids[i] for i in idx], tok.pad_id, d)  # all B rows on every rank
        seq, attn_mask, P = rollout_batch(gen)  # (B, P+G), (B, P+G), prompt columns
        mask = gen.mask  # (B, G) bool: real response tokens, the stop token included
        t1 = time.perf_counter()

        # steps 2-5 on this rank's rows: (b, ...) tensors, gathered back to (B, ...) after step 5
        seq_m, att_m, mask_m = seq[mine], attn_mask[mine], mask[mine]  # (b, P+G), (b, P+G), (b, G)
        with torch.no_grad(), autocast():
            # ---- 2. score: reward model at the last real token (minicai.infra.ppo.RewardModelScore); with
            # --score-truncated close, a truncated response is read closed with the end-of-turn marker
            raw_score = reward_fn(seq_m, att_m, mask_m, gen.stopped[mine])  # (b,)
            # TRL subtracts --no-eos-penalty from the score; summarize_from_feedback_details replaces it
            score = missing_eos_penalty(raw_score, gen.stopped[mine], args.no_eos_penalty, args.no_eos_mode)  # (b,)
            if args.score_clip is not None:  # DeepSpeed-Chat clamps to [-5, 5], OpenRLHF to (-10, 10)
                score = score.clamp(-args.score_clip, args.score_clip)
            # ---- 3. log-probs of the sampled tokens under the policy and the reference, at the rollout
            # temperature (TRL #2358: else the first ratio is not 1); values V(prompt + response[:t])
            out_pi = response_forward(policy, seq_m, att_m, P, args.temperature, value_head)
            logp = out_pi.logprobs  # (b, G)
            ref_logp = response_forward(ref, seq_m, att_m, P, args.temperature).logprobs  # (b, G)
            if value_head is not None:
                values = out_pi.values  # (b, G) from the policy's own hidden states
            else:
                values = response_values(value_model, seq_m, att_m, P)  # (b, G)
        t2 = time.perf_counter()

        # ---- 4. per-token rewards. Ziegler et al. 2019 eq. 2: r_t = -beta * KL_t, + score at one column
        # (rl.score_index: the last real token, or TRL's first padding column after it)
        beta = kl_ctl.value
        kl = kl_per_token(logp, ref_logp, args.kl_estimator)  # (b, G) k1 = logp - ref_logp
        gmask = gae_mask(mask_m, args.reward_at)  # (b, G) mask, plus the score column for eos_plus_one
        kl_in_reward = args.kl_penalty == "reward"
        rewards = per_token_rewards(score, kl, mask_m, beta if kl_in_reward else 0.0, args.reward_at)  # (b, G)
        if args.whiten_rewards:  # OpenAI: scale only, the mean is added back (shift_mean=False)
            rewards = masked_whiten(rewards, gmask, shift_mean=False, unbiased=unbiased,
                                    stats=global_whiten_stats(rewards, gmask, d, unbiased))

        # ---- 5. GAE (Schulman et al. 2016 eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
        # A_t = delta_t + gamma lam A_{t+1}, V = 0 after the last token; returns = A + V
        adv, returns = gae_vectorized(rewards, values, gmask, args.gamma, args.lam)  # (b, G), (b, G)
        if args.whiten_advantages == "batch":  # TRL: once per batch, over the real response tokens
            adv = masked_whiten(adv, mask_m, unbiased=unbiased, stats=global_whiten_stats(adv, mask_m, d, unbiased))
        # every rank gets the whole batch (global row order) for the update and the log
        raw_score, score, logp, ref_logp, values, kl, gmask, rewards, adv, returns = (
            distributed.gather_rows(x, d) for x in (raw_score, score, logp, ref_logp, values, kl, gmask, rewards,
                                                    adv, returns))  # (B,) or (B, G)
        if probe:
            probe("rollout", dict(it=it, seq=seq, attn_mask=attn_mask, mask=mask, gae_mask=gmask, stopped=gen.stopped,
                                  raw_score=raw_score, score=score, logprobs=logp, ref_logprobs=ref_logp,
                                  values=values, kl=kl, rewards=rewards, advantages=adv, returns=returns))

        # ---- 6. PPO: epochs x minibatches, the minibatch order from a generator seeded by (seed, it)
        trained.train()
        if args.lr_anneal:  # CleanRL / summarize_from_feedback_details: lr * (1 - it / iterations)
            for group in opt.param_groups:
                group["lr"] = args.lr * (1.0 - it / args.iterations)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        stats = []
        for epoch in range(args.ppo_epochs):
            perm = torch.randperm(B, generator=g)
            for k in range(args.num_minibatches):
                mb = perm[k * mb_size:(k + 1) * mb_size]  # (mb_size,) global rows of this minibatch
                mb_adv = adv[mb]  # (mb_size, G)
                if args.whiten_advantages == "minibatch":  # OpenAI lm-human-preferences: inside the loss
                    mb_adv = masked_whiten(mb_adv, mask[mb], unbiased=unbiased)
                # this rank's share of the minibatch: every world-th row (all of it in one process)
                share, mb_adv = distributed.shard(mb, d), distributed.shard(mb_adv, d)  # (s,), (s, G)
                mb_mask, mb_gmask = mask[share], gmask[share]  # (s, G)
                with autocast():
                    new_logp, new_values, new_entropy = ddp(seq[share], attn_mask[share], P, args.temperature)  # (s, G)
                # Schulman et al. 2017 eq. 7, clipped surrogate; OpenAI/TRL clipped value loss
                pg_loss, pg_stats = policy_loss(new_logp, logp[share], mb_adv, mb_mask, args.clip)
                vf_loss, vf_stats = value_loss(new_values, values[share], returns[share], mb_gmask, args.clip_v)
                kl_loss = torch.zeros(())
                if not kl_in_reward:  # GRPO (Shao et al. 2024 eqs. 3-4): + beta * k3(pi || ref), differentiable
                    kl_loss = masked_mean(kl_per_token(new_logp, ref_logp[share], "k3"), mb_mask)
                # The losses are token means over this rank's rows. Weighted by the rank's share of the
                # minibatch's tokens, times world (DDP averages gradients over ranks), their gradient is
                # that of the token mean over the whole minibatch. One process: both weights are 1.
                w_pg = mb_mask.sum() * d.world / mask[mb].sum()
                w_vf = mb_gmask.sum() * d.world / gmask[mb].sum()
                loss = w_pg * pg_loss + args.vf_coef * w_vf * vf_loss
                if not kl_in_reward:
                    loss = loss + beta * w_pg * kl_loss
                check_finite(loss.detach(), "PPO loss", it)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                # statistics stay tensors here (no host sync per minibatch); read once at step 7
                # token means weighted like the losses, so that their sum over ranks / world is the token
                # mean over the minibatch (exact for means; ratio_var is the ranks' weighted mean)
                per_token = {"pg_loss": pg_loss, "kl_loss": kl_loss, "entropy": masked_mean(new_entropy, mb_mask),
                             "grad_norm": grad_norm, **pg_stats}  # grad_norm: the same on every rank
                stats.append({**{n: v.detach() * w_pg for n, v in per_token.items()},
                              **{n: v.detach() * w_vf for n, v in {"vf_loss": vf_loss, **vf_stats}.items()}})
                if epoch == 0 and k == 0:  # 1 exactly when nothing moved since the rollout (TRL #454)
                    stats[-1]["first_ratio_dev"] = (new_logp.detach() - logp[share])[mb_mask].abs().max()
                if probe:
                    probe("minibatch", dict(it=it, epoch=epoch, k=k, mb=share, advantages=mb_adv,
                                            new_logprobs=new_logp.detach(), old_logprobs=logp[share],
                                            loss=loss.detach(), pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(),
                                            kl_loss=kl_loss))
        t3 = time.perf_counter()

        # ---- 7. log: names as in summarize_from_feedback_details; KL summed over tokens, mean over rows
        seq_kl = (kl * mask).sum(1)  # (B,)
        non_score = (-beta * kl * mask).sum(1)  # (B,)
        row = {"step": it + 1, "objective/kl": seq_kl.mean().item(), "objective/scores": score.mean().item(),
               "objective/raw_scores": raw_score.mean().item(), "objective/non_score_reward": non_score.mean().item(),
               "objective/rlhf_reward": (score + non_score).mean().item(), "objective/beta": beta,
               "val/explained_variance": explained_variance(values, returns, gmask).item(),
               "val/mean": masked_mean(values, gmask).item(),
               "response/length": mask.sum(1).float().mean().item(),
               "response/eos_fraction": gen.stopped.float().mean().item(),
               "lr": opt.param_groups[0]["lr"], "time/rollout": t1 - t0, "time/score_ref_values": t2 - t1,
               "time/update": t3 - t2}
        names = {"approxkl": "policy/approxkl", "clipfrac": "policy/clipfrac", "entropy": "policy/entropy",
                 "ratio_mean": "policy/ratio_mean", "ratio_var": "policy/ratio_var", "vf_clipfrac": "val/clipfrac",
                 "pg_loss": "loss/policy", "vf_loss": "loss/value", "kl_loss": "loss/kl", "grad_norm": "grad_norm"}
        # minibatch statistics: the mean over minibatches, then the (weighted) mean over ranks
        means = torch.stack([sum(s[k2] for s in stats) / len(stats) for k2 in names]).float()  # (len(names),)
        means = distributed.all_reduce_sum(means, d) / d.world
        for k2, v in zip(names.values(), means.tolist()):
            row[k2] = v
        row["policy/first_ratio_max_dev"] = float(distributed.all_reduce_max(stats[0]["first_ratio_dev"], d))
        # Ziegler et al. 2019 §2.2 (OpenAI AdaptiveKLController): beta follows the measured KL
        kl_ctl.update(row["objective/kl"], B)
        row["time/iteration"] = time.perf_counter() - t0
        if d.main:
            log.write(**row)  # before the checkpoint: a resumed run drops rows after its checkpoint
        if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
            save(ckpt, it + 1, with_state=True)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}",
                        approxkl=f"{row['policy/approxkl']:.4f}")
        if d.main and ((it + 1) % args.sample_every == 0 or it == start):
            for b in range(min(2, B)):
                tqdm.write(f"[it {it + 1}] score {score[b].item():+.3f} | {prompts[idx[b]].text[:70]!r}\n"
                           f"    -> {tok.decode(gen.tokens[b][mask[b]].tolist())[:300]!r}")
    bar.close()
    save(out / "model", args.iterations, with_state=False)
    if d.main:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        summary = {"iterations": args.iterations, "first": rows[0] if rows else None,
                   "last": rows[-1] if rows else None, "world_size": d.world}
        atomic_write_json(out / "ppo_summary.json", summary)
        print(f"done: {out / 'model'} (policy + value_head.safetensors); metrics in {out / 'metrics.jsonl'}")
    distributed.finish(d)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
