"""Command lines built from config dataclasses (CleanRL's `Args`, without tyro).

A script declares one dataclass whose fields are its flags, each with a default and a docstring
(the string literal under the field, read from the source: it becomes the flag's --help line).
Fields whose type is itself a dataclass are groups of shared flags (RunArgs, OptimArgs below),
named the same in every script; their fields become flags of the same name, with no prefix.

    args = cli.parse(Args, argv, description=__doc__)   # an Args instance
    config = cli.config(args)                            # flat dict for the run folder's config.json
    cli.resume_ignored(Args)                             # fields that may change between resumes
    sys.exit(cli.run_cli(main))                          # every entry point: one-line errors, exit 2

Field metadata (dataclasses.field(metadata=...)):
    required=True        the flag must be given
    choices=(...)        allowed values
    repeat=True          list field: the flag is repeatable (action="append"); default None
    resume="ignore"      may differ when a run folder is resumed (device, threads, how often to save)
    config=False         not part of the run's identity at all (--overwrite)
    flag="--name"        the flag's name when it is not the field's name with '-' for '_'
    range="[1, inf)"     allowed numbers, an interval: '[' / ']' include the bound, '(' / ')' exclude it,
                         'inf' / '-inf' for no bound; "(0, 1)" is 0 < x < 1, "[0, 1)" is 0 <= x < 1.
                         A float field must be finite unless its range includes inf ("[0, inf]").
    model="lm"           a model spec, checked cheaply (no weights are read): "lm" = the embedded name,
                         a parted model's name, a .gguf file or an HF folder (checkpoint.resolve_model);
                         "reward" = a reward-model folder (train_rm.py's OUT/rm); "feedback" =
                         MODEL[:METHOD] (labelling.member_spec), MODEL also 'policy'
parse checks every value against these (validate) before the script writes anything: a bad one
is one line, `--batch-size: 0 is not allowed (must be >= 1)`.
A script's Args may set a class attribute HELP = {field: text} to say what a shared field means
there (PPO's --batch-size counts prompts, not sequences), and RANGES = {field: interval} to give a
shared field another range= there (train_rm.py's --save-every 0 = at each epoch's end).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import inspect
import math
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..io import checkpoint
from ..io.checkpoint import EMBEDDED_NAME, PARTED_MODELS, embedded_model_path, installed_parts

IGNORE = {"resume": "ignore"}
"""metadata of a field that may change between the runs of one folder."""
NOT_CONFIG = {"config": False}
"""metadata of a field that is not recorded in config.json."""
AT_LEAST_1 = {"range": "[1, inf)"}
"""metadata of a count or size: 1 or more."""
AT_LEAST_0 = {"range": "[0, inf)"}
"""metadata of a count where 0 means 'all' or 'none', or of a float that may be 0."""
POSITIVE = {"range": "(0, inf)"}
"""metadata of a float that must be above 0 (a learning rate, a temperature)."""
SHARE = {"range": "[0, 1)"}
"""metadata of a share that may be 0 but must leave something on the other side."""


def field_docs(cls) -> dict[str, str]:
    """{field name: the string literal right under it} from the source of the class and of the
    classes it derives from (the nearest one wins)."""
    docs = {}
    for c in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        docs.update(_own_field_docs(c))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """int | None -> int; list[str] -> str; Literal is not used (choices= instead)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple):
        return args[0] if args else str
    if args and typing.get_origin(tp) is not None:
        return _base_type(args[0])
    return tp


