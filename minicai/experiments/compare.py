"""Course experiments that compare whole training runs, one command each (issue: "the experiments a
course runs"). Each runs its stages as subprocesses (printed before they run, resumed when rerun:
a finished stage is skipped), then writes OUT/<name>.experiment.json and OUT/<name>.md (the
contract the HTML report renders: a table, notes, line charts).

    python -m minicai.experiments.compare rl --policy runs/cai/sl/model --reward-model runs/cai/rm/rm \\
        --out runs/cai/experiments/rl

rl: critic-free RL beside PPO. train_ppo.py three times from the same policy, reward model, prompts,
seed and compute budget (--iterations x --batch-size episodes of --max-new-tokens tokens each):
--advantage gae (PPO with a value head), rloo and grpo (k samples of batch / k prompts, no value
function). Then minicai.eval.evaluate on the judge-free yardstick (held-out harmful prompts,
over-refusal, perplexity, capability) and the reward model's mean score on held-out prompts, for
the starting policy and the three trained ones. Table: the training reward (mean score of the last
quarter of the iterations), the KL to the reference at the end, seconds per iteration (mean after
the first), and the yardstick.

The SFT baseline (standard SFT on the initial responses beside SL-CAI) is a pipeline switch:
`python -m minicai.experiments.pipeline --baseline sft`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..eval.tables import fmt_share
from ..infra import cli
from ..io.checkpoint import EMBEDDED_NAME
from ..io.files import read_jsonl, write_experiment
from .pipeline import run_stage

METHODS = ("gae", "rloo", "grpo")


def rl_commands(args, out: Path) -> dict[str, list[str]]:
    """The train_ppo.py command of each method: everything equal but --advantage."""
    common = ["--policy", args.policy, "--reward-model", args.reward_model, "--iterations", str(args.iterations),
              "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
              "--seed", str(args.seed), "--device", args.device, "--save-every", str(args.iterations)]
    if args.bf16:
        common.append("--bf16")
    return {m: ["-m", "train_ppo", "--out", str(out / m), "--advantage", m, *common,
                *(["--k", str(args.k)] if m != "gae" else [])] for m in args.methods}


def training_summary(rows: list[dict]) -> dict:
    """From a metrics.jsonl: the mean score over the last quarter of the iterations (at least one),
    the first iteration's score, the final KL, and the seconds per iteration after the first."""
    if not rows:
        raise InputError("experiments: a PPO run wrote no metrics rows")
    q = max(1, len(rows) // 4)
    times = [r["time/iteration"] for r in rows[1:]] or [rows[0]["time/iteration"]]
    return {"first_score": rows[0]["objective/scores"],
            "last_quarter_score": sum(r["objective/scores"] for r in rows[-q:]) / q,
            "final_kl": rows[-1]["objective/kl"], "seconds_per_iteration": sum(times) / len(times),
            "iterations": len(rows)}


def rl_table(summary: dict[str, dict], res: dict) -> str:
    """Markdown: one row per policy (start + each method): training reward, KL, s/iteration, the
    reward model's held-out mean score and the judge-free outcomes."""
    head = ("| policy | train score, first → last quarter | KL at the end | s / iteration | RM score, held out (all) | "
            "explained refusal | evasive refusal | compliance | over-refusal, strict | perplexity | capability |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in ["start", *summary]:
        p = res["policies"].get(name, {})
        j = p.get("judge_free", {})
        s = summary.get(name)
        train = (f"{s['first_score']:.3f} → {s['last_quarter_score']:.3f}", f"{s['final_kl']:.3f}",
                 f"{s['seconds_per_iteration']:.1f}") if s else ("-", "-", "-")
        rm = (p.get("rm_score") or {}).get("all")
        lines.append(f"| {name} | " + " | ".join([
            *train, "-" if rm is None else f"{rm:.3f}",
            fmt_share(j.get("harmful", {}).get("explained_refusal")),
            fmt_share(j.get("harmful", {}).get("evasive_refusal")), fmt_share(j.get("harmful", {}).get("compliance")),
            fmt_share(j.get("over_refusal", {}).get("refusal_strict")),
            f"{j['perplexity']['perplexity']:.2f}" if "perplexity" in j else "-",
            fmt_share(j.get("capability", {}).get("accuracy"))]) + " |")
    return "\n".join(lines) + "\n"


def run_rl(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "pipeline.json"  # run_stage records each stage there
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    t0 = time.time()
    for m, cmd in rl_commands(args, out).items():
        run_stage(f"rl/{m}", cmd, out / m / "model" / "config.json", log, out, args.dry_run)
    policies = {"start": args.policy, **{m: str(out / m / "model") for m in args.methods}}
    run_stage("rl/eval", ["-m", "minicai.eval.evaluate", "--out", str(out / "eval"), "--policies",
                          *[f"{k}={v}" for k, v in policies.items()], "--reward-model", args.reward_model,
                          "--no-judge", "--n-red-team", str(args.eval_red_team), "--n-helpful", str(args.eval_helpful),
                          "--n-harmful", str(args.eval_harmful), "--n-benign", str(args.eval_benign),
                          "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.eval_dtype,
                          "--seed", str(args.seed), "--device", args.device],
              out / "eval" / "eval.json", log, out, args.dry_run)
    if args.dry_run:
        return {}
    rows = {m: read_jsonl(out / m / "metrics.jsonl") for m in args.methods}
    summary = {m: training_summary(r) for m, r in rows.items()}
    res = json.loads((out / "eval" / "eval.json").read_text())
    table = rl_table(summary, res)
    notes = (f"The same starting policy ({args.policy}), reward model, prompts and seed for every method, and the "
             f"same compute: {args.iterations} iterations x {args.batch_size} episodes of at most "
             f"{args.max_new_tokens} tokens. gae = PPO with a value head on the policy trunk; rloo and grpo sample "
             f"k = {args.k} responses for each of {args.batch_size // args.k} prompts per iteration and train no value "
             f"function. Train score = the reward model's score of the sampled responses (objective/scores) in the "
             f"first iteration and averaged over the last quarter of the iterations; KL = sum over the response "
             f"of log pi - log pi_ref (k1), mean over rows; seconds per iteration averaged after the first. The "
             f"other columns: minicai.eval.evaluate on held-out prompts (greedy): the reward model's mean score and "
             f"the judge-free yardstick (Wilson 95% intervals).")
    stage_seconds = {k: v["seconds"] for k, v in log.get("stages", {}).items()}
    plots = [{"title": "reward-model score of the sampled responses", "xlabel": "iteration", "ylabel": "score",
              "series": {m: [[r["step"], r["objective/scores"]] for r in rows[m]] for m in args.methods}},
             {"title": "KL to the reference (sum over the response)", "xlabel": "iteration", "ylabel": "KL (nats)",
              "series": {m: [[r["step"], r["objective/kl"]] for r in rows[m]] for m in args.methods}}]
    command = "python -m minicai.experiments.compare " + " ".join(args.argv)
    exp = write_experiment(out, "rl", title="Critic-free RL beside PPO: GAE vs RLOO vs GRPO, same compute",
                           command=command, seconds=sum(stage_seconds.values()) or time.time() - t0, table=table,
                           notes=notes, plots=plots, stage_seconds=stage_seconds, summary=summary)
    print(table)
    print(f"wrote {out / 'rl.experiment.json'} and {out / 'rl.md'}")
    return exp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minicai.experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    r = sub.add_parser("rl", help="GAE-PPO vs RLOO vs GRPO from one policy, same prompts and compute",
                       formatter_class=cli.DefaultsHelp,
                       description="GAE-PPO vs RLOO vs GRPO from one policy, same prompts and compute (see "
                                   "python -m minicai.experiments.compare --help)")
    r.add_argument("--out", required=True, help="folder for the three runs, the evaluation and rl.experiment.json")
    r.add_argument("--policy", default=EMBEDDED_NAME, help="starting policy (an SL-CAI model) and KL reference")
    r.add_argument("--reward-model", required=True, help="train_rm.py's OUT/rm folder")
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which --advantage values")
    r.add_argument("--iterations", type=int, default=20, help="iterations of every run")
    r.add_argument("--batch-size", type=int, default=8, help="episodes per iteration of every run (the compute)")
    r.add_argument("--k", type=int, default=4, help="samples per prompt of rloo and grpo (batch-size / k prompts)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="response length cap, training and evaluation")
    r.add_argument("--bf16", action="store_true", help="train_ppo.py --bf16 (bf16 autocast) for every run")
    r.add_argument("--eval-red-team", type=int, default=8, help="held-out red-team prompts (RM score)")
    r.add_argument("--eval-helpful", type=int, default=8, help="held-out helpfulness prompts (RM score)")
    r.add_argument("--eval-harmful", type=int, default=120, help="held-out harmful prompts of the yardstick")
    r.add_argument("--eval-benign", type=int, default=0, help="benign edgy prompts per source (0 = all)")
    r.add_argument("--eval-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights of the evaluation (minicai.eval.evaluate --dtype)")
    r.add_argument("--seed", type=int, default=0, help="seed of every stage")
    r.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    r.add_argument("--dry-run", action="store_true", help="print the stage commands only")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.experiment == "rl":
        for name in ("iterations", "batch_size", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if args.k < 2 or args.batch_size % args.k:
            raise InputError(f"--k {args.k}: must be at least 2 and divide --batch-size {args.batch_size}")
        for name in ("policy", "reward_model"):
            v = getattr(args, name)
            if Path(v).exists():
                setattr(args, name, str(Path(v).resolve()))
        if not Path(args.reward_model).exists():
            raise InputError(f"--reward-model {args.reward_model}: no such folder")
        run_rl(args)
    return 0


if __name__ == "__main__":
    from ..infra.cli import run_cli

    sys.exit(run_cli(main))
