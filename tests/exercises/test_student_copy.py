"""The exercise machinery itself: the markers and the catalogue agree, every exercise is graded
(with a hand-computed value), blanking keeps signatures/docstrings/comments and nothing else, and
a real student copy, graded in a subprocess, fails every graded test while blank and passes them
all once its bodies are filled back in (a student's complete solution), byte-identical to the
repository. Skipped inside a student copy (it grades copies; it is not a graded test)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from minicai.exercises import EXERCISES, find
from minicai.exercises.__main__ import check as check_markers, main as exercises_main
from minicai.exercises.blank import (MANIFEST, blank_source, fill_copy, fill_source, make_copy, marked_functions,
                                     markers, reading_path)
from minicai.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GRADED = sorted(HERE.glob("test_ex_*.py"))

pytestmark = pytest.mark.skipif((ROOT / MANIFEST).exists(), reason="inside a student copy: this file grades copies")


def graded_tests() -> dict[str, str]:
    """{file::test: exercise} of the graded tests, read from their @ex("name") decorators."""
    out = {}
    for path in GRADED:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names = [d.args[0].value for d in node.decorator_list
                         if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "ex"]
                assert len(names) == 1, f"{path.name}::{node.name} needs exactly one @ex('<exercise>')"
                out[f"{path.name}::{node.name}"] = names[0]
    return out


def test_the_markers_and_the_catalogue_agree():
    assert check_markers(ROOT) == []
    proc = subprocess.run([sys.executable, "-m", "minicai.exercises", "check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and f"{len(EXERCISES)} exercises, {len(EXERCISES)} markers" in proc.stdout, proc.stderr
    assert len(EXERCISES) >= 14 and len({e.name for e in EXERCISES}) == len(EXERCISES)
    for e in EXERCISES:
        assert (ROOT / e.test).is_file(), f"{e.name}: no graded test file {e.test}"
        assert find(e.name) is e and find(e.qualname) in (e, None)


def test_every_exercise_has_graded_tests_and_a_hand_value():
    tests = graded_tests()
    for e in EXERCISES:
        mine = [t for t, name in tests.items() if name == e.name]
        assert mine, f"exercise {e.name} has no graded test"
        assert all(t.startswith(Path(e.test).name + "::") for t in mine), f"{e.name}: tests outside {e.test}"
        assert any("hand" in t for t in mine), f"exercise {e.name} has no hand-computed test"
        assert any("fixture" in t for t in mine), f"exercise {e.name} has no test against the stored fixture"
    assert set(tests.values()) <= {e.name for e in EXERCISES}


SOURCE = '''import torch


# exercise
def f(x: torch.Tensor,
      y: int = 1) -> torch.Tensor:
    """Docstring: x (B, T) -> (B,)."""
    # step 1: square
    z = x * x  # (B, T)
    if y:
        z = z + y  # shifted
    return z.sum(-1)  # (B,)


def g(x):
    return x


class C:
    # exercise
    def m(self, x):
        return x + 1  # (B,)
'''


def test_blanking_keeps_signature_docstring_and_comments_and_fills_back_exactly():
    text, done = blank_source(SOURCE, "minicai/fake.py")
    assert done == ["f", "C.m"]
    assert '    """Docstring: x (B, T) -> (B,)."""\n    # step 1: square\n    # z: (B, T)\n' in text
    assert "    # z: shifted\n    # returns: (B,)\n    raise NotImplementedError(" in text
    assert "def f(x: torch.Tensor,\n      y: int = 1) -> torch.Tensor:\n" in text
    assert "z = x * x" not in text and "return z.sum" not in text and "return x + 1" not in text
    assert "def g(x):\n    return x\n" in text  # unmarked: untouched
    assert "    def m(self, x):\n        # returns: (B,)\n        raise NotImplementedError(" in text
    ns = {}
    exec(compile(text, "fake", "exec"), ns)
    with pytest.raises(NotImplementedError, match="exercise f"):
        ns["f"](1)
    assert fill_source(text, SOURCE, "minicai/fake.py") == SOURCE
    only, done = blank_source(SOURCE, "minicai/fake.py", {"C.m"})
    assert done == ["C.m"] and "z = x * x  # (B, T)" in only and fill_source(only, SOURCE, "minicai/fake.py") == SOURCE


def test_a_stray_marker_is_refused():
    with pytest.raises(InputError, match="directly above a function"):
        marked_functions("x = 1\n# exercise\ny = 2\n", "minicai/fake.py")


def test_make_refuses_bad_input(tmp_path, capsys):
    from minicai.infra.cli import run_cli

    assert run_cli(exercises_main, ["make", "--out", str(tmp_path / "c"), "--only", "no_such"]) == 2
    assert "--only no_such: no such exercise" in capsys.readouterr().err
    assert run_cli(exercises_main, ["make", "--out", str(ROOT / "student")]) == 2
    assert "must be outside the repository" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_cli(exercises_main, ["make", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert exercises_main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(e.name in out for e in EXERCISES) and "[no marker]" not in out


def minimal_checkout(root: Path) -> Path:
    """A source checkout small enough to copy in a blink: pyproject.toml and one marked function."""
    (root / "minicai").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'minicai'\n")
    (root / "minicai" / "model.py").write_text('# exercise\ndef f(x):\n    """Doc."""\n    return x\n')
    return root


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_student_copy(tmp_path, capsys):
    """Issue 24: `make --source REPO --out PARENT --overwrite` with PARENT holding REPO deleted the
    checkout and a sibling file. Every dangerous layout is refused and every foreign file survives;
    only an earlier student copy (what its manifest lists, and caches) is replaced."""
    from minicai.infra.cli import run_cli

    src = minimal_checkout(tmp_path / "parent" / "repo")
    (tmp_path / "parent" / "sibling.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    mine = tmp_path / "mine"  # a folder of the user's, with a config.json of its own
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "thesis.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    before = files(tmp_path)
    for out, msg in ((tmp_path / "parent", "contains the repository"), (tmp_path, "contains the repository"),
                     (src, "must be outside the repository"), (src / "minicai", "must be outside the repository"),
                     (tmp_path / "a-file", "is a file, not a folder"),
                     (mine, "not a student copy written by this minicai")):
        with pytest.raises(InputError, match=msg):
            make_copy(src, out, overwrite=True)
    with pytest.raises(InputError, match="exists and is not empty"):
        make_copy(src, mine)
    # the command, through the command line: one line, exit 2
    assert run_cli(exercises_main, ["make", "--source", str(src), "--out", str(tmp_path / "parent"),
                                    "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'parent'}: contains the repository {src}; "
                                       f"choose a folder outside it\n")
    assert files(tmp_path) == before

    # an earlier student copy, graded (caches) but unchanged: replaced
    copy = tmp_path / "copy"
    make_copy(src, copy)
    assert json.loads((copy / MANIFEST).read_text())["files"] == ["minicai", "minicai/model.py", "pyproject.toml"]
    (copy / "minicai" / "__pycache__").mkdir()
    (copy / "minicai" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")
    make_copy(src, copy, overwrite=True)
    assert "raise NotImplementedError" in (copy / "minicai" / "model.py").read_text()
    assert not (copy / "minicai" / "__pycache__").exists()
    # ... but a copy holding the student's solution (an edited file) is the student's work: refused
    blank = (copy / "minicai" / "model.py").read_text()
    (copy / "minicai" / "model.py").write_text("the student's solution")
    snap = files(copy)
    with pytest.raises(InputError, match="minicai/model.py changed since make wrote it"):
        make_copy(src, copy, overwrite=True)
    assert files(copy) == snap
    (copy / "minicai" / "model.py").write_text(blank)
    # ... but not when it holds anything minicai did not write: a file, or a folder of files
    for extra, msg in (("notes.txt", "holds notes.txt that minicai did not write"),
                       ("runs/a/log.txt", "holds runs and 2 more path")):
        (copy / extra).parent.mkdir(parents=True, exist_ok=True)
        (copy / extra).write_text("mine")
        snap = files(copy)
        with pytest.raises(InputError, match=msg):
            make_copy(src, copy, overwrite=True)
        assert files(copy) == snap
        shutil.rmtree(copy / "runs") if extra.startswith("runs") else (copy / extra).unlink()
    # a source with no marker at all: refused before anything is written
    (src / "minicai" / "model.py").write_text("def f(x):\n    return x\n")
    with pytest.raises(InputError, match="nothing to blank"):
        make_copy(src, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))
    # ... nor a copy whose manifest lists no files (made before manifests did)
    (copy / MANIFEST).write_text(json.dumps({"source": str(src), "blank": []}))
    snap = files(copy)
    with pytest.raises(InputError, match="not a student copy written by this minicai"):
        make_copy(src, copy, overwrite=True)
    assert files(copy) == snap


def grade(copy: Path, tmp: Path, tag: str) -> dict[str, tuple[str, str]]:
    """Run the graded tests inside `copy` in a fresh interpreter whose `minicai` is the copy's;
    {file::test: (outcome, message)}."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import minicai; print(minicai.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve() == (copy / "minicai" / "__init__.py").resolve(), f"the copy imports {where}"
    xml = tmp / f"{tag}.xml"
    files = [str(p.relative_to(ROOT)) for p in GRADED]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert xml.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for case in ET.parse(xml).iter("testcase"):
        key = f"{case.get('file', case.get('classname', '').rsplit('.', 1)[-1] + '.py').rsplit('/', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        out[key] = ("passed", "") if bad is None and case.find("skipped") is None else \
            ("skipped", "") if bad is None else ("failed", (bad.get("message") or "") + (bad.text or ""))
    assert "course exercises" in proc.stdout, proc.stdout[-2000:]
    return out


