"""The graded exercises: each test carries @pytest.mark.exercise("<name>") (the names of
minicai/exercises/__init__.py); at the end of a run that graded any, a table per exercise says
which are complete (every test passed). docs/exercises.md explains the grading."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # grading.py


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(name): a graded test of the course exercise `name`")


_results: dict[str, list[str]] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        ex = getattr(report, "exercise", None)
        if ex:
            _results.setdefault(ex, []).append(report.outcome)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    out = yield
    m = item.get_closest_marker("exercise")
    if m:
        out.get_result().exercise = m.args[0]


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    from minicai.exercises import EXERCISES

    tr = terminalreporter
    tr.section("course exercises")
    done = 0
    for e in EXERCISES:
        res = _results.get(e.name)
        if res is None:
            continue
        ok = all(r == "passed" for r in res)
        done += ok
        tr.write_line(f"  {'complete' if ok else 'FAILING ':<8}  {e.name:<17} {res.count('passed')}/{len(res)} tests"
                      f"   {e.file}:{e.qualname}")
    tr.write_line(f"  {done}/{len(_results)} exercises complete")
