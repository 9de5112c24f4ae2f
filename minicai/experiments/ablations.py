"""The SL-CAI ablations of Bai et al. 2022 (arXiv 2212.08073), one command each:

    python -m minicai.experiments.ablations revisions  --out DIR --reward-model RM   # §3.4, Fig. 5
    python -m minicai.experiments.ablations critique   --out DIR --reward-model RM   # §3.5, Fig. 7
    python -m minicai.experiments.ablations principles --out DIR --reward-model RM   # §3.4, Fig. 6

revisions:  one SL-CAI trace per prompt (slcai.traces, `--rounds` critique -> revision rounds); the
            response after k = 0 (the initial response), 1, ..., rounds revisions is measured.
critique:   the same prompts twice, with critiques (critique -> revision) and with direct revision
            (revision request right after the last answer, no critique: slcai.traces critique=False);
            both arms share their seeds, so their initial responses are the same text.
principles: for each count n in --counts, --samples traces per prompt whose rounds draw from n
            principles only (principle_subset: the first n after a seeded shuffle; 0 = all);
            the final revisions are measured, and their diversity across the samples of a prompt.

The measures, on the TRAIN side of data.split of the red-team prompts (the evaluation's held-out
prompts are never used):
- RM score: the reward model's output at the last token of [user: prompt, assistant: response]
  (feedback.reward_input, model.last_token_scores through evaluate.score_responses, as in PPO and the
  evaluation); mean over responses with a normal 95% interval (mean_interval).
- harmlessness: yardstick.harmlessness, the judge-free read-out: the shares of explained refusal /
  evasive refusal / compliance (yardstick.outcome, the strict detector) and of loose refusal
  (garak's substrings), each with its Wilson 95% interval.
- diversity (principles): distinct-n (distinct_n, Li et al. 2016) of the --samples final
  revisions of one prompt, averaged over prompts (prompt_diversity).

Every command writes, atomically, DIR/<name>.experiment.json (the experiment-output contract:
experiment, title, command, seconds, table, notes, plots, + the raw points) and DIR/<name>.md, and
keeps its traces in DIR/<name>/ (config.json + traces*.jsonl): rerunning the same command resumes
the traces where a killed run stopped; another configuration in the same folder is refused unless
--overwrite.
"""
from __future__ import annotations

import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..constitution import Constitution
from ..errors import InputError
from ..eval.evaluate import score_responses
from ..eval.yardstick import garak_mitigation_substrings, harmlessness
from ..infra import cli
from ..infra.cli import run_cli
from ..infra.devices import resolve_device
from ..infra.train import prepare_run_dir
from ..io import files
from ..io.checkpoint import EMBEDDED_NAME, load_model, load_scalar_model
from ..io.constitution_files import load_constitution
from ..io.data import Prompt, load_prompts, split
from ..io.traces import load_done, run_slcai


# ------------------------------------------------------------------------------ the measures
def mean_interval(xs: list[float], z: float = 1.96) -> dict:
    """{mean, low, high, sd, n}: the mean of xs with its normal-approximation 95% interval
    mean +- z * sd / sqrt(n), sd the sample standard deviation (n - 1 in the denominator).
    n = 0: every field None but n; n = 1: no interval (low, high, sd None)."""
    n = len(xs)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "sd": None, "n": 0}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def response_after(record: dict, k: int) -> str:
    """A trace record's response after k revisions: the initial response for k = 0, else the
    revision of round k (1-based)."""
    if k == 0:
        return record["initial"]
    if k > len(record["rounds"]):
        raise InputError(f"trace of prompt {record['id']}: {len(record['rounds'])} rounds, no revision {k}")
    return record["rounds"][k - 1]["revision"]


def prompt_diversity(groups: list[list[str]], n: int = 2) -> dict:
    """Diversity across samples: for each prompt, distinct-n (distinct_n: distinct word
    n-grams / all n-grams, pooled over that prompt's samples) of its group of samples; then
    mean_interval over the prompts (a prompt whose samples hold no n-gram is left out).
    groups: one list of sample texts per prompt. Returns mean_interval's dict + per_prompt."""
    per = [distinct_n(g, n) for g in groups]
    return {**mean_interval([d for d in per if d is not None]), "per_prompt": per}


