"""Helpers for train_ppo.py: the padded (prompt + response) batch, response log-probs and values,
scoring with a reward model or a synthetic reward, the missing-EOS penalty, and the sanity checks.

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

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from ..model import ScalarHead, ScalarModel, Transformer, last_real_index, last_token_scores
from ..rl import entropy_from_logits, logprobs_from_logits, masked_moments, mean_var_from_moments
from ..sample import Generation, pad
from .utils import InputError

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
                     value_head: ScalarHead | None = None, entropy: bool = False) -> ResponseOut:
    """One full forward of `model` over the padded (prompt + response) batch; returns the response
    tokens' log-probs under softmax(logits / temperature) and, with `value_head`, the values read
    from the same hidden states (a value head on the policy trunk, lm-human-preferences style).

    temperature must be the one the rollout sampled with, or the first PPO ratio is not 1 and the
    KL is measured against a different distribution (anchors.md pain point 3; TRL #2358).
    Only the response columns go through the LM head (the prompt's logits are never needed)."""
    P = context_len
    hidden = model.padded_forward(seq, attn_mask, hidden=True)  # (B, P+G, C)
    h = hidden[:, P - 1:-1]  # (B, G, C): the state before each response token
    logits = model.logits(h)  # (B, G, V)
    logp = logprobs_from_logits(logits, seq[:, P:], temperature)  # (B, G)
    values = value_head(h) if value_head is not None else None  # (B, G)
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
                 value_model: ScalarModel | None = None):
        super().__init__()
        if (value_head is None) == (value_model is None):
            raise ValueError("PolicyValue needs exactly one of value_head and value_model")
        self.policy, self.value_head, self.value_model = policy, value_head, value_model

    def forward(self, seq: Tensor, attn_mask: Tensor, context_len: int, temperature: float):
        out = response_forward(self.policy, seq, attn_mask, context_len, temperature, self.value_head, entropy=True)
        values = out.values if self.value_model is None else \
            response_values(self.value_model, seq, attn_mask, context_len)  # (b, G)
        return out.logprobs, values, out.entropy


def response_values(value_model: ScalarModel, seq: Tensor, attn_mask: Tensor, context_len: int) -> Tensor:
    """Values of a separate value model (its own trunk, e.g. a copy of the reward model, as in TRL
    and summarize_from_feedback_details) at the response columns: (B, P+G) -> (B, G) fp32."""
    hidden = value_model.trunk.padded_forward(seq, attn_mask, hidden=True)  # (B, P+G, C)
    return value_model.head(hidden[:, context_len - 1:-1])  # (B, G)


# --------------------------------------------------------------------------------------------
# scores: a reward model, or a synthetic reward (a test / education hook)
# --------------------------------------------------------------------------------------------


def end_of_turn_id(tok) -> int | None:
    """Id of the chat format's end-of-turn marker (<|im_end|> in ChatML), None for plain text."""
    end = tok.chat.end()
    return tok.tk.token_to_id(end) if end else None


class RewardModelScore:
    """Score = the reward model's scalar at the last real token of prompt + response. The reward is
    read where the attention mask says the sequence ends, never at a pad token, which is right for
    left-padded prompts and right-padded responses alike (anchors.md pain point 2; DeepSpeed-Chat
    reads the last non-pad token). The ScalarHead's gain/bias (reward normalization) are applied.

    Truncated responses (no stop token within max_new_tokens), `end_id` given ("close", default in
    train_ppo.py): the reward model reads them closed with the end-of-turn marker, i.e. exactly the
    layout train_rm.py trained and normalised it on (feedback.reward_input renders every response,
    truncated or not, as a finished assistant turn and reads the score at the marker). The marker is
    added to the reward model's input only, never to the rollout. end_id=None ("as_is", TRL): read
    at the last generated token, a position the reward model was not trained to score."""

    def __init__(self, rm: ScalarModel, end_id: int | None = None):
        self.rm, self.end_id = rm, end_id

    @torch.no_grad()
    def __call__(self, seq: Tensor, attn_mask: Tensor, response_mask: Tensor, stopped: Tensor) -> Tensor:
        if self.end_id is not None and not bool(stopped.all()):
            seq = F.pad(seq, (0, 1), value=self.end_id)  # (B, L+1) one more column for full-length rows
            attn_mask = F.pad(attn_mask, (0, 1), value=0)  # (B, L+1)
            rows = torch.nonzero(~stopped.bool()).flatten()  # (n,) truncated rows
            col = last_real_index(attn_mask)[rows] + 1  # (n,) the column after the last real token
            seq, attn_mask = seq.clone(), attn_mask.clone()
            seq[rows, col] = self.end_id
            attn_mask[rows, col] = 1
        return last_token_scores(self.rm, seq, attn_mask)  # (B,)


class TokenReward:
    """A synthetic reward for tests and teaching, usable in place of the reward model:
    score = +1 if `token_id` appears among the real response tokens, else 0.

    PPO has no way to know this is not a learned model; on a tiny random model it shows the whole
    loop working (the mean score rises while the KL stays finite) in seconds, and it makes reward
    hacking easy to see (the policy learns to emit the token, whatever else it says)."""

    def __init__(self, token_id: int):
        self.token_id = int(token_id)

    @torch.no_grad()
    def __call__(self, seq: Tensor, attn_mask: Tensor, response_mask: Tensor, stopped: Tensor) -> Tensor:
        G = response_mask.shape[1]
        hit = (seq[:, -G:] == self.token_id) & response_mask.bool()  # (B, G)
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
