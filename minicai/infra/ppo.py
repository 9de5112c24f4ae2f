"""Helpers for train_ppo.py: the padded (prompt + response) batch (`Rollout`), response log-probs
and values, the reward model's input and a synthetic reward, the missing-EOS penalty, the
checkpoint, and the sanity checks.

The PPO loop itself is in train_ppo.py (one visible loop); the math is in minicai/rl.py.

Layout of a rollout batch (B rows). Prompts are left-padded to P columns by `generate`, responses
are right-padded to G columns (`Generation.mask` is True on real response tokens, the stop token
included), so the concatenation has its real tokens contiguous in the middle:

    seq       = [pad pad p0 p1 p2 | r0 r1 r2 EOS pad pad]      (B, P + G)
    attn_mask = [ 0   0  1  1  1  |  1  1  1  1   0   0 ]      (B, P + G)

`Transformer.padded_forward` gives every real token its true RoPE position and hides the padding.
The logits that produced response token t sit at column P - 1 + t (the model predicts the next
token), so the response's logits and values are `hidden[:, P - 1 : -1]` (OpenAI lm-human-preferences
policy.py analyze_responses_op; TRL ppo_trainer.py `logits[:, context_length - 1 : -1]`): the value
of response column t is V(prompt + response[:t]), the state in which token t is chosen.
"""
from __future__ import annotations

import copy
import random
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..io.checkpoint import load_head, load_model, load_scalar_model, save_hf
from ..io.data import load_prompts, split
from ..io.files import atomic_write_json, read_jsonl
from ..model import ScalarHead, ScalarModel, Transformer, last_real_index
from ..rl import entropy_from_logits, explained_variance, logprobs_from_logits, masked_mean
from ..sample import Generation, pad
from . import distributed
from .fast import linear_logprobs
from .train import load_train_state, save_train_state

# --------------------------------------------------------------------------------------------
# which prompts, the padded batch and the forward passes
# --------------------------------------------------------------------------------------------


def prompt_batch(n: int, batch: int, iteration: int, seed: int) -> list[int]:
    """Indices (into n prompts) of the `batch` prompts of `iteration`: passes over the prompt list,
    pass e shuffled by Random(f"{seed}:{e}"), read back to back. Depends only on its arguments, so a
    resumed run sees the same prompts as an uninterrupted one."""
    out: list[int] = []
    pos = iteration * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        take = order[offset:offset + batch - len(out)]
        out += take
        pos += len(take)
    return out


def rollout_batch(gen: Generation) -> tuple[Tensor, Tensor, int]:
    """(seq (B, P+G), attn_mask (B, P+G) long, P) from a Generation: prompt and response side by
    side, 1 on real tokens (left-padded prompt, right-padded response)."""
    seq = torch.cat([gen.prompt_ids, gen.tokens], dim=1)  # (B, P+G)
    attn_mask = torch.cat([gen.prompt_mask.long(), gen.mask.long()], dim=1)  # (B, P+G)
    return seq, attn_mask, gen.prompt_ids.shape[1]