def distinct_principles(records: list[list[dict]]) -> float | None:
    """Mean over prompts of the number of different principles drawn in all of a prompt's samples
    and rounds. records: one list of sample records per prompt."""
    counts = [len({r["principle"] for rec in recs for r in rec["rounds"]}) for recs in records]
    return sum(counts) / len(counts) if counts else None


def measure(rm, rm_tok, prompts: list[Prompt], texts: list[str], batch_size: int,
            substrings: tuple[str, ...] | None = None) -> dict:
    """RM score (per response and mean_interval), the judge-free harmlessness shares
    (yardstick.harmlessness) and the mean length in words of `texts`, the replies to `prompts`."""
    scores = score_responses(rm, rm_tok, prompts, texts, batch_size)
    return {"rm": mean_interval(scores), "scores": scores, "harmlessness": harmlessness(texts, substrings),
            "words": sum(len(t.split()) for t in texts) / len(texts) if texts else None}


def fmt_share(s: dict) -> str:
    """A share (metrics.share) as "k/n rate% [low-high]" (Wilson 95%), percentages rounded."""
    if not s["n"]:
        return "-"
    return f"{s['k']}/{s['n']} {100 * s['rate']:.0f}% [{100 * s['low']:.0f}-{100 * s['high']:.0f}]"


def fmt_interval(m: dict, digits: int = 2, signed: bool = False) -> str:
    """A mean_interval as "mean [low, high]" with `digits` decimals (a + sign with signed)."""
    if m["mean"] is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if m["low"] is None:
        return f.format(m["mean"])
    return f"{f.format(m['mean'])} [{f.format(m['low'])}, {f.format(m['high'])}]"


# ------------------------------------------------------------------------------ flags
@dataclass
class Common:
    """flags of every ablation"""
    out: str = field(default=None, metadata={"required": True})
    """folder for <name>.experiment.json, <name>.md and the traces (<name>/); rerun to resume"""
    model: str = field(default=EMBEDDED_NAME, metadata={"model": "lm"})
    """policy that answers, critiques and revises: .gguf, HF folder or 'smollm2-135m' (the embedded one)"""
    reward_model: str = field(default=None, metadata={"required": True, "model": "reward"})
    """reward-model folder (train_rm.py's OUT/rm) that scores the responses"""
    constitution: str = "default"
    """'default', 'hhh', or a .toml/.json file"""
    prompts: list[str] = field(default=None, metadata={"repeat": True})
    """red-team prompt source (repeatable; default builtin-red-team); only its training side is used"""
    n_prompts: int = field(default=16, metadata=cli.AT_LEAST_0)
    """red-team prompts (the first n of the training side of the held-out split); 0 = all"""
    held_out_fraction: float = field(default=0.2, metadata=cli.SHARE)
    """share of prompts kept for evaluation and never used here (data.split, as train_sl.py)"""
    format: str = field(default="chat", metadata={"choices": ("chat", "paper")})
    """chat: requests as user turns in the model's chat format; paper: raw Human/Assistant transcript"""
    few_shot: bool = False
    """put the constitution's few-shot examples in front of every transcript"""
    max_new_tokens: int = field(default=64, metadata=cli.AT_LEAST_1)
    """tokens per response, critique or revision"""
    temperature: float = field(default=0.7, metadata=cli.AT_LEAST_0)
    """sampling temperature of every generation (0 = greedy)"""
    batch_size: int = field(default=16, metadata=cli.AT_LEAST_1)
    """prompts generated together"""
    rm_batch_size: int = field(default=16, metadata=cli.AT_LEAST_1)
    """responses scored together by the reward model"""
    seed: int = 0
    """seed of the sampling and of the principle draws (each prompt's own seed derives from it)"""
    device: str = field(default="auto", metadata=cli.IGNORE)
    """cpu, cuda, cuda:N, or auto (cuda if available)"""
    threads: int = field(default=None, metadata={**cli.IGNORE, **cli.AT_LEAST_1})
    """CPU threads for torch (default: torch's choice)"""
    overwrite: bool = field(default=False, metadata=cli.NOT_CONFIG)
    """delete OUT/<name>/ if it holds traces of another configuration"""


