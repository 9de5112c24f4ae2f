"""The SL-routes ablation table of docs/results.md ("SL-CAI routes"): one row per train_sl.py run,
its training targets described and its policy's judge-free numbers from one evaluation.

    python bench/sl_routes.py EVAL_JSON NAME=RUN_FOLDER [NAME=RUN_FOLDER ...]

EVAL_JSON is `python -m minicai.eval.evaluate --out E --policies base=smollm2-135m NAME=RUN/model ...`'s
E/eval.json (the policy names must be the NAMEs given here). Per run it reads RUN/config.json (route,
teacher, few-shot, prompts), RUN/traces.jsonl and RUN/sft_summary.json (generation and SFT seconds).

"targets refusing" DESCRIBES the SFT targets of the red-team prompts with the evaluation's own
detector (yardstick.outcome: explained / evasive refusal), after training: nothing here chooses,
filters or weights training data (the measuring stick never trains). Prints a Markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minicai.eval.yardstick import outcome  # noqa: E402  (describing, after training)


def pct(d: dict | None) -> str:
    """'12% (7-19)' from a yardstick share {rate, low, high}."""
    if not d or d.get("rate") is None:
        return "-"
    return f"{100 * d['rate']:.0f}% ({100 * d['low']:.0f}-{100 * d['high']:.0f})"


def selected_ids(cfg: dict) -> list[str]:
    """The prompt ids a train_sl.py run with this config.json trained on (train_sl.select_prompts)."""
    from types import SimpleNamespace

    from train_sl import select_prompts

    ns = SimpleNamespace(**{k: cfg.get(k) for k in ("prompts", "helpful", "held_out_fraction", "n_prompts",
                                                    "helpful_fraction", "model")}, run=SimpleNamespace(seed=cfg["seed"]))
    return [p.id for p in select_prompts(ns)]


def read_records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}


def describe(run: Path) -> dict:
    """What a run trained on: route, teacher, few-shot, prompt counts, its SFT targets described."""
    cfg = json.loads((run / "config.json").read_text())
    reused = bool(cfg.get("traces"))  # SFT on another run's traces (a subset, or the SFT baseline)
    trace = Path(cfg["traces"]) if reused else run / "traces.jsonl"
    gen_cfg = json.loads((trace.parent / "config.json").read_text()) if reused else cfg  # who wrote the traces
    by_id = read_records(trace)
    recs = [by_id[i] for i in selected_ids(cfg)]
    summ = json.loads((run / "sft_summary.json").read_text())
    red = [r for r in recs if r.get("kind") == "red-team"]
    field = "initial" if cfg.get("target") == "initial" else "final"
    kinds = [outcome(r[field]) for r in red]
    route = gen_cfg.get("route", "revise")
    self_taught = gen_cfg.get("critic_model") in (None, gen_cfg.get("model"))
    return {"route": "standard SFT (the policy's own answers)" if field == "initial" else route,
            "teacher": "-" if field == "initial" else "self (135M)" if self_taught else Path(gen_cfg["critic_model"]).name,
            "few-shot": "-" if field == "initial" else ("on" if gen_cfg.get("few_shot", True) else "off")
            if route == "revise" else "context",
            "best-of": gen_cfg.get("best_of", 1), "red-team prompts": len(red), "all prompts": len(recs),
            "targets explained": sum(k == "explained_refusal" for k in kinds),
            "targets evasive": sum(k == "evasive_refusal" for k in kinds),
            "generation s": None if reused else summ.get("generation_seconds_this_run"),
            "SFT s": summ["wall_seconds_this_run"] - summ.get("generation_seconds_this_run", 0)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    res = json.loads(Path(argv[0]).read_text())["policies"]
    head = ("| policy | route | teacher | few-shot | best-of | red-team / all prompts | SFT targets refusing (explained + evasive) "
            "| generation s | SFT s | explained refusal | evasive refusal | compliance | over-refusal strict | "
            "over-refusal loose | perplexity | capability |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def cols(j):
        h, o = j.get("harmful", {}), j.get("over_refusal", {})
        ppl = j.get("perplexity", {}).get("perplexity")
        return [pct(h.get("explained_refusal")), pct(h.get("evasive_refusal")), pct(h.get("compliance")),
                pct(o.get("refusal_strict")), pct(o.get("refusal_loose")), f"{ppl:.2f}" if ppl else "-",
                pct(j.get("capability", {}).get("accuracy"))]

    if "base" in res:
        print("| base | - | - | - | - | - | - | - | - | " + " | ".join(cols(res["base"]["judge_free"])) + " |")
    for spec in argv[1:]:
        name, _, folder = spec.partition("=")
        d = describe(Path(folder))
        j = res[name]["judge_free"]
        gen = f"{d['generation s']:.0f}" if d["generation s"] is not None else "(reused)"
        print(f"| {name} | {d['route']} | {d['teacher']} | {d['few-shot']} | {d['best-of']} | "
              f"{d['red-team prompts']} / {d['all prompts']} | {d['targets explained']} + {d['targets evasive']} | "
              f"{gen} | {d['SFT s']:.0f} | " + " | ".join(cols(j)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
