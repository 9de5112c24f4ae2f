"""Batched generation with a static KV cache: left padding, prefill, then one token at a time.

    gen = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0.7, stop_ids=tok.stop_ids)
    gen.tokens (N, G), gen.logprobs (N, G), gen.mask (N, G)   with N = len(prompts) * n

Layout. Prompts are left-padded to a common length P, so every row's next token goes to the same
cache slot; row b's RoPE position is (slot - pad_b) and its padding slots are masked out of
attention. The slow, obviously-correct twin of this loop is a full forward over the whole padded
sequence (Transformer.padded_forward); tests check that both give the same tokens and log-probs.

Randomness. Each output row has its own torch.Generator, seeded from (seed of its prompt, sample
index), and draws its token by inverting the CDF with one uniform u from that generator: the
first token whose cumulative probability exceeds u (an exact sample from p, as
torch.multinomial does it, but with the row's own generator). A row's text therefore depends
only on its prompt and seed, not on which other prompts share the batch. (An earlier version
drew argmax(p / E) with V exponential draws per row and step, the "exponential race": also
exact, but 14% of the time of batch-16 decoding went to those draws.)

Log-probs. gen.logprobs are log-softmax(logits / temperature) at the sampled token (temperature 1
for greedy), computed before top-k / top-p filtering: that is the policy's distribution, which is
what PPO's ratio needs (https://github.com/huggingface/trl/issues/2358,
https://github.com/OpenRLHF/OpenRLHF/issues/853). Filtering makes the sampler differ from the policy
whose log-probs the ratio uses, so PPO rollouts keep top_k=0, top_p=1 (TRL's PPO examples set
top_k=0.0, top_p=1.0 in their generation kwargs for this reason).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import InputError
from .model import KVCache, Transformer, padding_attn_mask


@dataclass
class Generation:
    prompt_ids: torch.Tensor
    """(N, P) left-padded prompts (row b*n + j is sample j of prompt b)."""
    prompt_mask: torch.Tensor
    """(N, P) 1 on real prompt tokens."""
    tokens: torch.Tensor
    """(N, G) generated ids; pad_id after a row stopped."""
    logprobs: torch.Tensor
    """(N, G) fp32 log-prob of each generated token under the sampling temperature; 0 where masked."""
    mask: torch.Tensor
    """(N, G) bool, True on real response tokens (the stop token included)."""
    stopped: torch.Tensor
    """(N,) bool, True if the row ended on a stop id or stop string (False: hit max_new_tokens)."""

    def texts(self, tok, skip_special: bool = True) -> list[str]:
        return [tok.decode(t[m].tolist(), skip_special) for t, m in zip(self.tokens, self.mask)]


def stable_seed(*parts) -> int:
    """A 48-bit seed from any parts (ints, strings), stable across runs, machines and Python's
    hash randomisation: the first 6 bytes of SHA-256 of the parts joined by ':'. Every per-prompt
    and per-row seed a stage passes to the sampler comes from here; inside generate, the n
    samples of one such seed draw from streams derived from it (_row_generators)."""
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:6], "big")


def pad(seqs: list[list[int]], pad_id: int, side: str = "right", device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """list of B id lists -> ids (B, T) padded with pad_id on the `side` ('right': training and
    scoring; 'left': prompts for generation, so that every row's next token is at the same
    column), mask (B, T) long, 1 on real tokens. T = the longest list."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[b, cols] = torch.tensor(s, dtype=torch.long)
            mask[b, cols] = 1
    return ids.to(device), mask.to(device)


# exercise
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p, Holtzman et al. 2020 §3.1) filtering: removed entries -> -inf.
    logits (B, V) -> (B, V). top_p keeps the smallest set of tokens whose probability sums to at
    least top_p (the most likely token is always kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # (B, V)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _row_generators(seeds: list[int], n: int, device) -> list[torch.Generator]:
    """One generator per output row: sample j of the prompt with seed s draws from seed
    s * 1_000_003 + j (so n samples of one prompt differ, and a row never depends on its batch)."""
    gens = []
    for s in seeds:
        for j in range(n):
            g = torch.Generator(device=device)
            g.manual_seed((int(s) * 1_000_003 + j) % (2**63))
            gens.append(g)
    return gens


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 gens: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every row. logits (B, V) -> token (B,), logprob (B,) fp32 under the
    sampling temperature (before filtering, see the module docstring)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)  # (B,)
        logp = logits.log_softmax(-1)
    else:
        logp = (logits / temperature).log_softmax(-1)  # (B, V)
        probs = filter_logits(logp, top_k, top_p).softmax(-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g, device=logits.device, dtype=torch.float64)
                       for g in gens])  # (B,) one uniform in [0, 1) per row, from its own generator
        cdf = probs.double().cumsum(-1)  # (B, V) fp64, so the last entry is 1 up to ~1e-16
        # inverse CDF: token i owns [cdf[i-1], cdf[i]), of length probs[i] (empty when it is 0);
        # the count of cdf entries <= u * total is the token. P(tok = i) = probs[i].
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (B,)
        tok = tok.clamp_max(logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)  # (B,), (B,)


def prefill(model: Transformer, ids, pos, mask, cache: KVCache) -> torch.Tensor:
    """Run the whole padded prompt, filling cache slots [0, P). Returns last-column logits (B, V)."""
    h = model.trunk(ids, pos, mask, cache, start=0)  # (B, P, C)
    return model.logits(h[:, -1])  # (B, V)


