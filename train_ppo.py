"""RL-CAI step: PPO against a reward (preference) model, with a KL penalty to the frozen reference.

    python train_ppo.py --out runs/ppo --reward-model runs/rm/rm --iterations 20

One visible loop in main, numbered like vwxyzjn/summarize_from_feedback_details ppo.py; each step
is a function below (the formulas are in minicai/rl.py, the padded-batch plumbing, the models and
the checkpoint in minicai/infra/ppo.py). Per iteration:

  1. rollout()           one response per prompt from the policy (left-padded prompts, KV cache)
  2. score()             the reward model at the last real token; the missing-EOS penalty
  3. logprobs_values()   log-probs under the policy and the reference, at the rollout temperature; values
  4-5. advantages()      r_t = -beta * KL_t, + the score at the last token; GAE (gamma 1, lambda 0.95),
                         returns = A + V; the advantages whitened
       or group_advantages()  --advantage rloo|grpo: k samples per prompt, no value function; each
                         response's advantage from the other samples of its prompt (below)
  6. update()            epochs x minibatches of clipped policy loss + vf_coef * clipped value loss
  7. log                 metrics.jsonl, a few samples, checkpoints (HF folder + value head + optimizer)

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
  --lr 1e-5                           Adam(W), eps 1e-5 (OpenAI, summarize_from_feedback_details); TRL 3e-6

Critic-free RL in the same loop (--advantage, default gae = PPO above). --batch-size stays the
number of episodes, so the compute per iteration is the same: B / k prompts, each sampled k times
(--k, default 4), rows g*k ... g*k + k - 1 being prompt g's samples.
  rloo   REINFORCE leave-one-out (Ahmadian et al. 2024, as TRL RLOOTrainer): R = score - beta * sum_t KL_t
         (the KL in the reward, summed over the response), A = R - mean of the prompt's other k - 1 R
  grpo   Shao et al. 2024 (DeepSeekMath; TRL GRPOTrainer): A = (score - group mean) / (group std + 1e-4),
         the KL to the reference as beta * k3 in the loss (--kl-penalty loss)
Both give every token of a response its response's advantage, keep the clipped ratio of step 6, and
train no value function (--value-model none; no value loss). Unless given, --kl-penalty,
--whiten-advantages and --value-model follow the method (method_defaults).

Data parallel: `torchrun --nproc_per_node N train_ppo.py ...` (DDP; gloo on CPU, NCCL on CUDA).
Lines marked `# [dist]` exist for it alone (in one process they change nothing): skip them on a
first reading. --batch-size is the global batch: rank r samples, scores and evaluates rows r, r + N,
... (steps 1-5; a row's sampling seed depends on its global index), rewards and advantages are
whitened with the global batch's statistics (all_reduce of sums), then every rank gathers the whole
batch. In step 6 rank r takes every N-th row of each minibatch; each loss divides its masked sum by
the minibatch's global token count / N (distributed.loss_denominator), so the DDP-averaged gradient
is the single-process one. Rank 0 alone logs and writes; tests/plumbing/test_distributed.py checks that 2
processes give the weights of 1.

Rerunning the same command resumes from OUT/ckpt (iteration, weights, optimizer, beta); the
prompts, sampling seeds and minibatch order of iteration i depend only on --seed and i, so a
resumed run is the same run. Use --overwrite to start over.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from minicai.infra import cli, distributed, train
from minicai.io.checkpoint import EMBEDDED_NAME, load_tokenizer
from minicai.io.data import check_prompt_lengths
from minicai.infra.ppo import (EOS_PENALTY_MODES, Models, Rollout, check_config, end_of_turn_id, gather_generation,
                               global_whiten_stats, iteration_metrics, load_checkpoint, load_models,
                               missing_eos_penalty, prompt_batch, response_forward, response_values,
                               reward_model_input, save_checkpoint, show_samples, token_reward, train_prompts,
                               write_summary)
from minicai.infra.train import MetricsLog, check_finite, drop_checkpoint, open_run
from minicai.infra.cli import run_cli
from minicai.model import last_token_scores
from minicai.rl import (ADVANTAGES, REWARD_AT, KLController, gae, gae_mask, grpo_advantages, kl_loss, kl_per_token,
                        masked_mean, masked_whiten, per_token_rewards, policy_loss, rloo_advantages,
                        sequence_advantages, value_loss)
from minicai.sample import generate, stable_seed


@dataclass
class ModelArgs:
    """models and data"""
    policy: str = field(default=EMBEDDED_NAME, metadata={"model": "lm"})
    """initial policy: an SL-CAI checkpoint (HF folder), a .gguf, or the embedded model's name"""
    ref: str | None = field(default=None, metadata={"model": "lm"})
    """frozen reference for the KL penalty (default: --policy)"""
    reward_model: str | None = field(default=None, metadata={"model": "reward"})
    """reward model folder (train_rm.py output: an HF folder with reward_head.safetensors)"""
    reward_token: str | None = None
    """instead of a reward model, a synthetic reward for tests and teaching: +1 when the response contains
    this text's single token, else 0"""
    prompts: list[str] | None = field(default=None, metadata={"repeat": True})
    """prompt source (repeatable): .jsonl/.csv/.txt, do-not-answer, harmbench, builtin-red-team,
    builtin-helpful (default: the two builtin sets)"""
    held_out_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of prompts kept for evaluation and never trained on (data.split, by hash)"""


@dataclass
class RolloutArgs:
    """1. rollout (--batch-size prompts = episodes per iteration, all ranks together under torchrun)"""
    iterations: int = field(default=20, metadata=cli.AT_LEAST_1)
    """PPO iterations (one batch of rollouts each)"""
    max_new_tokens: int = field(default=48, metadata=cli.AT_LEAST_1)
    """response length cap"""
    temperature: float = field(default=0.7, metadata=cli.POSITIVE)
    """sampling temperature; log-probs, KL and entropy use the same one (TRL, OpenAI: 0.7)"""


@dataclass
class ScoreArgs:
    """2. score"""
    no_eos_penalty: float | None = None
    """penalty for responses that hit --max-new-tokens without a stop token (default: none)"""
    no_eos_mode: str = field(default="subtract", metadata={"choices": EOS_PENALTY_MODES})
    """subtract: score - penalty (TRL missing_eos_penalty); replace: score = penalty
    (summarize_from_feedback_details penalty_reward_value, e.g. -1)"""
    score_truncated: str = field(default="close", metadata={"choices": ("close", "as_is")})
    """how the reward model reads a response without a stop token: close = append the end-of-turn marker
    to its input, as train_rm.py scored its training responses; as_is = read at the last generated token (TRL)"""
    score_clip: float | None = field(default=None, metadata=cli.POSITIVE)
    """clamp scores to [-c, c] (DeepSpeed-Chat 5, OpenRLHF 10; default: off, as TRL)"""


@dataclass
class KLArgs:
    """4. rewards and KL"""
    beta: float = field(default=0.05, metadata=cli.AT_LEAST_0)
    """KL coefficient (initial value if --kl-target)"""
    kl_target: float | None = field(default=None, metadata=cli.POSITIVE)
    """adaptive KL controller target (OpenAI: 6 nats); default: fixed beta (TRL)"""
    kl_horizon: int = field(default=10000, metadata=cli.AT_LEAST_1)
    """adaptive KL controller horizon (episodes)"""
    kl_estimator: str = field(default="k1", metadata={"choices": ("k1", "k3")})
    """per-token KL in the reward"""
    kl_penalty: str | None = field(default=None, metadata={"choices": ("reward", "loss")})
    """reward: r_t = -beta*KL_t (Ziegler et al., TRL); loss: beta * k3 KL term in the loss (GRPO);
    default: loss for --advantage grpo, else reward"""
    reward_at: str = field(default="last", metadata={"choices": REWARD_AT})
    """column that gets the score: the last real token, or the one after it (TRL)"""
    whiten_rewards: bool = False
    """scale the per-token rewards (OpenAI: on; TRL: off)"""


@dataclass
class AdvantageArgs:
    """5. advantages"""
    advantage: str = field(default="gae", metadata={"choices": ADVANTAGES})
    """gae: PPO with a learned value (GAE); rloo: leave-one-out baseline over k samples per prompt
    (Ahmadian et al. 2024); grpo: group mean/std normalised rewards (Shao et al. 2024)"""
    k: int | None = field(default=None, metadata=cli.AT_LEAST_1)
    """samples per prompt (rloo, grpo; default 4); --batch-size / k prompts per iteration"""
    gamma: float = field(default=1.0, metadata={"range": "[0, 1]"})
    """discount"""
    lam: float = field(default=0.95, metadata={"range": "[0, 1]"})
    """GAE lambda"""
    whiten_advantages: str | None = field(default=None, metadata={"choices": ("batch", "minibatch", "none")})
    """whiten advantages once per batch (TRL) or per minibatch (OpenAI); default: batch for gae, none for
    rloo and grpo (their baselines already centre the advantages)"""
    whiten_var: str = field(default="unbiased", metadata={"choices": ("unbiased", "biased")})
    """variance used by whitening: n-1 (TRL masked_var) or n (OpenAI tf.nn.moments)"""


@dataclass
class UpdateArgs:
    """6. PPO update (and --lr, --max-grad-norm under optimizer)"""
    ppo_epochs: int = field(default=4, metadata=cli.AT_LEAST_1)
    """passes over each batch"""
    num_minibatches: int = field(default=1, metadata=cli.AT_LEAST_1)
    """minibatches per epoch"""
    lr_anneal: bool = False
    """decay the learning rate linearly to 0"""
    clip: float = field(default=0.2, metadata=cli.POSITIVE)
    """policy ratio clip epsilon"""
    clip_v: float = field(default=0.2, metadata=cli.POSITIVE)
    """value clip epsilon"""
    vf_coef: float = field(default=0.1, metadata=cli.AT_LEAST_0)
    """weight of the value loss"""
    fused_logprobs: bool = False
    """steps 3 and 6: the response tokens' log-probs and entropies through infra.fast.linear_logprobs
    (the LM head fused with the softmax; same numbers, no (B, G, V) fp32 logits) instead of full
    logits + rl.logprobs_from_logits (docs/benchmarks.md, 'PPO iteration')"""
    value_model: str | None = field(default=None, metadata={"choices": ("shared", "separate", "none")})
    """shared: a zero-init value head on the policy trunk (3 models resident); separate: a trainable copy
    of the reward model (4 models; needs --reward-model); none: no value function (rloo, grpo);
    default: shared for gae, none for rloo and grpo"""


@dataclass
class Args:
    models: ModelArgs = field(default_factory=ModelArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    scoring: ScoreArgs = field(default_factory=ScoreArgs)
    kl: KLArgs = field(default_factory=KLArgs)
    adv: AdvantageArgs = field(default_factory=AdvantageArgs)
    ppo: UpdateArgs = field(default_factory=UpdateArgs)
    run: cli.RunArgs = field(default_factory=lambda: cli.RunArgs(save_every=5))
    optim: cli.OptimArgs = field(default_factory=lambda: cli.OptimArgs(lr=1e-5, warmup=0, batch_size=8))
    sample_every: int = field(default=5, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """7. log: print a few samples every N iterations"""
    HELP = {"batch_size": "prompts (= episodes) per iteration, all ranks together under torchrun",
            "lr": "Adam(W) learning rate (OpenAI 1e-5; TRL 3e-6)",
            "warmup": "must be 0: PPO's learning rate is constant (or --lr-anneal)",
            "save_every": "checkpoint every N iterations (and at the end)"}


def method_defaults(args: Args) -> Args:
    """The flags that follow --advantage unless given (None): where the KL goes, whether advantages
    are whitened, the value function, and k; resolved before the run's config is recorded."""
    a, gae_ = args.adv, args.adv.advantage == "gae"
    args.kl.kl_penalty = args.kl.kl_penalty or ("loss" if a.advantage == "grpo" else "reward")
    a.whiten_advantages = a.whiten_advantages or ("batch" if gae_ else "none")
    args.ppo.value_model = args.ppo.value_model or ("shared" if gae_ else "none")
    a.k = a.k or (1 if gae_ else 4)
    return args


