"""Line counts of the reading path (minicai/*.py), of each folder beside it (io/, infra/, eval/,
experiments/) and of each script, as recorded in the README ("How big it is"; tests/plumbing/test_layout.py checks that the README's
numbers are these):

    python -m minicai.infra.lines            # a markdown table

It counts the files this minicai runs: a checkout's, or an installed wheel's (site-packages holds
minicai/ and the train_*.py modules side by side, as a checkout does).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError

ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds minicai/ and the train_*.py scripts: the checkout, or site-packages."""
FOLDERS = (("io", "file formats"), ("infra", "training plumbing"), ("eval", "evaluation"),
           ("experiments", "whole runs"))
SCRIPTS = ("train_sl.py", "train_rm.py", "train_ppo.py", "train_dpo.py")


def count(path: Path) -> int:
    """Lines of a file, blank lines and comments included (what `wc -l` says)."""
    if not path.is_file():
        raise InputError(f"{path}: not found (python -m minicai.infra.lines counts a checkout or an installed wheel)")
    return len(path.read_text(encoding="utf-8").splitlines())


def counts(root: Path = ROOT) -> list[tuple[str, int]]:
    """[(name, lines)]: each reading-path module, the reading path's total, each folder's total (FOLDERS),
    then each script."""
    reading = sorted((root / "minicai").glob("*.py"))
    rows = [(f"minicai/{p.name}", count(p)) for p in reading if p.name != "__init__.py"]
    rows.append(("reading path (minicai/*.py)", sum(n for _, n in rows)))
    rows += [(f"{what} (minicai/{f}/*.py)", sum(count(p) for p in (root / "minicai" / f).glob("*.py")))
             for f, what in FOLDERS]
    rows += [(s, count(root / s)) for s in SCRIPTS]
    return rows


def table(root: Path = ROOT) -> str:
    return "\n".join(["| file | lines |", "| --- | ---: |"] + [f"| {n} | {c} |" for n, c in counts(root)]) + "\n"


def main(argv=None) -> int:
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
