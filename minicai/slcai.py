"""SL-CAI data generation (Bai et al. 2022, §3.1): response -> critique -> revision, repeated.

For each red-team prompt:
    1. the model answers the prompt (the initial response);
    2. for each of `rounds` rounds (default 4, as in the paper's released samples), a principle is
       drawn at random, with replacement; the model is asked for a critique of its last answer
       under that principle, then for a revision; the transcript keeps growing, so round r
       critiques the revision of round r-1;
    3. the last revision is the SFT target.
Direct revision (critique=False; the paper's ablation of §3.5 / Fig. 7): each round asks for the
revision straight after the last answer, with no critique request and no critique.
Helpfulness prompts are answered once and kept as they are (the paper mixes helpfulness samples
into SL-CAI so that the model does not become evasive).

Two transcript formats:
  * "chat" (default for chat models): every request is a user turn and every answer an assistant
    turn, in the checkpoint's own chat format (HF's llm-swarm CAI recipe does the same);
  * "paper": the raw transcript of the paper's released prompts, continued as plain text:
        "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"
        "\\n\\nCritiqueRequest: {critique request}\\n\\nCritique: {critique}"
        "\\n\\nRevisionRequest: {revision request}\\n\\nRevision: {revision}"
The constitution's few-shot transcripts go in front of every critique and revision request (on by
default, as in the paper; --no-few-shot turns them off), never in front of the initial response.

Principle subsets (experiments/ablations.py: principle_subset; the ablation of §3.4 / Fig. 6): the constitution restricted
to the first n of its principles after a seeded shuffle, so that the rounds draw from n principles.

Traces: `traces` yields every batch's records (prompt, initial response, each round's principle,
critique and revision). Each prompt has its own seed (from the global seed and the prompt's id),
and the sampler draws each row from its own generator, so a prompt's record does not depend on
which prompts shared its batch. minicai/io/traces.py appends them to a JSONL file and resumes a
killed run where it stopped (run_slcai).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .constitution import Constitution, Principle, critique_request_text, revision_request_text
from .errors import InputError
from .io.data import Prompt
from .io.tokenizer import ChatTokenizer
from .sample import generate, stable_seed

PAPER_STOPS = ("\n\nHuman:", "\n\nAssistant:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:",
               "\n\nCritique:", "\n\nRevision:")


@dataclass
class Record:
    """One prompt's trace as it grows: events are (kind, text) with kind in
    user / assistant / critique_request / critique / revision_request / revision."""

    prompt: Prompt
    seed: int
    principles: list[Principle]
    events: list[tuple[str, str]]
    critique: bool = True
    """False: direct revision, each round is (revision_request, revision) with no critique."""

    def to_json(self) -> dict:
        rounds = []
        ev = self.events[2:]
        for r, p in enumerate(self.principles):
            if not self.critique:  # direct revision: 2 events per round
                if 2 * r + 1 < len(ev):
                    rounds.append({"principle": p.name, "revision_request": ev[2 * r][1], "revision": ev[2 * r + 1][1]})
            elif 4 * r + 3 < len(ev):
                rounds.append({"principle": p.name, "critique_request": ev[4 * r][1], "critique": ev[4 * r + 1][1],
                               "revision_request": ev[4 * r + 2][1], "revision": ev[4 * r + 3][1]})
        final = rounds[-1]["revision"] if rounds else self.events[1][1]
        return {"id": self.prompt.id, "prompt": self.prompt.text, "kind": self.prompt.kind,
                "source": self.prompt.source, "seed": self.seed, "initial": self.events[1][1],
                "rounds": rounds, "final": final}


CHAT_ROLE = {"user": "user", "critique_request": "user", "revision_request": "user",
             "assistant": "assistant", "critique": "assistant", "revision": "assistant"}


def few_shot_events(constitution: Constitution) -> list[tuple[str, str]]:
    """The constitution's few-shot examples as events, put in front of every critique and revision
    request (the paper's few-shot critique/revision prompts, Bai et al. 2022 §3.1; never in front of
    the initial response, which is the policy's own, nor in the SFT target)."""
    out = []
    for shot in constitution.few_shot:
        p = constitution.principle(shot.principle)
        out += [("user", shot.prompt), ("assistant", shot.response), ("critique_request", p.critique),
                ("critique", shot.critique), ("revision_request", p.revision), ("revision", shot.revision)]
    return out


def quoted_few_shot(constitution: Constitution) -> list[tuple[str, str]]:
    """The few-shot examples in the critic's quoted layout (quoted_events): per example, the quoted
    conversation with its critique request, the critique, the revision request and the revision."""
    out = []
    for shot in constitution.few_shot:
        p = constitution.principle(shot.principle)
        out += quoted_events([("user", shot.prompt), ("assistant", shot.response), ("critique_request", p.critique),
                              ("critique", shot.critique), ("revision_request", p.revision)])
        out.append(("revision", shot.revision))
    return out


# exercise
def render_paper(events: list[tuple[str, str]], principles_for_requests: bool = True) -> str:
    """The paper's raw transcript of `events`, ending with the label the model continues after
    (Assistant:, Critique: or Revision:) when the last event is a request. Answers follow their
    label after one space, as in the released samples."""
    text = ""
    for kind, t in events:
        if kind == "user":
            text += f"\n\nHuman: {t}\n\nAssistant:"
        elif kind == "critique_request":
            text += critique_request_text(Principle("", t, "", ""))
        elif kind == "revision_request":
            text += revision_request_text(Principle("", "", t, ""))
        else:  # an answer: assistant / critique / revision
            text += f" {t}"
    return text


def shared_prefix(rows: list[list[int]], prefix: list[int]) -> tuple[list[int] | None, list[list[int]]]:
    """(prefix, rows without it) when every row starts with `prefix` and has a token after it: the
    context generate(prefix=...) prefills once; else (None, rows) unchanged (e.g. a BPE merge across the
    boundary of a raw-text transcript)."""
    if prefix and all(len(r) > len(prefix) and r[:len(prefix)] == prefix for r in rows):
        return prefix, [r[len(prefix):] for r in rows]
    return None, rows


def stage_ids(tok: ChatTokenizer, fmt: str, events: list[tuple[str, str]]) -> list[int]:
    """Token ids that ask the model for the next answer after `events` (whose last is a request)."""
    if fmt == "paper":
        return tok.encode(render_paper(events))
    msgs = [{"role": CHAT_ROLE[k], "content": t} for k, t in events]
    return tok.render(msgs, add_generation_prompt=True)[0]


QUOTE_INTRO = "Here is a conversation between a human and an AI assistant."
ONLY_REPLY = "Write only the assistant's new response, nothing else."


def quoted_events(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The critic's view of a transcript (critic_layout="quoted"): the conversation so far, with the
    latest answer (initial response or last revision) as the assistant's reply, quoted inside the
    first user message together with this round's critique request; then this round's critique
    and revision request (+ ONLY_REPLY). A separate critic model then reads the reply as someone
    else's, not as its own previous turn (in the plain chat layout a 1.5B critic answered the
    critique request as if it were the assistant defending itself). Rounds do not accumulate: round
    r quotes the revision of round r-1. `events` is the full trace ending with a request."""
    user = events[0][1]
    answers = [t for k, t in events if k in ("assistant", "revision")]
    requests = [(k, t) for k, t in events if k in ("critique_request", "critique", "revision_request")]
    last = requests[-1][0]
    crit_req = next(t for k, t in reversed(requests) if k == "critique_request")
    reply = answers[-1]
    out = [("critique_request", f"{QUOTE_INTRO}\n\nHuman: {user}\n\nAssistant: {reply}\n\n{crit_req}")]
    if last == "revision_request":
        critique = next(t for k, t in reversed(requests) if k == "critique")
        out += [("critique", critique), ("revision_request", f"{requests[-1][1]} {ONLY_REPLY}")]
    return out


def clean_answer(text: str, fmt: str) -> str:
    """Cut a paper-format continuation at the first transcript label; strip whitespace."""
    if fmt == "paper":
        for s in PAPER_STOPS:
            text = text.split(s)[0]
    return text.strip()


PREAMBLE = re.compile(r"^(sure|certainly|okay|of course|here)[^\n]{0,80}\b(response|version|revision|rewrite|rewritten)"
                      r"\b[^\n]{0,40}:\s*", re.IGNORECASE)


def strip_preamble(text: str) -> str:
    """A revision without a leading announcement such as "Sure, here's a rewritten version of the
    assistant's response:" (an opening of at most ~120 characters that starts with sure/certainly/
    okay/of course/here, names the response/version/revision/rewrite, and ends with a colon); the
    SFT target is the new response, not the note about it. Anything else is kept as it is."""
    out = PREAMBLE.sub("", text, count=1).strip()
    return out if out else text


def traces(model, tok: ChatTokenizer, prompts: list[Prompt], constitution: Constitution, *,
           rounds: int = 4, fmt: str = "chat", few_shot: bool = True, batch_size: int = 8,
           max_new_tokens: int = 96, temperature: float = 0.7, seed: int = 0,
           critic: tuple | None = None, critic_layout: str = "quoted", critique: bool = True):
    """SL-CAI traces of `prompts`, generated batch by batch: yields each batch's records (Record.to_json:
    prompt, initial response, each round's principle, critique and revision, final). A prompt's
    record depends only on its own seed, never on its batch. critic=(model, tok): a distilled
    SL-CAI, where `model` writes the initial response and the critic model every critique and
    revision (the transcript is text, rendered in each model's own chat format); None: `model`
    writes all of it, as in the paper. critic_layout "quoted" shows the critic each round as a
    quoted conversation (quoted_events), "chat" as the policy's own transcript. critique=False:
    direct revision, every round a revision request right after the last answer (no critique; the
    record's rounds then hold principle, revision_request and revision only); a revision keeps the
    sampler seed it has with critiques (stage 2r + 2 of round r)."""
    if fmt not in ("chat", "paper"):
        raise InputError(f"format must be 'chat' or 'paper', got {fmt!r}")
    if not critique and critic is not None and critic_layout == "quoted":
        raise InputError("direct revision (no critique) with a critic model needs critic_layout 'chat'")
    if fmt == "chat" and tok.chat.kind == "plain":
        fmt = "paper"  # a checkpoint without a chat template only has the raw transcript
    writer, writer_tok = critic if critic is not None else (model, tok)
    if critic is not None and fmt == "chat" and writer_tok.chat.kind == "plain":
        raise InputError("the critic model has no chat template: use --format paper with it")
    prefix = few_shot_events(constitution) if few_shot else []
    quoted_prefix = quoted_few_shot(constitution) if few_shot else []
    stop_strings = PAPER_STOPS if fmt == "paper" else ()
    shots_ids: dict[bool, list[int]] = {}  # quoted layout? -> the few-shot block's token ids
    for start in range(0, len(prompts), batch_size):
        recs = []
        for p in prompts[start:start + batch_size]:
            s = stable_seed(seed, p.id)  # a prompt's own seed: its text does not depend on its batch
            principles = constitution.sample(random.Random(s), rounds) if p.kind == "red-team" else []
            recs.append(Record(p, s, principles, [("user", p.text)], critique))

        def answer(active: list[Record], stage: int, kind: str):
            m, t = (model, tok) if stage == 0 else (writer, writer_tok)  # the policy answers, the critic revises
            quote = stage > 0 and critic is not None and critic_layout == "quoted" and fmt == "chat"
            shots = [] if stage == 0 else quoted_prefix if quote else prefix  # few-shot: critique/revision only
            ids = [stage_ids(t, fmt, shots + (quoted_events(r.events) if quote else r.events)) for r in active]
            if shots and quote not in shots_ids:  # the few-shot block's ids, tokenized once per layout
                shots_ids[quote] = (t.encode(render_paper(shots)) if fmt == "paper" else
                                    t.render([{"role": CHAT_ROLE[k], "content": x} for k, x in shots])[0])
            # the few-shot examples: prefilled once per batch
            pre, ids = shared_prefix(ids, shots_ids[quote] if shots else [])
            gen = generate(m, ids, max_new_tokens, temperature=temperature, stop_ids=t.stop_ids,
                           stop_strings=stop_strings, tokenizer=t, pad_id=t.pad_id,
                           seed=[stable_seed(r.seed, "stage", stage) for r in active], prefix=pre)
            for r, text in zip(active, gen.texts(t)):
                text = clean_answer(text, fmt)
                r.events.append((kind, strip_preamble(text) if kind == "revision" else text))

        answer(recs, 0, "assistant")  # 1. the initial response
        for rnd in range(rounds):  # 2. critique -> revision, `rounds` times, under a principle drawn per round
            active = [r for r in recs if r.principles]
            if not active:
                break
            if critique:  # direct revision (critique=False) skips these two events
                for r in active:
                    r.events.append(("critique_request", r.principles[rnd].critique))
                answer(active, 2 * rnd + 1, "critique")
            for r in active:
                r.events.append(("revision_request", r.principles[rnd].revision))
            answer(active, 2 * rnd + 2, "revision")
        yield [r.to_json() for r in recs]  # 3. the last revision is the SFT target (Record.to_json "final")


# ------------------------------------------------------------------------------ context distillation
DISTILL_SYSTEM = ("You are a helpful, honest and harmless assistant. Answer ordinary questions fully. If a request "
                  "could help someone cause harm, do not help with it: say briefly why, and suggest a safer "
                  "alternative.")
"""The system line of the teacher's context (--route distill). Our wording: the constitution's aim in
one sentence, as the HHH prompt of Askell et al. 2021 opens with a description of the assistant."""


def distill_context(constitution: Constitution, system: str | None = DISTILL_SYSTEM) -> list[dict]:
    """The context C a teacher answers under in context distillation (Askell et al. 2021, arXiv
    2112.00861, §2.2: train p_theta(X) toward p_0(X | C), L(theta) = KL(p_0(X | C) || p_theta(X));
    SFT on samples x ~ p_0(. | C), scored without C, is a sample estimate of that loss's gradient,
    the entropy of p_0 being constant): the system line, then each of the constitution's few-shot
    examples as a finished exchange (its prompt as the user turn, its *revision* as the answer)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for shot in constitution.few_shot:
        msgs += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.revision}]
    return msgs


