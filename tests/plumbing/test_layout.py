"""The layout the docs promise: docs/walkthrough.md names functions, loop lines and tests that
exist; the README's line counts are today's (python -m minicai.infra.lines); the reading path
(minicai/*.py) does no file I/O and no torch.distributed."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from minicai.infra import lines

ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"


def rows() -> list[list[str]]:
    """The 4-column rows (paper | function | loop line | test) of the walkthrough's tables."""
    out = []
    for ln in WALKTHROUGH.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
        if len(cells) == 4 and cells[1].startswith("`") and not set(cells[1]) <= {"-", " "}:
            out.append(cells)
    return out


def defined(path: Path) -> set[str]:
    """Top-level functions and classes of a file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def first_code(cell: str) -> str:
    return re.search(r"`([^`]+)`", cell).group(1)


def test_the_walkthrough_has_a_row_per_step():
    assert len(rows()) >= 40


@pytest.mark.parametrize("row", rows(), ids=lambda r: first_code(r[1]))
def test_every_walkthrough_row_names_a_function_a_loop_line_and_a_test_that_exist(row):
    _, function, loop, test = row
    path, name = first_code(function).split(":")
    assert name in defined(ROOT / path), f"{path} defines no {name}"
    path, line = first_code(loop).split(": ", 1)
    text = (ROOT / path).read_text(encoding="utf-8")
    assert line.replace("\\|", "|") in text, f"{path} has no line {line!r}"
    assert re.search(rf"\b{re.escape(name.split('.')[-1])}\(", line), f"the loop line does not call {name}: {line!r}"
    test_path, test_name = first_code(test).split("::")
    assert test_name in defined(ROOT / test_path), f"{test_path} has no {test_name}"


def test_the_readme_line_counts_are_todays():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = lines.table(ROOT)
    assert table in readme, "README.md's line counts are stale: paste `python -m minicai.infra.lines` into it\n" + table


@pytest.mark.parametrize("path", sorted((ROOT / "minicai").glob("*.py")), ids=lambda p: p.name)
def test_the_reading_path_does_no_file_io_and_no_distributed(path):
    src = path.read_text(encoding="utf-8")
    for pattern in (r"torch\.distributed", r"\bopen\(", r"\.read_text\(", r"\.write_text\(", r"\.read_bytes\(",
                    r"^import json", r"safetensors", r"from \.infra\.(files|distributed|checkpoint|train) import"):
        assert not re.search(pattern, src, re.M), f"{path.name}: {pattern}"
