"""Reading constitution files (the texts and the prompt layouts are in minicai/constitution.py).

Files we read (see constitutions/README.md):

- our TOML layout (constitutions/default.toml, constitutions/hhh.toml), or the same keys as JSON:
  {"name": ..., "description": ..., "principle": [{name, critique, revision, comparison}, ...],
   "few_shot": [{prompt, response, critique, revision, principle}, ...]}
- Anthropic's released files (github.com/anthropics/ConstitutionalHarmlessnessPaper, prompts/):
  CritiqueRevisionInstructions.json, an object {"harmful0": {"prompt": [critique],
  "edit_request": revision}, ...} (or a list of such entries), plus optionally
  RLMadisonInstructions.json, a list of comparison strings, via `comparisons_path=`. Their
  few-shot file (CritiqueRevisionFewShotPrompts.json) is whole transcripts, not fields, and is
  not read: a constitution loaded that way has no few-shot examples.

`load_constitution("default")` and `load_constitution("hhh")` read the files in the repository's
constitutions/ folder: in a checkout (or an editable install) the folder next to minicai/; in an
installed wheel the same files, shipped as minicai/constitutions/ (pyproject.toml's package-dir).

Every problem in a file raises InputError with one line naming the file and the key.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from ..constitution import GENERIC_COMPARISON, Constitution, FewShot, Principle
from ..errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport has the same API
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


def builtin_dir(package: Path = Path(__file__).resolve().parents[1]) -> Path:
    """The folder of the built-in constitutions for the minicai package folder `package`:
    minicai/constitutions/ in an installed wheel, else the checkout's top-level constitutions/ (the
    wheel's copy first: next to site-packages/minicai there may be an unrelated constitutions/)."""
    wheel = package / "constitutions"
    return wheel if wheel.is_dir() else package.parent / "constitutions"


CONSTITUTIONS_DIR = builtin_dir()
PRINCIPLE_FIELDS = ("name", "critique", "revision", "comparison")
CONTRAST_FIELDS = ("follow", "violate")
"""Optional fields of a principle, both or neither."""
FEW_SHOT_FIELDS = ("prompt", "response", "critique", "revision", "principle")
TOP_LEVEL_KEYS = ("name", "description", "principle", "few_shot")
KEBAB = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")

def load_constitution(path_or_name, comparisons_path=None) -> Constitution:
    """Load a constitution: a built-in name ("default", "hhh"), or a .toml / .json file in our
    layout or Anthropic's critique/revision format. `comparisons_path`: a JSON list of RL
    comparison strings (e.g. RLMadisonInstructions.json) that replaces the comparisons, paired by
    index when the counts match, otherwise cycled (principle i gets comparison i mod n)."""
    path = resolve_constitution_path(path_or_name)
    data = read_structured(path)
    if isinstance(data, list) and data and all(isinstance(v, str) for v in data):
        raise InputError(f"{path}: a list of strings looks like RL comparison principles; "
                         f"pass it as comparisons_path= with a critique/revision file")
    if isinstance(data, list) or (isinstance(data, dict) and not set(data) & set(TOP_LEVEL_KEYS)
                                  and any(isinstance(v, dict) for v in data.values())):
        c = parse_anthropic(data, path)
    elif isinstance(data, dict):
        c = parse_ours(data, path)
    else:
        raise InputError(f"{path}: expected a table/object of principles, got {type(data).__name__}")
    if comparisons_path is not None:
        comparisons = load_comparisons(comparisons_path)
        c.principles = [replace(p, comparison=comparisons[i % len(comparisons)])
                        for i, p in enumerate(c.principles)]
        c.source = f"{c.source} + {comparisons_path}"
    return c


