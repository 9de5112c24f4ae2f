"""The one-command pipeline, end to end on the tiny model: every stage runs, lands under one run
folder, and a rerun skips everything."""
import json

from minicai.infra.pipeline import main as pipeline_main

TINY = ["--sl-prompts", "4", "--sl-rounds", "1", "--rm-prompts", "8", "--ppo-iterations", "2", "--ppo-batch", "4",
        "--max-new-tokens", "8", "--eval-red-team", "2", "--eval-helpful", "2", "--constitution", "hhh",
        "--eval-harmful", "3", "--eval-benign", "2", "--bigbench", "none", "--feedback-model", "base",
        "--eval-judge", "feedback"]


def test_pipeline_end_to_end_and_resume(tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    assert pipeline_main(["--out", str(out), "--model", str(tiny_gguf), *TINY, "--self-improve", "1"]) == 0
    for f in ["sl/model/model.safetensors", "sl/traces.jsonl", "rm/preferences.jsonl", "rm/rm/reward_head.safetensors",
              "ppo/model/model.safetensors", "dpo/model/model.safetensors", "round2/ppo/model/config.json",
              "eval/eval.json", "eval/eval.md", "report.html"]:
        assert (out / f).exists(), f
    log = json.loads((out / "pipeline.json").read_text())
    assert {"round1/sl", "round1/rm", "round1/ppo", "dpo", "eval", "round2/ppo"} <= set(log["stages"])
    assert log["self_improve"][0]["round"] == 2
    table = (out / "eval" / "eval.md").read_text()
    for name in ("base", "sl", "rl", "dpo"):
        assert f"| {name}" in table
    res = json.loads((out / "eval" / "eval.json").read_text())
    assert "## Judge-free (held-out)" in table and res["judge_free"]["sets"]["harmful"] == 3
    assert res["judge_free"]["sets"]["benign"] == 4 and set(res["alignment_tax"]) == {"sl", "rl", "dpo", "rl2"}
    assert res["judge_accuracy"]["builtin_pairs"]["accuracy"]["n"] == 48
    assert res["reward_model_accuracy"]["builtin_pairs"]["accuracy"]["n"] == 48
    assert "The answer" in (out / "report.html").read_text()
    capsys.readouterr()
    # rerunning the same command finds every stage done
    assert pipeline_main(["--out", str(out), "--model", str(tiny_gguf), *TINY, "--self-improve", "1"]) == 0
    printed = capsys.readouterr().out
    assert "$ python" not in printed and printed.count("skipping") >= 8
