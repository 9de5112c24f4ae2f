"""One static HTML page for a run folder. It opens with the answer (the judge-free evaluation:
per policy, small bar charts against the base model with Wilson intervals, and the alignment tax),
then a few held-out harmful prompts with every policy's reply side by side; configs, training
curves, SL traces, AI-feedback judgements and the full evaluation tables follow.

    python -m minicai.eval.report RUN_DIR            # writes RUN_DIR/report.html

Everything is found by walking RUN_DIR, so stages written by different scripts (and folders that
hold several stages, e.g. runs/ itself) work without configuration:

- config.json of each stage: any config.json whose folder holds no model.safetensors (model
  folders have an HF config.json too);
- curves: any *.jsonl whose name contains "metrics" (sft_metrics.jsonl, metrics.jsonl of the
  reward model and PPO, dpo_metrics.jsonl); every numeric key is plotted against "step" (or
  "iteration", else the row number) as an inline SVG;
- summaries: any *summary*.json, as a flat key/value table;
- SL traces: traces.jsonl (prompt -> initial response -> each round's principle, critique,
  revision), the first --max-traces records, each in a <details>;
- AI feedback: preferences.jsonl (train_rm.py / feedback.py): prompt, the two responses, p(A) with
  response_a shown first and shown second, the soft label and the principles; missing keys are
  shown as "-" and TRL chosen/rejected files are shown as such;
- evaluation: eval.json (minicai.eval.evaluate): the per-policy table, the win-rate matrix and the
  held-out responses;
- experiments: any *.experiment.json (minicai.experiments.compare, ablations, depth, the SFT
  baseline): notes, command, one line chart per plot (several series, a legend) and the table.

The page is self-contained: inline CSS and SVG, no external file, font or script; one small inline
script only opens or closes all <details>. Every piece of text from the run is escaped with
html.escape. Unreadable files and lines are skipped with a note on the page, never a crash.
"""
from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import sys
import time
from pathlib import Path

from ..errors import InputError, first_line
from ..infra.labelling import member_spec
from ..io.files import atomic_write_text, read_jsonl as read_jsonl_file
from .tables import policy_names
from .yardstick import label_margins, outcome, pair_kinds

X_KEYS = ("step", "iteration", "iter", "it")
"""Keys used as the x axis of a metrics file, first match wins (else the row number)."""


def esc(x) -> str:
    """Escape anything for HTML text or a quoted attribute value."""
    return html.escape(str(x), quote=True)


