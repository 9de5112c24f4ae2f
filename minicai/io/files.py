"""Writing files safely and the project's JSON-lines files: atomic writes (a temporary file, fsync,
rename; modes that follow the umask), one JSONL reader (with the torn-last-line rule), one appender,
and the one reader of preference pairs (ours, or TRL's chosen/rejected layout)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError, WriteError


# ------------------------------------------------------------------------------ atomic writes
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


UMASK = _umask()
"""The process's umask when minicai was imported: what it writes gets the modes that open() and mkdir()
would give (tempfile's files and folders are 0600 / 0700 whatever the umask, and a report written that
way could not be shared without chmod)."""


def follow_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a file or folder made by tempfile the mode a plain open() / mkdir() would have given it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~UMASK)


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file in the same folder, fsync, rename.
    A crash leaves either the old file or the new one, never a torn one; an OSError (a full disk)
    becomes a WriteError and leaves the old file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        follow_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, _reason(e), kept=path.exists()) from None
        raise


def append_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """Append `text` to `path` in one write (a killed process leaves all of it or none; a full disk
    or a power cut at worst a torn last line, which the readers of our JSONL files drop).
    An OSError becomes a WriteError naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, _reason(e), kept=False) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")



def warn(line: str) -> None:
    """A warning line on stderr, on a line of its own even while a progress bar is open."""
    tqdm.write(line, file=sys.stderr)


def read_jsonl(path: Path, torn_tail: str = "error", hint: str = "", numbered: bool = False,
               skipped: list | None = None, torn: list | None = None) -> list:
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
    the line is left out, and bytes that are not UTF-8 are replaced. A list `torn` receives the
    number of a torn last line that was left out (a cut in the middle of a UTF-8 character
    included)."""
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
        if torn_tail == "error" or e.start <= data.rfind(b"\n"):  # not inside a last line without newline
            raise InputError(f"{path}: line {line}: not valid UTF-8 (byte {e.start}){hint}") from None
        lines = data[:data.rfind(b"\n") + 1].decode("utf-8").split("\n")[:-1] + ["\0torn"]  # fails to parse
    rows, cut = [], None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if n == len(lines) and torn_tail != "error":  # no newline after it: a torn write
                cut = n
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
    if cut and torn_tail == "repair":
        write_jsonl(path, [r for _, r in rows])  # a crash here keeps the old file
    if cut and torn is not None:
        torn.append(cut)
    return rows if numbered else [r for _, r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace the file with these rows, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, flushed and fsynced: a killed process leaves all of them or none;
    a power cut or a full disk at worst a torn last line, which read_jsonl drops."""
    append_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=True)


def _messages(v, key: str, where: str) -> list[tuple[str, str]]:
    """(role, content) of a TRL message list; anything else is one line naming the field."""
    if not isinstance(v, list) or not v or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in v):
        raise InputError(f"{where}: field {key!r} must be a string or a list of {{role, content}} messages")
    return [(m["role"], m["content"]) for m in v]


def _trl_side(r: dict, key: str, where: str) -> tuple[str, str]:
    """(prompt, response) of one side of a TRL record. TRL's layouts: chosen a string beside a
    string prompt; chosen a [user, assistant] message list (the prompt inside it, "implicit
    prompt"); or chosen an [assistant] list beside a prompt that is a [user] list. The prompt is
    the first user turn, the response the last assistant turn."""
    side, prompt = r[key], r.get("prompt")
    if isinstance(side, str):
        if isinstance(prompt, list):
            prompt = next((c for role, c in _messages(prompt, "prompt", where) if role == "user"), None)
        if not isinstance(prompt, str):
            raise InputError(f"{where}: field 'prompt' must be a string (or a message list) when {key!r} is a string")
        return prompt, side
    msgs = (_messages(prompt, "prompt", where) if isinstance(prompt, list) else []) + _messages(side, key, where)
    user = next((c for role, c in msgs if role == "user"), None)
    if user is None and isinstance(prompt, str):
        user = prompt
    reply = next((c for role, c in reversed(msgs) if role == "assistant"), None)
    if user is None or reply is None:
        raise InputError(f"{where}: field {key!r} needs a user turn (or a 'prompt') and an assistant turn")
    return user, reply