@dataclass
class Rollout:
    """One PPO batch of B rows (episodes): the padded prompt + response and, filled by steps 2-5 of
    train_ppo.py, everything PPO derives from it. Tensors are (B, ...) in the batch's row order;
    under torchrun a rank holds `rows(...)` of it during steps 2-5, then `gather`s it back."""
    seq: Tensor
    """(B, P+G) left-padded prompt ids, then right-padded response ids."""
    attn_mask: Tensor
    """(B, P+G) long, 1 on real tokens."""
    P: int
    """prompt columns; response token t is column P + t."""
    mask: Tensor
    """(B, G) bool: real response tokens, the stop token included (a prefix of each row)."""
    stopped: Tensor
    """(B,) bool: the row ended on a stop token (False: it hit --max-new-tokens)."""
    raw_score: Tensor | None = None
    """(B,) the reward model's (or the synthetic reward's) score."""
    score: Tensor | None = None
    """(B,) the score after the missing-EOS penalty and the clip."""
    logprobs: Tensor | None = None
    """(B, G) log pi_old(token t) at the rollout temperature."""
    ref_logprobs: Tensor | None = None
    """(B, G) log pi_ref(token t), same temperature."""
    values: Tensor | None = None
    """(B, G) V_old(prompt + response[:t])."""
    kl: Tensor | None = None
    """(B, G) per-token KL estimate (--kl-estimator)."""
    gae_mask: Tensor | None = None
    """(B, G) bool: where GAE and the value loss run (mask, plus the score column for eos_plus_one)."""
    rewards: Tensor | None = None
    """(B, G) per-token rewards."""
    advantages: Tensor | None = None
    """(B, G) GAE advantages (whitened per --whiten-advantages batch)."""
    returns: Tensor | None = None
    """(B, G) advantages + values (before whitening)."""

    @classmethod
    def of(cls, gen: Generation) -> "Rollout":
        seq, attn_mask, P = rollout_batch(gen)
        return cls(seq, attn_mask, P, gen.mask, gen.stopped)

    def _map(self, f) -> "Rollout":
        return replace(self, **{k.name: f(getattr(self, k.name)) for k in fields(self)
                                if isinstance(getattr(self, k.name), Tensor)})

    def rows(self, idx: Tensor) -> "Rollout":
        """The rows idx (b,) of every tensor."""
        return self._map(lambda x: x[idx])

    def gather(self, d: distributed.Dist) -> "Rollout":
        """Data parallel: undo rows(distributed.shard(arange(B), d)); every rank gets all B rows in
        global order (distributed.gather_rows). Single process: self."""
        return self if d.world == 1 else self._map(lambda x: distributed.gather_rows(x, d))


def gather_generation(gen: Generation, prompts: list[list[int]], pad_id: int, d: distributed.Dist) -> Generation:
    """Data parallel: rank r sampled rows r, r + world, ... of the global batch (`prompts` is the
    whole batch's prompt ids). Returns the global Generation laid out exactly as one process
    sampling every row would have laid it out: prompts left-padded to the longest prompt of the
    whole batch, responses right-padded to the longest response. Single process: gen itself."""
    if d.world == 1:
        return gen
    dev = gen.tokens.device
    G = int(distributed.all_reduce_max(torch.tensor(gen.tokens.shape[1], device=dev), d))
    extra = G - gen.tokens.shape[1]
    tokens = distributed.gather_rows(F.pad(gen.tokens, (0, extra), value=pad_id), d)  # (B, G)
    logprobs = distributed.gather_rows(F.pad(gen.logprobs, (0, extra)), d)  # (B, G)
    mask = distributed.gather_rows(F.pad(gen.mask, (0, extra)), d)  # (B, G) bool
    stopped = distributed.gather_rows(gen.stopped, d)  # (B,)
    ids, pmask = pad(prompts, pad_id, "left", dev)  # (B, P) the global left padding
    return Generation(ids, pmask, tokens, logprobs, mask, stopped)


def global_whiten_stats(x: Tensor, mask: Tensor, d: distributed.Dist, unbiased: bool):
    """(mean, var) of x over the real tokens of every rank's rows, for masked_whiten(stats=):
    each rank's (sum, sum of squares, count) are summed with all_reduce, so every rank whitens with
    the statistics of the global batch. Single process: None (masked_whiten's own two-pass stats)."""
    if d.world == 1:
        return None
    s, ss, n = (distributed.all_reduce_sum(t, d) for t in masked_moments(x.float(), mask))
    return mean_var_from_moments(s, ss, n, unbiased)


@dataclass
class ResponseOut:
    logprobs: Tensor
    """(B, G) fp32 log pi(response token t), at the rollout temperature."""
    values: Tensor | None
    """(B, G) fp32 V(state before token t), when a value head was given."""
    entropy: Tensor | None
    """(B, G) entropy of softmax(logits / temperature), when asked for (no gradient)."""


