"""python -m minicai.exercises list | make --out DIR [--only NAME ...] | check

  list    the exercises in handout order: name, file, function, paper source, graded test
  make    write a student copy of this repository (or of the installed package: its minicai/,
          train_*.py, constitutions and graded tests) into DIR with the marked bodies blanked
          (all of them, or the exercises named with --only); grade it with
          `cd DIR && python -m pytest tests/exercises`. --overwrite replaces only an earlier
          student copy holding nothing but what minicai wrote there
  check   verify that the '# exercise' markers in minicai/*.py and the catalogue agree

docs/exercises.md is the handout and the instructor's guide.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import EXERCISES, PARTS
from .blank import MANIFEST, make_copy, markers

SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the minicai package: the checkout, or an installed wheel's site-packages."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minicai.exercises", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the exercises (name, file, function, source, test)")
    mk = sub.add_parser("make", help="write a student copy with the exercise bodies blanked")
    mk.add_argument("--out", required=True, help="folder of the student copy (outside this repository)")
    mk.add_argument("--only", nargs="+", metavar="NAME",
                    help="blank only these exercises (short names from `list`); default: all")
    mk.add_argument("--source", default=str(SOURCE_ROOT),
                    help="the repository to copy (default: the checkout this package lives in, or the "
                         "installed package's own files)")
    mk.add_argument("--overwrite", action="store_true",
                    help="replace an earlier student copy (refused if --out holds anything minicai did not write)")
    sub.add_parser("check", help="verify that the markers in minicai/*.py and the catalogue agree")
    return p


def check(root: Path) -> list[str]:
    """Disagreements between the markers under root and the catalogue (empty when they agree)."""
    found = set(markers(root))
    listed = {(e.file, e.qualname) for e in EXERCISES}
    return ([f"{f}: {q} is in the catalogue but has no '# exercise' marker" for f, q in sorted(listed - found)]
            + [f"{f}: {q} is marked '# exercise' but not in minicai/exercises/__init__.py" for f, q in
               sorted(found - listed)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        marked = set(markers(SOURCE_ROOT))
        part = None
        for i, e in enumerate(EXERCISES, 1):
            if e.part != part:
                part = e.part
                print(f"\n{PARTS[part]}")
            flag = "" if (e.file, e.qualname) in marked else "   [no marker]"
            print(f"  {i:2d}. {e.name:<17} {e.file}:{e.qualname}{flag}\n"
                  f"      {e.source}\n      pytest {e.test} -k {e.name}")
        return 0
    if args.command == "check":
        problems = check(SOURCE_ROOT)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(EXERCISES)} exercises, {len(markers(SOURCE_ROOT))} markers" + ("" if not problems else ": MISMATCH"))
        return 1 if problems else 0
    blanked = make_copy(Path(args.source), Path(args.out), args.only, args.overwrite)
    print(f"wrote a student copy to {args.out} with {len(blanked)} blank exercise(s) "
          f"({', '.join(b['name'] for b in blanked)}); {MANIFEST} lists them.\n"
          f"Grade it: cd {args.out} && python -m pytest tests/exercises")
    return 0


if __name__ == "__main__":
    from ..infra.cli import run_cli

    sys.exit(run_cli(main))