def resolve_constitution_path(path_or_name) -> Path:
    """A bare name (letters, digits, '-', '_', no suffix) means constitutions/<name>.toml."""
    if isinstance(path_or_name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", path_or_name):
        path = CONSTITUTIONS_DIR / f"{path_or_name}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in CONSTITUTIONS_DIR.glob("*.toml"))
            raise InputError(f"constitution {path_or_name!r}: no {path}; built-in names: "
                             f"{', '.join(names) or 'none (a checkout or wheel without constitutions/?)'}")
        return path
    path = Path(path_or_name)
    if not path.is_file():
        raise InputError(f"{path}: constitution file not found")
    return path


def read_structured(path: Path):
    """Parse a .toml or .json file; syntax errors become one-line InputErrors with the line."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start})") from None
    if path.suffix == ".toml":
        if tomllib is None:
            raise InputError(f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{path}: invalid TOML: {e}") from None
        except RecursionError:  # tomllib recurses once per nested array/table
            raise InputError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    if path.suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=lambda pairs: unique_keys(pairs, path))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:  # json recurses once per nested array/object
            raise InputError(f"{path}: invalid JSON: arrays or objects nested too deeply") from None
    raise InputError(f"{path}: unknown constitution format {path.suffix!r} (expected .toml or .json)")


def unique_keys(pairs: list, path: Path) -> dict:
    """json object_pairs_hook: a repeated key is an error (json.loads would keep the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise InputError(f"{path}: duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def require_text(table: dict, key: str, where: str) -> str:
    """table[key] as a stripped, non-empty string, else InputError naming `where` and the key."""
    if key not in table:
        raise InputError(f"{where}: field {key!r} is missing")
    value = table[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: field {key!r} is empty")
    return value.strip()


def table_list(data: dict, key: str, path: Path) -> list[dict]:
    """data[key] as a list of tables ([[key]] in TOML), possibly empty."""
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise InputError(f"{path}: {key!r} must be an array of tables ([[{key}]] in TOML)")
    return items


def parse_ours(data: dict, path: Path) -> Constitution:
    """Our layout (TOML or JSON). Indices in messages are 1-based, in file order."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise InputError(f"{path}: unknown top-level key {key!r} (expected {', '.join(TOP_LEVEL_KEYS)})")
    name = require_text(data, "name", str(path)) if "name" in data else path.stem
    description = require_text(data, "description", str(path)) if "description" in data else ""

    principles, first_at = [], {}
    for i, table in enumerate(table_list(data, "principle", path), start=1):
        where = f"{path}: principle[{i}]"
        pname = require_text(table, "name", where)
        where = f"{where} (name {pname!r})"
        if not KEBAB.fullmatch(pname):
            raise InputError(f"{where}: name must be kebab-case (lowercase letters, digits, '-')")
        for key in table:
            if key not in PRINCIPLE_FIELDS + CONTRAST_FIELDS:
                raise InputError(f"{where}: unknown field {key!r} "
                                 f"(expected {', '.join(PRINCIPLE_FIELDS + CONTRAST_FIELDS)})")
        texts = {k: require_text(table, k, where) for k in PRINCIPLE_FIELDS[1:]}
        given = [k for k in CONTRAST_FIELDS if k in table]
        if len(given) == 1:
            missing = next(k for k in CONTRAST_FIELDS if k not in table)
            raise InputError(f"{where}: field {given[0]!r} needs field {missing!r} too (both or neither)")
        texts.update({k: require_text(table, k, where) for k in given})
        if pname in first_at:
            raise InputError(f"{path}: principle[{i}]: duplicate name {pname!r} "
                             f"(first at principle[{first_at[pname]}])")
        first_at[pname] = i
        principles.append(Principle(pname, **texts))
    if not principles:
        raise InputError(f"{path}: no principles (add at least one [[principle]] table)")

    few_shot = []
    for i, table in enumerate(table_list(data, "few_shot", path), start=1):
        where = f"{path}: few_shot[{i}]"
        for key in table:
            if key not in FEW_SHOT_FIELDS:
                raise InputError(f"{where}: unknown field {key!r} (expected {', '.join(FEW_SHOT_FIELDS)})")
        shot = FewShot(**{k: require_text(table, k, where) for k in FEW_SHOT_FIELDS})
        if shot.principle not in first_at:
            raise InputError(f"{where}: field 'principle' names unknown principle {shot.principle!r}")
        few_shot.append(shot)
    return Constitution(name, principles, few_shot, str(path), description)


def parse_anthropic(data: dict | list, path: Path) -> Constitution:
    """Anthropic's CritiqueRevisionInstructions.json: {name: {"prompt": [critique], "edit_request":
    revision}} (names are the keys) or a list of such entries (named principle-1, principle-2...).
    Comparisons are GENERIC_COMPARISON until load_constitution replaces them."""
    if isinstance(data, dict):
        entries = [(f"entry {k!r}", k, v) for k, v in data.items()]
    else:
        entries = [(f"entry[{i}]", f"principle-{i}", v) for i, v in enumerate(data, start=1)]
    principles = []
    for label, pname, entry in entries:
        where = f"{path}: {label}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object with 'prompt' and 'edit_request'")
        entry = dict(entry)
        if isinstance(entry.get("prompt"), list):  # the released file wraps each critique in a list
            if len(entry["prompt"]) != 1:
                raise InputError(f"{where}: field 'prompt' must be a list of one string, "
                                 f"got {len(entry['prompt'])} items")
            entry["prompt"] = entry["prompt"][0]
        critique = require_text(entry, "prompt", where)
        revision = require_text(entry, "edit_request", where)
        principles.append(Principle(pname, critique, revision, GENERIC_COMPARISON))
    if not principles:
        raise InputError(f"{path}: no principles (the file is empty)")
    return Constitution(path.stem, principles, [], str(path))


def load_comparisons(path) -> list[str]:
    """A JSON list of RL comparison principles (Anthropic's RLMadisonInstructions.json), stripped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: comparisons file not found")
    if path.suffix != ".json":
        raise InputError(f"{path}: comparisons must be a .json list of strings")
    data = read_structured(path)
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of comparison strings")
    out = []
    for i, s in enumerate(data, start=1):
        if not isinstance(s, str):
            raise InputError(f"{path}: comparison[{i}] must be a string, got {type(s).__name__}")
        if not s.strip():
            raise InputError(f"{path}: comparison[{i}] is empty")
        out.append(s.strip())
    return out