def best_of_k(items: list[tuple[str, list[str]]], prefer) -> list[tuple[int, list[float]]]:
    """The candidate the AI labeller likes best, per item (prompt, k candidate answers): a round
    robin, every unordered pair (i, j), i < j, labelled once by prefer(pairs) -> [p(a better)] with
    pairs [(conversation, a, b)] (feedback.ensemble_labels' p_a: both orders, m principles); a
    candidate's score is its mean win probability over its k - 1 games (p for i, 1 - p for j), and
    the highest score is kept (the first on a tie). k = 1: that candidate, score 1. Returns per item
    (index kept, scores). Identical texts are not judged: their game is a tie (1/2)."""
    games, where = [], []  # where[g] = (item, i, j) of games[g]
    for n, (prompt, cands) in enumerate(items):
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                if cands[i] != cands[j]:
                    games.append((f"Human: {prompt}", cands[i], cands[j]))
                    where.append((n, i, j))
    p = list(prefer(games)) if games else []
    if len(p) != len(games):
        raise InputError(f"best_of_k: the labeller gave {len(p)} labels for {len(games)} pairs")
    wins = [[0.0] * len(c) for _, c in items]
    for (n, i, j), p_a in zip(where, p):
        wins[n][i] += p_a - 0.5  # centred, so that a skipped tie adds nothing
        wins[n][j] += 0.5 - p_a
    out = []
    for (_, cands), w in zip(items, wins):
        k = len(cands)
        scores = [0.5 + x / (k - 1) for x in w] if k > 1 else [1.0]
        out.append((max(range(k), key=lambda i: (scores[i], -i)), scores))
    return out


