"""A wheel works (issue 24, item 4): `pip install .` (not editable), then from another folder the four
scripts (installed commands and `python -m`), the pipeline, constitutions by name, `exercises make`
and `lines`. The slow test builds the wheel from this checkout, installs it into a fresh venv and runs
each of them, and a tiny pipeline, from a folder outside the repository. The fast tests check the
pieces that make it work in a checkout too: where the built-in constitutions are found and how the
pipeline starts its stages."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from minicai.io import constitution_files
from minicai.infra import lines
from minicai.experiments import pipeline
from minicai.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("sl", "rm", "ppo", "dpo")


# ---------------------------------------------------------------- fast: the pieces

def test_builtin_constitutions_come_from_the_wheel_folder_first_else_the_checkout(tmp_path):
    # a checkout: minicai/ beside constitutions/
    (tmp_path / "repo" / "minicai").mkdir(parents=True)
    (tmp_path / "repo" / "constitutions").mkdir()
    assert constitution_files.builtin_dir(tmp_path / "repo" / "minicai") == tmp_path / "repo" / "constitutions"
    # a wheel: site-packages/minicai/constitutions, and an unrelated site-packages/constitutions beside it
    site = tmp_path / "site-packages"
    (site / "minicai" / "constitutions").mkdir(parents=True)
    (site / "constitutions").mkdir()
    assert constitution_files.builtin_dir(site / "minicai") == site / "minicai" / "constitutions"
    # this checkout: the names resolve to the top-level files
    for name in ("default", "hhh"):
        assert constitution_files.resolve_constitution_path(name) == ROOT / "constitutions" / f"{name}.toml"
    with pytest.raises(InputError, match=r"constitution 'nope': no .*nope.toml; built-in names: default, hhh"):
        constitution_files.resolve_constitution_path("nope")


def test_the_pipeline_starts_each_stage_as_a_module_not_a_checkout_path(tmp_path, capsys):
    assert pipeline.main(["--out", str(tmp_path / "dry"), "--dry-run", "--baseline", "sft",
                          "--feedback-model", "smollm2-135m"]) == 0  # the default's 22 parts are not installed here
    shown = [ln.split("$ ", 1)[1] for ln in capsys.readouterr().out.splitlines() if "$ python" in ln]
    firsts = [" ".join(c.split()[:3]) for c in shown]
    assert firsts == ["python -m train_sl", "python -m train_sl", "python -m train_rm", "python -m train_ppo",
                      "python -m train_dpo", "python -m minicai.eval.evaluate"], firsts
    assert not any(".py" in c.split()[2] for c in shown)


def test_a_stage_runs_this_checkout_from_any_working_folder(tmp_path, monkeypatch, capfd):
    """From a folder outside the repository, with no PYTHONPATH, a stage still imports this
    checkout's train_sl and minicai (not another install's: this venv has an editable install of
    another checkout)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    probe = "import minicai, train_sl; print(minicai.__file__); print(train_sl.__file__)"
    pipeline.run_stage("probe", ["-c", probe], tmp_path / "never", {}, tmp_path, dry=False)
    printed = capfd.readouterr().out.splitlines()
    assert printed[0] == f"[probe] $ python -c {probe}"
    assert [Path(p) for p in printed[1:3]] == [ROOT / "minicai" / "__init__.py", ROOT / "train_sl.py"]
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"]["probe"]["command"].startswith("python -c")


