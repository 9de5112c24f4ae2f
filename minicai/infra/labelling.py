"""AI-feedback plumbing: the resumable labelling loop that writes the preferences file, loading
feedback models, and the pipeline's labeller (DEFAULT). The labelling methods themselves are in
minicai/feedback.py; the labeller check on hand-labelled items (the paper's Fig. 4 number) is
minicai/eval/hhh.py.

Preferences file (JSONL, one record per judged pair, appended per batch; a rerun skips pairs
already there by "key" and drops a torn last line): key, prompt, prompt_id, kind, response_a,
response_b, principles (the comparison texts), p_a_first_order, p_a_swapped_order (both the
probability that response_a is better), p_a (the soft label), orders_agree, per_principle, and
TRL's implicit-prompt preference layout: chosen / rejected = [{"role": "user", ...},
{"role": "assistant", ...}], chosen being the response with p >= 0.5. TRL decides a row's format
from whichever key it looks at first, so give TRL only those two columns (e.g.
datasets' .select_columns(["chosen", "rejected"])); the plain-text "prompt" would confuse it.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..constitution import GENERIC_COMPARISON, Principle, label_shots
from ..errors import InputError
from ..feedback import (FeedbackModel, draw, ensemble_labels, provenance_label, revision_pairs, rlcd_responses,
                        sample_responses, scorers_of)
from ..io.checkpoint import load_model
from ..io.constitution_files import load_constitution
from ..io.data import Prompt
from ..io.files import append_jsonl, read_jsonl, write_jsonl
from ..io.tokenizer import ChatTokenizer
from ..io.traces import load_done
from ..model import Transformer
from ..slcai import distill_context
from . import distributed
from .devices import resolve_device


# ------------------------------------------------------------------------------ 1. response pairs
def dropped_path(path: Path) -> Path:
    """preferences.jsonl -> preferences.dropped.jsonl (pairs of identical responses)."""
    path = Path(path)
    return path.with_name(path.stem + ".dropped" + path.suffix)


def pair_keys(prompt: Prompt, k: int, labeller: str = "ab") -> list[str]:
    """Keys of a prompt's pairs in the order label_prompts writes them: "<prompt id>:i-j" for i < j
    over its k sampled responses; one "<prompt id>:rlcd" with labeller rlcd."""
    if labeller == "rlcd":
        return [f"{prompt.id}:rlcd"]
    return [f"{prompt.id}:{i}-{j}" for i, j in itertools.combinations(range(k), 2)]


def preference_record(prompt: Prompt, key: str, a: str, b: str, principles: list[Principle], label: dict,
                      labeller: str) -> dict:
    """One line of the preferences file (see the module docstring): the label's fields (p_a, and
    whatever else the labeller reports) plus TRL's chosen/rejected layout."""
    user = {"role": "user", "content": prompt.text}
    chosen, rejected = (a, b) if label["p_a"] >= 0.5 else (b, a)
    return {"key": key, "prompt": prompt.text, "prompt_id": prompt.id, "kind": prompt.kind, "labeller": labeller,
            "response_a": a, "response_b": b, "principles": [q.comparison for q in principles], **label,
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def label_prompts(policy: Transformer, policy_tok: ChatTokenizer, judges: list[FeedbackModel],
                  prompts: list[Prompt], principles: list[Principle], path: Path, *, labeller: str = "ab",
                  rescore: str | None = None, k: int = 2, m: int = 2, temperature: float = 1.0,
                  max_new_tokens: int = 64, seed: int = 0, prompts_per_batch: int = 8, judge_batch_size: int = 8,
                  cot: bool = False, cot_max_new_tokens: int = 64, rlcd_context: list[dict] | None = None,
                  shots: tuple = (), progress: bool = True) -> dict:
    """Make and label preference pairs for `prompts`, appending the records to `path` batch by batch.
    labeller ab / contrast / ab+contrast: `policy` samples k responses per prompt and the feedback
    models of `judges` (name, model, tok) label every pair (ensemble_labels) under m of the
    `principles` drawn per pair. labeller rlcd: `policy` samples one reply under a principle's
    follow context and one under its violate context (one principle drawn per prompt), labelled by
    provenance (provenance_label), or with rescore ('ab', 'contrast', 'ab+contrast') by the
    ensemble instead, the provenance label kept as p_a_provenance. rlcd_context (chat messages,
    e.g. slcai.distill_context: the constitution's few-shot harmless context): labeller rlcd samples
    one reply under that context and one with none instead, and needs rescore (the AI labeller
    labels these pairs: no provenance label; the records' labeller is "rlcd-few-shot+<rescore>"); the
    record's principles are the m drawn for the label. (labeller revision does not
    sample: see revision_pairs.) shots: worked examples of the labelling task put before every A/B
    question (constitution.label_shots; none by default). Resumable: prompts are cut into fixed batches of
    prompts_per_batch, and a pair already in `path` (or in its .dropped file) is not redone.
    Texts and principles of a record depend only on the global seed and its prompt (responses:
    stable_seed(seed, 'responses', prompt id); principles: stable_seed(seed, 'principles', key));
    the labels also on the batch the judges saw it in, in the last bits (padding changes the shapes
    of the matmuls): train_rm.py under torchrun therefore gives each rank whole batches of this
    fixed cut. progress=False hides the bar. Returns preference_stats() over the whole file plus this
    run's seconds of generation and of judging."""
    rlcd = labeller == "rlcd"
    if labeller == "revision":
        raise InputError("label_prompts: labeller 'revision' reads the SL-CAI traces (revision_pairs), it samples nothing")
    scorers = scorers_of(rescore) if rlcd and rescore else [] if rlcd else scorers_of(labeller)
    if scorers and not judges:
        raise InputError(f"labeller {labeller!r}: needs at least one feedback model")
    if rlcd_context is not None and not (rlcd and rescore):
        raise InputError("RLCD with a few-shot context: needs labeller rlcd and a rescore method (the AI labeller "
                         "labels those pairs, not their provenance)")
    if not rlcd and k < 2:
        raise InputError(f"k={k}: need at least 2 responses per prompt to make a pair")
    if not 1 <= m <= len(principles):
        raise InputError(f"principles per pair m={m}: must be between 1 and the {len(principles)} "
                         f"comparison principles of the constitution")
    if not prompts:
        raise InputError("label_prompts: no prompts")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_path = dropped_path(path)
    done = {r.get("key") for r in read_jsonl(path, "repair")}
    done |= {r.get("key") for r in read_jsonl(drop_path, "repair")}
    pair_idx = list(itertools.combinations(range(k), 2))
    batches = [prompts[s:s + prompts_per_batch] for s in range(0, len(prompts), prompts_per_batch)]
    worked, seconds = 0, {"generate_s": 0.0, "judge_s": 0.0}
    bar = tqdm(total=len(prompts), desc="feedback", unit="prompt", disable=not progress)
    for batch in batches:
        todo = [p for p in batch if any(key not in done for key in pair_keys(p, k, labeller))]
        if not todo:
            bar.update(len(batch))
            continue
        t0 = time.time()
        jobs, dropped = [], []  # jobs: (prompt, key, response_a, response_b, principles, provenance p_a)
        if rlcd:
            if rlcd_context is None:  # a principle's follow / violate system prompts, one principle per prompt
                drawn = [[draw(principles, 1, seed, "rlcd-principle", p.id)[0]] for p in todo]
                contexts = [q[0].contrast() for q in drawn]
            else:  # the few-shot context against none; the AI labeller's m principles go on the record
                drawn = [draw(principles, m, seed, "principles", f"{p.id}:rlcd") for p in todo]
                contexts = [(rlcd_context, [])] * len(todo)
            replies = rlcd_responses(policy, policy_tok, todo, contexts,
                                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            for p, comps, (good, bad) in zip(todo, drawn, replies):
                key = f"{p.id}:rlcd"
                if good == bad:
                    dropped.append({"key": key, "prompt": p.text, "prompt_id": p.id, "response": good})
                    continue
                a, b, p_a = provenance_label(key, seed, good, bad)
                jobs.append((p, key, a, b, comps, p_a))
        else:
            responses = sample_responses(policy, policy_tok, todo, k, max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed)
            for p, resp in zip(todo, responses):
                for i, j in pair_idx:
                    key = f"{p.id}:{i}-{j}"
                    if key in done:
                        continue
                    if resp[i] == resp[j]:
                        dropped.append({"key": key, "prompt": p.text, "prompt_id": p.id, "response": resp[i]})
                        continue
                    jobs.append((p, key, resp[i], resp[j], draw(principles, m, seed, "principles", key), None))
        seconds["generate_s"] += time.time() - t0
        t0 = time.time()
        if scorers and jobs:
            labels = ensemble_labels(judges, [(f"Human: {p.text}", a, b) for p, _, a, b, _, _ in jobs],
                                     [comps if not rlcd else draw(principles, m, seed, "principles", key)
                                      for _, key, _, _, comps, _ in jobs], scorers, cot=cot,
                                     batch_size=judge_batch_size, cot_max_new_tokens=cot_max_new_tokens, shots=shots)
        else:
            labels = [{} for _ in jobs]
        for lab, (*_, prov) in zip(labels, jobs):
            if prov is not None:
                if scorers:
                    lab["p_a_provenance"] = prov
                else:
                    lab["p_a"] = prov
        seconds["judge_s"] += time.time() - t0
        name = (labeller if not (rlcd and rescore) else  # which pairs, labelled how: "rlcd-few-shot+ab"
                f"rlcd{'-few-shot' if rlcd_context is not None else ''}+{rescore}")
        rows = [preference_record(p, key, a, b, comps, lab, name)
                for (p, key, a, b, comps, _), lab in zip(jobs, labels)]
        append_jsonl(path, rows)
        if dropped:
            append_jsonl(drop_path, dropped)
            tqdm.write(f"feedback: dropped {len(dropped)} pair(s) of identical responses")
        done |= {r["key"] for r in rows} | {r["key"] for r in dropped}
        worked += 1
        bar.update(len(batch))
    bar.close()
    return {**preference_stats(path), "seconds_this_run": seconds}


def preference_stats(path: Path, recs: list[dict] | None = None) -> dict:
    """Counts over a preferences file and its .dropped file. first_order_picks_a: share of pairs
    where the labeller prefers response_a when it is shown as (A); swapped_order_picks_a: the same
    when it is shown as (B). A labeller that always answers (A) has 1 and 0. recs: the file's
    records as files.read_preferences gives them (in the internal shape, TRL's layout included);
    default: the file as labelling writes it."""
    recs = read_jsonl(path, "drop") if recs is None else recs
    n = len(recs)
    full = n and all("orders_agree" in r for r in recs)  # only the ab labeller has order statistics

    def share(f):
        return sum(f(r) for r in recs) / n if full else None
    return {"pairs": n, "dropped_identical": len(read_jsonl(dropped_path(path), "drop")),
            "order_agreement": share(lambda r: bool(r["orders_agree"])),
            "first_order_picks_a": share(lambda r: r["p_a_first_order"] > 0.5),
            "swapped_order_picks_a": share(lambda r: r["p_a_swapped_order"] > 0.5),
            "a_preferred": sum(r["p_a"] > 0.5 for r in recs) / n if n else None,
            "mean_abs_label_margin": sum(abs(r["p_a"] - 0.5) for r in recs) / n if n else None}


# ------------------------------------------------------------------------------ reward-model inputs


DEFAULT = {"labeller": "ab", "feedback_models": ["qwen2.5-coder-1.5b:ab", "smollm2-135m:contrast"],
           "constitution": "default", "principles_per_pair": 2}
"""The pipeline's labeller: an ensemble of the 1.5B feedback model asking the paper's A/B question
(both orders) and the embedded 135M model's likelihood contrast, soft labels averaged, under m = 2
principles of the default constitution drawn per pair (docs/results.md, "Labeller ablation", says
why). train_rm.py, the pipeline and `python -m minicai.eval.hhh` without labeller flags all use
exactly this."""


# ------------------------------------------------------------------------------ train_rm.py's stage 1
def merge_rank_files(pref_path: Path, prompts: list[Prompt], k: int, labeller: str = "ab") -> None:
    """Fold the per-rank files of a torchrun labelling run (preferences.rank{r}.jsonl and their
    .dropped files, also those a killed run left behind, whatever its world size) into
    preferences.jsonl and preferences.dropped.jsonl: one record per key, in the order one process
    writes them (prompt order, then pair order); then delete them. Rank 0 only."""
    shards = sorted(f for f in pref_path.parent.glob(f"{pref_path.stem}.rank*{pref_path.suffix}")
                    if not f.name.endswith(".dropped" + pref_path.suffix))
    order = {key: n for n, key in enumerate(key for p in prompts for key in pair_keys(p, k, labeller))}
    for target, parts in ((pref_path, shards), (dropped_path(pref_path), [dropped_path(f) for f in shards])):
        recs = {}
        for f in (target, *parts) if shards else ():
            for r in read_jsonl(f, "drop"):
                recs.setdefault(r.get("key"), r)  # a key in two files (a rerun after a crash): the same record
        if recs:
            write_jsonl(target, sorted(recs.values(), key=lambda r: order.get(r.get("key"), len(order))))
    for f in shards:
        f.unlink()
        dropped_path(f).unlink(missing_ok=True)


def write_revision_pairs(a, seed: int, pref_path: Path, principles, judges, scorers) -> None:
    """--labeller revision (a: train_rm.LabelArgs): the SL-CAI traces' (initial response, final revision) pairs
    (feedback.revision_pairs), rescored by the ensemble with --rescore, written in one atomic step;
    the pairs the stated rule drops go to the .dropped file."""
    rows, dropped = revision_pairs(list(load_done(Path(a.sl_traces)).values()), seed)
    if not rows:
        raise InputError(f"{a.sl_traces}: no (initial, revision) pair left after the revision filter "
                         f"({len(dropped)} dropped)")
    if scorers:
        labels = ensemble_labels(judges, [(f"Human: {r['prompt']}", r["response_a"], r["response_b"]) for r in rows],
                                 draw_principles(principles, len(rows), a.principles_per_pair, seed, "revision"),
                                 scorers, cot=a.cot, batch_size=a.judge_batch_size,
                                 shots=few_shot_labels(a.constitution, a.comparisons) if a.few_shot_labels else ())
        for r, lab in zip(rows, labels):
            r.update(p_a_provenance=r["p_a"], **lab, labeller=f"revision+{a.rescore}")
    for path, recs in ((dropped_path(pref_path), dropped), (pref_path, rows)):
        write_jsonl(path, recs)


def label_pairs(a, seed: int, pref_path: Path, prompts: list[Prompt], principles, d, device,
                dtype) -> dict:
    """train_rm.py's stage 1 (a: its LabelArgs) into pref_path, resuming what is there. Under torchrun rank r labels whole batches
    r, r + world, ... of label_prompts' fixed cut (--gen-batch-size prompts) into its own file,
    skipping the batches already merged; rank 0 then merges the files (merge_rank_files). The policy
    and the judges so see exactly the batches of one process and the labels agree to the last bit
    (a prompt-by-prompt split changes the judge's padded batches, and p_a by ~1e-7); every record
    depends only on the seed and its prompt, so any world size writes the same file (more ranks
    than batches leaves some idle). Returns the seconds of generation and judging (slowest rank's)."""
    if d.main:
        merge_rank_files(pref_path, prompts, a.k, a.labeller)  # what a killed torchrun run left in rank files
    distributed.barrier(d)
    scorers = (scorers_of(a.rescore) if a.rescore else []) if a.labeller in ("rlcd", "revision") else \
        scorers_of(a.labeller)
    policy, policy_tok, _ = load_model(a.policy, dtype=dtype, device=device)
    names = [a.policy + n[len("policy"):] if n == "policy" or n.startswith("policy:") else n
             for n in (a.feedback_model or DEFAULT["feedback_models"])]
    judges = load_judges(names, resolve_device(str(device), a.feedback_dtype)[1], device,
                         reuse={a.policy: (policy, policy_tok)}) if scorers else []
    rlcd_context = (distill_context(load_constitution(a.constitution, a.comparisons))
                    if a.labeller == "rlcd" and a.rlcd_context == "few-shot" else None)
    mine, path = prompts, pref_path  # one process: label_prompts itself skips the pairs already in the file
    if a.labeller == "revision":
        mine = []
        if d.main and not pref_path.exists():
            write_revision_pairs(a, seed, pref_path, principles, judges, scorers)
    elif d.world > 1:
        done = {r.get("key") for f in (pref_path, dropped_path(pref_path)) for r in read_jsonl(f, "drop")}
        batches = [prompts[s:s + a.gen_batch_size] for s in range(0, len(prompts), a.gen_batch_size)]
        mine = [p for b in distributed.shard(batches, d)
                if any(key not in done for q in b for key in pair_keys(q, a.k, a.labeller)) for p in b]
        path = pref_path.with_name(f"{pref_path.stem}.rank{d.rank}{pref_path.suffix}")
    seconds = {"generate_s": 0.0, "judge_s": 0.0}
    if mine:
        seconds = label_prompts(policy, policy_tok, judges, mine, principles, path, labeller=a.labeller,
                                rescore=a.rescore, k=a.k, m=a.principles_per_pair, temperature=a.temperature,
                                max_new_tokens=a.max_new_tokens, seed=seed, prompts_per_batch=a.gen_batch_size,
                                judge_batch_size=a.judge_batch_size, cot=a.cot,
                                cot_max_new_tokens=a.cot_max_new_tokens, rlcd_context=rlcd_context,
                                shots=few_shot_labels(a.constitution, a.comparisons) if a.few_shot_labels else (),
                                progress=d.main)["seconds_this_run"]
    del policy, judges
    seconds = {f"feedback_{k}": distributed.all_reduce_max(torch.tensor(v, device=device), d).item()
               for k, v in seconds.items()}
    distributed.barrier(d)
    if d.world > 1 and d.main:  # the rank files into preferences.jsonl, in prompt order
        merge_rank_files(pref_path, prompts, a.k, a.labeller)
    distributed.barrier(d)
    return seconds


def draw_principles(principles: list[Principle], n_items: int, m: int, seed: int, salt: str) -> list[list[Principle]]:
    """Per item, m principles without replacement (m = 0: all of them), from a seeded rng per item
    (stable_seed(seed, salt, i)): how a pair is judged in the pipeline, applied to labelled items."""
    if m == 0 or m >= len(principles):
        return [list(principles)] * n_items
    return [draw(principles, m, seed, salt, i) for i in range(n_items)]


def feedback_principles(constitution: str) -> list[Principle]:
    """The principles a labeller judges under: a constitution's ('default', 'hhh', a file), or 'generic'
    (one principle: GENERIC_COMPARISON and GENERIC_CONTRAST)."""
    if constitution == "generic":
        return [Principle("generic", "", "", GENERIC_COMPARISON)]
    return load_constitution(constitution).principles


def few_shot_labels(constitution: str, comparisons: str | None = None) -> tuple:
    """--few-shot-labels: the worked examples of the labelling task of a constitution ('default',
    'hhh', a file; with `comparisons` as load_constitution reads them; constitution.label_shots).
    'generic' has none: a one-line error."""
    shots = () if constitution == "generic" else tuple(label_shots(load_constitution(constitution, comparisons)))
    if not shots:
        raise InputError(f"--few-shot-labels: the constitution {constitution!r} has no few-shot examples "
                         f"([[few_shot]] entries) to make worked labelling examples from")
    return shots


def member_spec(spec: str) -> tuple[str, list[str] | None]:
    """A --feedback-model value: 'MODEL' (scored with --labeller's methods) or 'MODEL:METHOD' with
    METHOD ab, contrast or ab+contrast (that model scores with METHOD only), e.g.
    'qwen2.5-coder-1.5b:ab' + 'smollm2-135m:contrast'. Returns (model, methods or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in ("ab", "contrast", "ab+contrast"):
        return head, tail.split("+")
    return spec, None


def load_judges(names: list[str], dtype, device, reuse: dict | None = None) -> list[FeedbackModel]:
    """A FeedbackModel (name, model, tokenizer, methods or None) of each feedback model spec
    (member_spec), each model loaded once; reuse {name: (model, tok)} holds models already loaded
    (the policy)."""
    loaded = dict(reuse or {})
    out = []
    for spec in dict.fromkeys(names):
        name, methods = member_spec(spec)
        if name not in loaded:
            loaded[name] = load_model(name, dtype=dtype, device=device)[:2]
        out.append(FeedbackModel(spec, *loaded[name], methods))
    return out