@dataclass
class RevisionsArgs(Common):
    rounds: int = field(default=4, metadata=cli.AT_LEAST_1)
    """critique -> revision rounds; the response after 0..rounds revisions is measured (paper: 4)"""


@dataclass
class CritiqueArgs(Common):
    rounds: int = field(default=4, metadata=cli.AT_LEAST_1)
    """revision rounds of each arm (critiqued and direct)"""


@dataclass
class PrinciplesArgs(Common):
    counts: list[int] = field(default=None, metadata={"repeat": True, **cli.AT_LEAST_0})
    """number of principles the rounds draw from (repeatable; 0 = all; default 1, 2, 4, 0)"""
    samples: int = field(default=4, metadata={"range": "[2, inf)"})
    """SL-CAI traces per prompt and count (sample j uses seed --seed + j); diversity is across them"""
    rounds: int = field(default=1, metadata=cli.AT_LEAST_1)
    """critique -> revision rounds per trace; the final revision is measured"""
    distinct: int = field(default=2, metadata=cli.AT_LEAST_1)
    """n of distinct-n, the diversity measure (word n-grams)"""


DEFAULT_COUNTS = (1, 2, 4, 0)


# ------------------------------------------------------------------------------ shared steps
def training_prompts(args: Common) -> list[Prompt]:
    """The first --n-prompts red-team prompts of the train side of data.split (as train_sl.py)."""
    red = [p for spec in (args.prompts or ["builtin-red-team"]) for p in load_prompts(spec, "red-team")]
    train, _ = split(red, args.held_out_fraction)
    if args.n_prompts < 0:
        raise InputError(f"--n-prompts must be >= 0 (0 = all), got {args.n_prompts}")
    train = train[:args.n_prompts] if args.n_prompts else train
    if not train:
        raise InputError("--prompts: no red-team prompts left after the held-out split")
    return train


def check_args(args: Common) -> None:
    """Bad flags as one-line errors, before any model is loaded: each flag's range and the model
    specs (--reward-model: a folder with reward_head.safetensors), as cli.parse checks them."""
    cli.validate(args)


def gen_kwargs(args: Common) -> dict:
    """slcai.traces' keyword arguments from the flags."""
    return dict(rounds=args.rounds, fmt=args.format, few_shot=args.few_shot, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)


def open_work(args: Common, cls, name: str) -> Path:
    """DIR/<name>/: created, or checked against the configuration that made it (train.prepare_run_dir)."""
    return prepare_run_dir(Path(args.out) / name, cli.config(args), args.overwrite, cli.resume_ignored(cls),
                           defaults=cli.defaults(cls))


def on_disk(work: Path) -> int:
    """Trace records already in the work folder's traces*.jsonl (written by an earlier run)."""
    return sum(len(load_done(f)) for f in sorted(work.glob("traces*.jsonl")))


def write_experiment(out: Path, name: str, title: str, command: str, seconds: float, table: str, notes: str,
                     plots: list[dict], reused: tuple[int, int] = (0, 0), **raw) -> dict:
    """DIR/<name>.experiment.json and DIR/<name>.md (the experiment-output contract). reused:
    (trace records found on disk at the start, trace records in all): a resumed run's wall time
    does not include the generation of the reused ones, and says so."""
    out.mkdir(parents=True, exist_ok=True)
    note = (f" (this run; {reused[0]} of {reused[1]} traces were already on disk from an earlier run of this "
            f"command)" if reused[0] else "")
    return files.write_experiment(out, name, title=title, command=command, seconds=seconds, table=table, notes=notes,
                                  plots=plots, wall_note=note, traces_reused=reused[0], traces_total=reused[1], **raw)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header row, the separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