def test_a_student_copy_fails_every_graded_test_while_blank_and_passes_once_filled(tmp_path):
    copy = tmp_path / "student"
    blanked = make_copy(ROOT, copy)
    assert {b["name"] for b in blanked} == {e.name for e in EXERCISES}
    assert json.loads((copy / MANIFEST).read_text())["blank"] == blanked
    assert not (copy / ".git").exists() and not (copy / ".venv").exists()
    # every marked body is gone: after the docstring, only comments and the raise
    for path in reading_path(copy):
        rel = path.relative_to(copy).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for m in marked_functions(text, rel):
            body = [ln.strip() for ln in lines[m.keep_through:m.end_line] if ln.strip()]
            assert body[-1].startswith("raise NotImplementedError('exercise "), (rel, m.qualname)
            assert all(ln.startswith("#") for ln in body[:-1]), (rel, m.qualname, body)
        if not marked_functions(text, rel):
            assert text == (ROOT / rel).read_text(encoding="utf-8"), f"{rel} changed without a marker"
    tests = graded_tests()
    blank = grade(copy, tmp_path, "blank")
    assert set(blank) == set(tests), sorted(set(blank) ^ set(tests))
    for t, (outcome, msg) in blank.items():
        assert outcome == "failed", f"{t} {outcome} on a blank copy: a blank exercise must never pass"
        assert "NotImplementedError" in msg and "exercise " in msg, f"{t}: unclear failure: {msg[:300]}"
    # the student fills in every body (here: the reference's own); the copy is then byte-identical
    fill_copy(copy, ROOT)
    for path in reading_path(ROOT):
        rel = path.relative_to(ROOT).as_posix()
        assert (copy / rel).read_bytes() == path.read_bytes(), f"{rel} differs after filling in"
    filled = grade(copy, tmp_path, "filled")
    assert all(o == "passed" for o, _ in filled.values()), [t for t, (o, _) in filled.items() if o != "passed"]
    assert len(filled) == len(tests)


