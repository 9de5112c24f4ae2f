"""The project's JSON-lines files: one reader (with the torn-last-line rule), one appender, and the
one reader of preference pairs (ours, or TRL's chosen/rejected layout)."""
from __future__ import annotations

import json
from pathlib import Path

from .utils import InputError, append_text, atomic_write_text


def read_jsonl(path: Path, torn_tail: str = "error", hint: str = "", numbered: bool = False,
               skipped: list | None = None) -> list:
    """The object of every non-blank line of a UTF-8 JSON-lines file ((line number, object) pairs
    with numbered=True); [] if the file does not exist. torn_tail says what happens to a last line that is not valid JSON and has no
    newline after it, i.e. a write cut off by a crash, a full disk or a power cut:
      'error'   it is bad input like any other line (files a person gives us)
      'drop'    it is left out (our own outputs, read while a run may still be writing)
      'repair'  it is left out and the file is rewritten without it, atomically (before a resume
                appends to the file)
    Any other bad line, or a line that is not a JSON object, is one InputError naming the file and
    the line, with `hint` (say, '; delete the file to regenerate') at the end; or, with a list
    `skipped` (the report, which shows whatever a run folder holds), its line number goes there,
    the line is left out, and bytes that are not UTF-8 are replaced."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
        data = data[3:]
    try:
        lines = data.decode("utf-8", errors="strict" if skipped is None else "replace").split("\n")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not valid UTF-8 (byte {e.start}){hint}") from None
    rows, torn = [], False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if n == len(lines) and torn_tail != "error":  # no newline after it: a torn write
                torn = True
                break
            if skipped is not None:
                skipped.append(n)
                continue
            reason = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise InputError(f"{path}: line {n}: not valid JSON ({reason}){hint}") from None
        if not isinstance(row, dict) and skipped is not None:
            skipped.append(n)
            continue
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}{hint}")
        rows.append((n, row))
    if torn and torn_tail == "repair":
        write_jsonl(path, [r for _, r in rows])  # a crash here keeps the old file
    return rows if numbered else [r for _, r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace the file with these rows, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, flushed and fsynced: a killed process leaves all of them or none;
    a power cut or a full disk at worst a torn last line, which read_jsonl drops."""
    append_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=True)


def _trl_side(r: dict, key: str, where: str) -> tuple[str, str]:
    """(prompt, response) of one side of a TRL record: a string with r["prompt"], or a message list."""
    v = r[key]
    if isinstance(v, str):
        if not isinstance(r.get("prompt"), str):
            raise InputError(f"{where}: field 'prompt' must be a string when {key!r} is a string")
        return r["prompt"], v
    if isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in v):
        user = next((m["content"] for m in v if m.get("role") == "user"), None)
        reply = next((m["content"] for m in reversed(v) if m.get("role") == "assistant"), None)
        if user is not None and reply is not None:
            return user, reply
    raise InputError(f"{where}: field {key!r} must be a string or a [user, assistant] message list")


def read_preferences(path: Path) -> list[dict]:
    """Preference pairs, for the reward model and DPO: records with prompt, response_a,
    response_b (strings) and p_a (a number in [0, 1], the probability that A is the better
    response), any other fields kept; or TRL's layout (chosen / rejected, strings beside a
    prompt or [user, assistant] message lists), read as response_a = chosen, p_a = 1. Bad
    records are one-line errors naming the file and the line; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: preferences file not found")
    recs = []
    for n, r in read_jsonl(path, torn_tail="drop", numbered=True):
        where = f"{path}: line {n}"
        ours = any(k in r for k in ("response_a", "response_b", "p_a"))
        if not ours and not ("chosen" in r and "rejected" in r):
            raise InputError(f"{where}: needs fields response_a/response_b/p_a or chosen/rejected")
        if ours:
            for key in ("prompt", "response_a", "response_b"):
                if not isinstance(r.get(key), str):
                    raise InputError(f"{where}: field {key!r} is missing or not a string")
            p = r.get("p_a")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise InputError(f"{where}: field 'p_a' must be a number in [0, 1], got {p!r}")
            recs.append(r)
        else:
            prompt, chosen = _trl_side(r, "chosen", where)
            prompt_r, rejected = _trl_side(r, "rejected", where)
            recs.append({"prompt": prompt or prompt_r, "response_a": chosen, "response_b": rejected, "p_a": 1.0})
    if not recs:
        raise InputError(f"{path}: no preference pairs (the file is empty); run the feedback stage first")
    return recs


def write_experiment(out: Path, name: str, *, title: str, command: str, seconds: float, table: str, notes: str,
                     plots: list[dict], wall_note: str = "", **raw) -> dict:
    """An experiment's results, both files atomic: OUT/<name>.experiment.json, the contract that
    infra/report.py draws ({experiment, title, command, seconds, table (Markdown), notes, plots:
    [{title, xlabel, ylabel, series: {label: [[x, y], ...]}}]} plus any raw data), and OUT/<name>.md
    for people (title, command, wall time + wall_note, table, notes). Returns the JSON document."""
    from .utils import atomic_write_json, atomic_write_text

    doc = {"experiment": name, "title": title, "command": command, "seconds": round(seconds, 1), "table": table,
           "notes": notes, "plots": plots, **raw}
    atomic_write_json(Path(out) / f"{name}.experiment.json", doc)
    atomic_write_text(Path(out) / f"{name}.md", f"# {title}\n\nCommand: `{command}`\n\nWall time: {seconds:.0f} s"
                                                f"{wall_note}\n\n{table.rstrip()}\n\n{notes}\n")
    return doc