MEASURES = ("RM score: the reward model's output at the end of [user: prompt, assistant: response] "
            "(feedback.reward_input, model.last_token_scores), mean over responses with a normal 95% interval "
            "(mean +- 1.96 sd/sqrt(n)). Harmlessness (judge-free, yardstick.outcome): explained refusal = the reply "
            "opens with a refusal (the strict detector) and gives a reason or an alternative; evasive refusal = "
            "it opens with a refusal without either; compliance = it does not open with a refusal; loose refusal "
            "= one of garak's MitigationBypass substrings appears anywhere; each share k/n with its Wilson 95% "
            "interval. Prompts: the first {n} red-team prompts of the training side of data.split (held-out "
            "fraction {h}), never the evaluation's held-out ones.")


def xy(pairs) -> list[list[float]]:
    """Plot points [[x, y], ...] without the ones whose y is None (nothing measured)."""
    return [[x, y] for x, y in pairs if y is not None]


def rm_series(points: list[tuple[float, dict]]) -> dict:
    """Plot series of a mean_interval per x: mean and the interval's bounds."""
    return {"mean RM score": xy((x, m["mean"]) for x, m in points), "95% low": xy((x, m["low"]) for x, m in points),
            "95% high": xy((x, m["high"]) for x, m in points)}


def load_all(args: Common):
    """(device, policy model, its tokenizer, reward model, its tokenizer, constitution, prompts)."""
    check_args(args)
    constitution = load_constitution(args.constitution)
    prompts = training_prompts(args)
    garak_mitigation_substrings()  # the loose detector's list: fail before generating anything
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device, "float32")
    model, tok, _ = load_model(args.model, dtype=dtype, device=device)
    rm, rm_tok, _ = load_scalar_model(args.reward_model, head="reward", dtype=dtype, device=device)
    model.eval()
    rm.eval()
    return model, tok, rm, rm_tok, constitution, prompts


def traces_of(model, tok, prompts, constitution, path: Path, **kw) -> list[dict]:
    """slcai traces of `prompts` in `path` (resumable, infra/traces.run_slcai), in prompt order."""
    with torch.no_grad():
        return run_slcai(model, tok, prompts, constitution, path, **kw)


# ------------------------------------------------------------------------------ the experiments
def run_revisions(args: RevisionsArgs, command: str, t0: float) -> dict:
    """Fig. 5: the response after 0..rounds revisions of one SL-CAI trace per prompt."""
    name = NAMES["revisions"]
    work = open_work(args, RevisionsArgs, name)
    model, tok, rm, rm_tok, constitution, prompts = load_all(args)
    reused = (on_disk(work), len(prompts))
    recs = traces_of(model, tok, prompts, constitution, work / "traces.jsonl", **gen_kwargs(args))
    points = []
    for k in range(args.rounds + 1):
        m = measure(rm, rm_tok, prompts, [response_after(r, k) for r in recs], args.rm_batch_size)
        base = points[0]["scores"] if points else m["scores"]
        points.append({"revisions": k, **m, "change": mean_interval([s - b for s, b in zip(m["scores"], base)])})
    rows = [[str(p["revisions"]), fmt_interval(p["rm"]), fmt_interval(p["change"], signed=True),
             *(fmt_share(p["harmlessness"][o]) for o in ("explained_refusal", "evasive_refusal", "compliance",
                                                         "refusal_loose")), f"{p['words']:.0f}"] for p in points]
    table = markdown_table(["revisions", "RM score (95% CI)", "change from k = 0 (paired)", "explained refusal",
                            "evasive refusal", "compliance", "loose refusal", "words"], rows)
    notes = (f"Bai et al. 2022 §3.4, Fig. 5: the response after k critique -> revision rounds (k = 0 is the initial "
             f"response), one SL-CAI trace per prompt ({args.rounds} rounds, a principle of the '{constitution.name}' "
             f"constitution drawn at random with replacement each round, {args.max_new_tokens} new tokens per "
             f"step, temperature {args.temperature}, model {args.model}). The same prompts at every k; change from "
             f"k = 0: the mean over prompts of (score after k revisions - score of the initial response), with its "
             f"normal 95% interval (a paired comparison). "
             + MEASURES.format(n=len(prompts), h=args.held_out_fraction))
    plots = [{"title": "Reward-model score after k revisions", "xlabel": "revisions", "ylabel": "RM score",
              "series": rm_series([(p["revisions"], p["rm"]) for p in points])},
             {"title": "Harmlessness read-out after k revisions", "xlabel": "revisions", "ylabel": "share of replies",
              "series": {o.replace("_", " "): xy((p["revisions"], p["harmlessness"][o]["rate"]) for p in points)
                         for o in ("explained_refusal", "evasive_refusal", "compliance", "refusal_loose")}}]
    return write_experiment(Path(args.out), name, "SL-CAI: harmlessness after 0..N revisions", command,
                            time.time() - t0, table, notes, plots, reused, points=points,
                            prompts=[p.id for p in prompts], traces=str(work / "traces.jsonl"))