def leaves(cls) -> list[tuple[str, dataclasses.Field, type, object]]:
    """Every flag field of cls, groups flattened: (name, field, type, owner class)."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            out += leaves(tp)
        else:
            out.append((f.name, f, tp, cls))
    return out


def build_parser(cls, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per leaf field of cls; groups (dataclass-typed fields)
    become argument groups titled by their class docstring's first line."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [n for n, *_ in leaves(cls)]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TypeError(f"{cls.__name__}: flag fields defined twice: {sorted(dup)}")

    overrides = getattr(cls, "HELP", {})  # a script's own words for a shared flag: HELP = {"batch_size": "..."}

    def add(group, c, inst):
        docs, hints = {**field_docs(c), **overrides}, _hints(c)
        for f in fields(c):
            tp = hints[f.name]
            default = getattr(inst, f.name)  # a group's own defaults come from its parent's default_factory
            if is_dataclass(tp):
                title = (inspect.getdoc(tp) or tp.__name__).splitlines()[0]
                add(p.add_argument_group(title), tp, default)
                continue
            md = f.metadata
            flag = flag_name(f)
            kw = dict(dest=f.name, help=docs.get(f.name, "") + ("" if md.get("required") else
                                                                  f" (default: {default})" if default is not None and default is not False else ""))
            base = _base_type(tp)
            if base is bool and not md.get("repeat"):
                kw.update(action=argparse.BooleanOptionalAction if default else "store_true", default=bool(default))
            else:
                kw.update(type=base, default=default)
                if md.get("repeat"):
                    kw.update(action="append", default=None)
                if "choices" in md:
                    kw["choices"] = list(md["choices"])
                if md.get("required"):
                    kw["required"] = True
                if "metavar" in md:
                    kw["metavar"] = md["metavar"]
            group.add_argument(flag, **kw)

    add(p, cls, cls())
    return p


def from_namespace(cls, ns: argparse.Namespace):
    """Fill cls (and its group fields) from the parsed flags."""
    hints = _hints(cls)
    kw = {}
    for f in fields(cls):
        tp = hints[f.name]
        kw[f.name] = from_namespace(tp, ns) if is_dataclass(tp) else getattr(ns, f.name)
    return cls(**kw)


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a field: metadata flag=, else --name-with-dashes."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def parse(cls, argv=None, description: str | None = None, prog: str | None = None):
    """argv (None = sys.argv[1:]) -> a cls instance, every value checked (validate)."""
    args = from_namespace(cls, build_parser(cls, description, prog).parse_args(argv))
    validate(args)
    return args


# ---------------------------------------------------------------- checks of single values
def validate(args, ranges: dict[str, str] | None = None) -> None:
    """Every leaf value of args (a config dataclass instance) against its field's metadata: range=
    (and finiteness of floats), model=. The first bad one is an InputError naming the flag.
    ranges: {field: interval} replacing a shared field's range (default: the class attribute
    RANGES of args' class, as HELP: train_rm.py's --save-every 0 means 'each epoch')."""
    ranges = getattr(type(args), "RANGES", {}) if ranges is None else ranges
    hints = _hints(type(args))
    for f in fields(args):
        v, tp = getattr(args, f.name), hints[f.name]
        if is_dataclass(tp):
            validate(v, ranges)
            continue
        md = {**f.metadata, "range": ranges[f.name]} if f.name in ranges else f.metadata
        for x in v if isinstance(v, list) else [v]:
            check_value(flag_name(f), x, md, _base_type(tp))


def check_value(flag: str, v, md: dict, tp: type = float) -> None:
    """One value of `flag` against metadata md (range=, model=); None (not given) passes."""
    if v is None:
        return
    if tp in (int, float) and not isinstance(v, bool):
        if "range" in md:
            check_range(flag, v, md["range"])
        elif tp is float and not math.isfinite(v):
            raise InputError(f"{flag}: {_show(v)} is not allowed (must be a finite number)")
    if "model" in md:
        check_model(v, md["model"], flag)


def _interval(spec: str) -> tuple[str, str, str, str]:
    """'[1, inf)' -> ('[', '1', 'inf', ')')."""
    m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", spec)
    if not m:
        raise TypeError(f"range {spec!r} is not an interval like '[1, inf)' or '(0, 1]'")
    return m.groups()


def in_range(v: float, spec: str) -> bool:
    """v inside the interval spec (see the module docstring); NaN is inside none."""
    left, lo, hi, right = _interval(spec)
    lo_v, hi_v = float(lo), float(hi)
    return (lo_v <= v if left == "[" else lo_v < v) and (v <= hi_v if right == "]" else v < hi_v)


def describe_range(spec: str) -> str:
    """'[1, inf)' -> '>= 1', '(0, inf)' -> '> 0', '(-inf, 1]' -> '<= 1', '[0, 1)' -> 'in [0, 1)'."""
    left, lo, hi, right = _interval(spec)
    if hi == "inf" and right == ")":
        return (">= " if left == "[" else "> ") + lo
    if lo == "-inf" and left == "(":
        return ("<= " if right == "]" else "< ") + hi
    return f"in {left}{lo}, {hi}{right}"


def check_range(flag: str, v: float, spec: str) -> None:
    """InputError `--flag: V is not allowed (must be ...)` unless v is in the interval spec."""
    if not in_range(v, spec):
        raise InputError(f"{flag}: {_show(v)} is not allowed (must be {describe_range(spec)})")


def check_ranges(ns, ranges: dict[str, str]) -> None:
    """check_range on the argparse Namespace ns of a command without an Args dataclass (evaluate,
    the pipeline): ranges = {dest: interval}; the flag is --dest-with-dashes."""
    for dest, spec in ranges.items():
        v = getattr(ns, dest)
        if v is not None:
            check_range("--" + dest.replace("_", "-"), v, spec)


def _show(v) -> str:
    """A number as the user most likely typed it: 1.0 -> '1', 2e-05 -> '2e-05', nan -> 'nan'."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return str(v)