def test_stage_env_leaves_a_wheel_alone(monkeypatch):
    """Installed (SOURCE_ROOT is a site-packages folder) a stage's PYTHONPATH is the user's; in a checkout
    the checkout comes first on it."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert pipeline.stage_env()["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/elsewhere"])
    monkeypatch.setattr(pipeline.site, "getsitepackages", lambda: [str(ROOT)])
    assert pipeline.stage_env()["PYTHONPATH"] == "/elsewhere"


def test_lines_names_a_missing_file_in_one_line(tmp_path):
    shutil.copytree(ROOT / "minicai", tmp_path / "minicai", ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.raises(InputError, match=r"train_sl.py: not found \(python -m minicai.infra.lines counts"):
        lines.counts(tmp_path)


# ---------------------------------------------------------------- slow: the real wheel

TINY = ["--sl-prompts", "4", "--sl-rounds", "1", "--rm-prompts", "8", "--ppo-iterations", "2", "--ppo-batch", "4",
        "--max-new-tokens", "8", "--eval-red-team", "2", "--eval-helpful", "2", "--eval-harmful", "3",
        "--eval-benign", "2", "--bigbench", "none", "--feedback-model", "base", "--eval-judge", "none"]


def build_wheel(tmp: Path) -> Path:
    """The wheel of this checkout, built from a copy of it (a build writes build/ and *.egg-info next
    to pyproject.toml). Without build isolation where this venv has setuptools (fast, offline), else
    pip fetches the build backend from the index."""
    from minicai.exercises.blank import COPY_IGNORE

    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("minicai-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel's minicai; torch, numpy, pytest... come from this test's
    environment through a .pth file of plain paths (so this venv's editable-install hook, a .pth
    import line, does not run there). Returns the venv's python."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed.pth").write_text("".join(p + "\n" for p in sorted(ours)))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    return py


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_works_from_another_folder(tmp_path, tiny_gguf):
    wheel = build_wheel(tmp_path)
    py = fresh_venv(tmp_path, wheel)
    bin_ = py.parent
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}

    def run(*cmd, cwd=work, ok=True):
        p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert (p.returncode == 0) == ok, f"{cmd}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    # minicai, the scripts and the built-in constitutions all come from the wheel, not from this checkout
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    where = run(py, "-c", "import minicai, train_sl; from minicai.io.constitution_files import load_constitution "
                          "as c; print(minicai.__file__, train_sl.__file__, c('default').source, c('hhh').source, "
                          "len(c('hhh').principles))").stdout.split()
    assert where[:4] == [f"{site}/minicai/__init__.py", f"{site}/train_sl.py",
                         f"{site}/minicai/constitutions/default.toml", f"{site}/minicai/constitutions/hhh.toml"]
    assert int(where[4]) == (ROOT / "constitutions" / "hhh.toml").read_text().count("[[principle]]")

    # the four scripts: installed commands and python -m
    for s in SCRIPTS:
        assert "--out" in run(bin_ / f"minicai-{s}", "--help").stdout
        assert "--out" in run(py, "-m", f"train_{s}", "--help").stdout
    # a bad flag: the installed command's one-line error and exit 2
    p = run(bin_ / "minicai-sl", "--out", "x", "--constitution", "nope", ok=False)
    assert p.returncode == 2 and p.stderr.startswith("error: constitution 'nope'") and "default, hhh" in p.stderr
    assert not (work / "x").exists()

    # lines: the installed files, counted as `wc -l` would
    table = run(py, "-m", "minicai.infra.lines").stdout
    for s in SCRIPTS:
        n = len((ROOT / f"train_{s}.py").read_text(encoding="utf-8").splitlines())
        assert f"| train_{s}.py | {n} |" in table

    # exercises make from the installed package: a checkout's layout, gradable, and re-made over itself
    copy = work / "student"
    run(py, "-m", "minicai.exercises", "make", "--out", copy)
    for f in ("minicai/model.py", "train_sl.py", "constitutions/default.toml", "tests/conftest.py",
              "tests/exercises/test_ex_transformer.py", "tests/exercises/fixtures/rmsnorm.safetensors",
              ".student-copy.json"):
        assert (copy / f).is_file(), f
    assert not (copy / "minicai" / "constitutions").exists() and not (copy / "minicai" / "tests").exists()
    graded = run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/exercises/test_ex_transformer.py",
                 "-k", "rmsnorm", cwd=copy, ok=False)
    assert "exercise rmsnorm" in graded.stdout and "course exercises" in graded.stdout, graded.stdout[-3000:]
    assert " passed" not in graded.stdout.splitlines()[-1], graded.stdout[-500:]  # blank: nothing passes
    (copy / "notes.txt").write_text("mine")
    p = run(py, "-m", "minicai.exercises", "make", "--out", copy, "--overwrite", ok=False)
    assert "holds notes.txt that minicai did not write" in p.stderr and (copy / "notes.txt").read_text() == "mine"
    (copy / "notes.txt").unlink()
    run(py, "-m", "minicai.exercises", "make", "--out", copy, "--overwrite")  # the graded copy's caches: fine

    # the pipeline: the dry run's commands, then a tiny run on the default constitution
    dry = run(py, "-m", "minicai.experiments.pipeline", "--dry-run", "--out", "dry",
              "--feedback-model", "smollm2-135m").stdout  # the default's 22 parts are not installed here
    assert "$ python -m train_sl --out" in dry and "$ python -m train_dpo --out" in dry
    run(py, "-m", "minicai.experiments.pipeline", "--out", "run", "--model", tiny_gguf, *TINY, "--constitution", "default")
    run_dir = work / "run"
    for f in ("sl/model/model.safetensors", "rm/rm/reward_head.safetensors", "ppo/model/model.safetensors",
              "dpo/model/model.safetensors", "eval/eval.json", "report.html"):
        assert (run_dir / f).exists(), f
    log = json.loads((run_dir / "pipeline.json").read_text())
    assert log["stages"]["round1/sl"]["command"].startswith("python -m train_sl --out ")
    config = json.loads((run_dir / "sl" / "config.json").read_text())
    assert config["constitution"] == "default"