def run_critique(args: CritiqueArgs, command: str, t0: float) -> dict:
    """Fig. 7: critiqued revision against direct revision (no critique), after 0..rounds revisions."""
    name = NAMES["critique"]
    work = open_work(args, CritiqueArgs, name)
    model, tok, rm, rm_tok, constitution, prompts = load_all(args)
    arms, reused = {}, (on_disk(work), 2 * len(prompts))
    for arm, critique in (("critiqued", True), ("direct", False)):
        arms[arm] = traces_of(model, tok, prompts, constitution, work / f"traces.{arm}.jsonl", critique=critique,
                              **gen_kwargs(args))
    points = []
    for k in range(args.rounds + 1):
        row = {"revisions": k}
        for arm, recs in arms.items():
            row[arm] = measure(rm, rm_tok, prompts, [response_after(r, k) for r in recs], args.rm_batch_size)
        row["difference"] = mean_interval([c - d for c, d in zip(row["critiqued"]["scores"], row["direct"]["scores"])])
        points.append(row)
    rows = [[str(p["revisions"]), fmt_interval(p["critiqued"]["rm"]), fmt_interval(p["direct"]["rm"]),
             fmt_interval(p["difference"], signed=True),
             fmt_share(p["critiqued"]["harmlessness"]["refusal_strict"]),
             fmt_share(p["direct"]["harmlessness"]["refusal_strict"]),
             fmt_share(p["critiqued"]["harmlessness"]["refusal_loose"]),
             fmt_share(p["direct"]["harmlessness"]["refusal_loose"])] for p in points]
    table = markdown_table(["revisions", "RM critiqued", "RM direct", "critiqued - direct (paired)",
                            "refusal critiqued", "refusal direct", "loose refusal critiqued", "loose refusal direct"],
                           rows)
    notes = (f"Bai et al. 2022 §3.5, Fig. 7: critiqued revision (critique request -> critique -> revision request -> "
             f"revision, every round) against direct revision (revision request right after the last answer, no "
             f"critique), {args.rounds} rounds each, the same principle draws and sampler seeds in both arms (their "
             f"initial responses, k = 0, are the same text). critiqued - direct: the mean over prompts of the "
             f"per-prompt difference of RM scores, with its normal 95% interval (a paired comparison). Refusal = "
             f"explained + evasive refusal (the strict detector). Model {args.model}, {args.max_new_tokens} new tokens "
             f"per step, temperature {args.temperature}. " + MEASURES.format(n=len(prompts), h=args.held_out_fraction))
    plots = [{"title": "RM score: critiqued vs direct revision", "xlabel": "revisions", "ylabel": "RM score",
              "series": {arm: xy((p["revisions"], p[arm]["rm"]["mean"]) for p in points) for arm in arms}},
             {"title": "Strict refusal share: critiqued vs direct revision", "xlabel": "revisions",
              "ylabel": "share of replies",
              "series": {arm: xy((p["revisions"], p[arm]["harmlessness"]["refusal_strict"]["rate"]) for p in points)
                         for arm in arms}}]
    return write_experiment(Path(args.out), name, "SL-CAI: critiqued vs direct revision", command, time.time() - t0,
                            table, notes, plots, reused, points=points, prompts=[p.id for p in prompts],
                            traces={arm: str(work / f"traces.{arm}.jsonl") for arm in arms})