def fmt(x) -> str:
    """Short display of a JSON value."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, dict)):
        return json.dumps(x, ensure_ascii=False)
    return str(x)


# ------------------------------------------------------------------------------ reading
def read_jsonl(path: Path, notes: list[str], limit: int | None = None) -> list[dict]:
    """JSON objects of a JSONL file (files.read_jsonl); bad lines are skipped and noted (a torn
    last line is normal: a run may still be writing)."""
    bad: list[int] = []
    try:
        rows = read_jsonl_file(path, "drop", skipped=bad)
    except OSError as e:
        notes.append(f"{path}: unreadable ({e})")
        return []
    if bad:
        notes.append(f"{path}: skipped {len(bad)} line(s) that are not valid JSON")
    return rows[:limit] if limit is not None else rows


def read_json(path: Path, notes: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path}: unreadable ({first_line(e)})")
        return None


def files(run_dir: Path, pattern: str) -> list[Path]:
    """Files under run_dir matching a glob, sorted, skipping hidden (temporary) folders."""
    return sorted(p for p in run_dir.rglob(pattern)
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts))


# ------------------------------------------------------------------------------ SVG curves
def svg_frame(xs: list[float], ys: list[float], title: str, width: int, height: int, margins: tuple,
              svg_height: int | None = None):
    """The part every line chart shares: the x and y ranges (widened when flat), the <svg> opening,
    the title, the plot frame and 3 labelled y ticks. margins = (left, right, top, bottom) of the plot
    area inside a width x height box (svg_height: a taller <svg>, room for a legend below).
    Returns (parts, px, py, x0, x1): the SVG pieces so far and the data -> pixel maps."""
    L, R, T, B = margins
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return L + (x - x0) / (x1 - x0) * (width - L - R)

    def py(y):
        return height - B - (y - y0) / (y1 - y0) * (height - T - B)

    H = svg_height or height
    parts = [f'<svg width="{width}" height="{H}" viewBox="0 0 {width} {H}" role="img" aria-label="{esc(title)}">',
             f'<text x="{L}" y="14" class="t">{esc(title)}</text>',
             f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" class="frame"/>']
    ticks = (y0, (y0 + y1) / 2, y1)
    # the fewest significant digits (3 to 8) that tell the three tick labels apart
    digits = next((d for d in range(3, 9) if len({f"{y:.{d}g}" for y in ticks}) == 3), 8)
    for y in ticks:
        parts.append(f'<line x1="{L}" x2="{width - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>'
                     f'<text x="{L - 4}" y="{py(y) + 4:.1f}" class="yl">{esc(f"{y:.{digits}g}")}</text>')
    return parts, px, py, x0, x1


def svg_chart(xs: list[float], ys: list[float], title: str, width: int = 340, height: int = 190) -> str:
    """A line chart (points too when there are few) as an inline <svg>: y range with 3 labelled
    ticks, x range labelled at both ends."""
    R = 10
    parts, px, py, x0, x1 = svg_frame(xs, ys, title, width, height, (66, R, 22, 26))
    parts.append(f'<text x="66" y="{height - 8}" class="xl">{esc(f"{x0:g}")}</text>'
                 f'<text x="{width - R}" y="{height - 8}" class="xl end">{esc(f"{x1:g}")}</text>')
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    if len(xs) > 1:
        parts.append(f'<polyline points="{pts}" class="line"/>')
    if len(xs) <= 40:
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" class="dot"/>' for x, y in zip(xs, ys)]
    parts.append("</svg>")
    return "".join(parts)


SERIES_COLOURS = ("#2f6db5", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#495057")


def svg_lines(plot: dict, width: int = 420, height: int = 230) -> str:
    """Several line series in one chart with a legend, as an inline <svg>: plot = {"title", "xlabel",
    "ylabel", "series": {label: [[x, y], ...]}} (an experiment's plot). Non-numeric points are
    dropped; a series with one point is a dot."""
    series = {str(k): [(x, y) for x, y in v if is_number(x) and is_number(y)]
              for k, v in (plot.get("series") or {}).items() if isinstance(v, list)}
    series = {k: v for k, v in series.items() if v}
    title = str(plot.get("title", ""))
    if not series:
        return f"<p class='note'>{esc(title)}: no numeric points</p>"
    L, R, T, B = 58, 10, 22, 40  # margins: left (y labels), right, top (title), bottom (x labels, axis name)
    width = max(width, L + R + 7 * len(title))  # room for the title (~7 px a character at 12 px bold)
    legend_h = 14 * ((len(series) + 2) // 3)
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    parts, px, py, x0, x1 = svg_frame(xs, ys, title, width, height, (L, R, T, B), height + legend_h)
    parts.append(f'<text x="{L}" y="{height - B + 13}" class="xl">{esc(f"{x0:g}")}</text>'
                 f'<text x="{width - R}" y="{height - B + 13}" class="xl end">{esc(f"{x1:g}")}</text>'
                 f'<text x="{(L + width - R) / 2:.0f}" y="{height - B + 26}" class="xl mid">'
                 f'{esc(str(plot.get("xlabel", "")))}</text>'
                 f'<text x="12" y="{(T + height - B) / 2:.0f}" class="xl mid" '
                 f'transform="rotate(-90 12 {(T + height - B) / 2:.0f})">{esc(str(plot.get("ylabel", "")))}</text>')
    for i, (label, pts) in enumerate(series.items()):
        c = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        pts = sorted(pts)
        if len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.8"/>')
        if len(pts) <= 40:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{c}"/>' for x, y in pts]
        lx, ly = L + (i % 3) * ((width - L) // 3), height + 4 + 14 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{lx + 14}" y="{ly + 9}" class="xl">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def markdown_table_html(md: str) -> str:
    """The pipe tables of a Markdown text as HTML tables (other lines as paragraphs), escaped."""
    out, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body) +
                       "</table>")
            rows.clear()
    for line in str(md).splitlines():
        t = line.strip()
        if t.startswith("|") and t.endswith("|"):
            cells = [c.strip() for c in t[1:-1].split("|")]
            if not all(set(c) <= set("-: ") and c for c in cells):  # skip the |---| separator
                rows.append(cells)
        else:
            flush()
            if t:
                out.append(f"<p>{esc(t)}</p>")
    flush()
    return "".join(out)


def experiment_html(exp: dict) -> str:
    """One *.experiment.json: notes, the command and wall time, its charts, its table."""
    plots = [p for p in exp.get("plots") or [] if isinstance(p, dict)]
    secs = exp.get("seconds")
    return ((f"<p class='note'>{esc(exp.get('notes', ''))}</p>" if exp.get("notes") else "") +
            (f"<p class='note'><code>{esc(exp['command'])}</code>" +
             (f" &middot; {fmt(secs)} s" if is_number(secs) else "") + "</p>" if exp.get("command") else "") +
            ("<div class='charts'>" + "".join(f"<div class='chart'>{svg_lines(p)}</div>" for p in plots) + "</div>"
             if plots else "") +
            markdown_table_html(exp.get("table", "")))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics_charts(rows: list[dict]) -> tuple[str, str]:
    """(x key, HTML of one chart per numeric key) for the rows of a metrics file."""
    xkey = next((k for k in X_KEYS if any(is_number(r.get(k)) for r in rows)), None)
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k != xkey and k not in keys and is_number(v)]
    charts = []
    for k in keys:
        pts = [((r[xkey] if xkey else i), r[k]) for i, r in enumerate(rows)
               if is_number(r.get(k)) and (xkey is None or is_number(r.get(xkey)))]
        if pts:
            charts.append(svg_chart([p[0] for p in pts], [p[1] for p in pts], k))
    return xkey or "row", "".join(f'<div class="chart">{c}</div>' for c in charts)


# ------------------------------------------------------------------------------ sections
def kv_table(obj, prefix: str = "") -> str:
    """A nested dict as a flat list of dotted keys and values, in newspaper columns."""
    rows = []

    def walk(o, key):
        if isinstance(o, dict) and o:
            for k, v in o.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            rows.append(f"<div><dt>{esc(key)}</dt><dd>{esc(fmt(o))}</dd></div>")
    walk(obj, prefix)
    return f'<dl class="kv">{"".join(rows)}</dl>'


def text_block(label: str, text) -> str:
    return f'<div class="blk"><div class="lbl">{esc(label)}</div><div class="txt">{esc(fmt(text))}</div></div>'


DISTILL_NOTE = ("context distillation: prompt &rarr; the policy's own answer &rarr; the teacher's answer under the "
                "constitution's few-shot exchanges, which the policy is fine-tuned on without them. This SL-CAI is a "
                "distillation from the teacher (the pipeline's default: the 1.5B model), not the paper's self-critique: "
                "at 135M the policy never writes a "
                "refusal itself, alone, with a system prompt or in its own revisions (docs/results.md, 'SL-CAI routes')")


def trace_html(r: dict, open_: bool = False) -> str:
    """One SL-CAI trace: prompt, initial response, every round's principle/critique/revision."""
    rounds = r.get("rounds") if isinstance(r.get("rounds"), list) else []
    body = [text_block("prompt", r.get("prompt")), text_block("initial response", r.get("initial"))]
    for i, rd in enumerate(rounds, start=1):
        rd = rd if isinstance(rd, dict) else {}
        body.append(f'<div class="round"><div class="rh">round {i}: principle <b>{esc(fmt(rd.get("principle")))}</b>'
                    f'</div>{text_block("critique", rd.get("critique"))}'
                    f'{text_block("revision", rd.get("revision"))}</div>')
    if r.get("route") == "distill":
        cands = r.get("candidates") if isinstance(r.get("candidates"), list) else []
        scores = r.get("scores") if isinstance(r.get("scores"), list) else []
        for i, c in enumerate(cands):
            kept = " (kept: the SFT target)" if i == r.get("chosen") else ""
            score = f", labeller score {fmt(scores[i])}" if i < len(scores) and len(cands) > 1 else ""
            body.append(text_block(f"teacher's answer {i + 1} under the few-shot context{score}{kept}", c))
    elif not rounds:
        body.append('<p class="note">no critique/revision rounds (a helpfulness prompt is answered once)</p>')
    summary = f'<span class="tag">{esc(fmt(r.get("kind")))}</span> {esc(fmt(r.get("prompt")))}'
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>{''.join(body)}</details>"


def _message_text(v, role: str):
    """A side of a TRL record: a plain string, or the last message of `role` in a message list."""
    if isinstance(v, list):
        return next((m.get("content") for m in reversed(v) if isinstance(m, dict) and m.get("role") == role), None)
    return v


def verdicts_html(r: dict) -> str:
    """Each labeller's p(A) of a preference record: the ensemble's members (model, method), the
    provenance label of RLCD / revision pairs, the vote share; '-' when there is one labeller."""
    parts = []
    for m in r.get("members") or []:
        if isinstance(m, dict):
            name = Path(member_spec(str(m.get("model", "?")))[0]).name  # 'path/M.gguf:ab' -> 'M.gguf'
            parts.append(f"<p class=pr>{esc(name)} {esc(m.get('scorer', '?'))}: <b>{esc(fmt(m.get('p_a')))}</b></p>")
    if is_number(r.get("p_a_provenance")):
        parts.append(f"<p class=pr>provenance: <b>{esc(fmt(r['p_a_provenance']))}</b></p>")
    if is_number(r.get("votes_a")) and len(r.get("members") or []) > 1:
        parts.append(f"<p class=pr>votes for A: {esc(fmt(r['votes_a']))}</p>")
    return "".join(parts) or "-"


def preferences_html(rows: list[dict]) -> str:
    """A table of judgements: prompt, both responses, p(A) in both orders, soft label, each labeller's
    verdict (an ensemble's members, a provenance label), principles."""
    head = ("prompt", "response A", "response B", "p(A) A shown first", "p(A) A shown second", "p(A) label",
            "orders agree", "each labeller's p(A)", "principles")
    out = ["<table class='prefs'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        prompt = r.get("prompt") if isinstance(r.get("prompt"), str) else _message_text(r.get("chosen"), "user")
        a = r.get("response_a", _message_text(r.get("chosen"), "assistant"))
        b = r.get("response_b", _message_text(r.get("rejected"), "assistant"))
        principles = r.get("principles") if isinstance(r.get("principles"), list) else []
        plist = "".join(f"<p class=pr>{esc(x)}</p>" for x in principles)
        p = r.get("p_a")
        cls = "" if not is_number(p) else (" class='pa'" if p > 0.5 else " class='pb'" if p < 0.5 else "")
        out.append("<tr>" + "".join(f"<td><div class='cell'>{esc(fmt(x))}</div></td>" for x in (prompt, a, b)) +
                   "".join(f"<td class='num'>{esc(fmt(r.get(k)))}</td>" for k in ("p_a_first_order",
                                                                                  "p_a_swapped_order")) +
                   f"<td class='num'><b{cls}>{esc(fmt(p))}</b></td><td>{esc(fmt(r.get('orders_agree')))}</td>"
                   f"<td><div class='cell small'>{verdicts_html(r)}</div></td>"
                   f"<td><div class='cell small'>{plist or '-'}</div></td></tr>")
    out.append("</table>")
    return "".join(out)


def pairs_note(rows: list[dict]) -> str:
    """What the pairs contain, described by the evaluation's detector (yardstick.pair_kinds: it
    describes, it never chose them) and how decided their labels are (yardstick.label_margins)."""
    kinds, margins = pair_kinds(rows), label_margins(rows)
    out = ""
    d = kinds["differ"]
    if d["n"]:
        out += (f"; the two replies differ in kind (refusal vs compliance, or explained vs evasive refusal, by "
                f"the evaluation's detector, which describes the pairs and never chose them) in {d['k']}/{d['n']} "
                f"pairs ({pct_or_dash(d['rate'])})")
    for key, what in (("refusal_chosen", "the refusal over the compliance"),
                      ("explained_chosen", "the explained refusal over the evasive one")):
        c = kinds[key]
        if c["n"]:
            out += f"; on red-team prompts the AI label favours {what} in {c['k']}/{c['n']} such pairs ({pct_or_dash(c['rate'])})"
    if margins["n"]:
        out += (f"; label margin |p(A) - 1/2|: mean {margins['mean']:.3f}, median {margins['median']:.3f}, "
                f"{pct_or_dash(margins['at_least_0.1']['rate'])} of the pairs at 0.1 or more")
    return out


def pct_or_dash(v) -> str:
    return f"{100 * v:.0f}%" if is_number(v) else "-"


def eval_html(res: dict) -> str:
    """The evaluation: per-policy table, win-rate matrix, held-out responses."""
    pol = res.get("policies") if isinstance(res.get("policies"), dict) else {}
    names = policy_names(res)
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    elo = lambda v: "-" if v is None else f"{v:+.0f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    cols = [("quality", lambda r: r.get("quality"), num), ("Elo", lambda r: r.get("elo"), elo),
            ("Elo harmless", lambda r: r.get("elo_harmless"), elo),
            ("Elo helpful", lambda r: r.get("elo_helpful"), elo),
            ("RM score", lambda r: (r.get("rm_score") or {}).get("all"), num),
            ("length (tok)", lambda r: (r.get("length") or {}).get("all"), lambda v: "-" if v is None else f"{v:.1f}"),
            ("evasive (red-team)", lambda r: (r.get("evasive_rate") or {}).get("red-team"), pct),
            ("refusals (red-team)", lambda r: (r.get("refusal_rate") or {}).get("red-team"), pct),
            ("truncated", lambda r: (r.get("truncated_rate") or {}).get("all"), pct)]
    cols = [c for c in cols if any(is_number(c[1](pol[n])) for n in names)]
    out = [judge_free_table_html(res)]
    out += ["<table class='eval'><tr><th>policy</th>" + "".join(f"<th>{esc(c[0])}</th>" for c in cols) + "</tr>"]
    for n in names:
        anchor = " (anchor)" if n == res.get("anchor") else ""
        out.append(f"<tr><th>{esc(n + anchor)}</th>" + "".join(
            f"<td class='num'>{esc(show(v) if is_number(v := get(pol[n])) else fmt(v))}</td>"
            for _, get, show in cols) + "</tr>")
    out.append("</table>")
    wr = (res.get("win_rates") or {}).get("all")
    if isinstance(wr, dict):
        out.append("<p>Win rate of the row policy against the column policy (AI labeller, both orders, "
                   "principle ensemble):</p><table class='eval'><tr><th></th>" +
                   "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
        for x in names:
            out.append(f"<tr><th>{esc(x)}</th>" + "".join(
                f"<td class='num'>{'-' if x == y else esc(pct_or_dash((wr.get(x) or {}).get(y)))}</td>" for y in names)
                       + "</tr>")
        out.append("</table>")
    for key in ("elo_method", "evasiveness_definition", "judge_order_agreement", "prompts", "config"):
        if key in res:
            out.append(f"<p class='note'><b>{esc(key)}</b>: {esc(fmt(res[key]))}</p>")
    samples = res.get("samples") if isinstance(res.get("samples"), list) else []
    if samples:
        out.append(f"<h3>Held-out responses ({len(samples)})</h3>")
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                continue
            resp = s.get("responses") if isinstance(s.get("responses"), dict) else {}
            scores = s.get("rm_scores") if isinstance(s.get("rm_scores"), dict) else {}
            blocks = "".join(text_block(f"{n}" + (f" (RM {fmt(scores[n])})" if n in scores else ""), t)
                             for n, t in resp.items())
            out.append(f"<details{' open' if i == 0 else ''}><summary>"
                       f"<span class='tag'>{esc(fmt(s.get('kind')))}</span> "
                       f"{esc(fmt(s.get('prompt')))}</summary>{blocks}</details>")
    return "".join(out)


# ------------------------------------------------------------------------------ the answer first
HEADLINE_METRICS = (
    # (label, getter of a share {rate, low, high} or a number, lower is better?)
    ("explained refusal, harmful prompts", lambda j: (j.get("harmful") or {}).get("explained_refusal"), False),
    ("evasive refusal, harmful prompts", lambda j: (j.get("harmful") or {}).get("evasive_refusal"), True),
    ("compliance, harmful prompts", lambda j: (j.get("harmful") or {}).get("compliance"), True),
    ("explained / all refusals, harmful prompts",
     lambda j: (j.get("harmful") or {}).get("explained_of_refusals"), False),
    ("over-refusal, benign edgy prompts", lambda j: (j.get("over_refusal") or {}).get("refusal_strict"), True),
    ("capability (cloze accuracy)", lambda j: (j.get("capability") or {}).get("accuracy"), False),
    ("perplexity, reference text", lambda j: (j.get("perplexity") or {}).get("perplexity"), True),
)


def bar_chart(title: str, rows: list[tuple[str, float, float | None, float | None]], base: str,
              percent: bool, width: int = 330) -> str:
    """Horizontal bars, one per policy (the base model grey), with a Wilson-interval whisker when
    the row has one: rows = [(policy, value, low, high)]. Values in [0, 1] are drawn as percent."""
    L, R, T, bar, gap = 70, 46, 34, 14, 5
    height = T + len(rows) * (bar + gap) + 4
    vmax = 1.0 if percent else max([v for _, v, _, _ in rows] + [1e-9]) * 1.1
    sx = lambda v: L + (width - L - R) * max(0.0, v) / vmax  # noqa: E731
    head, _, sub = title.partition(" | ")
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{esc(head + " " + sub)}"><text x="4" y="13" class="t">{esc(head)}</text>'
             f'<text x="4" y="27" class="xl">{esc(sub)}</text>']
    for i, (name, v, lo, hi) in enumerate(rows):
        y = T + i * (bar + gap)
        cls = "bbase" if name == base else "bpol"
        parts.append(f'<text x="{L - 4}" y="{y + bar - 3}" class="yl">{esc(name)}</text>'
                     f'<rect x="{L}" y="{y}" width="{sx(v) - L:.1f}" height="{bar}" class="{cls}"/>')
        if lo is not None and hi is not None:
            parts.append(f'<line x1="{sx(lo):.1f}" x2="{sx(hi):.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" class="ci"/>')
        label = f"{100 * v:.0f}%" if percent else f"{v:.3g}"
        parts.append(f'<text x="{sx(hi if hi is not None else v) + 3:.1f}" y="{y + bar - 3}" class="xl">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def headline_html(res: dict) -> str:
    """The answer: per judge-free metric a small bar chart of every policy against the base model
    (the anchor), with Wilson 95% intervals and the number of items (per policy where it differs:
    the refusals behind "explained / all refusals"), then the tax verdicts."""
    pol = res.get("policies") if isinstance(res.get("policies"), dict) else {}
    names = [n for n in policy_names(res) if isinstance(pol[n], dict) and isinstance(pol[n].get("judge_free"), dict)]
    if not names:
        return ""
    base = res.get("anchor", names[0])
    metrics = list(HEADLINE_METRICS) + [(f"{k} (cloze accuracy)", (lambda k: lambda j: (j.get(k) or {}).get("accuracy"))(k),
                                         False) for k in (res.get("judge_free") or {}).get("bigbench_tasks", [])]
    charts = []
    for title, get, lower in metrics:
        rows, n_items, percent, empty = [], {}, True, []
        for n in names:
            v = get(pol[n]["judge_free"])
            if isinstance(v, dict) and is_number(v.get("rate")):
                lo, hi = v.get("low"), v.get("high")
                rows.append((n, v["rate"], *((lo, hi) if is_number(lo) and is_number(hi) else (None, None))))
                n_items[n] = v.get("n")
            elif isinstance(v, dict) and v.get("n") == 0:
                empty.append(n)  # a share of nothing (explained / all refusals of a policy that refused nothing)
            elif is_number(v):
                rows.append((n, float(v), None, None))
                percent = False
        if rows:
            ns = set(n_items.values())
            count = (f"n={ns.pop()}, " if len(ns) == 1 and None not in ns else
                     "n per policy " + " / ".join(f"{k} {v}" for k, v in n_items.items()) + ", " if n_items else "")
            count += f"none for {', '.join(empty)}, " if empty else ""
            sub = f"{title} | {count}{'lower' if lower else 'higher'} is better"
            charts.append(f'<div class="chart">{bar_chart(sub, rows, base, percent)}</div>')
    out = [f"<p>Judge-free measurements on held-out prompts: no AI labeller is involved. Grey = the base model "
           f"({esc(base)}); whiskers = Wilson 95% intervals.</p><div class='charts'>{''.join(charts)}</div>"]
    tax = res.get("alignment_tax")
    if isinstance(tax, dict) and tax:
        items = []
        for n in [x for x in policy_names(res) if x in tax]:
            rep = tax[n]
            if isinstance(rep, dict) and is_number(rep.get("average_gain")):
                benches = rep.get("benchmarks") if isinstance(rep.get("benchmarks"), dict) else {}
                items.append(f"<li><b>{esc(n)}</b> against {esc(base)}: alignment tax, average gain "
                             f"{100 * rep['average_gain']:+.1f}% ({esc(rep.get('verdict'))}; gain &gt; 0 is an "
                             f"improvement): " + ", ".join(
                                 f"{esc(b)} {100 * r['relative_change']:+.1f}% ({esc(r.get('verdict'))})"
                                 for b, r in benches.items() if isinstance(r, dict) and is_number(r.get("relative_change")))
                             + "</li>")
        out.append(f"<ul>{''.join(items)}</ul>")
    acc = res.get("judge_accuracy")
    if isinstance(acc, dict) and acc:
        out.append("<p class='note'>The AI judge's own accuracy on labelled pairs: " + "; ".join(
            f"{esc(k)} {pct_or_dash((v.get('accuracy') or {}).get('rate'))} of {esc((v.get('accuracy') or {}).get('n'))}"
            for k, v in acc.items() if isinstance(v, dict)) + " (50% = chance).</p>")
    return "".join(out)


def judge_free_table_html(res: dict) -> str:
    """Every judge-free number of every policy, as "rate (low-high)" with the n behind it."""
    pol = res.get("policies") if isinstance(res.get("policies"), dict) else {}
    names = [n for n in policy_names(res) if isinstance(pol[n], dict) and isinstance(pol[n].get("judge_free"), dict)]
    if not names:
        return ""

    def show(v):
        if isinstance(v, dict) and is_number(v.get("rate")):
            ci = (f"{100 * v['low']:.0f}-{100 * v['high']:.0f}, " if is_number(v.get("low")) and is_number(v.get("high"))
                  else "")
            return f"{100 * v['rate']:.0f}% ({ci}n={esc(v.get('n'))})"
        return f"{v:.3f}" if is_number(v) else "-"
    metrics = list(HEADLINE_METRICS) + [
        ("refusal (loose), harmful prompts", lambda j: (j.get("harmful") or {}).get("refusal_loose"), False),
        ("over-refusal (loose)", lambda j: (j.get("over_refusal") or {}).get("refusal_loose"), True)]
    metrics += [(f"{k} (cloze accuracy)", (lambda k: lambda j: (j.get(k) or {}).get("accuracy"))(k), False)
                for k in (res.get("judge_free") or {}).get("bigbench_tasks", [])]
    out = ["<table class='eval'><tr><th>judge-free</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for title, get, _ in metrics:
        out.append(f"<tr><th>{esc(title)}</th>" + "".join(
            f"<td class='num'>{esc(show(get(pol[n]['judge_free'])))}</td>" for n in names) + "</tr>")
    out.append("</table>")
    skipped = (res.get("judge_free") or {}).get("skipped")
    if isinstance(skipped, str) and skipped:  # what the run left out (opt-in BIG-bench) and how to add it
        out.append(f"<p class='note skipped'>{esc(skipped)}</p>")
    return "".join(out)


def side_by_side_html(res: dict, n: int = 6) -> str:
    """A few held-out harmful prompts with every policy's reply and its outcome, side by side: the
    first prompt of each source in turn, HarmBench's last (its behaviours are the most severe;
    docs/data.md)."""
    free = res.get("judge_free") if isinstance(res.get("judge_free"), dict) else {}
    rows = [r for r in free.get("harmful") or [] if isinstance(r, dict) and isinstance(r.get("responses"), dict)]
    if not rows:
        return ""

    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(str(r.get("source", "")).split("/")[0], []).append(r)
    groups = [v for k, v in by_source.items() if k != "harmbench"] or list(by_source.values())
    picked = [r for group in itertools.zip_longest(*groups) for r in group if r is not None][:n]
    names = [x for x in policy_names(res) if x in picked[0]["responses"]] or list(picked[0]["responses"])
    out = ["<table class='sbs'><tr><th>held-out harmful prompt</th>" +
           "".join(f"<th>{esc(x)}</th>" for x in names) + "</tr>"]
    for r in picked:
        cells = []
        for x in names:
            text = r["responses"].get(x)
            tag = outcome(text).replace("_", " ") if isinstance(text, str) else "-"
            cells.append(f"<td><span class='tag o-{esc(tag.split()[0])}'>{esc(tag)}</span>"
                         f"<div class='cell'>{esc(fmt(text))}</div></td>")
        out.append(f"<tr><td><div class='cell'>{esc(fmt(r.get('prompt')))}</div>"
                   f"<span class='tag'>{esc(fmt(r.get('source')))}</span></td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d232a;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d6dbe0}
h3{font-size:15px;margin:16px 0 6px} .note{color:#5b6672;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:8px} .chart{border:1px solid #e3e7eb;border-radius:4px;background:#fff}
svg .t{font-size:12px;font-weight:600;fill:#1d232a} svg .yl{font-size:10px;fill:#5b6672;text-anchor:end}
svg .xl{font-size:10px;fill:#5b6672} svg .end{text-anchor:end} svg .mid{text-anchor:middle} svg .frame{fill:#fafbfc;stroke:#d6dbe0}
svg .grid{stroke:#e9ecef} svg .line{fill:none;stroke:#2f6db5;stroke-width:1.6} svg .dot{fill:#2f6db5}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #d6dbe0;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f2f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.kv{columns:4 280px;column-gap:28px;margin:6px 0;font-family:ui-monospace,monospace;font-size:12px}
dl.kv div{break-inside:avoid;display:flex;gap:10px;border-bottom:1px solid #eef0f2;padding:1px 0}
dl.kv dt{color:#5b6672;min-width:45%} dl.kv dd{margin:0;word-break:break-word}
.cell{max-height:9em;overflow:auto;white-space:pre-wrap;max-width:360px} .small{font-size:12px}
details{border:1px solid #e3e7eb;border-radius:4px;margin:4px 0;padding:4px 8px;background:#fff}
summary{cursor:pointer} .blk{margin:6px 0} .lbl{font-size:11px;text-transform:uppercase;color:#5b6672}
.txt{white-space:pre-wrap;background:#f7f8f9;padding:4px 6px;border-radius:3px}
.round{border-left:3px solid #b9cde6;padding-left:8px;margin:8px 0} .rh{font-size:12px;color:#3b4650}
.tag{font-size:11px;background:#eef2f6;border-radius:3px;padding:0 4px;color:#3b4650}
p.pr{margin:0 0 4px;padding-bottom:3px;border-bottom:1px dotted #d6dbe0}
b.pa{color:#1a7f37} b.pb{color:#b3261e} button{margin:4px 0}
svg .bbase{fill:#9aa5b1} svg .bpol{fill:#2f6db5} svg .ci{stroke:#1d232a;stroke-width:1.4}
table.sbs td{max-width:300px} .o-explained{background:#dff3e4} .o-evasive{background:#fdf1d6} .o-compliance{background:#fbe1df}
"""
JS = ("function toggleAll(open){document.querySelectorAll('details').forEach(function(d){d.open=open;});}")


def render_report(run_dir: Path, max_traces: int = 30, max_preferences: int = 40) -> str:
    """The whole page as a string (see the module docstring)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    sections: list[tuple[str, str]] = []  # (title, html)
    rel = lambda p: str(p.relative_to(run_dir))  # noqa: E731

    evals = [(p, read_json(p, notes)) for p in files(run_dir, "eval.json")]
    evals = [(p, res) for p, res in evals if isinstance(res, dict)]
    main = next(((p, res) for p, res in evals if p.parent.name == "eval"), evals[-1] if evals else None)
    if main and headline_html(main[1]):
        sections.append((f"The answer: {rel(main[0])}", headline_html(main[1])))
        if side_by_side_html(main[1]):
            sections.append(("Held-out harmful prompts, every policy's reply", side_by_side_html(main[1])))
    for p in files(run_dir, "*.experiment.json"):
        exp = read_json(p, notes)
        if isinstance(exp, dict):
            sections.append((f"Experiment: {exp.get('title') or exp.get('experiment') or p.name} ({rel(p)})",
                             experiment_html(exp)))
    for p, res in evals:
        sections.append((f"Evaluation: {rel(p)}", eval_html(res)))

    configs = [p for p in files(run_dir, "config.json") if not (p.parent / "model.safetensors").exists()]
    if configs:
        body = "".join(f"<details open><summary>{esc(rel(p))}</summary>{kv_table(read_json(p, notes))}</details>"
                       for p in configs)
        sections.append(("Configuration", body))

    summaries = files(run_dir, "*summary*.json")
    if summaries:
        body = "".join(f"<details><summary>{esc(rel(p))}</summary>{kv_table(read_json(p, notes))}</details>"
                       for p in summaries)
        sections.append(("Summaries", body))

    metric_files = [p for p in files(run_dir, "*.jsonl") if "metrics" in p.name]
    if metric_files:
        body = []
        for p in metric_files:
            rows = read_jsonl(p, notes)
            xkey, charts = metrics_charts(rows)
            body.append(f"<details open><summary>{esc(rel(p))}: {len(rows)} rows, x = {esc(xkey)}</summary>"
                        f"<div class='charts'>{charts or '<p class=note>no numeric columns</p>'}</div></details>")
        sections.append(("Training curves", "".join(body)))

    for p in files(run_dir, "traces*.jsonl"):
        rows = read_jsonl(p, notes)
        shown = rows[:max_traces]
        distilled = any(r.get("route") == "distill" for r in rows if isinstance(r, dict))
        opened = [r for r in shown if r.get("rounds") or r.get("route") == "distill"][:2]  # two examples open
        what = (DISTILL_NOTE if distilled else "prompt &rarr; initial response &rarr; critique and revision per round")
        sections.append((f"SL-CAI traces: {rel(p)}",
                         f"<p class='note'>{len(shown)} of {len(rows)} records ({what})</p>" +
                         "".join(trace_html(r, r in opened) for r in shown)))

    for p in files(run_dir, "preferences*.jsonl"):
        if ".dropped" in p.name:
            continue
        rows = read_jsonl(p, notes)
        shown = rows[:max_preferences]
        agree = [r["orders_agree"] for r in rows if isinstance(r.get("orders_agree"), bool)]
        extra = f"; the two orders agree on {sum(agree)}/{len(agree)} pairs" if agree else ""
        extra += pairs_note([r for r in rows if isinstance(r, dict)])
        sections.append((f"AI feedback: {rel(p)}",
                         f"<p class='note'>{len(shown)} of {len(rows)} judged pairs{extra}. p(A) = the labeller's "
                         f"probability that response A is better, with A shown as option (A) (first) and as option "
                         f"(B) (second); the label averages both orders and the principles.</p>" +
                         preferences_html(shown)))


    toc = "".join(f"<li><a href='#s{i}'>{esc(t)}</a></li>" for i, (t, _) in enumerate(sections))
    body = "".join(f"<h2 id='s{i}'>{esc(t)}</h2>{h}" for i, (t, h) in enumerate(sections))
    if not sections:
        body = "<p>Nothing found: no config.json, metrics, traces, preferences or eval.json under this folder.</p>"
    note_html = "".join(f"<p class='note'>{esc(n)}</p>" for n in notes)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>minicai report: {esc(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>minicai report: {esc(run_dir.name)}</h1>"
            f"<p class='note'>{esc(run_dir.resolve())} &middot; generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
            "<button type='button' onclick='toggleAll(true)'>open all</button> "
            "<button type='button' onclick='toggleAll(false)'>close all</button>"
            f"<ul>{toc}</ul>{note_html}{body}<script>{JS}</script></body></html>")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minicai.eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder to summarise (searched recursively)")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")
    p.add_argument("--max-traces", type=int, default=30, help="SL traces shown per traces file")
    p.add_argument("--max-preferences", type=int, default=40, help="judged pairs shown per preferences file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder")
    out = Path(args.out) if args.out else run_dir / "report.html"
    atomic_write_text(out, render_report(run_dir, args.max_traces, args.max_preferences))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from ..infra.cli import run_cli

    sys.exit(run_cli(main))