def rollout(m: Models, prompts: list[list[int]], it: int, args: Args, d) -> Rollout:
    """Step 1: one response per prompt (B prompts' ids) from the policy (sample.generate: left-padded
    prompts, static KV cache; a row ends at its first stop token). Row b's seed is stable_seed(seed,
    "ppo", it, b): a resumed run, and any number of ranks, draw the same rows. Returns the Rollout
    of all B rows (seq (B, P+G), mask (B, G), stopped (B,)), on every rank."""
    mine = distributed.shard(list(range(len(prompts))), d)  # [dist] rows r, r + N, ...
    m.trained.eval()  # no dropout anywhere in this model; eval() only documents that it must be off
    with torch.no_grad(), m.autocast(args.run.bf16):
        gen = generate(m.policy, [prompts[b] for b in mine], args.rollout.max_new_tokens,
                       temperature=args.rollout.temperature, stop_ids=m.tok.stop_ids, pad_id=m.tok.pad_id,
                       seed=[stable_seed(args.run.seed, "ppo", it, b) for b in mine])
    return Rollout.of(gather_generation(gen, prompts, m.tok.pad_id, d))  # [dist] all B rows on every rank


def score(m: Models, r: Rollout, args: Args) -> tuple[Tensor, Tensor]:
    """Step 2: the reward model at the last real token of prompt + response (model.last_token_scores;
    --score-truncated close: a truncated response is read closed with the end-of-turn marker), or
    the --reward-token reward; then the missing-EOS penalty and the clip. Returns (raw_score (b,),
    score (b,)) of the b rows of r."""
    sc = args.scoring
    with torch.no_grad(), m.autocast(args.run.bf16):
        if isinstance(m.reward, int):  # --reward-token
            raw = token_reward(r.seq, r.mask, m.reward)  # (b,)
        else:
            end_id = end_of_turn_id(m.tok) if sc.score_truncated == "close" else None
            raw = last_token_scores(m.reward, *reward_model_input(r.seq, r.attn_mask, r.stopped, end_id))  # (b,)
    out = missing_eos_penalty(raw, r.stopped, sc.no_eos_penalty, sc.no_eos_mode)  # (b,)
    if sc.score_clip is not None:  # DeepSpeed-Chat clamps to [-5, 5], OpenRLHF to (-10, 10)
        out = out.clamp(-sc.score_clip, sc.score_clip)
    return raw, out