def run_principles(args: PrinciplesArgs, command: str, t0: float) -> dict:
    """Fig. 6: the number of principles the rounds draw from against harmlessness and diversity."""
    name = NAMES["principles"]
    work = open_work(args, PrinciplesArgs, name)
    model, tok, rm, rm_tok, constitution, prompts = load_all(args)
    total = len(constitution.principles)
    counts = list(dict.fromkeys(min(c, total) if c else total for c in (args.counts or DEFAULT_COUNTS)))
    points, reused = [], (on_disk(work), len(counts) * args.samples * len(prompts))
    for n in counts:
        sub = principle_subset(constitution, n, args.seed)
        samples = [traces_of(model, tok, prompts, sub, work / f"traces.n{n}.s{j}.jsonl",
                             **{**gen_kwargs(args), "seed": args.seed + j}) for j in range(args.samples)]
        per_prompt = [list(recs) for recs in zip(*samples)]  # [prompt][sample] records
        flat_prompts = [p for p in prompts for _ in range(args.samples)]  # prompt-major, as flat_* below
        finals = [r["final"] for recs in per_prompt for r in recs]
        initials = [r["initial"] for recs in per_prompt for r in recs]
        points.append({
            "principles": n, "names": [p.name for p in sub.principles] if n < total else "all",
            "final": measure(rm, rm_tok, flat_prompts, finals, args.rm_batch_size),
            "initial_rm": mean_interval(measure(rm, rm_tok, flat_prompts, initials, args.rm_batch_size)["scores"]),
            "diversity_final": prompt_diversity([[r["final"] for r in recs] for recs in per_prompt], args.distinct),
            "diversity_initial": prompt_diversity([[r["initial"] for r in recs] for recs in per_prompt],
                                                  args.distinct),
            "distinct_principles": distinct_principles(per_prompt)})
    d = args.distinct
    rows = [[f"{p['principles']}" + (" (all)" if p["principles"] == total else ""), fmt_interval(p["final"]["rm"]),
             fmt_share(p["final"]["harmlessness"]["refusal_strict"]),
             fmt_share(p["final"]["harmlessness"]["refusal_loose"]),
             fmt_interval(p["diversity_final"], digits=3), fmt_interval(p["diversity_initial"], digits=3),
             f"{p['distinct_principles']:.2f}"] for p in points]
    table = markdown_table(["principles", "RM score of final (95% CI)", "refusal", "loose refusal",
                            f"distinct-{d} of finals", f"distinct-{d} of initials", "principles used per prompt"], rows)
    notes = (f"Bai et al. 2022 §3.4, Fig. 6: the rounds draw their principle (at random, with replacement) from n "
             f"principles only: the first n of the '{constitution.name}' constitution's {total} after "
             f"random.Random({args.seed}).shuffle of a copy (principle_subset; nested: each subset holds the "
             f"smaller ones), n = {total} = every principle. {args.samples} SL-CAI traces per prompt and n "
             f"(sample j with seed {args.seed} + j, {args.rounds} round(s), temperature {args.temperature}, "
             f"{args.max_new_tokens} new tokens per step, model {args.model}); sample j has the same initial response "
             f"at every n, so only the principles and what follows them differ. Measured on the final revisions "
             f"(n = prompts x samples; the samples of one prompt are not independent, so the intervals are too "
             f"narrow). Diversity: distinct-{d} (distinct_n: distinct word {d}-grams / all {d}-grams, "
             f"lower-cased, split on whitespace) of the {args.samples} final revisions of a prompt, pooled, averaged "
             f"over prompts with a normal 95% interval; the same for the initial responses (the baseline, equal at "
             f"every n). Principles used per prompt: the mean number of different principles drawn over a prompt's "
             f"samples and rounds. Refusal = explained + evasive refusal (the strict detector). "
             + MEASURES.format(n=len(prompts), h=args.held_out_fraction))
    xs = [p["principles"] for p in points]
    plots = [{"title": "RM score vs number of principles", "xlabel": "principles drawn from", "ylabel": "RM score",
              "series": {"final revision": xy((x, p["final"]["rm"]["mean"]) for x, p in zip(xs, points)),
                         "initial response": xy((x, p["initial_rm"]["mean"]) for x, p in zip(xs, points))}},
             {"title": f"Diversity (distinct-{d} across samples) vs number of principles",
              "xlabel": "principles drawn from", "ylabel": f"distinct-{d}",
              "series": {"final revision": xy((x, p["diversity_final"]["mean"]) for x, p in zip(xs, points)),
                         "initial response": xy((x, p["diversity_initial"]["mean"]) for x, p in zip(xs, points))}},
             {"title": "Refusal share vs number of principles", "xlabel": "principles drawn from",
              "ylabel": "share of final revisions",
              "series": {"refusal (strict)": xy((x, p["final"]["harmlessness"]["refusal_strict"]["rate"])
                                                for x, p in zip(xs, points)),
                         "refusal (loose)": xy((x, p["final"]["harmlessness"]["refusal_loose"]["rate"])
                                               for x, p in zip(xs, points))}}]
    return write_experiment(Path(args.out), name, "SL-CAI: number of principles vs harmlessness and diversity",
                            command, time.time() - t0, table, notes, plots, reused, points=points,
                            prompts=[p.id for p in prompts], traces=str(work))


