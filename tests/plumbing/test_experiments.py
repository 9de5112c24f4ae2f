"""python -m minicai.experiments.compare rl on tiny models: three runs that differ by --advantage only,
an evaluation of all of them, and the experiment file the report renders."""
import json

import pytest

from minicai.experiments.compare import main as experiments_main, training_summary
from minicai.errors import InputError


def test_training_summary_by_hand():
    rows = [{"objective/scores": s, "objective/kl": 0.1 * i, "time/iteration": t}
            for i, (s, t) in enumerate([(0.0, 9.0), (1.0, 2.0), (2.0, 4.0), (3.0, 3.0), (5.0, 5.0)])]
    s = training_summary(rows)
    # 5 rows: the last quarter is max(1, 5 // 4) = 1 row; times after the first: (2 + 4 + 3 + 5) / 4
    assert s == {"first_score": 0.0, "last_quarter_score": 5.0, "final_kl": pytest.approx(0.4),
                 "seconds_per_iteration": 3.5, "iterations": 5}
    assert training_summary(rows * 2)["last_quarter_score"] == (3.0 + 5.0) / 2  # 10 rows: the last 2


def test_rl_experiment_end_to_end(tiny_gguf, tiny_rm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "rl"
    argv = ["rl", "--policy", str(tiny_gguf), "--reward-model", str(tiny_rm), "--out", str(out), "--iterations", "2",
            "--batch-size", "4", "--k", "2", "--max-new-tokens", "6", "--eval-harmful", "3", "--eval-benign", "2",
            "--eval-red-team", "2", "--eval-helpful", "2", "--device", "cpu"]
    assert experiments_main(argv) == 0
    exp = json.loads((out / "rl.experiment.json").read_text())
    assert exp["experiment"] == "rl" and set(exp["summary"]) == {"gae", "rloo", "grpo"}
    for plot in exp["plots"]:
        assert {k: len(v) for k, v in plot["series"].items()} == {"gae": 2, "rloo": 2, "grpo": 2}
    table = exp["table"]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["start", "gae", "rloo", "grpo"]
    # the three runs differ by the method alone (and what it implies), not by prompts, seed or budget
    cfgs = {m: json.loads((out / m / "config.json").read_text()) for m in ("gae", "rloo", "grpo")}
    differ = {k for k in cfgs["gae"] if len({json.dumps(c.get(k)) for c in cfgs.values()}) > 1}
    assert differ <= {"advantage", "k", "kl_penalty", "whiten_advantages", "value_model", "out"}, differ
    assert cfgs["grpo"]["kl_penalty"] == "loss" and cfgs["rloo"]["kl_penalty"] == "reward"
    assert (out / "rl.md").read_text().startswith("# Critic-free RL beside PPO")
    capsys.readouterr()
    assert experiments_main(argv) == 0  # a rerun skips every stage
    assert capsys.readouterr().out.count("skipping") == 4


def test_rl_experiment_bad_flags(tiny_gguf, tmp_path):
    with pytest.raises(InputError, match="--k 3"):
        experiments_main(["rl", "--reward-model", str(tmp_path), "--out", str(tmp_path / "o"), "--k", "3"])
    with pytest.raises(InputError, match="no such folder"):
        experiments_main(["rl", "--reward-model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
