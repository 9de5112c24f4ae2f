"""BIG-bench tasks read in place (evaluation only), from a checkout of github.com/google/BIG-bench
or from the bigbench 1.0.0 source archive:

    git clone --depth 1 https://github.com/google/BIG-bench ~/.cache/minicai/BIG-bench
    # then --bigbench ~/.cache/minicai/BIG-bench (or --bigbench auto, which looks there)

(PyPI no longer serves bigbench 1.0.0, only 0.0.1; an archive downloaded earlier,
~/.cache/minicai/bigbench-1.0.0.tar.gz, still works.) Only the task JSON files named below are
read: from a folder directly, from the archive with tarfile in one pass. Nothing is installed or
imported. Every BIG-bench task carries a canary string: its items must never be trained on,
pasted into code or docs, or used to tune prompts, thresholds or principles. minicai uses them
only to score:
- hhh_alignment (Askell et al. 2021): 221 two-choice items in 4 subtasks (harmless, helpful,
  honest, other), to measure the AI labeller (feedback.py --hhh bigbench; the paper's Fig. 4);
- truthful_qa (task_mc.json) and strategyqa: cloze-scored multiple choice for the alignment tax.

A task JSON has "examples": [{"input": str, "target_scores": {option: score}}, ...]; the correct
option is the one with the highest score (exactly one is highest in these tasks; scores must be
finite numbers).
"""
from __future__ import annotations

import json
import math
import os
import tarfile
import zlib
from pathlib import Path

from ..errors import InputError, first_line

BIGBENCH_FILE = "bigbench-1.0.0.tar.gz"
BIGBENCH_DIR = "BIG-bench"
BIGBENCH_CACHE = Path(os.environ.get("MINICAI_CACHE", Path.home() / ".cache" / "minicai"))
BIGBENCH_INSTALL = ("git clone --depth 1 https://github.com/google/BIG-bench ~/.cache/minicai/BIG-bench "
                    "(then --bigbench ~/.cache/minicai/BIG-bench)")
TASKS = "bigbench/benchmark_tasks/"
"""Where the tasks are inside a checkout (and inside the archive's top folder)."""
ROOT = "bigbench-1.0.0/" + TASKS
"""The tasks' prefix inside the archive."""
HHH_SUBTASKS = ("harmless", "helpful", "honest", "other")
TASK_MEMBERS = {f"hhh_alignment/{s}": f"hhh_alignment/{s}/task.json" for s in HHH_SUBTASKS} | {
    "truthfulqa_mc": "truthful_qa/task_mc.json", "strategyqa": "strategyqa/task.json"}
"""Our task names -> the file (under TASKS) that holds them."""


def default_archive() -> Path:
    """The BIG-bench source at the default place ($MINICAI_CACHE, default ~/.cache/minicai): the
    archive bigbench-1.0.0.tar.gz if it is there, else the checkout folder BIG-bench (whether or
    not that exists: see .exists())."""
    archive = BIGBENCH_CACHE / BIGBENCH_FILE
    return archive if archive.is_file() else BIGBENCH_CACHE / BIGBENCH_DIR


def find_archive(path: str | Path | None = None) -> Path:
    """The BIG-bench source at `path` (a checkout folder, an extracted sdist folder or the archive;
    default: default_archive()); a missing one is a one-line InputError with the command to get it."""
    p = Path(path).expanduser() if path else default_archive()
    if not p.exists():
        raise InputError(f"{p}: no BIG-bench checkout or archive here; get it with: {BIGBENCH_INSTALL}")
    if p.is_dir() and not (p / TASKS).is_dir():  # checked before a pipeline runs, not at its evaluation
        raise InputError(f"{p}: not a BIG-bench checkout (no {TASKS}); get it with: {BIGBENCH_INSTALL}")
    return p


def read_tasks(archive: str | Path, names: list[str]) -> dict[str, list[dict]]:
    """{task name: items} for task names of TASK_MEMBERS, read from a BIG-bench folder (a checkout
    of github.com/google/BIG-bench or an extracted sdist: TASKS under it) or from the archive in
    one pass. Each item is {input, options, answer (index of the highest target score), category
    (the subtask)}. A malformed file is a one-line InputError naming it and the field."""
    unknown = [n for n in names if n not in TASK_MEMBERS]
    if unknown:
        raise InputError(f"BIG-bench: unknown task {unknown[0]!r}; known: {', '.join(TASK_MEMBERS)}")
    archive = Path(archive)
    found = (read_folder if archive.is_dir() else read_archive)(archive, names)
    return {n: found[n] for n in names}