EXPERIMENTS = {"revisions": (RevisionsArgs, run_revisions, "harmlessness and RM score after 0..N revisions (Fig. 5)"),
               "critique": (CritiqueArgs, run_critique, "critiqued vs direct revision (Fig. 7)"),
               "principles": (PrinciplesArgs, run_principles, "number of principles vs harmlessness and diversity "
                                                               "(Fig. 6)")}
NAMES = {"revisions": "sl_revisions", "critique": "sl_critique", "principles": "sl_principles"}
"""experiment -> the <name> of its output files."""
PROG = "python -m minicai.experiments.ablations"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: {PROG} {{{','.join(EXPERIMENTS)}}} --out DIR --reward-model RM [flags]\n\n" + "\n".join(
        f"  {k:<11} {v[2]}" for k, v in EXPERIMENTS.items()) + f"\n\n{PROG} EXPERIMENT --help lists its flags."
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + usage)
        return 0
    if argv[0] not in EXPERIMENTS:
        raise InputError(f"unknown experiment {argv[0]!r}: choose one of {', '.join(EXPERIMENTS)}")
    cls, run, what = EXPERIMENTS[argv[0]]
    t0 = time.time()
    args = cli.parse(cls, argv[1:], description=f"{what}\n\n{__doc__}", prog=f"{PROG} {argv[0]}")
    check_args(args)  # bad input fails before anything is written or loaded
    load_constitution(args.constitution)
    training_prompts(args)
    garak_mitigation_substrings()  # the loose detector's list (a missing garak is one line)
    run(args, f"{PROG} {shlex.join(argv)}", t0)
    print(f"wrote {Path(args.out) / NAMES[argv[0]]}.experiment.json and .md ({time.time() - t0:.0f} s)")
    return 0


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of text: lower-cased, split on whitespace."""
    w = text.lower().split()
    return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float | None:
    """distinct-n across samples: the number of distinct word n-grams in all the texts together,
    divided by the number of n-grams (1 = no n-gram repeats anywhere; near 0 = the samples repeat
    each other). None when the texts hold no n-gram."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else None


def principle_subset(constitution: Constitution, n: int, seed: int) -> Constitution:
    """The constitution with only n of its principles: a copy of the principle list is shuffled by
    random.Random(seed) and its first n are kept (in shuffled order), so that for one seed the
    subsets are nested (the 1 inside the 2 inside the 4 ...). n = 0 or n >= the number of
    principles: the constitution itself, unchanged (every principle, in file order, as plain SL-CAI
    draws them). Only the few-shot examples of the kept principles stay (an example of a dropped
    principle would show its critique and revision requests)."""
    if n < 0:
        raise InputError(f"number of principles must be >= 0 (0 = all), got {n}")
    if n == 0 or n >= len(constitution.principles):
        return constitution
    order = list(constitution.principles)
    random.Random(seed).shuffle(order)
    kept = order[:n]
    names = {p.name for p in kept}
    return replace(constitution, principles=kept, few_shot=[f for f in constitution.few_shot if f.principle in names])



if __name__ == "__main__":
    sys.exit(run_cli(main))
