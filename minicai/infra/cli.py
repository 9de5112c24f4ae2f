"""Command lines built from config dataclasses (CleanRL's `Args`, without tyro).

A script declares one dataclass whose fields are its flags, each with a default and a docstring
(the string literal under the field, read from the source: it becomes the flag's --help line).
Fields whose type is itself a dataclass are groups of shared flags (RunArgs, OptimArgs below),
named the same in every script; their fields become flags of the same name, with no prefix.

    args = cli.parse(Args, argv, description=__doc__)   # an Args instance
    config = cli.config(args)                            # flat dict for the run folder's config.json
    cli.resume_ignored(Args)                             # fields that may change between resumes

Field metadata (dataclasses.field(metadata=...)):
    required=True        the flag must be given
    choices=(...)        allowed values
    repeat=True          list field: the flag is repeatable (action="append"); default None
    resume="ignore"      may differ when a run folder is resumed (device, threads, how often to save)
    config=False         not part of the run's identity at all (--overwrite)
    flag="--name"        the flag's name when it is not the field's name with '-' for '_'
A script's Args may set a class attribute HELP = {field: text} to say what a shared field means
there (PPO's --batch-size counts prompts, not sequences).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass, field, fields, is_dataclass

IGNORE = {"resume": "ignore"}
"""metadata of a field that may change between the runs of one folder."""
NOT_CONFIG = {"config": False}
"""metadata of a field that is not recorded in config.json."""


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
            flag = md.get("flag", "--" + f.name.replace("_", "-"))
            kw = dict(dest=f.name, help=docs.get(f.name, "") + ("" if md.get("required") else
                                                                  f" (default: {default})" if default is not None and default is not False else ""))
            base = _base_type(tp)
            if base is bool and not md.get("repeat"):
                kw.update(action="store_true", default=bool(default))
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


def parse(cls, argv=None, description: str | None = None, prog: str | None = None):
    """argv (None = sys.argv[1:]) -> a cls instance."""
    return from_namespace(cls, build_parser(cls, description, prog).parse_args(argv))


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
    threads: int = field(default=None, metadata=IGNORE)
    """CPU threads for torch (default: torch's choice); 1 is much faster when another job holds a core"""
    bf16: bool = False
    """bf16 autocast for forward and backward (weights stay fp32)"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard) instead of DDP"""
    save_every: int = field(default=20, metadata=IGNORE)
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
    lr: float = 2e-5
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup: float = 5
    """linear warmup before the cosine decay: a share of all steps if below 1, else a number of steps"""
    batch_size: int = 4
    """sequences (or pairs) per micro-batch, all ranks together under torchrun"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