def distill(model, tok: ChatTokenizer, prompts: list[Prompt], constitution: Constitution, *,
            teacher: tuple | None = None, k: int = 1, prefer=None, system: str | None = DISTILL_SYSTEM,
            batch_size: int = 8, max_new_tokens: int = 96, temperature: float = 0.7, seed: int = 0):
    """Context-distillation records, batch by batch (the second SL route, --route distill):
        1. the policy answers each prompt with no context (the record's "initial": what the standard-SFT
           baseline trains on);
        2. the teacher (teacher=(model, tok); None: the policy itself) answers it k times under
           distill_context (system line + the constitution's few-shot exchanges);
        3. k > 1: best_of_k with `prefer` (the AI labeller) keeps one; k = 1: the one answer.
    The record's "final" is the kept answer: SFT (train_sl.sft_examples) trains the policy on
    (prompt, final) with NO context in front, so the context's behaviour is distilled into the
    weights. Helpfulness prompts take the same route (the context holds a helpful exchange too).
    A prompt's texts depend only on its own seed (stable_seed(seed, prompt id)), not on its batch."""
    if k < 1:
        raise InputError(f"best-of-k: k must be >= 1, got {k}")
    if k > 1 and prefer is None:
        raise InputError("best-of-k with k > 1 needs a labeller (prefer)")
    t_model, t_tok = teacher if teacher is not None else (model, tok)
    context = distill_context(constitution, system)
    context_ids = t_tok.render(context)[0]  # the shared prefix of every teacher row, tokenized once
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        seeds = [stable_seed(seed, p.id) for p in batch]
        ids = [tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0] for p in batch]
        initial = generate(model, ids, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id, seed=[stable_seed(s, "stage", 0) for s in seeds]).texts(tok)
        ids = [t_tok.render(context + [{"role": "user", "content": p.text}], add_generation_prompt=True)[0]
               for p in batch for _ in range(k)]  # row b*k + j: answer j of prompt b
        pre, ids = shared_prefix(ids, context_ids)  # the context: prefilled once per batch
        texts = generate(t_model, ids, max_new_tokens, temperature=temperature, stop_ids=t_tok.stop_ids,
                         pad_id=t_tok.pad_id, seed=[stable_seed(s, "distill", j) for s in seeds for j in range(k)],
                         prefix=pre).texts(t_tok)
        cands = [[t.strip() for t in texts[b * k:(b + 1) * k]] for b in range(len(batch))]
        picks = best_of_k([(p.text, c) for p, c in zip(batch, cands)], prefer) if k > 1 else [(0, [1.0])] * len(batch)
        yield [{"id": p.id, "prompt": p.text, "kind": p.kind, "source": p.source, "seed": s, "route": "distill",
                "initial": init.strip(), "rounds": [], "candidates": c, "scores": sc, "chosen": i, "final": c[i]}
               for p, s, init, c, (i, sc) in zip(batch, seeds, initial, cands, picks)]
