"""Finding the `# exercise` markers, blanking marked bodies, copying the repository, filling back in.

Blanking a function keeps, byte for byte, everything up to the end of its docstring; the lines of
its body after the docstring become:
  - every whole-line comment, at the body's indentation (the steps and sources the body was
    annotated with);
  - every trailing shape comment of a removed line, as a comment line naming what it described
    (`freqs = ...  # (B, T, D/2)` becomes `# freqs: (B, T, D/2)`, `return ...  # (B,)` becomes
    `# returns: (B,)`);
  - `raise NotImplementedError("exercise NAME: ...")`.
Everything else in the file is untouched, so a student copy differs from the repository only
inside the blanked bodies, and filling them back in (`fill_source`) gives the original bytes.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_write_json, follow_umask
from . import EXERCISES, Exercise, find

MARKER = "# exercise"
MANIFEST = ".student-copy.json"
"""Written at the root of a student copy: which exercises are blank (tests/exercises reads it), every
path minicai wrote there and each file's sha256 (`make --overwrite` deletes the copy only while it holds
those paths alone, unchanged)."""
CACHES = ("__pycache__", ".pytest_cache", ".hypothesis")
"""Written by Python and pytest running a copy, not by its owner: `make --overwrite` may delete them."""
COPY_IGNORE = (".git", ".venv", *CACHES, "*.egg-info", "runs", "build", ".whl", MANIFEST)
"""Not copied into a student copy: version control, environments, caches, run folders."""
SCRIPTS = ("train_sl.py", "train_rm.py", "train_ppo.py", "train_dpo.py")


@dataclass(frozen=True)
class Marked:
    """A marked function of one file: where its body starts and ends (1-based lines)."""

    qualname: str
    def_line: int
    """The `def` line (after any decorators)."""
    keep_through: int
    """Last line kept when blanking: the end of the docstring, or of the signature without one."""
    end_line: int
    """The function's last line."""
    indent: str
    """Indentation of the body."""