def preference_record(r: dict, where: str) -> dict:
    """One record of a preferences file in the internal shape {prompt, response_a, response_b, p_a,
    other fields kept}: ours is checked as it is; TRL's chosen/rejected becomes response_a = chosen,
    response_b = rejected, p_a = 1.0 (P(a is preferred)), its other fields (not chosen/rejected) kept."""
    ours = any(k in r for k in ("response_a", "response_b", "p_a"))
    if not ours and not ("chosen" in r and "rejected" in r):
        raise InputError(f"{where}: needs fields response_a/response_b/p_a or chosen/rejected")
    if not ours:
        prompt, chosen = _trl_side(r, "chosen", where)
        prompt_r, rejected = _trl_side(r, "rejected", where)
        if prompt != prompt_r:
            raise InputError(f"{where}: fields 'chosen' and 'rejected' have different prompts")
        rest = {k: v for k, v in r.items() if k not in ("chosen", "rejected", "prompt")}
        return {**rest, "prompt": prompt, "response_a": chosen, "response_b": rejected, "p_a": 1.0}
    for key in ("prompt", "response_a", "response_b"):
        if not isinstance(r.get(key), str):
            raise InputError(f"{where}: field {key!r} is missing or not a string")
    p = r.get("p_a")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise InputError(f"{where}: field 'p_a' must be a number in [0, 1], got {p!r}")
    return r


def read_preferences(path: Path, notes: dict | None = None, log=warn) -> list[dict]:
    """Preference pairs, for the reward model and DPO (the one reader of preference files), in the
    internal shape of preference_record: ours (prompt, response_a, response_b and p_a, a number in
    [0, 1], the probability that A is the better response, any other fields kept) or TRL's
    chosen/rejected layout. The rules, the same for every caller:
    - a last line without a newline after it that is not valid JSON is a write cut off by a crash
      (ours: labelling appends batch by batch): it is left out, with one warning line;
    - any other bad line is a one-line InputError naming the file and the line;
    - a pair whose two responses are the same text carries no preference (its loss is ln 2 whatever
      the model does): it is left out and counted, with one warning line;
    - no pair left is an error.
    `log` gets the warning lines (None: silent, e.g. on torchrun's other ranks); `notes`, a dict,
    gets torn_last_line (its number, or None) and identical_dropped (the count)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: preferences file not found")
    torn, recs, identical = [], [], 0
    for n, r in read_jsonl(path, torn_tail="drop", numbered=True, torn=torn):
        rec = preference_record(r, f"{path}: line {n}")
        if rec["response_a"] == rec["response_b"]:
            identical += 1
            continue
        recs.append(rec)
    if log and torn:
        log(f"warning: {path}: line {torn[0]}: left out, a last line without a newline that is not valid JSON "
            f"(a write cut off)")
    if log and identical:
        log(f"warning: {path}: left out {identical} pair(s) whose two responses are the same text")
    if notes is not None:
        notes.update(torn_last_line=torn[0] if torn else None, identical_dropped=identical)
    if not recs:
        raise InputError(f"{path}: no preference pairs (the file is empty{' or every pair is identical' if identical else ''})"
                         f"; run the feedback stage first")
    return recs


def write_experiment(out: Path, name: str, *, title: str, command: str, seconds: float, table: str, notes: str,
                     plots: list[dict], wall_note: str = "", **raw) -> dict:
    """An experiment's results, both files atomic: OUT/<name>.experiment.json, the contract that
    eval/report.py draws ({experiment, title, command, seconds, table (Markdown), notes, plots:
    [{title, xlabel, ylabel, series: {label: [[x, y], ...]}}]} plus any raw data), and OUT/<name>.md
    for people (title, command, wall time + wall_note, table, notes). Returns the JSON document."""
    doc = {"experiment": name, "title": title, "command": command, "seconds": round(seconds, 1), "table": table,
           "notes": notes, "plots": plots, **raw}
    atomic_write_json(Path(out) / f"{name}.experiment.json", doc)
    atomic_write_text(Path(out) / f"{name}.md", f"# {title}\n\nCommand: `{command}`\n\nWall time: {seconds:.0f} s"
                                                f"{wall_note}\n\n{table.rstrip()}\n\n{notes}\n")
    return doc
