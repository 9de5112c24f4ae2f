"""python -m minicai.experiments.ablations {revisions,critique,principles} on the tiny model: the
experiment-output contract, resuming, the paired arms, and one-line errors for bad input."""
import json

import pytest

from minicai import slcai
from minicai.experiments import ablations
from minicai.infra import cli
from minicai.experiments.ablations import EXPERIMENTS, main
from minicai.infra.cli import run_cli


def args(kind, tiny_gguf, tiny_rm, out, *extra):
    return [kind, "--out", str(out), "--model", str(tiny_gguf), "--reward-model", str(tiny_rm),
            "--constitution", "hhh", "--n-prompts", "3", "--max-new-tokens", "4", "--batch-size", "2",
            "--device", "cpu", *extra]


def check_contract(out, name, kind, rows):
    doc = json.loads((out / f"{name}.experiment.json").read_text())
    assert doc["experiment"] == name and doc["title"] and doc["notes"] and doc["seconds"] > 0
    assert doc["command"].startswith(f"python -m minicai.experiments.ablations {kind} --out {out}")
    lines = doc["table"].splitlines()
    assert lines[1].startswith("|---") and len(lines) == 2 + rows
    for plot in doc["plots"]:
        assert set(plot) == {"title", "xlabel", "ylabel", "series"} and plot["series"]
        for pts in plot["series"].values():
            assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in pts)
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# {doc['title']}\n") and doc["table"] in md and doc["notes"] in md
    return doc


