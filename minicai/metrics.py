"""Evaluation metrics: Wilson intervals on shares, log-probs of continuations (the scoring primitive
of the contrast labeller, the cloze benchmarks and perplexity), Bradley-Terry Elo and win rates
from soft-label games, and the alignment-tax arithmetic. How they are run on policies is in
minicai/eval/evaluate.py and minicai/eval/yardstick.py."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .model import Transformer
from .sample import pad

# ---------------------------------------------------------------------------------------------
# Wilson score interval (Wilson 1927; Agresti & Coull 1998 eq. 2):
#   centre = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
# with p = k/n. Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0.


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | tuple[None, None]:
    """95% Wilson score interval (low, high) for k successes in n trials; (None, None) for n = 0."""
    if n == 0:
        return None, None
    if not 0 <= k <= n:
        raise InputError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def share(flags: list[bool]) -> dict:
    """{rate, low, high, k, n}: the share of True flags with its Wilson 95% interval."""
    k, n = sum(bool(f) for f in flags), len(flags)
    low, high = wilson(k, n)
    return {"rate": k / n if n else None, "low": low, "high": high, "k": k, "n": n}


@torch.no_grad()
def continuation_logprobs(model: Transformer, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                          batch_size: int = 16) -> list[torch.Tensor]:
    """log p(continuation token t | context, continuation[:t]) for each (context ids, continuation
    ids): a list of 1-d fp32 tensors, one per pair, of the continuation's length. Sequences are
    batched by length (right padding); the LM head runs in fp32 on the continuation positions only
    (bf16 logits are too coarse to rank close options)."""
    if any(not ctx or not cont for ctx, cont in pairs):
        raise InputError("continuation_logprobs: every context and continuation needs at least one token")
    device = model.embed_tokens.weight.device
    w = model.head_weight.float()  # (V, C)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[torch.Tensor | None] = [None] * len(pairs)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        seqs = [pairs[r][0] + pairs[r][1] for r in rows]
        ids, mask = pad(seqs, pad_id, "right", device)  # (B, T)
        # position t predicts token t + 1: the last context position up to the one before the end
        pred = pad([[0] * (len(pairs[r][0]) - 1) + [1] * len(pairs[r][1]) + [0] for r in rows], 0, "right",
                   device)[0].bool()  # (B, T)
        h = model.padded_forward(ids, mask, hidden=True)  # (B, T, C)
        targets = ids[:, 1:][pred[:, :-1]]  # (n,) the continuation tokens, row-major
        h_pred = h[pred]  # (n, C)
        tok_lp = torch.cat([  # 1024 rows at a time: never a full (n, V) fp32 logits tensor
            (lg := F.linear(hc.float(), w)).gather(-1, tc.unsqueeze(-1)).squeeze(-1) - lg.logsumexp(-1)
            for hc, tc in zip(h_pred.split(1024), targets.split(1024))]).cpu()  # (n,) log p(target)
        lengths = [len(pairs[r][1]) for r in rows]
        for r, chunk in zip(rows, tok_lp.split(lengths)):
            out[r] = chunk
    return out


# ---------------------------------------------------------------------------------------------
# Elo from pairwise soft-label games.

ELO_PER_NAT = 400.0 / math.log(10.0)
"""Elo points per natural-log unit of Bradley-Terry strength: P(i beats j) = sigmoid(r_i - r_j)
= 1 / (1 + 10^(-(E_i - E_j)/400)), so E = r * 400 / ln 10 (the logistic Elo scale)."""


def bradley_terry_elo(games: list[tuple[str, str, float]], names: list[str], anchor: str,
                      l2: float = 0.01, max_iter: int = 100, tol: float = 1e-10) -> dict[str, float | None]:
    """Elo ratings from games (a, b, p) where p = P(a is better than b), a soft label in [0, 1].

    Bradley-Terry maximum likelihood (Bradley & Terry 1952), soft labels as fractional wins: with
    strengths r (r_anchor = 0 fixed) and d = r_a - r_b, maximise
        L(r) = sum_games [p log sigmoid(d) + (1 - p) log sigmoid(-d)]  -  l2/2 * sum_i r_i^2
    by Newton's method (the log-likelihood is concave). dL/dd = p - sigmoid(d) and
    d2L/dd2 = -sigmoid(d) sigmoid(-d). The l2 term is a weak Gaussian prior (N(0, 1/l2) in natural
    units; 0.01 = std 10 nats = 4000 Elo) that keeps a policy that wins every game finite; l2=0
    is the plain MLE (with one pair of policies and p_mean = mean label, Elo(a) - Elo(b) =
    400 log10(p_mean / (1 - p_mean)) exactly). We use the MLE on all games at once rather than
    the sequential Elo update, whose result depends on the order of the games.
    Returns Elo per name (400/ln 10 * r); None for a policy that played no game."""
    if anchor not in names:
        raise InputError(f"anchor {anchor!r} is not one of the policies {names}")
    played = {n for a, b, _ in games for n in (a, b)}
    free = [n for n in names if n != anchor and n in played]
    col = {n: i for i, n in enumerate(free)}
    r = np.zeros(len(free))

    def strength(n):
        return r[col[n]] if n in col else 0.0

    def objective(x):
        total = -0.5 * l2 * float(x @ x)
        for a, b, p in games:
            d = (x[col[a]] if a in col else 0.0) - (x[col[b]] if b in col else 0.0)
            total += p * -np.logaddexp(0.0, -d) + (1 - p) * -np.logaddexp(0.0, d)  # log sigmoid(+-d)
        return total

    for _ in range(max_iter if free else 0):
        g = -l2 * r  # gradient of L
        H = -l2 * np.eye(len(free))  # Hessian of L (negative definite when l2 > 0 or the games connect)
        for a, b, p in games:
            s = 1.0 / (1.0 + math.exp(-(strength(a) - strength(b))))  # sigmoid(d)
            w = s * (1.0 - s)
            for n, sign in ((a, 1.0), (b, -1.0)):
                if n in col:
                    g[col[n]] += sign * (p - s)
            for n1, s1 in ((a, 1.0), (b, -1.0)):
                for n2, s2 in ((a, 1.0), (b, -1.0)):
                    if n1 in col and n2 in col:
                        H[col[n1], col[n2]] -= s1 * s2 * w
        step = np.linalg.lstsq(H, -g, rcond=None)[0]  # Newton: r <- r - H^-1 g
        t, base = 1.0, objective(r)
        while objective(r + t * step) < base - 1e-12 and t > 1e-6:  # backtracking keeps L increasing
            t *= 0.5
        r = r + t * step
        if float(np.abs(t * step).max()) < tol:
            break
    return {n: (ELO_PER_NAT * strength(n) if (n == anchor or n in col) else None) for n in names}


def win_rates(games: list[tuple[str, str, float]], names: list[str]) -> dict[str, dict[str, float | None]]:
    """win[X][Y] = mean over the games between X and Y of P(X better than Y); None if they never met."""
    sums = {x: {y: [0.0, 0] for y in names} for x in names}
    for a, b, p in games:
        sums[a][b][0] += p
        sums[a][b][1] += 1
        sums[b][a][0] += 1.0 - p
        sums[b][a][1] += 1
    return {x: {y: (s / n if n else None) for y, (s, n) in row.items() if y != x} for x, row in sums.items()}


# ---------------------------------------------------------------------------------------------
# Diversity of samples: distinct n-grams (Li et al. 2016, arXiv 1510.03055, "distinct-n"), used by
# the principle-count ablation (Bai et al. 2022 Fig. 6 measures diversity of revisions too).


# ---------------------------------------------------------------------------------------------
# Alignment depth (Qi et al. 2024, arXiv 2406.05946, Fig. 1): the per-token KL between the aligned
# policy and the base model along the aligned policy's own replies, averaged by position.
