"""Pieces every training script shares (the loops themselves live in train_sl.py, train_rm.py,
train_ppo.py): the learning-rate schedule, length-bucketed batches, right-padding collation,
crash-safe training state (safetensors + JSON, never pickle), a metrics log, and a NaN guard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from contextlib import nullcontext
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..io.checkpoint import save_hf, sha256_of
from ..io.files import append_text, atomic_write_json, read_jsonl, write_jsonl
from . import cli, distributed
from .devices import resolve_device


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to min_ratio * peak at `total`
    (the nanoGPT get_lr schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_steps(warmup: float, total: int) -> int:
    """--warmup as a number of steps: a share of all `total` steps if below 1 (at least 1 step),
    else a number of steps; 0 = none."""
    if warmup <= 0:
        return 0
    return max(1, round(warmup * total)) if warmup < 1 else int(warmup)


def length_buckets(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding): shuffle, sort within windows of
    50 batches by length, cut into batches, shuffle the batch order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy; on CUDA from pinned memory without blocking the host."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    """Stop training on a NaN or inf with a clear error; the last good checkpoint is untouched
    because checkpoints are written atomically and only after a finite step."""
    if not torch.isfinite(value).all():
        raise InputError(f"{what} became {value.flatten()[0].item()} at step {step}: training stopped; "
                         f"the last good checkpoint is kept (lower --lr, or check the data)")


class MetricsLog:
    """Append one JSON object per line to metrics.jsonl (flushed at once so a crash loses nothing).
    On resume, lines from steps after the resumed step are dropped first (the file is replaced
    atomically), and so is a torn last line (a write cut off by a full disk or a power cut)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            hint = "; delete it or pass --overwrite"
            keep = []
            for n, row in read_jsonl(self.path, "drop", hint, numbered=True):
                step = row.get("step", 0)
                if not isinstance(step, (int, float)):
                    raise InputError(f"{self.path}: line {n}: not a metrics row{hint}")
                if step <= resume_step:
                    keep.append(row)
            write_jsonl(self.path, keep)
        elif self.path.exists():
            self.path.unlink()

    def write(self, **row) -> None:
        append_text(self.path, json.dumps(row) + "\n")


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None,
                     state: dict | None = None) -> None:
    """Optimizer moments as safetensors and the scalars as JSON (torch.save would pickle).
    Written into the checkpoint folder before it is renamed into place (see save_hf).
    state: an optimizer state dict to write instead of optimizer.state_dict() (FSDP gathers a
    full one first: distributed.full_optimizer_state)."""
    folder = Path(folder)
    sd = optimizer.state_dict() if state is None else state
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}::{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}::{k}"] = v
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(folder / "train_state.json", {"step": step, "param_groups": sd["param_groups"],
                                                    "scalars": scalars, **(extra or {})})


def save_checkpoint(folder: Path, model, tok, optimizer, step: int, meta: dict, d, fsdp: bool = False,
                    with_state: bool = True, extra: dict | None = None, heads: dict | None = None) -> None:
    """Write an HF-format checkpoint of a trained Transformer (plus the optimizer state when
    with_state), from rank 0, after checking that every weight is finite: a weight that went NaN
    or inf (say, a huge --lr) must not replace the last good checkpoint, and every rank checks the
    same weights, so all of them stop together. fsdp: the weights and the optimizer state are
    gathered into full tensors first (collectives: every rank calls this). d: distributed.Dist.
    extra: scalars stored beside the optimizer state (train_state.json). heads: scalar heads saved
    beside the trunk (save_hf), checked too (not with fsdp)."""
    state = distributed.full_state_dict(model, d) if fsdp else None
    weights = list(state.values()) if state is not None else list(model.parameters())
    weights += [w for h in (heads or {}).values() for w in h.parameters()]
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise InputError(f"a weight became NaN or inf by step {step}: training stopped; the last good "
                         f"checkpoint is kept (lower --lr, or check the data)")
    ostate = distributed.full_optimizer_state(model, optimizer, d) if fsdp and with_state else None
    if d.main:
        save_hf(folder, model, tok, heads=heads, meta=meta, state=state,
                extra=(lambda tmp: save_train_state(tmp, optimizer, step, extra, ostate)) if with_state else None)
    distributed.barrier(d)


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer, apply=None) -> dict:
    """Restore what save_train_state wrote; returns the JSON (with 'step'). apply(state_dict), if
    given, loads the optimizer state instead of optimizer.load_state_dict (FSDP re-shards it)."""
    folder = Path(folder)
    path = folder / "train_state.json"

    def cannot(e):
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        return InputError(f"{path}: cannot resume from this checkpoint: {reason}; pass --overwrite to start over")

    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except Exception as e:  # OSError, bad JSON, and safetensors' own error type
        raise cannot(e) from None

    def key(pid: str):
        return int(pid) if pid.isdigit() else pid  # optimizer ids, or parameter names (FSDP)

    state: dict = {}
    try:  # a state written by another run or edited by hand: one line, not a traceback
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("'step' is missing or not an integer")
        for k, v in tensors.items():
            if k == "torch_rng":
                torch.set_rng_state(v)
                continue
            pid, name = k.split("::", 1)
            state.setdefault(key(pid), {})[name] = v
        for k, v in meta["scalars"].items():
            pid, name = k.split("::", 1)
            state.setdefault(key(pid), {})[name] = v
        sd = {"state": state, "param_groups": meta["param_groups"]}
        (apply or optimizer.load_state_dict)(sd)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise cannot(e) from None
    return meta