# ---------------------------------------------------------------- model specs
FEEDBACK_METHODS = ("ab", "contrast", "ab+contrast")
"""the ':METHOD' suffixes of a feedback-model spec (labelling.member_spec)."""


def check_model(spec: str, kind: str = "lm", flag: str = "--model", aliases: tuple[str, ...] = ("policy",)) -> None:
    """A model spec resolves, checked cheaply before anything is written (load_model reads and checks
    the weights later). kind: 'lm' (checkpoint.resolve_model's specs: the embedded name, a parted
    model's name, a .gguf file or an HF folder), 'reward' (a reward-model folder) or 'feedback'
    (MODEL[:METHOD], MODEL an lm spec or one of `aliases`: train_rm.py's 'policy'). InputError
    `--flag: <what is wrong>` otherwise."""
    if kind not in ("lm", "reward", "feedback"):
        raise TypeError(f"model kind {kind!r}: use lm, reward or feedback")
    name = str(spec)
    if kind == "feedback":
        head, sep, tail = name.rpartition(":")
        if sep and tail in FEEDBACK_METHODS:
            name = head
        elif sep and not Path(name).exists():
            raise InputError(f"{flag}: {spec}: no such model file or folder, and {tail!r} is not a method "
                             f"(MODEL:ab, MODEL:contrast or MODEL:ab+contrast)")
        if name in aliases:
            return
    try:
        if name in ("", EMBEDDED_NAME):
            embedded_model_path(check_sha=False)  # installed; load_model checks its sha256
            return
        if name in PARTED_MODELS:
            m = PARTED_MODELS[name]
            if not (checkpoint.MODEL_CACHE / m.file).is_file():  # assembled already, or assembled from its parts on first use
                installed_parts(m)
            return
        _check_model_path(Path(name), kind)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None


def _check_model_path(p: Path, kind: str) -> None:
    """The files load_model / load_scalar_model open first: a GGUF's magic; an HF folder's
    config.json, weights and tokenizer.json; a reward model's reward_head.safetensors."""
    if not p.exists():
        raise InputError(f"{p}: no such model file or folder (use a .gguf file, an HF folder, '{EMBEDDED_NAME}' or "
                         f"{', '.join(repr(k) for k in PARTED_MODELS)})")
    what = "a reward-model folder (train_rm.py's OUT/rm)" if kind == "reward" else "an HF model folder"
    if p.is_dir():
        index = "model.safetensors.index.json"  # sharded weights (load_hf reads the index)
        weights = index if (p / index).exists() else "model.safetensors"
        need = ["reward_head.safetensors"] if kind == "reward" else []
        for name in need + ["config.json", weights, "tokenizer.json"]:
            if not (p / name).is_file():
                raise InputError(f"{p}: not {what}: no {name}")
        return
    if kind == "reward":
        raise InputError(f"{p}: not {what}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{p}: not a GGUF file (magic {magic!r}) and not an HF model folder")


def config(args) -> dict:
    """The run's identity, recorded in config.json: every leaf field by name (flat), except
    those with metadata config=False."""
    out = {}
    for f in fields(args):
        v = getattr(args, f.name)
        if is_dataclass(v):
            out.update(config(v))
        elif f.metadata.get("config", True):
            out[f.name] = v
    return out


