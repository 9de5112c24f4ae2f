"""RL-CAI's AI feedback (Bai et al. 2022, §4.1): response pairs from the policy, soft preference
labels from a feedback model that answers the paper's multiple-choice question, and the
reward-model inputs that train_rm.py and PPO share.

1. Pairs. For each prompt the policy samples k responses (default 2, temperature 1) in one
   batched call (sample.generate, n=k); the prompt's seed comes from the global seed and
   Prompt.id through SHA-256, so a rerun or a resumed run draws the same responses. Every pair
   (i < j) of a prompt's responses is judged; a pair whose two responses are the same text is
   dropped (and logged to <preferences>.dropped.jsonl, which also makes resuming skip it).

2. The question. constitution.feedback_prompt() lays out the paper's prompt ("Consider the
   following conversation ...", the transcript "Human: <prompt>", the comparison principle,
   " (A) ...", " (B) ...", "The answer is:"). A chat model gets everything before "The answer is:"
   as a user message; its assistant turn then starts with "The answer is:" (written by us), so the
   next tokens are the model's answer:

       <user> Consider ... Options:\\n (A) ...\\n (B) ...</user><assistant> The answer is: (|A or B

3. Reading the answer. The options are ANSWERS = (" (A)", " (B)"), which BPE tokenizers split
   into several tokens (SmolLM2: " (", "A", ")"). We append the shared prefix (" (") to the
   context and read the log-probs of the first token where the options differ (the letter), in
   one forward pass of the context. Why not the sum over the whole continuation: the shared
   prefix has the same log-prob under both options and cancels in the two-way normalisation, so
   the only difference is the closing ")" after each letter, which says nothing about the choice.
   The labeller's probability of (A) is the two-way softmax of those log-probs (the paper's
   "normalized log-probabilities"): p(A) = sigmoid(logp(A) - logp(B)).

4. Position bias and ensembling. Each pair is asked in both orders (a as (A), then b as (A)); with
   c = p - 1/2 for the probability that response a is better,
       p_a = 1/2 + mean over principles of (c_first + c_swapped) / 2,
   i.e. the average of p_a_first_order and p_a_swapped_order over both orders and over the
   m principles drawn for the pair (m = 2 by default, without replacement, from a seeded rng).
   Since sigmoid(x) - 1/2 = tanh(x/2) / 2 is odd, a pair (x, x) gets exactly p_a = 1/2.

5. Chain of thought (cot=True). The assistant turn starts with "Let's think step by step:", the
   model writes its reasoning (greedy), we append "So the answer is:" and the shared prefix and
   read the letters as above; each probability is clamped to [0.4, 0.6] because CoT answers are
   nearly always confident (paper §4.1). The paper shows CoT few-shot examples first; we don't.

6. Labellers that carry signal at small scale (--labeller; docs/walkthrough.md explains why the
   paper's question fails at 135M, docs/results.md "Labeller ablation" measures each):
   - contrast (contrast_pairs): no question, no letters; a reply's mean per-token log-prob under
     the principle's "follow" system prompt minus under its "violate" one; p = sigmoid(gap / tau);
   - ab+contrast: both methods, averaged;
   - rlcd (rlcd_responses): RLCD's pairs, one reply sampled under "follow", one under "violate",
     labelled by provenance (optionally --rescore'd by a method above);
   - revision (revision_pairs): SL-CAI's (initial response, final revision), rejected / chosen,
     minus the pairs revision_filter's stated rule marks as no improvement;
   - an ensemble: several feedback models (and methods) each label every pair; the soft labels
     are averaged and the vote share is recorded (ensemble_labels).
   infra.labelling.DEFAULT is the pipeline's choice; `python -m minicai.eval.hhh --hhh ...`
   without labeller flags measures exactly it.

The preferences file and the resumable labelling loop (label_prompts) are in minicai/infra/labelling.py;
the labeller check on HHH items (evaluate_hhh, the paper's Fig. 4 number) is minicai/eval/hhh.py.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .constitution import ANSWERS, LabelShot, Principle, feedback_prompt
from .errors import InputError
from .io.data import Prompt
from .io.tokenizer import ChatTokenizer
from .metrics import continuation_logprobs
from .model import Transformer, last_real_index, padding_attn_mask, padding_positions
from .sample import generate, pad, stable_seed

ANSWER_CUE = "The answer is:"
"""Ends feedback_prompt(); we move it from the user message to the start of the assistant turn."""
COT_CUE = "Let's think step by step:"
COT_ANSWER = "So the answer is:"
COT_CLAMP = (0.4, 0.6)
"""Chain-of-thought probabilities are clamped to 40-60% (Bai et al. 2022 §4.1)."""
@torch.no_grad()
def sample_responses(model: Transformer, tok: ChatTokenizer, prompts: list[Prompt], k: int, *,
                     max_new_tokens: int, temperature: float, seed: int) -> list[list[str]]:
    """k responses per prompt from one batched generate call (n=k). Prompt p uses the seed
    stable_seed(seed, 'responses', p.id), so its responses do not depend on its batch."""
    ids = [tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0] for p in prompts]
    gen = generate(model, ids, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, n=k,
                   seed=[stable_seed(seed, "responses", p.id) for p in prompts], pad_id=tok.pad_id)
    texts = [t.strip() for t in gen.texts(tok)]
    return [texts[b * k:(b + 1) * k] for b in range(len(prompts))]  # row b*k + j is sample j of prompt b


# ------------------------------------------------------------------------------ 2. the labeller
def option_tokens(tok: ChatTokenizer) -> tuple[list[int], int, int]:
    """(shared prefix ids, token id of option A, token id of option B): ANSWERS tokenized, cut at
    the first token where they differ (SmolLM2: [' ('], 'A', 'B')."""
    a, b = tok.encode(ANSWERS[0]), tok.encode(ANSWERS[1])
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if n is None:
        raise InputError(f"tokenizer: the options {ANSWERS} tokenize with one a prefix of the other: {a} / {b}")
    return a[:n], a[n], b[n]


def feedback_question(conversation: str, comparison: str, first: str, second: str) -> str:
    """constitution.feedback_prompt without its closing 'The answer is:' (the assistant turn says it)."""
    text = feedback_prompt(conversation, comparison, first, second)
    assert text.endswith(ANSWER_CUE), "constitution.feedback_prompt no longer ends with 'The answer is:'"
    return text[:-len(ANSWER_CUE)].rstrip()


def shot_answer(shot: LabelShot, cue: str = ANSWER_CUE) -> str:
    """A worked example's assistant turn: 'The answer is: (B)', or under chain of thought
    'Let's think step by step: In option (A), <critique>\nSo the answer is: (B)'."""
    if cue == COT_CUE:
        worse, why = ANSWERS[1 - shot.better].strip(), shot.reasoning.strip()
        return f"{COT_CUE} In option {worse}, {why[:1].lower()}{why[1:]}\n{COT_ANSWER}{ANSWERS[shot.better]}"
    return f"{ANSWER_CUE}{ANSWERS[shot.better]}"