def start(run, dtype: str = "float32"):
    """A script's first lines, from its cli.RunArgs: torch's CPU threads (--threads), the device
    and the weight dtype (devices.resolve_device), the process group under torchrun. Returns
    (device, dtype, d): this rank's device, a torch dtype, a distributed.Dist."""
    if run.threads:
        torch.set_num_threads(run.threads)
    device, dt = resolve_device(run.device, dtype)
    d = distributed.init(device)
    return distributed.rank_device(device, d), dt, d


def open_run(args, cls, d) -> Path:
    """Rank 0 makes or checks the run folder args.run.out (prepare_run_dir with the config
    dataclass cls: its config, resume-ignored fields and defaults); every rank waits. Returns it."""
    out = Path(args.run.out)
    if d.main:
        prepare_run_dir(out, cli.config(args), args.run.overwrite, cli.resume_ignored(cls), defaults=cli.defaults(cls))
    distributed.barrier(d)
    return out


def bf16_autocast(device: torch.device, on: bool):
    """A context factory: bf16 autocast on `device` (--bf16; the weights stay fp32), else nothing."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if on else nullcontext


def adamw_resumed(net, model, optim, ckpt: Path, resuming: bool, d, fsdp: bool = False, betas=(0.9, 0.999),
                  what: str = "training", total: int | None = None):
    """AdamW over net's parameters (fused: one kernel, HF Trainer's default on torch >= 2.8; FSDP's
    sharded DTensor parameters take the default implementation), with its state and step restored
    from ckpt when resuming (FSDP re-shards the full state: distributed.load_full_optimizer_state).
    optim: a cli.OptimArgs; what, total: for the 'resuming WHAT at step S/TOTAL' line. Returns
    (optimizer, step)."""
    opt = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, betas=betas,
                            fused=not fsdp)
    if not resuming:
        return opt, 0
    apply = (lambda sd: distributed.load_full_optimizer_state(model, opt, sd)) if fsdp else None
    step = load_train_state(ckpt, opt, apply)["step"]
    if d.main:
        print(f"resuming {what} at step {step}/{total} from {ckpt}")
    return opt, step


def drop_checkpoint(ckpt: Path, keep: bool) -> None:
    """The end of a finished stage: delete its resumable checkpoint OUT/ckpt (the weights again plus
    the optimizer's two moments: 2.1 GB for the 135M model) unless --keep-checkpoint; OUT/model and
    the stage's summary, written before this, are what the next stage and a rerun need."""
    if not keep and Path(ckpt).is_dir():
        shutil.rmtree(ckpt)


def save_final(save, model, ckpt: Path, out: Path, step: int) -> None:
    """The end of training: save(folder, step, with_state) to the resumable checkpoint (with the
    optimizer state) and to OUT/model (weights only)."""
    model.eval()
    save(ckpt, step, True)
    save(out / "model", step, False)


MARKER = ".minicai-run"
"""The file prepare_run_dir puts in a run folder it creates (or finds empty): the folder is minicai's.
--overwrite deletes nothing in a folder without it."""
OWN_OUTPUTS = ("config.json", MARKER, "model", "ckpt", "rm", "traces.jsonl", "traces.rank*.jsonl",
               "preferences.jsonl", "preferences.dropped.jsonl", "preferences.rank*.jsonl", "metrics.jsonl",
               "sft_metrics.jsonl", "dpo_metrics.jsonl", "summary.json", "sft_summary.json", "dpo_summary.json",
               "ppo_summary.json", "ref_logprobs.safetensors")
"""The names the training scripts (and the ablations' work folders) write at the top of a run folder,
and their temporaries '.NAME.*' (atomic writes, checkpoint.save_hf's .NAME.tmpXXXX and .NAME.old);
tests/plumbing/test_run_folder.py runs every script and checks that this list covers what it wrote.
--overwrite deletes these and nothing else."""
HASHED_UP_TO = 64 << 20
"""Input files up to this size are identified by their sha256; larger ones (a model's GGUF) and
folders (a model checkpoint) by the name, size and mtime of each file (file_stamp)."""


def file_stamp(path: Path) -> str:
    """A cheap identity of a large file or a folder: sha256 over (name, size, mtime_ns) of the file or
    of each file in the folder. A retrained model folder gets a new one; a moved folder keeps it."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "stamp:" + h.hexdigest()


def input_digests(config: dict) -> dict[str, str]:
    """{field: identity of the input} for every config value (or list item) naming an existing file or
    folder: a file's sha256 (file_stamp beyond HASHED_UP_TO), a folder's file_stamp. A prompts,
    preferences or traces file edited, or a policy retrained, between two runs of one folder is then
    refused on resume instead of mixing old and new records; a path written another way (relative,
    from another folder, a moved run) to the same input is the same input."""
    out = {}
    for k, v in sorted(config.items()):
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            if not isinstance(item, str) or not item or k == "out":
                continue
            p = Path(item).expanduser()
            key = f"{k}[{i}]" if isinstance(v, list) else k
            if p.is_file():
                out[key] = sha256_of(p) if p.stat().st_size <= HASHED_UP_TO else file_stamp(p)
            elif p.is_dir():
                out[key] = file_stamp(p)
    return out


def is_own_output(name: str) -> bool:
    """A name minicai writes at the top of a run folder (OWN_OUTPUTS) or a temporary of one."""
    return any(fnmatch(name, pat) or fnmatch(name, f".{pat}.*") for pat in OWN_OUTPUTS)


def foreign_entries(out: Path) -> list[str]:
    """Names at the top of `out` that minicai does not write there (is_own_output), sorted."""
    return sorted(p.name for p in out.iterdir() if not is_own_output(p.name))


def clear_own_outputs(out: Path) -> None:
    """--overwrite: delete what minicai wrote in `out`, only if the folder carries minicai's MARKER and
    holds nothing else (foreign_entries): a folder with any file minicai did not write, or one it did
    not create, is refused in one line and left exactly as it is. config.json goes last, so that a
    deletion cut short leaves a folder that is still refused (not resumed) under the new config."""
    if not (out / MARKER).is_file():
        raise InputError(f"{out}: --overwrite refused: this folder has no {MARKER} file (minicai puts one in every "
                         f"run folder it creates), so nothing in it is deleted; use another --out, or delete it "
                         f"yourself")
    foreign = foreign_entries(out)
    if foreign:
        raise InputError(f"{out}: --overwrite refused: '{foreign[0]}' was not written by minicai"
                         f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; nothing was deleted; "
                         f"move it away or use another --out")
    for p in sorted(out.iterdir(), key=lambda p: p.name == "config.json"):
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def config_difference(old: dict, config: dict, old_digests: dict, digests: dict, ignored,
                      defaults: dict | None) -> str | None:
    """Why the run in a folder (its config.json: old, old_digests) is not this run (config, digests),
    or None: the first differing field, then the first input whose content changed. A field naming
    an input (in both digests) is compared by the input's identity, not by how its path is written;
    keys in `ignored` may differ; a field the old config lacks is accepted at its default."""
    def same(key: str, a, b) -> bool:  # equal values, or both naming an input (compared below)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(f"{key}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b)))
        return a == b or (key in old_digests and key in digests)

    for k in sorted(set(old) | set(config)):
        if k in ignored or k == "out":
            continue
        if k not in old and defaults is not None and k in defaults and config.get(k) == defaults[k]:
            continue  # a flag added since this run began, at its default
        if not same(k, old.get(k), config.get(k)):
            return (f"field '{k}' was {old.get(k)!r} in the run in this folder, now {config.get(k)!r}; "
                    f"use another --out or pass --overwrite to start over")
    for k in sorted(set(old_digests) | set(digests)):
        field_ = k.split("[")[0]
        if field_ in ignored or old_digests.get(k) == digests.get(k):
            continue
        what = "file" if Path(str(config_item(config, k) or "")).is_file() else "input"
        return (f"--{field_.replace('_', '-')} {config_item(config, k)}: the {what} changed since the run in "
                f"this folder began ({'its sha256 differs' if what == 'file' else 'another file or folder'}); "
                f"restore it, use another --out, or pass --overwrite to start over")
    return None


def prepare_run_dir(out: Path, config: dict, overwrite: bool = False, resume_keys_ignored=("device", "dtype"),
                    defaults: dict | None = None) -> Path:
    """Create `out` and record the config in out/config.json. A folder made by a different config
    is refused (one line naming the first differing field: config_difference) unless overwrite is
    set, so a resumed run never mixes two configurations. Keys in resume_keys_ignored may differ
    between runs. defaults (cli.defaults(Args)): a field that the folder's config lacks (the run was
    started by a version without it) is accepted at its default value.

    The run is the folder, wherever it is and however it is named ('out' itself is not compared),
    plus the identity of every input (input_digests). overwrite deletes only a run with another
    configuration or other inputs, and only what minicai wrote (clear_own_outputs); an identical run
    resumes. A non-empty folder that is not a run of minicai's is refused: the run's files would land
    among the user's."""
    out = Path(out)
    path = out / "config.json"
    config = {**config, "out": str(out.resolve())}
    digests = input_digests(config)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            why = None if isinstance(old, dict) else "unreadable (not a JSON object); pass --overwrite to start over"
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
            old, why = None, f"unreadable ({e}); pass --overwrite to start over"
        if why is None:
            old_digests = old.pop("input_sha256", None) or {}
            why = config_difference(old, config, old_digests, digests, resume_keys_ignored, defaults)
        if why is not None and not overwrite:
            raise InputError(f"{path}: {why}")
        if why is not None:
            clear_own_outputs(out)
        elif overwrite:
            print(f"{out}: the run in this folder has the same configuration and inputs: resuming it "
                  f"(--overwrite deletes only a run with another configuration)")
    elif out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"{out}: not empty and not a minicai run folder ('{sorted(os.listdir(out))[0]}' is there); "
                         f"use a new or empty --out")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MARKER, {"written_by": "minicai", "note": "this folder and the files minicai "
                                         "wrote in it may be deleted by --overwrite; nothing else is"})
    recover_checkpoints(out)
    atomic_write_json(path, {**config, "input_sha256": digests})
    return out


def config_item(config: dict, key: str):
    """input_digests' key ('prompts[1]' or 'traces') -> the value it names."""
    if "[" in key:
        name, i = key[:-1].split("[")
        return config.get(name, [None] * (int(i) + 1))[int(i)]
    return config.get(key)


def recover_checkpoints(out: Path) -> None:
    """Undo what a process killed inside checkpoint.save_hf can leave in a run folder (save_hf
    writes .NAME.tmpXXXX, then renames NAME to .NAME.old and the temporary folder to NAME):
    a .NAME.old without NAME is the last complete checkpoint and is renamed back; a .NAME.old
    beside NAME and any .NAME.tmp* folder are leftovers and are deleted (each can be as big as
    the model)."""
    for p in sorted(Path(out).iterdir()):
        if not p.name.startswith("."):
            continue
        if p.is_dir() and p.name.endswith(".old") and (p / "config.json").exists():
            target = p.with_name(p.name[1:-len(".old")])
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.replace(target)
        elif p.is_dir() and ".tmp" in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(".tmp"):  # io/files.atomic_write_bytes' temporary file
            p.unlink(missing_ok=True)
