"""python -m minicai.experiments.depth {prefill,kl,attack}: a tiny-model run of each probe writes the
experiment-output contract; flags have help; bad input is one line and exit 2."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import random_model, tiny_config, write_tiny_gguf
from minicai.experiments import depth
from minicai.infra.cli import run_cli

SMALL = ["--n-prompts", "3", "--harmful-source", "builtin-red-team", "--max-new-tokens", "5", "--batch-size", "2"]


def _read(out, name):
    doc = json.loads((out / f"{name}.experiment.json").read_text())
    for key in ("experiment", "title", "command", "seconds", "table", "notes", "plots"):
        assert key in doc, key
    assert doc["experiment"] == name
    assert doc["command"].startswith("python -m minicai.experiments.depth ")
    assert doc["seconds"] >= 0
    assert doc["table"].startswith("| policy |")
    for plot in doc["plots"]:
        assert set(plot) == {"title", "xlabel", "ylabel", "series"}
    md = (out / f"{name}.md").read_text()
    assert doc["title"] in md and doc["table"] in md
    return doc


def test_prefill_on_the_tiny_model(tiny_gguf, tmp_path):
    out = tmp_path / "d"
    assert depth.main(["prefill", "--policy", f"a={tiny_gguf}", "--policy", f"b={tiny_gguf}", "--out", str(out),
                       "--k", "0", "2", "4", *SMALL]) == 0
    doc = _read(out, "depth_prefill")
    assert list(doc["plots"][0]["series"]) == ["a", "b"]
    assert [x for x, _ in doc["plots"][0]["series"]["a"]] == [0, 2, 4]
    assert doc["results"]["a"] == doc["results"]["b"]  # the same model twice
    rep = doc["replies"]["a"]
    assert [len(rep[k]) for k in ("0", "2", "4")] == [3, 3, 3]
    assert rep["0"][0]["prefix"] == "" and len(rep["4"][0]["prefix"]) > len(rep["2"][0]["prefix"]) > 0
    assert rep["2"][0]["prefix"] == depth.OPENERS[0][:len(rep["2"][0]["prefix"])]


def test_kl_on_the_tiny_model(tiny_gguf, tmp_path):
    other = write_tiny_gguf(tmp_path / "other.gguf", random_model(tiny_config(), seed=1))
    out = tmp_path / "d"
    assert depth.main(["kl", "--policy", f"same={tiny_gguf}", "--policy", f"other={other}", "--base", str(tiny_gguf),
                       "--out", str(out), *SMALL]) == 0
    doc = _read(out, "depth_kl")
    same, diff = doc["results"]["same"], doc["results"]["other"]
    assert max(abs(v) for v in same["by_position"] if v is not None) < 1e-5  # a model against itself
    assert diff["mean"] > 0.01
    assert same["counts"][0] == 3 and same["tokens"] == sum(same["counts"])
    assert [x for x, _ in doc["plots"][0]["series"]["other"]] == list(range(len(doc["plots"][0]["series"]["other"])))


def test_attack_on_the_tiny_model(tiny_gguf, tmp_path):
    out = tmp_path / "d"
    assert depth.main(["attack", "--policy", f"t={tiny_gguf}", "--base", str(tiny_gguf), "--out", str(out),
                       "--steps", "0", "2", "--train-batch-size", "2", "--n-train", "4", "--data-max-new-tokens", "6",
                       "--lr", "1e-3", *SMALL]) == 0
    doc = _read(out, "depth_attack")
    assert len(doc["losses"]["t"]) == 2 and 1 <= len(doc["train_data"]) <= 4
    assert [x for x, _ in doc["plots"][0]["series"]["t"]] == [0, 2]
    assert set(doc["results"]["t"]) == {"0", "2"}
    assert doc["replies"]["t"]["0"] != doc["replies"]["t"]["2"]  # lr 1e-3 moves a tiny random model


def _actions(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _actions(sub)
        elif not isinstance(a, argparse._HelpAction):
            yield a


def test_every_flag_has_help():
    acts = list(_actions(depth.build_parser()))
    assert len(acts) > 20
    assert all(a.help for a in acts), [a.dest for a in acts if not a.help]


@pytest.mark.parametrize("argv, words", [
    (["prefill", "--policy", "nopath", "--out", "x"], ["--policy", "NAME=PATH"]),
    (["prefill", "--policy", "a=P", "--policy", "a=Q", "--out", "x"], ["given twice"]),
    (["prefill", "--policy", "a=P", "--out", "x", "--n-prompts", "0"], ["--n-prompts"]),
    (["attack", "--policy", "a=P", "--out", "x", "--train-batch-size", "0"], ["--train-batch-size"]),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert run_cli(depth.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert all(w in err for w in words), err


def test_a_k_longer_than_the_opener_is_one_line(tiny_gguf, tmp_path, capsys):
    assert run_cli(depth.main, ["prefill", "--policy", f"a={tiny_gguf}", "--out", str(tmp_path), "--k", "500",
                                *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than --k 500" in err and "\n" not in err


def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "minicai.experiments.depth", "attack", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--train-batch-size" in r.stdout and "--lr" in r.stdout
