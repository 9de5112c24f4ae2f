"""The layout the docs promise: docs/walkthrough.md names functions, loop lines and tests that
exist; the README's line counts are today's (python -m minicai.infra.lines); the reading path
(minicai/*.py) does no file I/O and no torch.distributed, and imports from the folders beside it
only the two documented types; training code never imports the evaluation; every module the docs
name exists."""
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
                    r"^import json", r"safetensors"):
        assert not re.search(pattern, src, re.M), f"{path.name}: {pattern}"


READING_PATH_MAY_IMPORT = {"minicai.io.data": {"Prompt"}, "minicai.io.tokenizer": {"ChatTokenizer"},
                           "minicai.errors": {"InputError"}}
"""What the reading path takes from outside it: two types and the error type, nothing that runs."""


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(absolute module, names, inside a function) of every import of a file under ROOT."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = pkg.split(".")[:len(pkg.split(".")) - n.level + 1] if n.level else []
            mod = ".".join(base + ([n.module] if n.module else []))
            out.append((mod, [a.name for a in n.names], id(n) in inner))
        elif isinstance(n, ast.Import):
            out += [(a.name, [], id(n) in inner) for a in n.names]
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "minicai").glob("*.py")), ids=lambda p: p.name)
def test_the_reading_path_imports_only_the_documented_types_from_beside_it(path):
    for mod, names, inner in imports(path):
        assert not inner, f"{path.name}: an import inside a function ({mod})"
        if mod.startswith("minicai.") and mod.count(".") > 1 or mod == "minicai.errors":
            allowed = READING_PATH_MAY_IMPORT.get(mod, set())
            assert set(names) <= allowed, f"{path.name} imports {sorted(set(names) - allowed)} from {mod}"


TRAINING = [*sorted((ROOT / "minicai").glob("*.py")), *sorted((ROOT / "minicai" / "infra").glob("*.py")),
            *sorted((ROOT / "minicai" / "io").glob("*.py")), *sorted(ROOT.glob("train_*.py"))]


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_code_never_imports_the_evaluation_or_the_experiments(path):
    """The measuring stick never chooses training data: nothing that trains imports minicai/eval/
    (the yardstick's detectors, BIG-bench) or the experiments that run it."""
    for mod, _, _ in imports(path):
        assert not mod.startswith(("minicai.eval", "minicai.experiments")), f"{path.name} imports {mod}"


INSIDE_FUNCTIONS = {"minicai/infra/distributed.py": "torch."}
"""The documented exception to 'imports at the top': torch.distributed's opt-in parts (FSDP, DDP,
under torchrun only)."""


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "minicai").rglob("*.py") if "exercises" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_at_the_top(path):
    """The dependency graph is the files' first lines: no import inside a function, but the opt-in ones."""
    rel = str(path.relative_to(ROOT))
    for mod, _, inner in imports(path):
        if inner:
            assert mod.startswith(INSIDE_FUNCTIONS.get(rel, "\0")), f"{rel}: an import inside a function ({mod})"


def test_every_module_the_docs_name_exists():
    """`python -m minicai.X.Y`, `minicai.X.Y` and `minicai/X/Y.py` in the README and docs/ name files
    that exist (a moved module leaves no stale command behind)."""
    missing = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for path in re.findall(r"\bminicai/[\w/]+\.py\b", text):
            if not (ROOT / path).is_file():
                missing.add(f"{doc.name}: {path}")
        for dotted in re.findall(r"\bminicai(?:\.[a-z_]+)+", text):
            parts = dotted.split(".")
            # the whole name is a package, or a prefix is a module file and the rest its attribute
            # (minicai.infra.labelling.DEFAULT)
            found = (ROOT.joinpath(*parts) / "__init__.py").is_file() or \
                any(ROOT.joinpath(*parts[:i]).with_suffix(".py").is_file() for i in range(2, len(parts) + 1))
            if not found:
                missing.add(f"{doc.name}: {dotted}")
    assert not missing, "docs name modules that do not exist: " + ", ".join(sorted(missing))


def test_every_import_the_docs_show_works():
    """`from minicai.X import a, b` in a code block of the README, docs/ or constitutions/README.md
    imports: the module exists and has every name."""
    import importlib

    broken = []
    for doc in [ROOT / "README.md", ROOT / "constitutions" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for mod, names in re.findall(r"^from (minicai[\w.]*) import ([\w, ]+)$", doc.read_text(encoding="utf-8"), re.M):
            m = importlib.import_module(mod)
            broken += [f"{doc.relative_to(ROOT)}: {mod}.{n}" for n in (x.strip() for x in names.split(",")) if not hasattr(m, n)]
    assert not broken, "docs show imports that fail: " + ", ".join(broken)