def response_forward(model: Transformer, seq: Tensor, attn_mask: Tensor, context_len: int, temperature: float,
                     value_head: ScalarHead | None = None, entropy: bool = False, fused: bool = False) -> ResponseOut:
    """One full forward of `model` over the padded (prompt + response) batch; returns the response
    tokens' log-probs under softmax(logits / temperature) and, with `value_head`, the values read
    from the same hidden states (a value head on the policy trunk, lm-human-preferences style).

    temperature must be the one the rollout sampled with, or the first PPO ratio is not 1 and the
    KL is measured against a different distribution (TRL https://github.com/huggingface/trl/issues/2358,
    OpenRLHF https://github.com/OpenRLHF/OpenRLHF/pull/853).
    Only the response columns go through the LM head (the prompt's logits are never needed).
    fused (train_ppo.py --fused-logprobs): the same numbers through infra.fast.linear_logprobs,
    which never holds the (B, G, V) logits in fp32 (the entropy then comes at no extra cost)."""
    P = context_len
    hidden = model.padded_forward(seq, attn_mask, hidden=True)  # (B, P+G, C)
    h = hidden[:, P - 1:-1]  # (B, G, C): the state before each response token
    values = value_head(h) if value_head is not None else None  # (B, G)
    if fused:
        B, G, C = h.shape
        logp, ent = linear_logprobs(h.reshape(B * G, C), model.head_weight, seq[:, P:].reshape(B * G),
                                    temperature)  # (B*G,) each
        return ResponseOut(logp.view(B, G), values, ent.view(B, G) if entropy else None)
    logits = model.logits(h)  # (B, G, V)
    logp = logprobs_from_logits(logits, seq[:, P:], temperature)  # (B, G)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits.float() / temperature)  # (B, G)
    return ResponseOut(logp, values, ent)


class PolicyValue(torch.nn.Module):
    """The trained parameters of PPO as one module: the policy plus either a value head on its
    trunk (`value_head`) or a separate value model (`value_model`). It exists so that
    DistributedDataParallel can wrap them together: DDP averages the gradients of the parameters of
    the module it wraps, during the backward of a forward that went through the wrapper. The
    single-process loop calls the same module, unwrapped. forward -> (log-probs (b, G), values
    (b, G), entropy (b, G)) of the response columns, as response_forward."""

    def __init__(self, policy: Transformer, value_head: ScalarHead | None = None,
                 value_model: ScalarModel | None = None, fused: bool = False):
        super().__init__()
        if value_head is not None and value_model is not None:
            raise ValueError("PolicyValue takes at most one of value_head and value_model")
        self.policy, self.value_head, self.value_model = policy, value_head, value_model
        self.fused = fused  # --fused-logprobs

    def forward(self, seq: Tensor, attn_mask: Tensor, context_len: int, temperature: float):
        out = response_forward(self.policy, seq, attn_mask, context_len, temperature, self.value_head, entropy=True,
                               fused=self.fused)
        values = out.values if self.value_model is None else \
            response_values(self.value_model, seq, attn_mask, context_len)  # (b, G); None: no value function
        return out.logprobs, values, out.entropy


def response_values(value_model: ScalarModel, seq: Tensor, attn_mask: Tensor, context_len: int) -> Tensor:
    """Values of a separate value model (its own trunk, e.g. a copy of the reward model, as in TRL
    and summarize_from_feedback_details) at the response columns: (B, P+G) -> (B, G) fp32."""
    hidden = value_model.trunk.padded_forward(seq, attn_mask, hidden=True)  # (B, P+G, C)
    return value_model.head(hidden[:, context_len - 1:-1])  # (B, G)