def test_revisions(tiny_gguf, tiny_rm, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    a = args("revisions", tiny_gguf, tiny_rm, out, "--rounds", "2")
    assert run_cli(main, a) == 0
    doc = check_contract(out, "sl_revisions", "revisions", rows=3)  # 0, 1, 2 revisions
    recs = [json.loads(x) for x in (out / "sl_revisions" / "traces.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["rounds"]) == 2 for r in recs)
    assert [p["revisions"] for p in doc["points"]] == [0, 1, 2]
    assert all(p["rm"]["n"] == 3 and p["harmlessness"]["compliance"]["n"] == 3 for p in doc["points"])
    assert [len(s) for s in doc["plots"][0]["series"].values()] == [3, 3, 3]
    first, second = doc["points"][:2]  # the paired change from the initial response
    assert first["change"]["mean"] == 0.0
    assert second["change"]["mean"] == pytest.approx(second["rm"]["mean"] - first["rm"]["mean"])
    # a rerun reuses the traces: nothing is generated again, the same numbers come out
    monkeypatch.setattr(slcai, "generate", lambda *a, **k: pytest.fail("regenerated a finished trace"))
    assert run_cli(main, a) == 0
    again = json.loads((out / "sl_revisions.experiment.json").read_text())
    assert again["points"] == doc["points"]
    assert (doc["traces_reused"], doc["traces_total"], again["traces_reused"]) == (0, 3, 3)
    assert "3 of 3 traces were already on disk" in (out / "sl_revisions.md").read_text()


def test_critique(tiny_gguf, tiny_rm, tmp_path):
    out = tmp_path / "exp"
    assert run_cli(main, args("critique", tiny_gguf, tiny_rm, out, "--rounds", "2")) == 0
    doc = check_contract(out, "sl_critique", "critique", rows=3)
    direct = [json.loads(x) for x in (out / "sl_critique" / "traces.direct.jsonl").read_text().splitlines()]
    critiqued = [json.loads(x) for x in (out / "sl_critique" / "traces.critiqued.jsonl").read_text().splitlines()]
    assert all("critique" not in r for rec in direct for r in rec["rounds"])
    assert all("critique" in r for rec in critiqued for r in rec["rounds"])
    zero = doc["points"][0]  # no revision yet: both arms hold the same initial responses
    assert zero["critiqued"]["scores"] == zero["direct"]["scores"] and zero["difference"]["mean"] == 0.0
    one = doc["points"][1]
    assert one["difference"]["mean"] == pytest.approx(one["critiqued"]["rm"]["mean"] - one["direct"]["rm"]["mean"])


def test_principles(tiny_gguf, tiny_rm, tmp_path):
    out = tmp_path / "exp"
    a = args("principles", tiny_gguf, tiny_rm, out, "--counts", "1", "--counts", "0", "--counts", "9",
             "--samples", "2", "--temperature", "1.0")
    assert run_cli(main, a) == 0
    doc = check_contract(out, "sl_principles", "principles", rows=2)  # 0 and 9 both mean all 4 (hhh)
    one, every = doc["points"]
    assert one["principles"] == 1 and len(one["names"]) == 1 and every["principles"] == 4 and every["names"] == "all"
    assert one["distinct_principles"] == 1.0  # one principle: the only one ever drawn
    assert one["final"]["rm"]["n"] == 6  # 3 prompts x 2 samples
    assert one["diversity_initial"] == every["diversity_initial"]  # sample j's initial response is shared
    assert sorted(p.name for p in (out / "sl_principles").glob("traces.*.jsonl")) == \
        ["traces.n1.s0.jsonl", "traces.n1.s1.jsonl", "traces.n4.s0.jsonl", "traces.n4.s1.jsonl"]
    s0 = [json.loads(x)["initial"] for x in (out / "sl_principles" / "traces.n1.s0.jsonl").read_text().splitlines()]
    s1 = [json.loads(x)["initial"] for x in (out / "sl_principles" / "traces.n1.s1.jsonl").read_text().splitlines()]
    assert s0 != s1  # the samples differ


@pytest.mark.parametrize("extra, match", [
    (["--rounds", "0"], "--rounds: 0 is not allowed (must be >= 1)"),
    (["--n-prompts", "-1"], "--n-prompts: -1 is not allowed (must be >= 0)"),
    (["--constitution", "nope.toml"], "nope.toml"),
])
def test_bad_inputs_are_one_line_and_write_nothing(tiny_gguf, tiny_rm, tmp_path, capsys, extra, match):
    out = tmp_path / "exp"
    assert run_cli(main, args("revisions", tiny_gguf, tiny_rm, out, *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not out.exists()


def test_more_bad_inputs(tiny_gguf, tiny_rm, tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli(main, ["nonsense", "--out", str(out)]) == 2
    assert "unknown experiment 'nonsense'" in capsys.readouterr().err
    assert run_cli(main, args("principles", tiny_gguf, tmp_path, out)) == 2  # not a reward-model folder
    assert "no reward_head.safetensors" in capsys.readouterr().err
    assert run_cli(main, args("principles", tiny_gguf, tiny_rm, out, "--samples", "1")) == 2
    assert "--samples: 1 is not allowed (must be >= 2)" in capsys.readouterr().err
    assert run_cli(main, args("principles", tiny_gguf, tiny_rm, out, "--counts", "-2")) == 2
    assert "--counts: -2 is not allowed (must be >= 0)" in capsys.readouterr().err
    assert not out.exists()
    # a folder made by another configuration is refused, naming the field
    assert run_cli(main, args("revisions", tiny_gguf, tiny_rm, out, "--rounds", "1")) == 0
    capsys.readouterr()
    assert run_cli(main, args("revisions", tiny_gguf, tiny_rm, out, "--rounds", "2")) == 2
    err = capsys.readouterr().err
    assert "field 'rounds' was 1" in err and err.count("\n") == 1


def test_every_flag_has_help(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(k in top for k in EXPERIMENTS)
    for kind, (cls, _, _) in EXPERIMENTS.items():
        parser = cli.build_parser(cls)
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and not action.help.lstrip().startswith("(default"), (kind, action.dest)
        with pytest.raises(SystemExit):
            main([kind, "--help"])
        assert "--reward-model" in capsys.readouterr().out
    assert ablations.NAMES.keys() == EXPERIMENTS.keys()


def test_the_module_runs_as_a_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "minicai.experiments.ablations", "critique", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "direct revision" in r.stdout and "--rounds" in r.stdout
    r = subprocess.run([sys.executable, "-m", "minicai.experiments.ablations", "fig8"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == ("error: unknown experiment 'fig8': choose one of revisions, "
                                                      "critique, principles")
