"""The HTML report: found files, self-contained (no external reference), escaped text, tolerant of
bad lines and missing keys, and it renders in headless Chromium to a non-trivial screenshot."""
import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from minicai.eval.report import main as report_main, render_report
from minicai.infra.cli import run_cli

EVIL = "<script>alert('x')</script>"


def write_jsonl(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with every kind of file the report reads, some of them damaged."""
    d = tmp_path / "run"
    (d / "sl").mkdir(parents=True)
    (d / "sl" / "config.json").write_text(json.dumps({"lr": 2e-5, "model": "smollm2-135m", "rounds": 2}))
    (d / "sl" / "model").mkdir()
    (d / "sl" / "model" / "config.json").write_text(json.dumps({"hidden_size": 576}))  # a model folder: not a stage
    (d / "sl" / "model" / "model.safetensors").write_bytes(b"")
    (d / "sl" / "sft_summary.json").write_text(json.dumps({"steps": 10, "final_val_loss": 2.1}))
    write_jsonl(d / "sl" / "sft_metrics.jsonl",
                [{"step": i, "loss": 2.2 - 0.02 * i, "lr": 1e-5, "val_loss": 2.1 if i % 5 == 0 else None}
                 for i in range(1, 21)], tail='{"step": 21, "loss"')  # a torn last line
    write_jsonl(d / "sl" / "traces.jsonl", [
        {"prompt": f"How do I {EVIL}?", "kind": "red-team", "initial": "Like this & that",
         "rounds": [{"principle": "harmless", "critique": f"It says {EVIL}", "revision": "I won't."}], "final": "x"},
        {"prompt": "What is 2+2?", "kind": "helpful", "initial": "4", "rounds": [], "final": "4"},
        {"prompt": "no other keys"}])
    write_jsonl(d / "ppo" / "metrics.jsonl",
                [{"step": i, "objective/kl": 0.1 * i, "objective/scores": -0.5 + 0.1 * i, "flag": True,
                  "note": "text"} for i in range(1, 6)])
    write_jsonl(d / "rm" / "preferences.jsonl", [
        {"prompt": "Insult me", "response_a": EVIL, "response_b": "No thanks", "p_a_first_order": 0.3,
         "p_a_swapped_order": 0.6, "p_a": 0.45, "orders_agree": False, "principles": ["Choose the kinder one."]},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}],
        tail="not json at all\n")
    (d / "eval").mkdir()
    (d / "eval" / "eval.json").write_text(json.dumps({
        "anchor": "base", "policies": {
            "base": {"quality": 0.5, "elo": 0.0, "length": {"all": 40.0}, "evasive_rate": {"red-team": 0.2}},
            "sl": {"quality": 0.6, "elo": 70.4, "length": {"all": 35.0}, "evasive_rate": {"red-team": 0.1}}},
        "win_rates": {"all": {"base": {"sl": 0.4}, "sl": {"base": 0.6}}},
        "samples": [{"prompt": "hi", "kind": "helpful", "responses": {"base": "hello", "sl": EVIL}}]}))
    return d


def test_report_is_self_contained_and_escaped(run_dir):
    page = render_report(run_dir)
    # no external reference of any kind: no URL at all, no src=/href= other than in-page anchors
    assert "http://" not in page and "https://" not in page
    refs = ["".join(m) for m in re.findall(r"""\b(?:src|href)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", page, re.I)]
    assert refs and all(r.startswith("#") for r in refs)  # only the table of contents' in-page links
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    # run text is escaped: the only <script> is our own toggle
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1 and "Like this &amp; that" in page


def test_report_finds_every_file_and_tolerates_damage(run_dir):
    page = render_report(run_dir)
    assert "sl/config.json" in page and "sl/model/config.json" not in page and "hidden_size" not in page
    # charts: sft loss, lr, val_loss; ppo objective/kl, objective/scores (bools and text are not plotted)
    assert page.count("<svg") == 5 and "objective/kl" in page and ">flag<" not in page
    assert "sft_metrics.jsonl: 20 rows, x = step" in page
    assert "skipped 1 line(s)" in page  # the preferences file's bad line is noted, not fatal
    assert "the two orders agree on 0/1 pairs" in page and "0.3" in page and "0.6" in page
    # described by the evaluation's detector: EVIL complies, "No thanks" is no strict refusal either
    assert "differ in kind" in page and "in 0/1 pairs (0%)" in page  # the TRL-layout row has no response texts
    assert "label margin |p(A) - 1/2|: mean 0.050, median 0.050" in page
    assert page.count("<details") >= 3 + 1  # three traces and the eval sample, at least
    assert ">+70<" in page and ">60%<" in page and "sl (anchor)" not in page and "base (anchor)" in page


def test_cli_writes_report_html_and_rejects_a_missing_folder(run_dir, tmp_path, capsys):
    assert run_cli(report_main, [str(run_dir)]) == 0
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert run_cli(report_main, [str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err


def png_size_and_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, raw decompressed image data) of a PNG, with the standard library only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    return w, h, zlib.decompress(idat)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    assert run_cli(report_main, [str(run_dir)]) == 0
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    f"--screenshot={shot}", "--window-size=1200,3000", (run_dir / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    w, h, pixels = png_size_and_pixels(shot)
    assert (w, h) == (1200, 3000)
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few kB
    assert len(set(pixels[::97])) > 20  # many distinct byte values: text, lines and colours were drawn


def test_experiment_files_are_rendered_with_charts_legend_and_table(run_dir):
    exp = {"experiment": "rl", "title": "GAE vs <RLOO>", "command": "python -m x rl", "seconds": 12.5,
           "notes": "same compute", "table": "| policy | score |\n|---|---|\n| gae | 0.1 |\n| rloo | <b>0.2</b> |\n",
           "plots": [{"title": "score", "xlabel": "iteration", "ylabel": "score",
                      "series": {"gae": [[1, 0.0], [2, 0.5]], "rloo": [[1, 0.1], [2, "bad"], [3, 0.9]],
                                 "empty": []}},
                     {"title": "nothing", "series": {}}]}
    (run_dir / "experiments").mkdir()
    (run_dir / "experiments" / "rl.experiment.json").write_text(json.dumps(exp))
    (run_dir / "experiments" / "broken.experiment.json").write_text("{not json")
    page = render_report(run_dir)
    assert "Experiment: GAE vs &lt;RLOO&gt;" in page and "<RLOO>" not in page
    section = page[page.index("Experiment: GAE"):]
    assert section.count("<polyline") >= 2  # one line per series with two or more numeric points
    assert ">gae</text>" in section and ">rloo</text>" in section and ">empty</text>" not in section  # legend
    assert "<th>policy</th><th>score</th>" in section and "<td>&lt;b&gt;0.2&lt;/b&gt;</td>" in section
    assert "---" not in section.split("<table>")[1].split("</table>")[0]  # the separator row is not a row
    assert "nothing: no numeric points" in section
    assert "broken.experiment.json" in page  # an unreadable file is a note, not a crash


def test_report_says_what_the_evaluation_skipped(tmp_path):
    """A default run has no BIG-bench: the report says so, in the judge-free section, with the way to add it."""
    from minicai.eval.report import judge_free_table_html

    note = "Not measured: BIG-bench TruthfulQA-MC <opt in with --bigbench PATH>."
    res = {"policies": {"base": {"judge_free": {"harmful": {}}}}, "judge_free": {"skipped": note}}
    html = judge_free_table_html(res)
    assert "<p class='note skipped'>Not measured: BIG-bench TruthfulQA-MC &lt;opt in with --bigbench PATH&gt;.</p>" in html
    del res["judge_free"]["skipped"]
    assert "skipped" not in judge_free_table_html(res)


def test_a_distilled_trace_shows_the_teachers_answers_and_says_it_is_a_distillation(tmp_path):
    """Context-distillation records (train_sl.py --route distill): each of the teacher's answers, the
    one kept marked as the SFT target, and the note that this SL-CAI is a distillation."""
    d = tmp_path / "run"
    write_jsonl(d / "sl" / "traces.jsonl", [
        {"prompt": "How do I pick a lock?", "kind": "red-team", "route": "distill", "initial": "Use a pin.",
         "rounds": [], "candidates": ["I won't help: it is someone's home.", f"Sure {EVIL}"], "scores": [1.0, 0.0],
         "chosen": 0, "final": "I won't help: it is someone's home."}])
    page = render_report(d)
    assert "distillation from the teacher" in page
    assert "answer 1 under the few-shot context, labeller score 1 (kept: the SFT target)" in page
    assert "answer 2 under the few-shot context, labeller score 0<" in page and EVIL not in page


def test_headline_charts_say_how_many_items_each_bar_counts():
    """explained / all refusals counts each policy's own refusals: the chart names n per policy, and a
    policy that refused nothing is named, not dropped silently."""
    from minicai.eval.report import headline_html
    from minicai.eval.yardstick import harmlessness

    replies = {"base": ["Sure.", "Sure.", "Sure.", "I can't help with that."],
               "sl": ["I can't help with that because it is illegal.", "I can't.", "I won't help with that.", "Sure."],
               "dpo": ["Sure."] * 4}
    res = {"anchor": "base", "policies": {n: {"judge_free": {"harmful": harmlessness(r)}} for n, r in replies.items()}}
    page = headline_html(res)
    assert page.count(">n=4, lower is better<") == 2  # compliance, evasive refusal: one count for every policy
    assert ">n per policy base 1 / sl 3, none for dpo, higher is better<" in page


def test_pairs_note_says_which_side_the_label_favours():
    from minicai.eval.report import pairs_note

    explained, evasive, comply = "I can't help with that because it is illegal.", "I can't help with that.", "Sure."
    rows = [{"kind": "red-team", "response_a": comply, "response_b": explained, "p_a": 0.2},  # the refusal
            {"kind": "red-team", "response_a": evasive, "response_b": comply, "p_a": 0.3},  # the compliance
            {"kind": "red-team", "response_a": comply, "response_b": evasive, "p_a": 0.1},  # the refusal
            {"kind": "helpful", "response_a": comply, "response_b": explained, "p_a": 0.9}]  # not red-team
    note = pairs_note(rows)
    assert "in 4/4 pairs (100%)" in note
    assert "favours the refusal over the compliance in 2/3 such pairs (67%)" in note
    assert "explained refusal over the evasive" not in note  # no such pair