# --------------------------------------------------------------------------------------------
# the models and the checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The four models of RLHF's PPO: the trained policy, its frozen reference, the frozen reward
    (a ScalarModel, or the token id of the synthetic --reward-token reward) and the value function
    (exactly one of value_head, a head on the policy's trunk, and value_model, a separate model).
    `trained` holds every trained parameter: what the optimizer and DDP see."""
    policy: Transformer
    tok: object
    ref: Transformer
    reward: ScalarModel | int
    value_head: ScalarHead | None
    value_model: ScalarModel | None
    trained: "PolicyValue"
    device: torch.device
    meta: dict
    """what the checkpoints' minicai.json records about the run's models"""

    def autocast(self, bf16: bool):
        """bf16 autocast around a forward when bf16 is set (weights stay fp32), else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def load_models(policy_path: str, ref_path: str | None, reward_model: str | None, reward_token: str | None,
                value_model: str, device: torch.device, fused_logprobs: bool = False) -> Models:
    """Load the policy, the reference (default: a frozen copy of the policy, the SL-CAI model in the
    paper), the reward (a reward model folder or one token's text) and make the value function;
    the reference and the reward model must read the policy's token ids (InputError otherwise).

    value_model "shared" (default): a zero-init value head on the policy's own trunk, as in OpenAI
    lm-human-preferences (policy.py: Model(scalar_heads=['value'])); V = 0 at the start. This keeps
    three models resident instead of four and costs no extra forward or backward: the policy's
    hidden states give logits and values at once (~35% less compute per iteration, docs/benchmarks.md).
    "separate": a trainable copy of the reward model, trunk and head, as in TRL and
    summarize_from_feedback_details (values start as the reward model's reading of each prefix).
    "none": no value function (train_ppo.py --advantage rloo|grpo).
    fused_logprobs (train_ppo.py --fused-logprobs): the trained module's response log-probs go
    through infra.fast.linear_logprobs (PolicyValue.fused)."""
    policy, tok, _ = load_model(policy_path, device=device)
    if ref_path is None or ref_path == policy_path:
        ref = copy.deepcopy(policy)
    else:
        ref, ref_tok, _ = load_model(ref_path, device=device)
        check_same_shapes(policy, ref, "the reference", ref_path)
        check_same_tokenizer(tok, ref_tok, "the reference", ref_path)
    ref.requires_grad_(False)
    if reward_model is not None:
        reward, rm_tok, _ = load_scalar_model(reward_model, head="reward", device=device)
        check_same_tokenizer(tok, rm_tok, "the reward model", reward_model)
        reward.requires_grad_(False)
    else:
        ids = tok.encode(reward_token)
        if len(ids) != 1:
            raise InputError(f"--reward-token {reward_token!r} is {len(ids)} tokens, not one")
        reward = ids[0]
    head, vm = None, None
    if value_model == "shared":
        head = ScalarHead(policy.cfg.dim).to(device)  # zero init: V = 0 at the start (OpenAI)
    elif value_model == "separate":
        vm = ScalarModel(copy.deepcopy(reward.trunk), copy.deepcopy(reward.head)).requires_grad_(True)
        vm.trunk.lm_head = None  # never used by a value model (DDP needs every parameter used)
    meta = {"stage": "ppo", "policy": policy_path, "ref": ref_path or policy_path, "reward_model": reward_model,
            "value_model": value_model}
    return Models(policy, tok, ref, reward, head, vm, PolicyValue(policy, head, vm, fused_logprobs), device, meta)


def save_checkpoint(folder: Path, m: Models, d: distributed.Dist, opt=None, iteration: int = 0,
                    beta: float = 0.0) -> None:
    """Rank 0 writes the policy as an HF folder (checkpoint.save_hf, atomic) with the value head
    (value_head.safetensors) or the value model (value_model.safetensors), and, given opt, the train
    state a resume needs (optimizer, iteration, beta); the other ranks wait for it (every rank holds
    the same weights)."""
    if d.main:
        def extra(tmp):
            if m.value_model is not None:
                save_file({k: v.contiguous() for k, v in m.value_model.state_dict().items()},
                          str(tmp / "value_model.safetensors"))
            if opt is not None:
                save_train_state(tmp, opt, iteration, {"beta": beta})
        save_hf(folder, m.policy, m.tok, heads={"value": m.value_head} if m.value_head is not None else None,
                meta={**m.meta, "iteration": iteration}, extra=extra)
    distributed.barrier(d)


def load_checkpoint(folder: Path, m: Models, opt) -> tuple[int, float] | None:
    """Resume from a save_checkpoint folder with a train state: loads the weights and the optimizer
    in place; returns (iteration, beta), or None if there is no checkpoint to resume from."""
    folder = Path(folder)
    if not (folder / "train_state.json").exists():
        return None
    loaded, _, _ = load_model(str(folder), device=m.device)
    m.policy.load_state_dict(loaded.state_dict())
    if m.value_head is not None:
        m.value_head.load_state_dict(load_head(folder, "value", m.policy.cfg.dim).state_dict())
    elif m.value_model is not None:
        m.value_model.load_state_dict(load_file(str(folder / "value_model.safetensors")))
    state = load_train_state(folder, opt)
    return state["step"], state["beta"]


# --------------------------------------------------------------------------------------------
# scores: what the reward model reads, or a synthetic reward (a test / education hook). The reward
# model itself is read through model.last_token_scores only (train_ppo.score).
# --------------------------------------------------------------------------------------------


def end_of_turn_id(tok) -> int | None:
    """Id of the chat format's end-of-turn marker (<|im_end|> in ChatML), None for plain text."""
    end = tok.chat.end()
    return tok.tk.token_to_id(end) if end else None


def reward_model_input(seq: Tensor, attn_mask: Tensor, stopped: Tensor, end_id: int | None) -> tuple[Tensor, Tensor]:
    """The reward model's input for a rollout batch: (seq, attn_mask) (B, L) -> (B, L) or (B, L + 1).
    model.last_token_scores then reads the score where the attention mask says the sequence ends,
    never at a pad token, which is right for left-padded prompts and right-padded responses alike
    (DeepSpeed-Chat RewardModel.forward_value reads the last non-pad token:
    https://github.com/microsoft/DeepSpeedExamples/blob/fa87108cd870ccc2c4a89aa5fb1e7295e632a2b1/applications/DeepSpeed-Chat/dschat/utils/model/reward_model.py).

    Truncated responses (stopped False), `end_id` given ("close", train_ppo.py's default): closed
    with the end-of-turn marker, i.e. exactly the layout train_rm.py trained and normalised the
    reward model on (feedback.reward_input renders every response, truncated or not, as a finished
    assistant turn and reads the score at the marker). The marker is added to the reward model's
    input only, never to the rollout. end_id=None ("as_is", TRL): read at the last generated token,
    a position the reward model was not trained to score."""
    if end_id is None or bool(stopped.all()):
        return seq, attn_mask
    seq = F.pad(seq, (0, 1), value=end_id)  # (B, L+1) one more column for full-length rows
    attn_mask = F.pad(attn_mask, (0, 1), value=0)  # (B, L+1)
    rows = torch.nonzero(~stopped.bool()).flatten()  # (n,) truncated rows
    col = last_real_index(attn_mask)[rows] + 1  # (n,) the column after the last real token
    seq[rows, col] = end_id
    attn_mask[rows, col] = 1
    return seq, attn_mask


def token_reward(seq: Tensor, response_mask: Tensor, token_id: int) -> Tensor:
    """A synthetic reward for tests and teaching, usable in place of the reward model (--reward-token):
    +1 if `token_id` appears among the real response tokens, else 0. seq (B, P+G), response_mask
    (B, G) -> (B,) fp32.

    PPO has no way to know this is not a learned model; on a tiny random model it shows the whole
    loop working (the mean score rises while the KL stays finite) in seconds, and it makes reward
    hacking easy to see (the policy learns to emit the token, whatever else it says)."""
    G = response_mask.shape[1]
    hit = (seq[:, -G:] == token_id) & response_mask.bool()  # (B, G)
    return hit.any(-1).float()  # (B,)


EOS_PENALTY_MODES = ("subtract", "replace")


def missing_eos_penalty(score: Tensor, stopped: Tensor, penalty: float | None, mode: str = "subtract") -> Tensor:
    """Penalise rows that ran out of tokens without producing a stop token (B,) -> (B,).

    mode="subtract" (TRL ppo_trainer.py `scores[~contain_eos_token] -= missing_eos_penalty`):
        score - penalty; the reward model's opinion of the truncated text still counts.
    mode="replace" (summarize_from_feedback_details / OpenAI lm-human-preferences
        `penalty_reward_value`, `torch.where(contain_eos_token, scores, penalty_reward_value)`):
        the score becomes `penalty` itself (e.g. -1), whatever the reward model said. Note the sign:
        the replacement value is used as given, the subtracted one is subtracted.
    penalty=None: no penalty (the default, as in TRL)."""
    if mode not in EOS_PENALTY_MODES:
        raise InputError(f"missing-EOS penalty mode must be one of {EOS_PENALTY_MODES}, got {mode!r}")
    if penalty is None:
        return score
    stopped = stopped.bool().to(score.device)
    if mode == "subtract":
        return torch.where(stopped, score, score - penalty)
    return torch.where(stopped, score, torch.full_like(score, penalty))


# --------------------------------------------------------------------------------------------
# sanity checks: errors, not warnings
# --------------------------------------------------------------------------------------------

PROBE_TEXT = "Hello, world! 12345 <|im_start|>user\nÇa va? 你好 <|im_end|> the end."


def check_same_tokenizer(tok_policy, tok_other, what: str, path: str = "") -> None:
    """The reward model (or reference) reads the policy's token ids, so both tokenizers must agree:
    same vocabulary size and the same ids for a probe text (ASCII, digits, chat specials,
    non-ASCII). A mismatch is an InputError naming `what`."""
    where = f"{what} ({path})" if path else what
    if tok_policy.vocab_size != tok_other.vocab_size:
        raise InputError(f"{where}: its tokenizer has {tok_other.vocab_size} tokens, the policy's has "
                         f"{tok_policy.vocab_size}; it cannot read the policy's token ids")
    a, b = tok_policy.encode(PROBE_TEXT), tok_other.encode(PROBE_TEXT)
    if a != b:
        raise InputError(f"{where}: its tokenizer encodes the probe text {PROBE_TEXT!r} differently from the "
                         f"policy's ({len(b)} vs {len(a)} ids); it cannot read the policy's token ids")


def check_same_shapes(policy: Transformer, other: Transformer, what: str, path: str = "") -> None:
    """The reference must be the policy's architecture (same config and tensor shapes), else the
    KL between them is meaningless. A mismatch is an InputError naming `what` and the tensor."""
    where = f"{what} ({path})" if path else what
    a, b = policy.state_dict(), other.state_dict()
    for name in sorted(set(a) | set(b)):
        if name not in b or name not in a:
            raise InputError(f"{where}: tensor {name} is in {'the policy' if name in a else what} only; "
                             f"the policy and {what} must have the same architecture")
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise InputError(f"{where}: tensor {name} has shape {tuple(b[name].shape)}, the policy's has "
                             f"{tuple(a[name].shape)}; the policy and {what} must have the same architecture")


# --------------------------------------------------------------------------------------------
# flags and metrics
# --------------------------------------------------------------------------------------------


def train_prompts(specs: list[str] | None, held_out_fraction: float) -> list:
    """The prompts PPO trains on: every source of --prompts (default: the two builtin sets), minus
    the held-out share (data.split, by hash: evaluation never sees a training prompt)."""
    prompts = [p for spec in (specs or ["builtin-red-team", "builtin-helpful"]) for p in load_prompts(spec)]
    prompts, _ = split(prompts, held_out_fraction)
    if not prompts:
        raise InputError("--prompts: no prompts left for training after the held-out split")
    return prompts


def show_samples(r: Rollout, texts: list[str], tok, it: int, n: int = 2) -> None:
    """Print the first n rows of the batch: score, prompt, response (texts: the rows' prompt texts)."""
    for b in range(min(n, len(texts))):
        tqdm.write(f"[it {it + 1}] score {r.score[b].item():+.3f} | {texts[b][:70]!r}\n"
                   f"    -> {tok.decode(r.seq[b, r.P:][r.mask[b]].tolist())[:300]!r}")


def write_summary(out: Path, iterations: int, d: distributed.Dist) -> None:
    """OUT/ppo_summary.json: the first and last metrics rows."""
    rows = read_jsonl(Path(out) / "metrics.jsonl")
    atomic_write_json(Path(out) / "ppo_summary.json", {"iterations": iterations, "first": rows[0] if rows else None,
                                                       "last": rows[-1] if rows else None, "world_size": d.world})


def check_config(c: dict, world: int = 1) -> None:
    """Bad flags of train_ppo.py, as one-line InputErrors, before anything is loaded or written.
    c: the flat config (cli.config(args)); world: the number of processes."""
    if (c["reward_model"] is None) == (c["reward_token"] is None):
        raise InputError("give exactly one of --reward-model PATH and --reward-token TEXT")
    if c["value_model"] == "separate" and c["reward_model"] is None:
        raise InputError("--value-model separate copies the reward model: it needs --reward-model")
    critic_free = c["advantage"] != "gae"
    if critic_free and c["value_model"] != "none":
        raise InputError(f"--advantage {c['advantage']} trains no value function: drop --value-model")
    if not critic_free and c["value_model"] == "none":
        raise InputError("--value-model none: GAE needs a value function (or use --advantage rloo|grpo)")
    if critic_free and c["k"] < 2:
        raise InputError(f"--k must be at least 2 for --advantage {c['advantage']}: the baseline is the other samples")
    if not critic_free and c["k"] != 1:
        raise InputError("--k: GAE-PPO samples one response per prompt (--k is for --advantage rloo|grpo)")
    if c["batch_size"] % c["k"]:
        raise InputError(f"--batch-size {c['batch_size']} is not a multiple of --k {c['k']}: every prompt "
                         f"gets k rows")
    for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "save_every",
                 "sample_every"):
        if c[name] < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {c[name]}")
    B, n = c["batch_size"], c["num_minibatches"]
    if B % n:
        raise InputError(f"--batch-size {B} is not a multiple of --num-minibatches {n}")
    if B % (n * world):
        raise InputError(f"--batch-size {B} must be a multiple of --num-minibatches x processes "
                         f"({n} x {world}): every rank takes the same share of each minibatch")
    if c["temperature"] <= 0:
        raise InputError("--temperature must be > 0: PPO needs the sampling distribution's log-probs")
    if c["kl_target"] is not None and c["kl_target"] <= 0:
        raise InputError("--kl-target must be > 0")
    # shared flags (infra.cli.RunArgs / OptimArgs) that PPO cannot honour: refused, never ignored
    for flag, bad, why in (("--fsdp", c["fsdp"], "DDP only (every rank holds every model)"),
                           ("--grad-accum", c["grad_accum"] != 1, "one step per minibatch (use --num-minibatches)"),
                           ("--warmup", c["warmup"] != 0, "no warmup (--lr-anneal decays the rate linearly)")):
        if bad:
            raise InputError(f"{flag}: train_ppo.py has {why}")