def decode_one_token(model: Transformer, tok, pos, mask, cache: KVCache, start: int) -> torch.Tensor:
    """One step: token (B, 1) at cache slot `start`, RoPE position pos (B, 1). Returns (B, V)."""
    h = model.trunk(tok, pos, mask, cache, start=start)  # (B, 1, C)
    return model.logits(h[:, -1])  # (B, V)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=(), stop_strings=(), tokenizer=None, n: int = 1,
             seed: int | list[int] = 0, pad_id: int = 0, sync_every: int | None = None,
             decode=None, prefix: list[int] | None = None) -> Generation:
    """Sample max_new_tokens (or until a stop) for every prompt, n samples each.

    prompts: token id lists of any lengths. temperature 0 = greedy. stop_ids: ids that end a row
    (e.g. tokenizer.stop_ids); stop_strings: texts that end a row once they appear in its decoded
    reply (needs tokenizer). seed: an int (prompt b gets seed + b) or one seed per prompt.
    sync_every: how often the loop asks whether every row has stopped (a host sync); default 1 on
    CPU, 8 on CUDA. decode: the decode step, default decode_one_token (the entry point passes
    infra/fast.py's compiled_decode_one_token() when --compile asks: gpt-fast compiles in main).
    prefix: token ids in front of every prompt (a shared context, e.g. few-shot exchanges), prefilled
    once and its keys/values copied to every row: the same samples as prompts [prefix + p] (its twin,
    tests/algorithm/test_sample.py), without prefilling the context B times. Generation.prompt_ids
    then holds the prompts without it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("generate: every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise InputError("generate: stop_strings needs the tokenizer")
    device = model.embed_tokens.weight.device
    ctx = model.cfg.max_seq_len
    C = len(prefix) if prefix else 0  # shared context tokens, in cache slots [0, C)
    for i, p in enumerate(prompts):
        if C + len(p) >= ctx:
            raise InputError(f"prompt {i}: {len(p)} tokens{f' after a {C}-token shared prefix' if C else ''} do not fit "
                             f"the model's context of {ctx} tokens "
                             f"(max_seq_len) with room to generate; shorten it")
    B = len(prompts)
    seeds = [seed + b for b in range(B)] if isinstance(seed, int) else list(seed)
    if len(seeds) != B:
        raise InputError(f"generate: {len(seeds)} seeds for {B} prompts")
    ids, pmask = pad(prompts, pad_id, "left", device)  # (B, P)
    P = ids.shape[1]
    G = max(0, min(max_new_tokens, ctx - C - P))
    S = C + P + G  # cache slots
    if sync_every is None:
        sync_every = 8 if device.type == "cuda" else 1

    # 1. prefill once per prompt (after the shared prefix, prefilled once for all rows)
    pos = C + (torch.arange(P, device=device) - (P - pmask.sum(-1, keepdim=True))).clamp(min=0)  # (B, P)
    n_pad = P - pmask.sum(-1)  # (B,) left padding per row, between the prefix and the prompt
    key_valid = torch.cat([torch.ones(B, C, dtype=torch.bool, device=device), pmask.bool(),
                           torch.ones(B, G, dtype=torch.bool, device=device)], dim=1)  # (B, S)
    has_pad = bool((n_pad > 0).any())
    if C:
        one = model.new_cache(1, S)
        model.trunk(torch.tensor([prefix], device=device), None, None, one, start=0)  # (1, C, H): keys/values only
        cache = one.repeat_interleave(B)  # row b: a copy of the prefix's slots [0, C)
        h = model.trunk(ids, pos, padding_attn_mask(key_valid, P, start=C), cache, start=C)  # (B, P, H)
        logits = model.logits(h[:, -1])  # (B, V)
    else:
        cache = model.new_cache(B, S)
        logits = prefill(model, ids, pos, padding_attn_mask(key_valid, P) if has_pad else None, cache)  # (B, V)

    # 2. n samples per prompt: copy the cache rather than prefilling again
    if n > 1:
        cache = cache.repeat_interleave(n)
        logits, key_valid, n_pad = (x.repeat_interleave(n, dim=0) for x in (logits, key_valid, n_pad))
        ids, pmask = ids.repeat_interleave(n, dim=0), pmask.repeat_interleave(n, dim=0)
    N = B * n
    gens = None if temperature == 0 else _row_generators(seeds, n, device)
    stop_t = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    tokens = torch.full((N, G), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((N, G), dtype=torch.float32, device=device)
    mask = torch.zeros((N, G), dtype=torch.bool, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    stopped = torch.zeros(N, dtype=torch.bool, device=device)
    steps = 0
    step_fn = decode or decode_one_token
    # 3. decode: sample from the last logits, write, feed the token back
    for t in range(G):
        tok, lp = sample_token(logits, temperature, top_k, top_p, gens)  # (N,), (N,)
        live = ~done
        tokens[:, t] = torch.where(live, tok, pad_id)
        logprobs[:, t] = torch.where(live, lp, 0.0)
        mask[:, t] = live
        hit = torch.isin(tok, stop_t) & live
        if stop_strings:
            for r in torch.nonzero(live & ~hit).flatten().tolist():
                text = tokenizer.decode(tokens[r, :t + 1][mask[r, :t + 1]].tolist())
                if any(s in text for s in stop_strings):
                    hit[r] = True
        stopped |= hit
        done |= hit
        steps = t + 1
        if t + 1 == G or ((t + 1) % sync_every == 0 and bool(done.all())):
            break
        slot = C + P + t
        step_mask = key_valid[:, None, None, :slot + 1] if has_pad else None  # (N, 1, 1, slot+1)
        logits = step_fn(model, tokens[:, t:t + 1], (slot - n_pad)[:, None], step_mask, cache, slot)
    return Generation(ids, pmask, tokens[:, :steps], logprobs[:, :steps], mask[:, :steps], stopped)