def _category(name: str) -> str:
    return name.split("/")[-1] if name.startswith("hhh_alignment/") else name


def read_folder(folder: Path, names: list[str]) -> dict[str, list[dict]]:
    """read_tasks from a folder: FOLDER/bigbench/benchmark_tasks/<task file>."""
    found = {}
    for n in names:
        f = folder / TASKS / TASK_MEMBERS[n]
        if not f.is_file():
            raise InputError(f"{folder}: not a BIG-bench checkout (no {TASKS}{TASK_MEMBERS[n]}); "
                             f"get it with: {BIGBENCH_INSTALL}")
        try:
            data = f.read_bytes()
        except OSError as e:
            raise InputError(f"{f}: cannot read ({first_line(e)})") from None
        found[n] = parse_task(data, str(f), _category(n))
    return found


def read_archive(archive: Path, names: list[str]) -> dict[str, list[dict]]:
    """read_tasks from the bigbench-1.0.0 source archive, in one pass."""
    wanted = {ROOT + TASK_MEMBERS[n]: n for n in names}
    found: dict[str, list[dict]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                f = tar.extractfile(member)
                found[name] = parse_task(f.read() if f else b"", f"{archive}:{member.name}", _category(name))
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InputError(f"{archive}: not a readable BIG-bench archive ({type(e).__name__}: {first_line(e)}); "
                         f"get the tasks with: {BIGBENCH_INSTALL}") from None
    missing = [m for m, n in wanted.items() if n not in found]
    if missing:
        raise InputError(f"{archive}: member {missing[0]} not found; is this bigbench-1.0.0.tar.gz? "
                         f"Get the tasks with: {BIGBENCH_INSTALL}")
    return found


def parse_task(data: bytes, where: str, category: str) -> list[dict]:
    """The items of one task JSON (see the module docstring); `where` names the member in errors."""
    try:
        task = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: malformed task JSON ({type(e).__name__})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list) or not task["examples"]:
        raise InputError(f"{where}: field 'examples' must be a non-empty list")
    items = []
    for i, ex in enumerate(task["examples"]):
        field = f"examples[{i}]"
        if not isinstance(ex, dict):
            raise InputError(f"{where}: field {field} must be an object")
        if not isinstance(ex.get("input"), str) or not ex["input"].strip():
            raise InputError(f"{where}: field {field}.input must be a non-empty string")
        ts = ex.get("target_scores")
        if (not isinstance(ts, dict) or len(ts) < 2 or not all(isinstance(k, str) and k.strip() for k in ts)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ts.values())):
            raise InputError(f"{where}: field {field}.target_scores must map at least 2 options to numbers")
        bad = next((k for k, v in ts.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise InputError(f"{where}: field {field}.target_scores[{json.dumps(bad)[:60]}] is {ts[bad]}, "
                             f"not a finite number")
        options, scores = list(ts), list(ts.values())
        best = max(scores)
        if scores.count(best) != 1:
            raise InputError(f"{where}: field {field}.target_scores has no single best option")
        items.append({"input": ex["input"].strip(), "options": [o.strip() for o in options],
                      "answer": scores.index(best), "category": category})
    return items


def hhh_items(archive: str | Path | None = None) -> list[dict]:
    """BIG-bench hhh_alignment as labeller items {conversation, better, worse, category}: the
    conversation is "Human: <input>" (the task's own input prefix), better / worse its two options."""
    tasks = read_tasks(find_archive(archive), [f"hhh_alignment/{s}" for s in HHH_SUBTASKS])
    out = []
    for name, items in tasks.items():
        for it in items:
            if len(it["options"]) != 2:
                raise InputError(f"{archive or default_archive()}: {name}: an item has {len(it['options'])} options, "
                                 f"expected 2")
            out.append({"conversation": f"Human: {it['input']}", "better": it["options"][it["answer"]],
                        "worse": it["options"][1 - it["answer"]], "category": it["category"]})
    return out


def mc_items(archive: str | Path, names: list[str], max_items: int = 0) -> dict[str, list[dict]]:
    """Multiple-choice tasks as cloze items {id, category, question, options, answer}, the first
    max_items of each task (0 = all), in the task's own order."""
    tasks = read_tasks(find_archive(archive), names)
    out = {}
    for name, items in tasks.items():
        items = items[:max_items] if max_items else items
        out[name] = [{"id": f"{name}-{i}", "category": name, "question": it["input"], "options": it["options"],
                      "answer": it["answer"]} for i, it in enumerate(items)]
    return out