METRICS = {"approxkl": "policy/approxkl", "clipfrac": "policy/clipfrac", "entropy": "policy/entropy",
           "ratio_mean": "policy/ratio_mean", "ratio_var": "policy/ratio_var", "vf_clipfrac": "val/clipfrac",
           "pg_loss": "loss/policy", "vf_loss": "loss/value", "kl_loss": "loss/kl", "grad_norm": "grad_norm"}
"""train_ppo.update's minibatch statistics and their names in metrics.jsonl."""


def iteration_metrics(r: Rollout, stats: list[dict], beta: float, d: distributed.Dist) -> dict:
    """Step 7's numbers, named as in summarize_from_feedback_details: KL summed over tokens, then
    the mean over rows; update()'s statistics averaged over minibatches and summed over ranks /
    world (each rank's token mean was divided by the global count / world, so the result is the
    global token mean; ratio_var is the token-weighted mean of the ranks' variances)."""
    seq_kl, non_score = (r.kl * r.mask).sum(1), (-beta * r.kl * r.mask).sum(1)  # (B,), (B,)
    row = {"objective/kl": seq_kl.mean().item(), "objective/scores": r.score.mean().item(),
           "objective/raw_scores": r.raw_score.mean().item(), "objective/non_score_reward": non_score.mean().item(),
           "objective/rlhf_reward": (r.score + non_score).mean().item(), "objective/beta": beta,
           "response/length": r.mask.sum(1).float().mean().item(),
           "response/eos_fraction": r.stopped.float().mean().item()}
    if r.values is not None:  # none for rloo, grpo
        row["val/explained_variance"] = explained_variance(r.values, r.returns, r.gae_mask).item()
        row["val/mean"] = masked_mean(r.values, r.gae_mask).item()
    means = torch.stack([sum(s[k] for s in stats) / len(stats) for k in METRICS]).float()  # (len(METRICS),)
    means = distributed.all_reduce_sum(means, d) / d.world
    row.update(zip(METRICS.values(), means.tolist()))
    # max |new - old log-prob| in the first minibatch: 0 exactly when nothing moved since the rollout
    row["policy/first_ratio_max_dev"] = float(distributed.all_reduce_max(stats[0]["first_ratio_dev"], d))
    return row


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sum, sum of squares, count) of x over real tokens, three 0-d tensors. Data-parallel
    callers all_reduce(SUM) them across ranks, then call `mean_var_from_moments` and pass the
    result to `masked_whiten(..., stats=)` so that every rank whitens with the global statistics."""
    xm = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))  # 0 on padding
    return xm.sum(), (xm * xm).sum(), mask.to(x.dtype).sum()


def mean_var_from_moments(s: Tensor, ss: Tensor, n: Tensor, unbiased: bool = False) -> tuple[Tensor, Tensor]:
    """(mean, var) from (sum, sum_sq, count): var = E[x^2] - mean^2, times n / (n - 1) if unbiased.
    (One-pass formula: fine for advantages/rewards of moderate magnitude; `masked_var` is two-pass.)"""
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0.0)
    if unbiased:
        # Bessel's correction, as in TRL masked_var
        var = var * n / (n - 1)
    return mean, var
