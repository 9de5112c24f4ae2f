"""The one-command pipeline, end to end on the tiny model: every stage runs, lands under one run
folder, and a rerun skips everything."""
import json

import pytest

from minicai.experiments.pipeline import main as pipeline_main

TINY = ["--sl-prompts", "4", "--sl-rounds", "1", "--rm-prompts", "8", "--ppo-iterations", "2", "--ppo-batch", "4",
        "--max-new-tokens", "8", "--eval-red-team", "2", "--eval-helpful", "2", "--constitution", "hhh",
        "--eval-harmful", "3", "--eval-benign", "2", "--bigbench", "none", "--feedback-model", "base",
        "--eval-judge", "feedback"]
NO_PARTS = ["--feedback-model", "smollm2-135m"]
"""Dry runs check every model before printing: the default 1.5B feedback model needs its 22 parts,
which the test command does not install (the main command does)."""


def test_pipeline_end_to_end_and_resume(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    assert pipeline_main(["--out", str(out), "--model", str(tiny_gguf), *TINY, "--self-improve", "1",
                          "--baseline", "sft"]) == 0
    for f in ["sl/model/model.safetensors", "sl/traces.jsonl", "rm/preferences.jsonl", "rm/rm/reward_head.safetensors",
              "ppo/model/model.safetensors", "dpo/model/model.safetensors", "round2/ppo/model/config.json",
              "eval/eval.json", "eval/eval.md", "report.html", "baseline/model/model.safetensors",
              "self_improve.experiment.json"]:
        assert (out / f).exists(), f
    log = json.loads((out / "pipeline.json").read_text())
    assert {"round1/sl", "baseline", "round1/rm", "round1/ppo", "dpo", "eval", "round2/ppo"} <= set(log["stages"])
    assert "--target initial --traces" in log["stages"]["baseline"]["command"]
    assert not (out / "baseline" / "traces.jsonl").exists()  # the baseline reads stage 1's traces
    # every round on the yardstick: round 1's RL policy, then round 2's
    assert [r["round"] for r in log["self_improve"]] == [1, 2]
    for r in log["self_improve"]:
        assert r["yardstick_quality"] == r["explained_refusal"] - r["over_refusal"]
    table = (out / "eval" / "eval.md").read_text()
    for name in ("base", "sft", "sl", "rl", "dpo"):
        assert f"| {name}" in table
    res = json.loads((out / "eval" / "eval.json").read_text())
    assert "## Judge-free (held-out)" in table and res["judge_free"]["sets"]["harmful"] == 3
    assert res["judge_free"]["sets"]["benign"] == 4 and set(res["alignment_tax"]) == {"sft", "sl", "rl", "dpo", "rl2"}
    assert res["judge_accuracy"]["builtin_pairs"]["accuracy"]["n"] == 48
    assert res["reward_model_accuracy"]["builtin_pairs"]["accuracy"]["n"] == 48
    page = (out / "report.html").read_text()
    assert "The answer" in page and "Experiment: Iterative SL -&gt; RL rounds" in page
    capsys.readouterr()
    # rerunning the same command finds every stage done
    assert pipeline_main(["--out", str(out), "--model", str(tiny_gguf), *TINY, "--self-improve", "1",
                          "--baseline", "sft"]) == 0
    printed = capsys.readouterr().out
    assert "$ python" not in printed and printed.count("skipping") >= 8


def test_self_improvement_stops_on_an_absolute_drop_of_the_yardstick_quality():
    from minicai.experiments.pipeline import stop_self_improvement
    assert not stop_self_improvement(0.10, 0.12, 0.05)  # 2 points below the best: go on
    assert stop_self_improvement(0.05, 0.12, 0.05)  # 7 points below: stop
    assert not stop_self_improvement(-0.02, 0.0, 0.05)  # a quality near 0 is not a 100% relative drop
    assert stop_self_improvement(-0.06, 0.0, 0.05)


def test_yardstick_quality_and_tax_cli(tmp_path, capsys):
    import pytest

    from minicai.eval.evaluate import main as evaluate_main, yardstick_quality
    from minicai.errors import InputError
    j = {"harmful": {"explained_refusal": {"rate": 0.25}}, "over_refusal": {"refusal_strict": {"rate": 0.10}}}
    assert yardstick_quality(j) == pytest.approx(0.15)
    assert yardstick_quality({"harmful": {"explained_refusal": {"rate": 0.2}}}) is None
    # --tax reads every eval*/eval.json of a run and prints base, policy, relative change and verdict
    tax = {"sl": {"benchmarks": {"perplexity": {"base": 20.0, "policy": 22.0, "relative_change": 0.1,
                                                 "verdict": "regression"},
                                 "capability": {"base": 0.5, "policy": 0.6, "relative_change": 0.2,
                                                "verdict": "improvement"}},
                  "average_gain": 0.05, "verdict": "improvement"}}
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "eval.json").write_text(json.dumps({"anchor": "base", "alignment_tax": tax}))
    assert evaluate_main(["--tax", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Alignment tax of sl against base" in out
    assert "perplexity" in out and "+10.0%  regression" in out and "+20.0%  improvement" in out
    assert "+5.0%  improvement" in out  # the average, signed so that improvement is positive
    with pytest.raises(InputError, match="missing: no such file or folder"):
        evaluate_main(["--tax", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no eval\*/eval.json"):
        evaluate_main(["--tax", str(tmp_path / "empty")])


def test_precision_flags_follow_the_machine(tmp_path, monkeypatch, capsys):
    from minicai.experiments import pipeline

    def commands(*extra):
        assert pipeline_main(["--out", str(tmp_path / "dry"), "--dry-run", *NO_PARTS, *extra]) == 0
        return {line.split("]")[0][1:]: line for line in capsys.readouterr().out.splitlines() if "$ python" in line}

    monkeypatch.setattr(pipeline, "bf16_is_fast", lambda: True)
    fast = commands()
    assert "--bf16 --gen-dtype bfloat16" in fast["round1/sl"]
    assert "--bf16 --dtype bfloat16" in fast["round1/rm"]
    assert "--bf16 --fused-logprobs" in fast["round1/ppo"] and "--bf16" in fast["dpo"]
    assert "--dtype bfloat16" in fast["eval"]
    fp32_flag = commands("--precision", "float32")
    monkeypatch.setattr(pipeline, "bf16_is_fast", lambda: False)  # a machine without bf16 matrix units
    for cmds in (fp32_flag, commands()):
        assert not any(f in c for c in cmds.values() for f in ("--bf16", "--gen-dtype", "--fused-logprobs"))


def test_a_finished_stage_with_changed_flags_or_inputs_is_refused_or_run_again(tmp_path, capsys):
    """run_stage skips a finished stage only when pipeline.json recorded the same stage_key: the same
    command (the run folder's own path and --device aside) and the same inputs. Changed flags are
    refused naming the flag, an input that changed (an earlier stage ran again) naming the input, or
    with --overwrite the stage runs again."""
    from minicai.experiments.pipeline import run_stage
    from minicai.errors import InputError

    out = tmp_path / "run"
    out.mkdir()
    touch = "import pathlib, sys; pathlib.Path(sys.argv[2]).write_text(sys.argv[4])"

    def stage(name, n, log, folder=out, device="cpu", inp=None):
        done = folder / f"{name}.done"
        extra = ["--policy", str(inp)] if inp else []
        run_stage(name, ["-c", touch, "--out", str(done), "--n", str(n), "--device", device, *extra], done, log,
                  folder, dry=False)
        return done.read_text()

    fresh = lambda folder=out: {**json.loads((folder / "pipeline.json").read_text()), "overwrite": False}  # noqa: E731
    log = {"overwrite": False}
    assert stage("a", 1, log) == "1" and stage("b", 1, log, inp=out / "a.done") == "1"
    assert "overwrite" not in json.loads((out / "pipeline.json").read_text())
    log = fresh()
    (out / "a.done").write_text("1")  # rewritten with the same bytes: the same input for b
    assert stage("a", 1, log, device="cuda") == "1" and stage("b", 1, log, inp=out / "a.done") == "1"
    assert capsys.readouterr().out.count("done already") == 2
    with pytest.raises(InputError) as e:
        stage("a", 2, log)
    assert str(e.value) == (f"{out / 'pipeline.json'}: stage 'a' finished with other inputs: its flags changed "
                            f"(--n 1 -> 2); use another --out, or pass --overwrite to run it again (only the files "
                            f"minicai wrote are deleted)")
    log["overwrite"] = True
    assert stage("a", 2, log) == "2"  # ran again: b's input is another file now
    log = fresh()
    with pytest.raises(InputError, match="stage 'b' finished with other inputs: its input OUT/a.done changed"):
        stage("b", 1, log, inp=out / "a.done")
    log["overwrite"] = True
    assert stage("b", 3, log, inp=out / "a.done") == "3"
    moved = tmp_path / "moved"
    out.rename(moved)
    log = fresh(moved)
    (moved / "b.done").write_text("kept")
    assert stage("b", 3, log, moved, inp=moved / "a.done") == "kept"  # the same run, moved


def test_a_run_without_bigbench_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """BIG-bench is opt-in: a default run (and 'auto' with nothing in the cache) prints and logs one line
    naming what is left out and the command that adds it; the dry run shows it before any stage."""
    from minicai.eval import bigbench
    from minicai.experiments.pipeline import bigbench_skipped

    monkeypatch.setattr(bigbench, "BIGBENCH_CACHE", tmp_path / "empty-cache")
    line = bigbench_skipped("none")
    assert line == bigbench_skipped("auto")
    assert line.startswith("BIG-bench not used (opt-in, evaluation only): TruthfulQA-MC / StrategyQA")
    assert line.endswith("To add it: " + bigbench.BIGBENCH_INSTALL) and "git clone" in line
    assert pipeline_main(["--out", str(tmp_path / "dry"), "--dry-run", *NO_PARTS]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"[pipeline] {line}"


def test_the_pipeline_never_writes_among_a_users_files(tmp_path):
    """--out naming a non-empty folder that is no run is refused before anything is written there."""
    from minicai.errors import InputError

    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "letter.txt").write_text("dear")
    with pytest.raises(InputError) as e:
        pipeline_main(["--out", str(mine), "--dry-run", *NO_PARTS])
    assert str(e.value) == (f"{mine}: not empty and not a minicai run folder ('letter.txt' is there); use a new or "
                            f"empty --out")
    assert sorted(p.name for p in mine.iterdir()) == ["letter.txt"]
    assert pipeline_main(["--out", str(tmp_path / "new"), "--dry-run", *NO_PARTS]) == 0
    assert (tmp_path / "new" / ".minicai-run").is_file()


def test_pipeline_overwrite_reaches_an_interrupted_stage_refused_by_its_script(tmp_path, monkeypatch):
    """The issue's dead end: a stage interrupted, the flags changed, its script refuses the folder
    ('pass --overwrite'); the pipeline's --overwrite passes --overwrite to every train_*.py stage, done
    or not (the script deletes only its own files, and only for another configuration)."""
    from minicai.experiments import pipeline

    seen = []

    class Proc:
        def __init__(self, argv, env=None):
            seen.append(argv[1:])

        def wait(self):
            return 0

    monkeypatch.setattr(pipeline.subprocess, "Popen", Proc)
    out = tmp_path / "run"
    out.mkdir()
    for overwrite in (False, True):
        pipeline.run_stage("round1/sl", ["-m", "train_sl", "--out", str(out / "sl"), "--n-prompts", "3"],
                           out / "sl" / "sft_summary.json", {"overwrite": overwrite}, out, dry=False)
        pipeline.run_stage("eval", ["-m", "minicai.eval.evaluate", "--out", str(out / "eval")],
                           out / "eval" / "eval.json", {"overwrite": overwrite}, out, dry=False)
    assert seen == [["-m", "train_sl", "--out", str(out / "sl"), "--n-prompts", "3"],
                    ["-m", "minicai.eval.evaluate", "--out", str(out / "eval")],
                    ["-m", "train_sl", "--out", str(out / "sl"), "--n-prompts", "3", "--overwrite"],
                    ["-m", "minicai.eval.evaluate", "--out", str(out / "eval")]]


def test_rlcd_few_shot_context_reaches_the_reward_stage_with_an_ai_labeller(tmp_path, capsys):
    def rm_command(*extra):
        assert pipeline_main(["--out", str(tmp_path / "dry"), "--dry-run", *NO_PARTS, *extra]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "$ python" in line and "round1/rm" in line)

    assert "--rlcd-context" not in rm_command() and "--rescore" not in rm_command("--labeller", "rlcd")
    cmd = rm_command("--labeller", "rlcd", "--rlcd-context", "few-shot")
    assert "--labeller rlcd --rlcd-context few-shot --rescore ab" in cmd
    assert "--few-shot-labels" not in rm_command() and "--few-shot-labels" in rm_command("--few-shot-labels")


def test_rl_advantage_reaches_the_rl_stage(tmp_path, capsys):
    """--rl-advantage picks train_ppo.py's --advantage; the default (gae, the paper's PPO) adds no flag,
    so runs recorded before the flag existed keep their stage keys."""
    def ppo_command(*extra):
        assert pipeline_main(["--out", str(tmp_path / "dry"), "--dry-run", *NO_PARTS, *extra]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "$ python" in line and "round1/ppo" in line)

    assert "--advantage" not in ppo_command("--rl-advantage", "gae")
    assert "--advantage grpo" in ppo_command("--rl-advantage", "grpo")
    assert "--advantage rloo" in ppo_command("--rl-advantage", "rloo")