def judge_context(tok: ChatTokenizer, conversation: str, comparison: str, first: str, second: str,
                  cue: str = ANSWER_CUE, shots: tuple[LabelShot, ...] = ()) -> list[int]:
    """Token ids of the feedback question (first = option (A), second = option (B)) as a user
    message, then the assistant header and `cue`, where the model's answer begins. With shots
    (constitution.label_shots, paper §4.1), each worked example comes first as a user question and
    an assistant answer (shot_answer), so every context of a run starts with the same tokens."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": feedback_question(s.conversation, s.comparison, *s.options)},
                     {"role": "assistant", "content": shot_answer(s, cue)}]
    messages.append({"role": "user", "content": feedback_question(conversation, comparison, first, second)})
    ids, _ = tok.render(messages, add_generation_prompt=True)
    return ids + tok.encode(cue)


MIN_SHARED_PREFIX = 16
"""Shortest common prefix (tokens) worth one KV-cache prefill shared by several contexts."""


def shared_prefix_groups(contexts: list[tuple[int, ...]], max_group: int,
                         min_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[int, list[int]]]:
    """Contexts that start with the same tokens, as groups (prefix length P, indices into contexts):
    each group's prefix is prefilled once and only the suffixes run per row. Sorted as token
    tuples, a run of neighbours i..j shares P = the least common prefix of adjacent pairs (cut to
    leave every member at least one token: its last hidden state is read in the suffix pass), and
    runs
        tokens(i..j) = sum of lengths - (n - 1) * P      (n = j - i + 1 members, P >= min_prefix)
    tokens (sum of lengths when P < min_prefix: no sharing). The partition of the sorted order into
    runs of at most max_group members that runs the fewest tokens is found exactly by dynamic
    programming over run ends (O(N * max_group)). Groups with P = 0 are lone contexts."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    seqs = [contexts[i] for i in order]
    N = len(seqs)

    def lcp(a, b):
        n = min(len(a), len(b))
        return next((k for k in range(n) if a[k] != b[k]), n)

    adj = [lcp(seqs[k], seqs[k + 1]) for k in range(N - 1)]  # adj[k]: seqs k and k + 1
    best, cut = [0] + [None] * N, [0] * (N + 1)  # best[j]: fewest tokens for seqs[:j]; cut[j]: its last run's start
    for j in range(1, N + 1):
        P, total = len(seqs[j - 1]) - 1, 0
        for i in range(j - 1, max(j - max_group, 0) - 1, -1):  # the run seqs[i:j]
            total += len(seqs[i])
            if i < j - 1:
                P = min(P, adj[i], len(seqs[i]) - 1)
            cost = best[i] + (total - (j - i - 1) * P if P >= min_prefix else total)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], N
    while j > 0:
        i = cut[j]
        members = [order[k] for k in range(i, j)]
        P = min([len(seqs[k]) - 1 for k in range(i, j)] + adj[i:j - 1])
        out += [(P, members)] if len(members) > 1 and P >= min_prefix else [(0, [m]) for m in members]
        j = i
    return out[::-1]