def logprobs_values(m: Models, r: Rollout, args: Args) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3: log-probs of the sampled tokens under the policy and the reference at the rollout
    temperature (else the first ratio is not 1: https://github.com/huggingface/trl/issues/2358), and
    values V(prompt + response[:t]). Returns (logprobs, ref_logprobs, values), (b, G) each; values is
    None without a value function (rloo, grpo)."""
    T = args.rollout.temperature
    with torch.no_grad(), m.autocast(args.run.bf16):
        fused = args.ppo.fused_logprobs
        out = response_forward(m.policy, r.seq, r.attn_mask, r.P, T, m.value_head, fused=fused)
        ref_logp = response_forward(m.ref, r.seq, r.attn_mask, r.P, T, fused=fused).logprobs  # (b, G)
        values = out.values if m.value_model is None else response_values(m.value_model, r.seq, r.attn_mask, r.P)
    return out.logprobs, ref_logp, values


def advantages(r: Rollout, beta: float, args: Args, d) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Steps 4-5 on the b rows of r (score, logprobs, ref_logprobs, values filled in).
    4. Ziegler et al. 2019 eq. 2 (rl.per_token_rewards): r_t = -beta * KL_t on real tokens (none with
       --kl-penalty loss), + the score at one column (rl.score_index); --whiten-rewards scales them.
    5. GAE, Schulman et al. 2016 eq. 16 (rl.gae, the backward loop; infra.fast.gae_vectorized is its tested matmul twin): delta_t = r_t + gamma V_{t+1} - V_t,
       A_t = delta_t + gamma lam A_{t+1}, V = 0 after the last token; returns = A + V; --whiten-advantages
       batch (TRL) whitens A. Returns (kl, gae_mask, rewards, advantages, returns), (b, G) each."""
    ka, a = args.kl, args.adv
    unbiased = a.whiten_var == "unbiased"
    kl = kl_per_token(r.logprobs, r.ref_logprobs, ka.kl_estimator)  # (b, G) k1 = logp - ref_logp
    gmask = gae_mask(r.mask, ka.reward_at)  # (b, G) mask, plus the score column for eos_plus_one
    rewards = per_token_rewards(r.score, kl, r.mask, beta if ka.kl_penalty == "reward" else 0.0, ka.reward_at)
    if ka.whiten_rewards:  # OpenAI: scale only, the mean is added back
        rewards = masked_whiten(rewards, gmask, shift_mean=False, unbiased=unbiased,
                                stats=global_whiten_stats(rewards, gmask, d, unbiased))  # [dist] stats
    adv, returns = gae(rewards, r.values, gmask, a.gamma, a.lam)  # (b, G), (b, G)
    if a.whiten_advantages == "batch":
        adv = masked_whiten(adv, r.mask, unbiased=unbiased,
                            stats=global_whiten_stats(adv, r.mask, d, unbiased))  # [dist] stats
    return kl, gmask, rewards, adv, returns


def group_advantages(r: Rollout, beta: float, args: Args) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
    """Steps 4-5 for --advantage rloo|grpo on all B rows of r (groups of k consecutive rows = one prompt).
    4. The per-token rewards of step 4 (-beta * KL_t with --kl-penalty reward, + the score at the last
       token), summed over the response: R = score - beta * sum_t KL_t (TRL rloo_trainer.py
       `rlhf_reward = scores + non_score_reward`); with --kl-penalty loss (GRPO) R = score.
    5. RLOO (rl.rloo_advantages) or GRPO (rl.grpo_advantages) on R (B,), the same on every real token
       of the row (rl.sequence_advantages); --whiten-advantages batch whitens them too.
    Returns (kl, mask, rewards, advantages, None): no value function, so no returns; (B, G) each."""
    ka, a = args.kl, args.adv
    kl = kl_per_token(r.logprobs, r.ref_logprobs, ka.kl_estimator)  # (B, G)
    rewards = per_token_rewards(r.score, kl, r.mask, beta if ka.kl_penalty == "reward" else 0.0)  # (B, G)
    R = rewards.sum(1)  # (B,) padding holds 0
    seq_adv = rloo_advantages(R, a.k) if a.advantage == "rloo" else grpo_advantages(R, a.k)  # (B,)
    adv = sequence_advantages(seq_adv, r.mask)  # (B, G)
    if a.whiten_advantages == "batch":
        adv = masked_whiten(adv, r.mask, unbiased=a.whiten_var == "unbiased")
    return kl, r.mask, rewards, adv, None


def minibatches(r: Rollout, it: int, args: Args):
    """Step 6's minibatches of the batch r (B rows): each epoch a permutation of the rows (generator
    seeded by stable_seed(seed, "ppo-minibatch", it)) cut into --num-minibatches. Yields (epoch, j,
    rows (B/n,), their advantages (B/n, G)), whitened here with --whiten-advantages minibatch (OpenAI)."""
    B, n = len(r.seq), args.ppo.num_minibatches
    g = torch.Generator().manual_seed(stable_seed(args.run.seed, "ppo-minibatch", it))
    for epoch in range(args.ppo.ppo_epochs):
        perm = torch.randperm(B, generator=g)
        for j in range(n):  # the j-th minibatch of this epoch
            mb = perm[j * B // n:(j + 1) * B // n]
            adv = r.advantages[mb]
            if args.adv.whiten_advantages == "minibatch":
                adv = masked_whiten(adv, r.mask[mb], unbiased=args.adv.whiten_var == "unbiased")
            yield epoch, j, mb, adv


def ppo_loss(r: Rollout, adv, new_logp, new_values, entropy, beta: float, args: Args, d) -> tuple[Tensor, dict]:
    """A minibatch's loss on this rank's s rows r, given their advantages and the new log-probs, values,
    entropy (s, G): the clipped surrogate (Schulman et al. 2017 eq. 7) + vf_coef * the clipped value
    loss (OpenAI, TRL) [+ beta * GRPO's k3 KL, Shao et al. 2024 eqs. 3-4, with --kl-penalty loss],
    each a masked sum / (the minibatch's global token count / N) (distributed.loss_denominator).
    With no value function (rloo, grpo) the loss is the policy term [+ the KL term].
    Returns (loss, detached 0-d statistics with the same denominators)."""
    den, den_v = distributed.loss_denominator(r.mask, d), distributed.loss_denominator(r.gae_mask, d)  # [dist]
    pg, pg_stats = policy_loss(new_logp, r.logprobs, adv, r.mask, args.ppo.clip, denominator=den)
    if r.values is not None:
        vf, vf_stats = value_loss(new_values, r.values, r.returns, r.gae_mask, args.ppo.clip_v, denominator=den_v)
    else:  # rloo, grpo: no value function
        vf, vf_stats = torch.zeros(()), {"vf_clipfrac": torch.zeros(())}
    loss, kl = pg + args.ppo.vf_coef * vf, torch.zeros(())
    if args.kl.kl_penalty == "loss":
        kl = kl_loss(new_logp, r.ref_logprobs, r.mask, denominator=den)  # differentiable in new_logp
        loss = loss + beta * kl
    stats = {"pg_loss": pg, "vf_loss": vf, "kl_loss": kl, "entropy": masked_mean(entropy, r.mask, denominator=den),
             **pg_stats, **vf_stats}
    return loss, {k: v.detach() for k, v in stats.items()}


def update(m: Models, ddp, opt, r: Rollout, beta: float, it: int, args: Args, d) -> list[dict]:
    """Step 6: --ppo-epochs x --num-minibatches optimizer steps on `ppo_loss` over the batch r (B rows),
    gradient norm clipped to --max-grad-norm; ddp: m.trained (DDP-wrapped under torchrun). Returns
    each minibatch's statistics; the first's first_ratio_dev = max |log ratio| is 0 exactly when
    nothing moved since the rollout (https://github.com/huggingface/trl/issues/454)."""
    m.trained.train()
    stats = []
    for epoch, j, mb, adv in minibatches(r, it, args):  # (B/n,) global rows, (B/n, G)
        share, adv = distributed.shard(mb, d), distributed.shard(adv, d)  # [dist] (s,), (s, G) this rank's rows
        rs = r.rows(share)
        with m.autocast(args.run.bf16):
            new_logp, new_values, entropy = ddp(rs.seq, rs.attn_mask, rs.P, args.rollout.temperature)  # (s, G)
        loss, mb_stats = ppo_loss(rs, adv, new_logp, new_values, entropy, beta, args, d)
        check_finite(loss.detach(), "PPO loss", it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mb_stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(m.trained.parameters(), args.optim.max_grad_norm)
        opt.step()
        if epoch == 0 and j == 0:
            mb_stats["first_ratio_dev"] = (new_logp.detach() - rs.logprobs)[rs.mask].abs().max()
        stats.append(mb_stats)
    return stats


def main(argv=None) -> int:
    args = method_defaults(cli.parse(Args, argv, description=__doc__))
    device, _, d = train.start(args.run)  # [dist] the process group: a single process unless started by torchrun
    check_config(cli.config(args), d.world)
    prompts = train_prompts(args.models.prompts, args.models.held_out_fraction)  # before the run folder
    check_prompt_lengths(prompts, *load_tokenizer(args.models.policy))  # a too-long one: its file and line
    a = args.models  # the models too: a reward token of two tokens or another tokenizer writes no folder
    m = load_models(a.policy, a.ref, a.reward_model, a.reward_token, args.ppo.value_model, device,
                    args.ppo.fused_logprobs)
    out, B, n_it = open_run(args, Args, d), args.optim.batch_size, args.rollout.iterations
    ckpt = out / "ckpt"
    if (out / "model" / "config.json").exists() and (out / "ppo_summary.json").exists():
        if d.main:
            print(f"PPO already done: {out / 'model'}")
        distributed.finish(d)  # [dist]
        return 0
    ddp = distributed.wrap(m.trained, d)  # [dist] DDP under torchrun; the module itself in one process
    prompt_ids = [m.tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0] for p in prompts]
    # summarize_from_feedback_details / OpenAI: Adam with eps 1e-5, one optimizer for policy and values;
    # fused: one kernel for all parameters (HF Trainer's default on torch >= 2.8), the same update
    opt = torch.optim.AdamW(m.trained.parameters(), lr=args.optim.lr, eps=1e-5, weight_decay=args.optim.weight_decay,
                            fused=True)
    kl_ctl = KLController(args.kl.beta, args.kl.kl_target, args.kl.kl_horizon)
    start, kl_ctl.value = load_checkpoint(ckpt, m, opt) or (0, kl_ctl.value)  # resume: weights, optimizer, beta
    if start and d.main:
        print(f"resuming at iteration {start}/{n_it} from {ckpt}")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start or None) if d.main else None
    bar = tqdm(range(start, n_it), initial=start, total=n_it, desc="PPO", unit="it", disable=not d.main)
    for it in bar:
        t0 = time.perf_counter()
        k = args.adv.k  # samples per prompt (1 for gae)
        # this iteration's prompts depend on (seed, it) only; prompt g fills rows g*k ... g*k + k - 1
        idx = [i for i in prompt_batch(len(prompts), B // k, it, args.run.seed) for _ in range(k)]  # (B,)
        # ---- 1. rollout: all B rows, on every rank
        r = rollout(m, [prompt_ids[i] for i in idx], it, args, d)
        t1 = time.perf_counter()
        mine = r.rows(distributed.shard(torch.arange(B), d))  # [dist] steps 2-5 on this rank's rows
        # ---- 2. score; 3. log-probs (policy, reference) and values
        mine.raw_score, mine.score = score(m, mine, args)  # (b,), (b,)
        mine.logprobs, mine.ref_logprobs, mine.values = logprobs_values(m, mine, args)  # (b, G) each
        t2 = time.perf_counter()
        # ---- 4-5. per-token rewards, GAE, whitened advantages (or, critic-free, the group baselines)
        beta = kl_ctl.value
        if args.adv.advantage == "gae":
            mine.kl, mine.gae_mask, mine.rewards, mine.advantages, mine.returns = advantages(mine, beta, args, d)
            r = mine.gather(d)  # [dist] every rank holds the whole batch for the update and the log
        else:
            r = mine.gather(d)  # [dist] first: a prompt's k rows may lie on different ranks
            r.kl, r.gae_mask, r.rewards, r.advantages, r.returns = group_advantages(r, beta, args)
        # ---- 6. PPO update
        if args.ppo.lr_anneal:  # CleanRL / summarize_from_feedback_details: lr * (1 - it / iterations)
            opt.param_groups[0]["lr"] = args.optim.lr * (1.0 - it / n_it)
        stats = update(m, ddp, opt, r, beta, it, args, d)
        t3 = time.perf_counter()
        # ---- 7. log; beta follows the measured KL (Ziegler et al. 2019 §2.2, OpenAI AdaptiveKLController)
        row = {"step": it + 1, **iteration_metrics(r, stats, beta, d), "lr": opt.param_groups[0]["lr"],
               "time/rollout": t1 - t0, "time/score_ref_values": t2 - t1, "time/update": t3 - t2}
        kl_ctl.update(row["objective/kl"], B)
        row["time/iteration"] = time.perf_counter() - t0
        if d.main:
            log.write(**row)  # before the checkpoint: a resumed run drops rows after its checkpoint
        if (it + 1) % args.run.save_every == 0 or it + 1 == n_it:
            save_checkpoint(ckpt, m, d, opt=opt, iteration=it + 1, beta=kl_ctl.value)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}")
        if d.main and ((it + 1) % args.sample_every == 0 or it == start):
            show_samples(r, [prompts[i].text for i in idx], m.tok, it)
    bar.close()
    save_checkpoint(out / "model", m, d, iteration=n_it)
    if d.main:
        write_summary(out, n_it, d)
        drop_checkpoint(ckpt, args.run.keep_checkpoint)
        print(f"done: {out / 'model'} (policy + value head); metrics in {out / 'metrics.jsonl'}")
    del ddp  # [dist] DDP's reducer goes before the process group it holds, not at interpreter exit
    distributed.finish(d)  # [dist]
    return 0


def command() -> int:
    """The installed command (pyproject.toml's [project.scripts]): main with one-line errors."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(command())
