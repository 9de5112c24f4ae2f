"""eval.json as Markdown: the judge-free table (harmful-prompt outcomes, over-refusal, alignment tax),
the judge's and the reward model's accuracy lines and the win-rate / Elo table. No torch: the report
(report.py) and the experiments read these without loading the evaluation."""
from __future__ import annotations


def _fmt(x, kind="f"):
    if x is None:
        return "-"
    if kind == "elo":
        return f"{x:+.0f}"
    if kind == "pct":
        return f"{100 * x:.0f}%"
    return f"{x:.3f}" if kind == "f" else f"{x:.1f}"


def fmt_share(x: dict | None) -> str:
    """A share as '12% (8-19)': the rate and its Wilson 95% interval, in percent."""
    if not x or x.get("rate") is None:
        return "-"
    return f"{100 * x['rate']:.0f}% ({100 * x['low']:.0f}-{100 * x['high']:.0f})"


def policy_names(res: dict) -> list[str]:
    """The policies of an evaluation in the order they were given ("policy_order": eval.json is
    written with sorted keys), else in the file's order; [] when there are none."""
    pol = res.get("policies") if isinstance(res.get("policies"), dict) else {}
    order = res.get("policy_order")
    return list(order) if isinstance(order, list) and set(order) == set(pol) else list(pol)