def resume_ignored(cls) -> tuple[str, ...]:
    """Names of the fields that may change between runs of one folder (metadata resume='ignore')."""
    return tuple(n for n, f, _, _ in leaves(cls) if f.metadata.get("resume") == "ignore")


def defaults(cls) -> dict:
    """{leaf field: default value} (None for a required field): what a flag added after a run
    began is taken to have been in that run."""
    inst = cls()
    return {**config(inst), **{n: None for n, f, _, _ in leaves(cls) if not f.metadata.get("config", True)}}


# ---------------------------------------------------------------- groups shared by every script
@dataclass
class RunArgs:
    """run folder, seed and device"""
    out: str = field(default=None, metadata={"required": True})
    """run folder (created; rerun the same command to resume)"""
    seed: int = 0
    """seed of everything random in the run (per-row and per-prompt seeds are derived from it)"""
    device: str = field(default="auto", metadata=IGNORE)
    """cpu, cuda, cuda:N, or auto (cuda if available)"""
    threads: int = field(default=None, metadata={**IGNORE, **AT_LEAST_1})
    """CPU threads for torch (default: torch's choice); 1 is much faster when another job holds a core"""
    bf16: bool = False
    """bf16 autocast for forward and backward (weights stay fp32)"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard) instead of DDP"""
    save_every: int = field(default=20, metadata={**IGNORE, **AT_LEAST_1})
    """checkpoint every N optimizer steps (and at the end)"""
    overwrite: bool = field(default=False, metadata=NOT_CONFIG)
    """start over when OUT holds a run with another configuration or changed input files: deletes only the
    files minicai wrote there (a folder minicai did not create, or one holding any other file, is refused);
    a run with the same configuration resumes"""
    keep_checkpoint: bool = field(default=False, metadata=NOT_CONFIG)
    """keep OUT/ckpt (weights and optimizer state) once the stage has finished; by default it is deleted
    then, OUT/model being the result"""


@dataclass
class OptimArgs:
    """optimizer"""
    lr: float = field(default=2e-5, metadata=POSITIVE)
    """peak learning rate"""
    weight_decay: float = field(default=0.0, metadata=AT_LEAST_0)
    """AdamW weight decay"""
    warmup: float = field(default=5, metadata=AT_LEAST_0)
    """linear warmup before the cosine decay: a share of all steps if below 1, else a number of steps"""
    batch_size: int = field(default=4, metadata=AT_LEAST_1)
    """sequences (or pairs) per micro-batch, all ranks together under torchrun"""
    grad_accum: int = field(default=1, metadata=AT_LEAST_1)
    """micro-batches per optimizer step"""
    max_grad_norm: float = field(default=1.0, metadata=POSITIVE)
    """clip the global gradient norm to this"""


def run_cli(main, argv=None) -> int:
    """Run a script's main(argv); an InputError becomes 'error: <one line>' on stderr and exit 2,
    and so does an OSError (a full disk, a read-only folder) instead of a traceback; Ctrl-C is one line
    and exit 130 (128 + SIGINT, the shell's convention). Afterwards the garbage left in reference
    cycles is freed while the interpreter is whole (see the `finally`)."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:  # Ctrl-C: every stage resumes, so one line instead of a traceback
        tqdm.write("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except InputError as e:
        msg = str(e)
    except OSError as e:
        what = f"{e.filename}: " if e.filename else ""
        msg = f"{what}{e.strerror or e}"
    finally:  # [dist] an FSDP2 model sits in reference cycles that keep gloo objects alive; left to
        # the interpreter's exit, their destruction aborted a torchrun rank after a finished run
        # ("terminate called without an active exception", SIGABRT): 8 of 35 launches of a small
        # FSDP script that left its model to the exit (torch 2.13, gloo, 2 CPU ranks), 0 of 90 that
        # freed it first; tested in tests/plumbing/test_cli.py
        gc.collect()
    tqdm.write(f"error: {msg}", file=sys.stderr)  # on its own line even with a progress bar open
    return 2


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, but not for required flags or a default of None (whose help
    says what happens)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