def _functions(tree: ast.Module):
    """(qualname, node) for top-level functions and the methods of top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{m.name}", m


def _signature_end(lines: list[str], def_line: int) -> int:
    """The line of the colon that ends the signature starting at `def_line` (1-based)."""
    text = "".join(ln + "\n" for ln in lines[def_line - 1:])
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return def_line + tok.start[0] - 1
    raise InputError(f"line {def_line}: no end of the signature")


def marked_functions(source: str, path: str = "<source>") -> list[Marked]:
    """The functions of `source` whose line above the def (or above its first decorator) is exactly
    the marker comment, in file order. A marker above anything else is an InputError."""
    lines = source.splitlines()
    tree = ast.parse(source, filename=path)
    out, used = [], set()
    for qualname, node in _functions(tree):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if first >= 2 and lines[first - 2].strip() == MARKER:
            used.add(first - 1)
            body = node.body
            doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str))
            if doc and len(body) == 1:
                raise InputError(f"{path}:{node.lineno}: {qualname} is marked '{MARKER}' but has no body to blank")
            keep = body[0].end_lineno if doc else _signature_end(lines, node.lineno)
            if keep >= body[0].lineno and not doc:
                raise InputError(f"{path}:{node.lineno}: {qualname}: put its body on the lines after the def")
            indent = re.match(r"\s*", lines[body[1 if doc else 0].lineno - 1]).group(0)
            out.append(Marked(qualname, node.lineno, keep, node.end_lineno, indent))
    stray = [i + 1 for i, ln in enumerate(lines) if ln.strip() == MARKER and i + 1 not in used]
    if stray:
        raise InputError(f"{path}:{stray[0]}: '{MARKER}' must be the line directly above a function's def")
    return out


def _comments(lines: list[str], start: int, end: int) -> dict[int, tuple[str, bool]]:
    """{line number: (comment text, whole_line)} for lines start..end (1-based) of a body."""
    text = "".join(ln + "\n" for ln in lines[start - 1:end])
    out = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                row = tok.start[0] + start - 1
                out[row] = (tok.string, lines[row - 1][:tok.start[1]].strip() == "")
    except (tokenize.TokenError, IndentationError):  # a body always tokenizes; be safe anyway
        pass
    return out


TARGET = re.compile(r"^\s*([A-Za-z_][\w\[\]:, .]*?)\s*(?:[-+*/@|&]?=)(?!=)")


def _shape_comment(code_line: str, comment: str, indent: str) -> str:
    """A trailing comment of a removed line, as a comment line that names what it describes."""
    text = comment[1:].strip()
    stripped = code_line.strip()
    if stripped.startswith("return"):
        return f"{indent}# returns: {text}"
    m = TARGET.match(code_line)
    if m and not stripped.startswith(("if ", "for ", "while ", "elif ")):
        return f"{indent}# {m.group(1).strip()}: {text}"
    return f"{indent}# {text}"


def not_implemented(ex: Exercise | None, qualname: str, file: str) -> str:
    name = ex.name if ex else qualname
    return (f"exercise {name}: write the body of {qualname} in {file} "
            f"(docs/exercises.md, test: pytest {ex.test if ex else 'tests/exercises'} -k {name})")


def blank_source(source: str, file: str, only: set[str] | None = None) -> tuple[str, list[str]]:
    """`source` with the bodies of its marked functions blanked (those whose qualname is in `only`,
    or all when only is None). Returns (new source, blanked qualnames)."""
    lines = source.splitlines()
    marked = [m for m in marked_functions(source, file) if only is None or m.qualname in only]
    stmts = [(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)]

    def statement_line(row: int) -> str:  # first line of the innermost statement holding `row`
        return lines[max((a for a, b in stmts if a <= row <= b), default=row) - 1]

    for m in reversed(marked):  # bottom-up: line numbers above stay valid
        ex = next((e for e in EXERCISES if e.file == file and e.qualname == m.qualname), None)
        comments = _comments(lines, m.keep_through + 1, m.end_line)
        new = []
        for row in range(m.keep_through + 1, m.end_line + 1):
            if row in comments:
                text, whole = comments[row]
                new.append(f"{m.indent}{text}" if whole else _shape_comment(statement_line(row), text, m.indent))
        new.append(f"{m.indent}raise NotImplementedError({not_implemented(ex, m.qualname, file)!r})")
        lines[m.keep_through:m.end_line] = new
    out = "\n".join(lines) + ("\n" if source.endswith("\n") else "")
    ast.parse(out, filename=file)  # a blanked file must still import
    return out, [m.qualname for m in marked]


def fill_source(blank: str, reference: str, file: str) -> str:
    """What a student's complete solution looks like: every blanked body of `blank` replaced by the
    body of the same function in `reference` (found by qualname). Functions that were not blanked
    are left as they are."""
    ref_lines, ref = reference.splitlines(), {m.qualname: m for m in marked_functions(reference, file)}
    lines = blank.splitlines()
    for m in reversed(marked_functions(blank, file)):
        body = lines[m.keep_through:m.end_line]
        if not any("raise NotImplementedError(" in ln and "exercise " in ln for ln in body):
            continue
        if m.qualname not in ref:
            raise InputError(f"{file}: the reference has no marked {m.qualname}")
        r = ref[m.qualname]
        lines[m.keep_through:m.end_line] = ref_lines[r.keep_through:r.end_line]
    return "\n".join(lines) + ("\n" if blank.endswith("\n") else "")


def reading_path(root: Path) -> list[Path]:
    """The files that may hold markers: minicai/*.py."""
    return sorted((root / "minicai").glob("*.py"))


def markers(root: Path) -> list[tuple[str, str]]:
    """(file, qualname) of every marked function under root, in file order."""
    out = []
    for p in reading_path(root):
        rel = p.relative_to(root).as_posix()
        out += [(rel, m.qualname) for m in marked_functions(p.read_text(encoding="utf-8"), rel)]
    return out


def resolve(names: list[str] | None, root: Path) -> set[tuple[str, str]] | None:
    """--only NAME ... as a set of (file, qualname), None for every marked function. An unknown name
    or one whose function carries no marker is an InputError."""
    if names is None:
        return None
    marked = set(markers(root))
    out = set()
    for n in names:
        ex = find(n)
        if ex is None:
            raise InputError(f"--only {n}: no such exercise (python -m minicai.exercises list)")
        if (ex.file, ex.qualname) not in marked:
            raise InputError(f"--only {n}: {ex.file} has no '{MARKER}' line above {ex.qualname}")
        out.add((ex.file, ex.qualname))
    return out


def is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "minicai").is_dir()


def is_installed(root: Path) -> bool:
    """A wheel's layout (site-packages): minicai/ with the graded tests and constitutions inside it
    (pyproject.toml's package-dir), the train_*.py modules beside it."""
    return ((root / "minicai" / "tests" / "exercises").is_dir() and (root / "minicai" / "constitutions").is_dir()
            and all((root / s).is_file() for s in SCRIPTS))


def copy_source(src: Path, dest: Path) -> None:
    """Copy the source at `src` into the existing folder `dest` with a checkout's layout: a checkout
    as it is (but COPY_IGNORE); an installed wheel's minicai/, train_*.py, and its
    minicai/constitutions and minicai/tests moved back to the top level, where a checkout has them."""
    ignore = shutil.ignore_patterns(*COPY_IGNORE)
    if is_checkout(src):
        shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True, symlinks=True)
        return
    pkg = src / "minicai"
    shutil.copytree(pkg, dest / "minicai", symlinks=True, ignore=lambda d, names: [
        *ignore(d, names), *(n for n in names if Path(d) == pkg and n in ("constitutions", "tests"))])
    for part in ("constitutions", "tests"):
        shutil.copytree(pkg / part, dest / part, ignore=ignore, symlinks=True)
    for script in SCRIPTS:
        shutil.copy2(src / script, dest / script)


def entries(root: Path) -> list[str]:
    """Every path under root (files, folders, links; links not followed), relative, in POSIX form."""
    out = []
    for d, dirs, files in os.walk(root):
        out += [(Path(d) / n).relative_to(root).as_posix() for n in dirs + files]
    return sorted(out)


def check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that is, lies inside or contains the source, or that is not empty, unless it is
    a student copy (its MANIFEST lists what minicai wrote) holding nothing but those paths and caches
    and --overwrite was given: only then may make_copy delete it."""
    what = "the repository" if is_checkout(src) else "the installed package's folder"
    if out == src or src in out.parents:
        raise InputError(f"--out {out}: must be outside {what} {src}")
    if out in src.parents:
        raise InputError(f"--out {out}: contains {what} {src}; choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"--out {out}: exists and is not empty (pass --overwrite to replace a student copy)")
    try:
        written = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        written = None
    if not isinstance(written, list):
        raise InputError(f"--out {out}: not a student copy written by this minicai (no list of its files in "
                         f"{MANIFEST}), so --overwrite will not delete it; choose a new or empty folder")
    ours = {MANIFEST, *written}
    foreign = [e for e in entries(out) if e not in ours and not set(e.split("/")) & set(CACHES)]
    if foreign:
        raise InputError(f"--out {out}: holds {foreign[0]}" + (f" and {len(foreign) - 1} more path(s)" if len(foreign) > 1
                         else "") + " that minicai did not write; --overwrite replaces only a student copy holding "
                         "nothing else: move them or choose another folder")
    digests = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("sha256") or {}
    edited = [rel for rel, want in sorted(digests.items()) if (out / rel).is_file() and file_sha256(out / rel) != want]
    if edited:
        raise InputError(f"--out {out}: {edited[0]}" + (f" and {len(edited) - 1} more file(s)" if len(edited) > 1 else "")
                         + " changed since make wrote it (a student's work?); --overwrite replaces only an unchanged "
                         "student copy: move the copy or choose another folder")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (MANIFEST records one per file written)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_copy(src: Path, out: Path, only: list[str] | None = None, overwrite: bool = False) -> list[dict]:
    """Write a student copy of the source at `src` (a checkout, or an installed wheel's site-packages)
    into `out`: everything but COPY_IGNORE, with the marked bodies blanked (all, or the exercises named
    in `only`), and MANIFEST listing them and every path written. The copy is built in a temporary
    folder next to `out` and renamed into place; an existing `out` is deleted only as check_out allows.
    Returns the manifest's list of blanked exercises."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not is_checkout(src) and not is_installed(src):
        raise InputError(f"{src}: not a minicai source checkout (no pyproject.toml / minicai/) "
                         f"or installed package (no minicai/tests, minicai/constitutions, train_*.py)")
    check_out(src, out, overwrite)
    chosen = resolve(only, src)
    if chosen is None and not markers(src):  # before writing anything: a copy would be left behind
        raise InputError(f"{src}: nothing to blank: no '{MARKER}' marker in minicai/*.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    follow_umask(tmp, folder=True)  # the copy is the student's folder: mkdir's mode, not mkdtemp's 0700
    try:
        copy_source(src, tmp)
        blanked = []
        for p in reading_path(src):
            rel = p.relative_to(src).as_posix()
            wanted = None if chosen is None else {q for f, q in chosen if f == rel}
            if wanted == set():
                continue
            text, done = blank_source(p.read_text(encoding="utf-8"), rel, wanted)
            if done:
                (tmp / rel).write_text(text, encoding="utf-8")
            for q in done:
                ex = next((e for e in EXERCISES if e.file == rel and e.qualname == q), None)
                blanked.append({"name": ex.name if ex else q, "file": rel, "function": q,
                                "test": ex.test if ex else None})
        files = entries(tmp)
        atomic_write_json(tmp / MANIFEST, {"source": str(src), "blank": blanked, "files": files,
                                           "sha256": {f: file_sha256(tmp / f) for f in files if (tmp / f).is_file()}})
        if out.exists():
            check_out(src, out, overwrite)  # again, just before deleting: the copy took a while
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return blanked


def fill_copy(copy: Path, reference: Path) -> list[str]:
    """Fill every blanked body of the student copy at `copy` from the repository at `reference`
    (a complete solution); returns the files changed."""
    changed = []
    for p in reading_path(Path(copy)):
        rel = p.relative_to(copy).as_posix()
        text = p.read_text(encoding="utf-8")
        new = fill_source(text, (Path(reference) / rel).read_text(encoding="utf-8"), rel)
        if new != text:
            p.write_text(new, encoding="utf-8")
            changed.append(rel)
    return changed