def judge_free_table(res: dict) -> str:
    """The judge-free table (Markdown): harmful-prompt outcomes, over-refusal, alignment tax."""
    names = [n for n in policy_names(res) if "judge_free" in res["policies"][n]]
    if not names:
        return ""
    sets = res["judge_free"]["sets"]
    first = res["policies"][names[0]]["judge_free"]
    cols = [("explained refusal", lambda j: fmt_share(j.get("harmful", {}).get("explained_refusal"))),
            ("evasive refusal", lambda j: fmt_share(j.get("harmful", {}).get("evasive_refusal"))),
            ("compliance", lambda j: fmt_share(j.get("harmful", {}).get("compliance"))),
            ("explained / all refusals", lambda j: fmt_share(j.get("harmful", {}).get("explained_of_refusals"))),
            ("refusal, loose", lambda j: fmt_share(j.get("harmful", {}).get("refusal_loose"))),
            ("over-refusal, strict", lambda j: fmt_share(j.get("over_refusal", {}).get("refusal_strict"))),
            ("over-refusal, loose", lambda j: fmt_share(j.get("over_refusal", {}).get("refusal_loose"))),
            ("perplexity", lambda j: f"{j['perplexity']['perplexity']:.2f}" if "perplexity" in j else "-"),
            ("capability", lambda j: fmt_share(j.get("capability", {}).get("accuracy")))]
    cols += [(k, (lambda k: lambda j: fmt_share(j.get(k, {}).get("accuracy")))(k))
             for k in res["judge_free"].get("bigbench_tasks", [])]
    lines = ["| policy | " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for n in names:
        j = res["policies"][n]["judge_free"]
        lines.append(f"| {n} | " + " | ".join(f(j) for _, f in cols) + " |")
    chance = first.get("capability", {}).get("chance")
    out = ("\n".join(lines) + "\n\n" +
           f"Judge-free, greedy replies of at most {res['judge_free']['max_new_tokens']} tokens "
           f"({res['judge_free'].get('benign_max_new_tokens', res['judge_free']['max_new_tokens'])} for the benign "
           f"prompts). Outcomes on "
           f"{sets['harmful']} held-out harmful prompts ({', '.join(res['judge_free']['harmful_sources'])}): explained / "
           f"evasive refusal = the reply opens with a refusal (strict detector) with / without a reason or "
           f"alternative; compliance = it does not; explained / all refusals = the share of the refusals that "
           f"explain (the paper's evasiveness, read the other way round); loose = any garak MitigationBypass "
           f"phrase anywhere. Over-refusal "
           f"on {sets['benign']} benign prompts that look edgy (lower is better). Perplexity on "
           f"{sets['reference_tokens']} tokens of our reference text; capability = cloze accuracy on "
           f"{sets['capability']} items of ours" + (f" (chance {100 * chance:.0f}%)" if chance else "") +
           ". Every share: % (Wilson 95% interval)." +
           (f" {res['judge_free']['skipped']}" if res["judge_free"].get("skipped") else "") + "\n")
    tax = res.get("alignment_tax")
    if tax:
        out += "\nAlignment tax against the anchor (relative change; improvement / regression):\n\n"
        benches = list(next(iter(tax.values()))["benchmarks"]) if tax else []
        out += "| policy | " + " | ".join(benches) + " | average |\n|" + "---|" * (len(benches) + 2) + "\n"
        for n in [x for x in policy_names(res) if x in tax]:
            rep = tax[n]
            cells = [f"{100 * rep['benchmarks'][b]['relative_change']:+.1f}% {rep['benchmarks'][b]['verdict']}"
                     if b in rep["benchmarks"] else "-" for b in benches]
            avg = "-" if rep["average_gain"] is None else f"{100 * rep['average_gain']:+.1f}% {rep['verdict']}"
            out += f"| {n} | " + " | ".join(cells) + f" | {avg} |\n"
    return out


def judge_accuracy_line(res: dict) -> str:
    """One sentence stating the AI judge's own accuracy on labelled pairs (what its win rates are worth)."""
    acc = res.get("judge_accuracy")
    if not acc:
        return ("The AI judge's own accuracy was not measured in this run (no labelled pairs given), so its win "
                "rates and Elo below are of unknown worth.\n")
    parts = [f"{name}: {fmt_share(a['accuracy'])} on {a['accuracy']['n']} pairs" for name, a in acc.items()]
    return (f"AI judge ({res['config'].get('judge')}) accuracy on labelled pairs, configured as it judges the "
            f"policies (both orders, principle ensemble): " + "; ".join(parts) +
            ". 50% is chance: the win rates and Elo below are worth no more than this.\n")


def reward_model_accuracy_line(res: dict) -> str:
    """One sentence with the reward model's accuracy on the labelled pairs ('' when not measured)."""
    acc = res.get("reward_model_accuracy")
    if not acc:
        return ""
    parts = []
    for name, a in acc.items():
        cats = ", ".join(f"{c} {fmt_share(v)}" for c, v in a["per_category"].items() if c != "all")
        parts.append(f"{name}: {fmt_share(a['accuracy'])} on {a['accuracy']['n']} pairs" + (f" ({cats})" if cats else ""))
    return "Reward model accuracy on the same labelled pairs (better reply scored higher): " + "; ".join(parts) + ".\n"


def markdown_table(res: dict) -> str:
    """The per-policy table (and the win-rate matrix when there is one) as Markdown."""
    names = policy_names(res)
    has_rm = any("rm_score" in r for r in res["policies"].values())
    has_elo = any("elo" in r for r in res["policies"].values())
    head = ["policy", "quality"] + (["Elo", "Elo harmless", "Elo helpful"] if has_elo else []) + \
        (["RM score"] if has_rm else []) + ["length (tok)", "evasive (red-team)", "refusals (red-team)",
                                             "truncated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    free = judge_free_table(res) if res.get("judge_free") else ""
    if free:
        lines = ["## Judge-free (held-out)", "", free, "## AI judge, reward model, lengths", "",
                 judge_accuracy_line(res) if has_elo else "", reward_model_accuracy_line(res), *lines]
    for n in names:
        r = res["policies"][n]
        red = "red-team" if "red-team" in r["evasive_rate"] else "all"
        cells = [n + (" (anchor)" if n == res["anchor"] else ""), _fmt(r["quality"])]
        if has_elo:
            cells += [_fmt(r.get("elo"), "elo"), _fmt(r.get("elo_harmless"), "elo"), _fmt(r.get("elo_helpful"), "elo")]
        if has_rm:
            cells += [_fmt(r["rm_score"]["all"])]
        cells += [_fmt(r["length"]["all"], "1"), _fmt(r["evasive_rate"][red], "pct"),
                  _fmt(r["refusal_rate"][red], "pct"), _fmt(r["truncated_rate"]["all"], "pct")]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    if res.get("win_rates"):
        out += "\nWin rate of the row policy against the column policy (all held-out prompts):\n\n"
        out += "| | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1) + "\n"
        for x in names:
            out += f"| {x} | " + " | ".join("-" if x == y else _fmt(res["win_rates"]["all"][x][y], "pct")
                                           for y in names) + " |\n"
    counts = ", ".join(f"{v} {k}" for k, v in res["prompts"].items())
    out += (f"\nHeld-out prompts: {counts}. quality = P(beat the anchor) per prompt, by "
            f"{next((r['quality_source'] for r in res['policies'].values() if r['quality_source']), 'nothing')}. "
            f"Elo: {res['elo_method']}. Evasive: {res['evasiveness_definition']}.\n")
    return out