def test_only_blanks_exactly_the_named_exercises(tmp_path):
    copy = tmp_path / "some"
    make_copy(ROOT, copy, only=["gae", "feedback_prompt"])
    tests = graded_tests()
    res = grade(copy, tmp_path, "some")
    failed = {t for t, (o, _) in res.items() if o == "failed"}
    assert failed == {t for t, n in tests.items() if n in ("gae", "feedback_prompt")}, sorted(failed)
    assert all(o == "passed" for t, (o, _) in res.items() if t not in failed)
    changed = {p.relative_to(copy).as_posix() for p in reading_path(copy)
               if p.read_bytes() != (ROOT / p.relative_to(copy)).read_bytes()}
    assert changed == {"minicai/rl.py", "minicai/constitution.py"}
    assert markers(copy) == markers(ROOT)  # the markers stay: a copy can be graded and re-made


@pytest.mark.slow
def test_the_filled_copy_runs_the_tiny_pipeline(tmp_path):
    """Issue 16 item 5: after a student fills every exercise (here: from the reference), the tiny
    end-to-end pipeline test runs unchanged inside the copy, on the copy's own minicai."""
    copy = tmp_path / "done"
    make_copy(ROOT, copy)
    fill_copy(copy, ROOT)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/plumbing/test_pipeline.py"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_the_handout_covers_every_exercise():
    doc = (ROOT / "docs" / "exercises.md").read_text(encoding="utf-8")
    for i, e in enumerate(EXERCISES, 1):
        head = f"**{i}. `{e.name}`: `{e.qualname}`.**"
        assert head in doc, f"docs/exercises.md has no paragraph {head}"
        para = doc[doc.index(head):].split("\n\n")[0]
        assert f"pytest {e.test} -k {e.name}" in para, f"docs/exercises.md: {e.name}: no test command"
        assert "Hint:" in para and "Source:" in para, f"docs/exercises.md: {e.name}: a hint and a source"
    for part in ("## Instructors", "--only", "make_fixtures.py", "byte-identical"):
        assert part in doc