def head_fp32(model: Transformer) -> torch.Tensor:
    """The LM head's weight (V, C) in fp32, cast once per option_logprobs call (not per batch).
    fp32 even for bf16 weights: bf16 logits are spaced ~0.06 apart near 10, as coarse as the
    margins between the two options, and would make many labels exactly 1/2."""
    return model.head_weight.float()


def option_rows(h_last: torch.Tensor, w32: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """LM head in fp32 and the two option columns: h_last (B, C), w32 (V, C) fp32, cols (2,)
    -> (B, 2) fp32 log-probs (log_softmax over the whole vocabulary)."""
    return F.linear(h_last.float(), w32).log_softmax(-1)[:, cols]  # (B, V) -> (B, 2)


def full_last_hidden(model: Transformer, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """The slow twin: a full padded forward of every row (right padding), read at the last real
    token. seqs: B token lists -> (B, C)."""
    device = model.embed_tokens.weight.device
    ids, mask = pad(seqs, pad_id, "right", device)  # (B, T)
    h = model.padded_forward(ids, mask, hidden=True)  # (B, T, C)
    return h[torch.arange(len(seqs), device=device), last_real_index(mask)]  # (B, C)


def prefix_last_hidden(model: Transformer, prefixes: list[list[int]], suffixes: list[list[int]],
                       group: list[int], pad_id: int) -> torch.Tensor:
    """Last hidden state of each row prefixes[group[r]] + suffixes[r], with each prefix run once:
    1. prefill the G prefixes (right-padded to Pm) into a KV cache (G, slots [0, Pm));
    2. copy its rows to the R rows (row r gets group[r]) into a cache of Pm + Sm slots;
    3. run the R suffixes (right-padded to Sm) at slots [Pm, Pm + Sm), RoPE positions P_g + t,
       attending to their prefix's real slots and to their own earlier suffix tokens.
    The same attention as one forward of the concatenation: only the slots differ, not the
    positions or the visible keys. prefixes: G lists (>= 1 token), suffixes: R lists (>= 1
    token), group: R ints in [0, G) -> (R, C)."""
    device = model.embed_tokens.weight.device
    p_ids, p_mask = pad(prefixes, pad_id, "right", device)  # (G, Pm)
    s_ids, s_mask = pad(suffixes, pad_id, "right", device)  # (R, Sm)
    (G, Pm), (R, Sm) = p_ids.shape, s_ids.shape
    p_valid, s_valid = p_mask.bool(), s_mask.bool()
    pre = model.new_cache(G, Pm)
    model.trunk(p_ids, padding_positions(p_mask), None if bool(p_valid.all()) else padding_attn_mask(p_valid, Pm),
                pre, start=0)  # fills pre; the hidden states of the prefix are not needed
    g = torch.tensor(group, device=device)
    cache = model.new_cache(R, Pm + Sm)
    cache.k[:, :, :, :Pm] = pre.k[:, g]  # (L, R, K, Pm, D) row r <- prefix group[r]
    cache.v[:, :, :, :Pm] = pre.v[:, g]
    key_valid = torch.cat([p_valid[g], s_valid], dim=1)  # (R, Pm + Sm)
    pos = p_mask.sum(-1)[g][:, None] + padding_positions(s_mask)  # (R, Sm) P_g + t
    h = model.trunk(s_ids, pos, padding_attn_mask(key_valid, Sm, start=Pm), cache, start=Pm)  # (R, Sm, C)
    return h[torch.arange(R, device=device), last_real_index(s_mask)]  # (R, C)


@torch.no_grad()
def option_logprobs(model: Transformer, contexts: list[list[int]], option_ids: tuple[int, int], pad_id: int,
                    batch_size: int = 8, desc: str | None = None, shared_prefix: bool = True) -> torch.Tensor:
    """Next-token log-probs of the two option tokens after each context: (N, 2) fp32 on the CPU,
    column 0 = option A. Equal contexts are scored once (so equal inputs give equal outputs,
    whatever the batch); contexts are batched by length (right padding, read at the last real
    token). With shared_prefix, contexts that start alike (the two orders of a pair, its
    principles: chat header, question, conversation) are grouped (shared_prefix_groups); each
    group's prefix is prefilled once into a KV cache, copied to its rows, and only the suffixes
    run (prefix_last_hidden); up to batch_size rows per batch. Contexts that share no prefix go
    through a full forward (full_last_hidden). The LM head is cast to fp32 once per call."""
    uniq = list(dict.fromkeys(tuple(c) for c in contexts))
    row = {c: i for i, c in enumerate(uniq)}
    out = torch.empty(len(uniq), 2)
    cols = torch.tensor(option_ids, device=model.embed_tokens.weight.device)
    w32 = head_fp32(model)  # (V, C)
    groups = shared_prefix_groups(uniq, batch_size) if shared_prefix else [(0, [i]) for i in range(len(uniq))]
    # batches: lone contexts by length, groups by their longest member, up to batch_size rows each
    single = sorted((m[0] for P, m in groups if P == 0), key=lambda i: len(uniq[i]))
    batches = [("full", single[s:s + batch_size]) for s in range(0, len(single), batch_size)]
    shared = sorted(((P, m) for P, m in groups if P > 0), key=lambda g: max(len(uniq[i]) for i in g[1]))
    chunk, n = [], 0
    for P, m in shared:
        if n + len(m) > batch_size:
            batches.append(("prefix", chunk))
            chunk, n = [], 0
        chunk.append((P, m))
        n += len(m)
    if chunk:
        batches.append(("prefix", chunk))
    for kind, b in tqdm(batches, desc=desc, disable=desc is None, unit="batch", leave=False):
        if kind == "full":
            rows = b
            h_last = full_last_hidden(model, [list(uniq[r]) for r in rows], pad_id)  # (B, C)
        else:
            rows = [i for _, m in b for i in m]
            group = [g for g, (_, m) in enumerate(b) for _ in m]
            h_last = prefix_last_hidden(model, [list(uniq[m[0]][:P]) for P, m in b],
                                        [list(uniq[i][P:]) for P, m in b for i in m], group, pad_id)  # (B, C)
        out[rows] = option_rows(h_last, w32, cols).cpu()  # (B, 2)
    return out[[row[tuple(c)] for c in contexts]]  # (N, 2)


@torch.no_grad()
def add_reasoning(model: Transformer, tok: ChatTokenizer, contexts: list[list[int]], max_new_tokens: int,
                  batch_size: int = 8) -> list[list[int]]:
    """Chain of thought: let the model continue each context (which ends with COT_CUE) greedily,
    cut its text at any answer it starts to give, and append '\\nSo the answer is:'."""
    uniq = list(dict.fromkeys(tuple(c) for c in contexts))
    reasoning = {}
    stops = (COT_ANSWER, ANSWER_CUE, "So the answer", "The answer is")
    for s in tqdm(range(0, len(uniq), batch_size), desc="reasoning", unit="batch", leave=False):
        chunk = uniq[s:s + batch_size]
        gen = generate(model, [list(c) for c in chunk], max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                       stop_strings=stops, tokenizer=tok, pad_id=tok.pad_id)
        for c, text in zip(chunk, gen.texts(tok)):
            for st in stops:
                text = text.split(st)[0]
            reasoning[c] = tok.encode(" " + text.strip() + "\n" + COT_ANSWER)
    return [list(c) + reasoning[tuple(c)] for c in contexts]


def centered_p(margin: float, cot: bool) -> float:
    """p - 1/2 for p = sigmoid(margin), the two-way softmax of the option log-probs, written as
    tanh(margin / 2) / 2 (an identity) because tanh is exactly odd in floating point: swapping the
    options flips the sign exactly. With cot, p is clamped to COT_CLAMP (paper §4.1)."""
    c = 0.5 * math.tanh(0.5 * margin)
    if cot:
        c = min(max(c, COT_CLAMP[0] - 0.5), COT_CLAMP[1] - 0.5)
    return c


# exercise
def judge_pairs(model: Transformer, tok: ChatTokenizer, pairs: list[tuple[str, str, str]],
                principles: list[list[str]], *, cot: bool = False, batch_size: int = 8,
                cot_max_new_tokens: int = 64, progress: bool = False,
                shots: tuple[LabelShot, ...] = ()) -> list[dict]:
    """Soft labels for pairs (conversation, response_a, response_b), each judged under its own
    list of comparison principles, in both orders, after the worked examples `shots` when given
    (judge_context). Returns per pair p_a_first_order,
    p_a_swapped_order, p_a (all: probability that response_a is better), orders_agree and
    per_principle [{principle, p_a_first_order, p_a_swapped_order}]."""
    if len(pairs) != len(principles):
        raise InputError(f"judge_pairs: {len(pairs)} pairs but {len(principles)} principle lists")
    prefix, id_a, id_b = option_tokens(tok)
    cue = COT_CUE if cot else ANSWER_CUE
    contexts = []  # per pair, per principle: [a first, b first]
    for (conv, a, b), comps in zip(pairs, principles):
        if not comps:
            raise InputError("judge_pairs: every pair needs at least one principle")
        for comp in comps:
            contexts.append(judge_context(tok, conv, comp, a, b, cue, shots))
            contexts.append(judge_context(tok, conv, comp, b, a, cue, shots))
    if cot:
        contexts = add_reasoning(model, tok, contexts, cot_max_new_tokens, batch_size)
    lp = option_logprobs(model, [c + prefix for c in contexts], (id_a, id_b), tok.pad_id, batch_size,
                         desc="judging" if progress else None)  # (N, 2)
    margin = (lp[:, 0] - lp[:, 1]).tolist()  # log p(A) - log p(B) per context
    out, i = [], 0
    for comps in principles:
        per, sum_first, sum_swap = [], 0.0, 0.0
        for comp in comps:
            c_first = centered_p(margin[i], cot)  # response_a shown as (A)
            c_swap = centered_p(-margin[i + 1], cot)  # response_a shown as (B): its margin is -margin
            i += 2
            per.append({"principle": comp, "p_a_first_order": 0.5 + c_first, "p_a_swapped_order": 0.5 + c_swap})
            sum_first += c_first
            sum_swap += c_swap
        m = len(comps)
        p_first, p_swap = 0.5 + sum_first / m, 0.5 + sum_swap / m
        # p_a = (p_first + p_swap) / 2, summed as centred values so that (x, x) gives exactly 1/2
        p_a = 0.5 + (sum_first + sum_swap) / (2 * m)
        out.append({"p_a_first_order": p_first, "p_a_swapped_order": p_swap, "p_a": p_a,
                    "orders_agree": (p_first > 0.5) == (p_swap > 0.5), "per_principle": per})
    return out


# ------------------------------------------------------------------------------ 2b. likelihood contrast
CONTRAST_TAU = 0.1
"""Temperature of the contrast label p(a) = sigmoid((s(a) - s(b)) / tau), s in nats per token: a gap
of 0.1 nat per token gives p = 0.73. It sets how soft the labels are, not which reply wins."""


def user_turn(conversation: str) -> str:
    """A feedback conversation ("Human: <prompt>", possibly with earlier turns) as the text of one
    user message: the leading "Human: " is dropped."""
    return conversation[len("Human: "):] if conversation.startswith("Human: ") else conversation


@torch.no_grad()
def reply_logprob_means(model: Transformer, tok: ChatTokenizer, items: list[tuple[str, str, str]],
                        batch_size: int = 8) -> list[float]:
    """Mean per-token log p(reply | system, user) over the reply's own tokens (not its end-of-turn
    marker), for items (system prompt, user text, reply), in the model's chat format. Equal items
    are scored once, and the batches depend only on the set of items, so equal inputs give equal
    outputs; the LM head runs in fp32 (metrics.continuation_logprobs)."""
    uniq = sorted(set(items))  # a canonical order: the batches depend only on the SET of items, so a
    pairs = []                 # pair asked in the other order is scored in exactly the same batches
    for system, user, reply in uniq:
        ctx, _ = tok.render([{"role": "system", "content": system}, {"role": "user", "content": user}],
                            add_generation_prompt=True)
        full, mask = tok.render([{"role": "system", "content": system}, {"role": "user", "content": user},
                                 {"role": "assistant", "content": reply}])
        reply_ids = [t for t, m in zip(full, mask) if m]  # the reply and its end-of-turn marker
        if tok.chat.end() and len(reply_ids) > 1:
            reply_ids = reply_ids[:-1]  # the end marker says little about content: not scored
        pairs.append((ctx, reply_ids))
    lps = continuation_logprobs(model, pairs, tok.pad_id, batch_size)
    mean = {u: float(lp.double().mean()) for u, lp in zip(uniq, lps)}
    return [mean[it] for it in items]


# exercise
def contrast_pairs(model: Transformer, tok: ChatTokenizer, pairs: list[tuple[str, str, str]],
                   contexts: list[list[tuple[str, str]]], *, tau: float = CONTRAST_TAU,
                   batch_size: int = 8) -> list[dict]:
    """Likelihood-contrast soft labels (no letters, no answer read-out): for pairs (conversation,
    response_a, response_b), each with its own list of (follow, violate) system prompts (one per
    principle),
        s(y) = mean log p(y | follow, x) - mean log p(y | violate, x)       (nats per token)
        p_a  = 1/2 + mean over principles of tanh((s(a) - s(b)) / (2 tau)) / 2
    i.e. the mean of sigmoid((s(a) - s(b)) / tau), written through tanh so that swapping a and b
    gives exactly 1 - p_a and identical replies exactly 1/2. All four forwards per principle go
    through one batched, length-sorted pass. The idea is the contrastive prompt of RLCD (Yang et
    al. 2023, arXiv 2307.12950 §3), read as a likelihood ratio instead of used to sample.
    Returns per pair {p_a, per_principle: [{follow, s_a, s_b, p_a}]}."""
    if len(pairs) != len(contexts):
        raise InputError(f"contrast_pairs: {len(pairs)} pairs but {len(contexts)} context lists")
    items = []
    for (conv, a, b), ctxs in zip(pairs, contexts):
        if not ctxs:
            raise InputError("contrast_pairs: every pair needs at least one (follow, violate) context")
        for follow, violate in ctxs:
            user = user_turn(conv)
            items += [(follow, user, a), (violate, user, a), (follow, user, b), (violate, user, b)]
    lp = reply_logprob_means(model, tok, items, batch_size)
    out, i = [], 0
    for ctxs in contexts:
        per, total = [], 0.0
        for follow, _ in ctxs:
            s_a, s_b = lp[i] - lp[i + 1], lp[i + 2] - lp[i + 3]
            i += 4
            c = 0.5 * math.tanh((s_a - s_b) / (2 * tau))  # sigmoid(x / tau) - 1/2, exactly odd in x
            per.append({"follow": follow, "s_a": s_a, "s_b": s_b, "p_a": p_from_centered(c)})
            total += c
        out.append({"p_a": p_from_centered(total / len(ctxs)), "per_principle": per})
    return out


def p_from_centered(c: float) -> float:
    """1/2 + c for c in [-1/2, 1/2], computed so that p_from_centered(-c) == 1 - p_from_centered(c)
    exactly in floating point: 1/2 + |c| is rounded once, and the negative side is 1 minus it
    (exact, by Sterbenz's lemma, for a value in [1/2, 1])."""
    return 0.5 + c if c >= 0 else 1.0 - (0.5 - c)


# ------------------------------------------------------------------------------ 2c. one switch, ensembles
LABELLERS = ("ab", "contrast", "ab+contrast", "rlcd", "revision")
"""--labeller: how pairs are made and labelled.
  ab           the paper's multiple choice (judge_pairs), both orders, m principles per pair;
  contrast     likelihood contrast (contrast_pairs) under the same m principles' follow/violate contexts;
  ab+contrast  both, averaged (each feedback model scores each pair both ways);
  rlcd         pairs sampled under a follow and a violate context, labelled by provenance (rlcd_responses);
  revision     (initial response, final revision) of the SL-CAI traces (revision_pairs)."""


def scorers_of(labeller: str) -> list[str]:
    """The scoring methods a --labeller value runs on sampled pairs: 'ab+contrast' -> ['ab', 'contrast']."""
    if labeller not in LABELLERS:
        raise InputError(f"--labeller {labeller!r}: expected one of {', '.join(LABELLERS)}")
    return labeller.split("+")


class FeedbackModel(NamedTuple):
    """One member of a labelling ensemble. A plain (name, model, tok) tuple is one too (methods None)."""
    name: str
    """its spec, e.g. 'qwen2.5-coder-1.5b:ab' (recorded in every label)"""
    model: Transformer
    tok: ChatTokenizer
    methods: list[str] | None = None
    """its own scoring methods (feedback model 'M:contrast'), or None: the labeller's"""


def member_methods(judge: tuple, scorers: list[str]) -> list[str]:
    """The scoring methods of one ensemble member (a FeedbackModel): its own when it names some
    (feedback model "M:contrast"), else `scorers`."""
    return FeedbackModel(*judge).methods or scorers


def ensemble_labels(judges: list[FeedbackModel], pairs: list[tuple[str, str, str]],
                    principles: list[list[Principle]], scorers: list[str], *, cot: bool = False,
                    batch_size: int = 8, cot_max_new_tokens: int = 64, tau: float = CONTRAST_TAU,
                    progress: bool = False, shots: tuple[LabelShot, ...] = ()) -> list[dict]:
    """Soft labels from an ensemble: every feedback model (FeedbackModel: name, model, tok, methods) of `judges`
    scores every pair with its own methods when it names some (feedback model "M:contrast", see
    member_spec), else with every method of `scorers` ('ab': judge_pairs under the principles' comparison
    texts, both orders, after the worked examples `shots` when given; 'contrast': contrast_pairs under
    their (follow, violate) contexts, which cannot read worked examples: shots with no 'ab' member are
    an error). With the centred labels c = p - 1/2 of the members,
        p_a     = 1/2 + mean over members of c        (soft labels averaged)
        votes_a = share of members with c > 0          (the majority vote, recorded; 1/2 counts half)
    so swapping a and b gives exactly 1 - p_a and one member its own label (to one rounding). The ab
    members' order statistics (p_a_first_order, p_a_swapped_order, orders_agree) are kept, averaged
    the same way, when there is an ab member. Returns per pair {p_a, votes_a, members: [{model,
    scorer, p_a}], per_principle (the first member's), [p_a_first_order, p_a_swapped_order,
    orders_agree]}."""
    if not judges or not scorers:
        raise InputError("ensemble_labels: need at least one feedback model and one scoring method")
    if shots and not any("ab" in member_methods(j, scorers) for j in judges):
        raise InputError("--few-shot-labels: no feedback model answers the A/B question (a contrast member "
                         "scores reply likelihoods and cannot read worked examples)")
    runs = []  # (name, scorer, labels)
    for judge in [FeedbackModel(*j) for j in judges]:
        name, model, tok = judge.name, judge.model, judge.tok
        for sc in member_methods(judge, scorers):
            if sc == "ab":
                labs = judge_pairs(model, tok, pairs, [[q.comparison for q in ps] for ps in principles], cot=cot,
                                   batch_size=batch_size, cot_max_new_tokens=cot_max_new_tokens, progress=progress,
                                   shots=shots)
            elif sc == "contrast":
                labs = contrast_pairs(model, tok, pairs, [[q.contrast() for q in ps] for ps in principles],
                                      tau=tau, batch_size=batch_size)
            else:
                raise InputError(f"scoring method {sc!r}: expected ab or contrast")
            runs.append((name, sc, labs))
    out = []
    for i in range(len(pairs)):
        cs = [r[2][i]["p_a"] - 0.5 for r in runs]
        rec = {"p_a": p_from_centered(sum(cs) / len(cs)),
               "votes_a": sum(1.0 if c > 0 else 0.5 if c == 0 else 0.0 for c in cs) / len(cs),
               "members": [{"model": n, "scorer": sc, "p_a": labs[i]["p_a"]} for n, sc, labs in runs],
               "per_principle": runs[0][2][i]["per_principle"]}
        ab = [labs[i] for _, sc, labs in runs if sc == "ab"]
        if ab:
            first = sum(lab["p_a_first_order"] - 0.5 for lab in ab) / len(ab)
            swap = sum(lab["p_a_swapped_order"] - 0.5 for lab in ab) / len(ab)
            rec.update(p_a_first_order=p_from_centered(first), p_a_swapped_order=p_from_centered(swap),
                       orders_agree=(first > 0) == (swap > 0))
        out.append(rec)
    return out


@torch.no_grad()
def rlcd_responses(model: Transformer, tok: ChatTokenizer, prompts: list[Prompt], contexts: list[tuple],
                   *, max_new_tokens: int, temperature: float, seed: int) -> list[tuple[str, str]]:
    """RLCD's pair construction (Yang et al. 2023, arXiv 2307.12950, §3): for prompt i, one reply
    sampled under contexts[i][0] ("follow the principle", p+) and one under contexts[i][1] ("violate
    it", p-), in one batched call. A context is a system prompt (str: a principle's follow / violate
    line) or a list of chat messages put in front of the user turn (the constitution's few-shot
    context, slcai.distill_context, against [] = no context: RLCD with the SL-CAI context). Returns
    (follow reply, violate reply) per prompt. The contexts are used only to sample: the reward model
    later sees the bare conversation. Row seeds stable_seed(seed, 'rlcd', prompt id, side) do not
    depend on the batch."""
    ids = []
    for p, ctx in zip(prompts, contexts):
        for c in ctx:  # rows 2i (follow), 2i + 1 (violate)
            front = [{"role": "system", "content": c}] if isinstance(c, str) else list(c)
            ids.append(tok.render(front + [{"role": "user", "content": p.text}], add_generation_prompt=True)[0])
    gen = generate(model, ids, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                   seed=[stable_seed(seed, "rlcd", p.id, side) for p in prompts for side in ("follow", "violate")])
    texts = [t.strip() for t in gen.texts(tok)]
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


def provenance_label(key: str, seed: int, chosen: str, rejected: str) -> tuple[str, str, float]:
    """(response_a, response_b, p_a) for a pair whose better reply is known by construction (RLCD's
    follow reply, or a final revision): which of the two is shown as response_a is a seeded coin
    (stable_seed(seed, 'side', key)), so that response_a is not always the better one; p_a is 1.0
    when response_a is `chosen`, else 0.0."""
    if random.Random(stable_seed(seed, "side", key)).random() < 0.5:
        return chosen, rejected, 1.0
    return rejected, chosen, 0.0


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def revision_filter(initial: str, final: str) -> str | None:
    """Why a (initial response, final revision) pair says nothing about improvement, or None to keep
    it. The rule, stated: drop the pair when
      1. the revision is empty;
      2. the revision equals the initial response up to case and whitespace.
    Nothing else: whether either text is a refusal is the evaluation's question (eval/yardstick.py),
    and the measuring stick never chooses training data. A revision that made the answer worse is
    kept with the provenance label; `train_rm.py --rescore ab` lets the AI labeller judge it instead."""
    if not final.strip():
        return "empty revision"
    if _norm(initial) == _norm(final):
        return "revision equals the initial response"
    return None


def revision_pairs(traces: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Preference pairs from SL-CAI traces (Hugging Face's CAI recipe: the initial response as
    rejected, the final revision as chosen), for the red-team records with at least one revision
    round and every distilled record (route distill: the policy's own answer rejected, the teacher's
    kept answer chosen, helpful prompts too), filtered by revision_filter. Returns (records with key
    '<id>:revision', prompt, prompt_id, kind, response_a, response_b, p_a, labeller='revision';
    dropped [{key, prompt, reason}])."""
    rows, dropped = [], []
    for r in traces:
        if not r.get("rounds") and r.get("route") != "distill":
            continue  # helpfulness prompts are answered once: no revision
        # (route distill: "initial" is the policy's own answer, "final" the teacher's under the context)
        key = f"{r['id']}:revision"
        why = revision_filter(r["initial"], r["final"])
        if why:
            dropped.append({"key": key, "prompt": r["prompt"], "reason": why})
            continue
        a, b, p_a = provenance_label(key, seed, r["final"], r["initial"])
        rows.append({"key": key, "prompt": r["prompt"], "prompt_id": r["id"], "kind": r.get("kind", "red-team"),
                     "response_a": a, "response_b": b, "p_a": p_a, "labeller": "revision"})
    return rows, dropped


# ------------------------------------------------------------------------------ drawing principles, reward-model inputs
def draw(pool: list, m: int, *seed_parts) -> list:
    """min(m, len(pool)) items of `pool` without replacement, from a rng seeded with
    stable_seed(*seed_parts): the one way every stage draws the principles of a pair or an item."""
    rng = random.Random(stable_seed(*seed_parts))
    return [pool[c] for c in rng.sample(range(len(pool)), min(m, len(pool)))]



def reward_input(tok: ChatTokenizer, prompt: str, response: str) -> list[int]:
    """Token ids the reward model scores: the conversation [user: prompt, assistant: response]
    in the chat format, ending with the assistant's end-of-turn marker (the score is read there;
    in the plain format, at the last reply token). PPO must score rollouts the same way."""
    ids, mask = tok.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    last = max((i for i, m in enumerate(mask) if m), default=len(ids) - 1)
    return ids[:last + 1]
