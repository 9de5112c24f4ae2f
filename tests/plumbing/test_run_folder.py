"""Run folders (the fresh-machine issue): --overwrite deletes only what minicai wrote, a run is its
folder (not the string typed for --out) plus the content of its input files, Ctrl-C is one line,
files follow the umask, and a finished stage drops its optimizer state.

Each dangerous layout is built by hand, the command is run through its command-line entry point
(cli.run_cli), and every file the user owns is checked byte for byte afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sl  # noqa: E402
from minicai.infra import train  # noqa: E402
from minicai.io import files as io_files  # noqa: E402
from minicai.infra.train import MARKER, foreign_entries, prepare_run_dir  # noqa: E402
from minicai.infra.cli import run_cli


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (what must survive, byte for byte)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sl_argv(gguf: Path, prompts: Path, out, *extra: str) -> list[str]:
    """train_sl.py on the tiny model: 2 prompts, 1 round, 2 new tokens, 1 SFT step."""
    return ["--model", str(gguf), "--out", str(out), "--prompts", str(prompts), "--helpful-fraction", "0",
            "--constitution", "hhh", "--rounds", "1", "--max-new-tokens", "2", "--gen-batch-size", "2",
            "--n-prompts", "2", "--batch-size", "2", "--grad-accum", "1", "--epochs", "1", "--warmup", "0",
            "--val-fraction", "0", "--device", "cpu", *extra]


@pytest.fixture
def env(tmp_path, tiny_gguf):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"tell me something risky, case {i}" for i in range(8)) + "\n")
    return tiny_gguf, prompts


OUT: list[str] = []
"""stdout of the last run()."""


def run(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a command through its entry point; its stdout goes to OUT[0]."""
    code = run_cli(main, argv)
    cap = capsys.readouterr()
    OUT[:] = [cap.out]
    return code, cap.err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------ --overwrite
def test_overwrite_never_deletes_a_folder_minicai_did_not_create(env, tmp_path, capsys):
    """The measured case: a folder holding someone's src/thesis.txt and an unrelated config.json."""
    gguf, prompts = env
    mine = tmp_path / "thesis"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "thesis.txt").write_text("three years of work\n")
    (mine / "config.json").write_text('{"lr": 1}\n')
    before = tree(mine)
    code, err = run(train_sl.main, sl_argv(gguf, prompts, mine, "--overwrite"), capsys)
    assert code == 2
    line = one_error_line(err)
    assert line == (f"error: {mine}: --overwrite refused: this folder has no .minicai-run file (minicai puts one in "
                    f"every run folder it creates), so nothing in it is deleted; use another --out, or delete it "
                    f"yourself")
    assert tree(mine) == before


def test_overwrite_refuses_a_minicai_run_holding_a_foreign_file(env, tmp_path, capsys):
    gguf, prompts = env
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft"), capsys)[0] == 0
    assert (out / MARKER).is_file()
    (out / "my_notes.md").write_text("notes\n")
    (out / "data").mkdir()
    (out / "data" / "keep.jsonl").write_text("{}\n")
    before = tree(out)
    code, err = run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft", "--seed", "1", "--overwrite"), capsys)
    assert code == 2
    assert one_error_line(err) == (f"error: {out}: --overwrite refused: 'data' was not written by minicai "
                                   f"(and 1 more); nothing was deleted; move it away or use another --out")
    assert tree(out) == before


def test_overwrite_replaces_a_run_with_another_config(env, tmp_path, capsys):
    gguf, prompts = env
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft"), capsys)[0] == 0
    (out / "traces.rank7.jsonl").write_text("{}\n")  # a leftover of ours: deleted with the rest
    code, err = run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft", "--seed", "1"), capsys)
    assert code == 2 and "field 'seed' was 0" in one_error_line(err)
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft", "--seed", "1", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert not (out / "traces.rank7.jsonl").exists() and (out / MARKER).is_file()


def test_overwrite_with_the_same_config_resumes_and_deletes_nothing(env, tmp_path, capsys):
    gguf, prompts = env
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft"), capsys)[0] == 0
    before = tree(out)
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft", "--overwrite"), capsys)[0] == 0
    assert "same configuration and inputs: resuming it" in OUT[0]
    assert tree(out).keys() == before.keys()
    assert tree(out)["traces.jsonl"] == before["traces.jsonl"]


def test_a_non_empty_folder_that_is_not_a_run_is_refused_untouched(env, tmp_path, capsys):
    gguf, prompts = env
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    before = tree(mine)
    code, err = run(train_sl.main, sl_argv(gguf, prompts, mine), capsys)
    assert code == 2
    assert one_error_line(err) == (f"error: {mine}: not empty and not a minicai run folder ('photo.jpg' is there); "
                                   f"use a new or empty --out")
    assert tree(mine) == before and sorted(os.listdir(mine)) == ["photo.jpg"]


def test_clear_own_outputs_by_hand():
    """The rule on its own: names from OWN_OUTPUTS go, anything else stops the deletion."""
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        out = Path(t)
        for name in ("config.json", MARKER, "sft_summary.json", "dpo_metrics.jsonl", ".model.tmpab12", ".model.old",
                     ".config.json.x1y2.tmp"):
            (out / name).write_text("x")
        for name in ("model", "ckpt", "rm"):
            (out / name).mkdir()
            (out / name / "weights.bin").write_text("x")
        assert foreign_entries(out) == []
        (out / "thesis.txt").write_text("mine")
        (out / "model.bak").mkdir()
        for name in ("my_summary.json", ".notes.old", "old_metrics.jsonl"):  # near misses of our names
            (out / name).write_text("mine")
        assert foreign_entries(out) == [".notes.old", "model.bak", "my_summary.json", "old_metrics.jsonl", "thesis.txt"]
        with pytest.raises(io_files.InputError, match="'.notes.old' was not written by minicai \\(and 4 more\\)"):
            train.clear_own_outputs(out)
        assert (out / "model" / "weights.bin").exists() and (out / "thesis.txt").read_text() == "mine"
        for name in ("thesis.txt", "my_summary.json", ".notes.old", "old_metrics.jsonl"):
            (out / name).unlink()
        shutil.rmtree(out / "model.bak")
        train.clear_own_outputs(out)
        assert sorted(os.listdir(out)) == [MARKER]


# ------------------------------------------------------------------------ resume by folder and inputs
def test_resume_through_another_spelling_or_a_moved_folder(env, tmp_path, capsys, monkeypatch):
    """The same run reached as an absolute path, with a trailing slash, from another working folder,
    and after the folder was moved: resumed, not refused."""
    gguf, prompts = env
    monkeypatch.chdir(tmp_path)
    assert run(train_sl.main, sl_argv(gguf, prompts, "runs/sl_tiny", "--skip-sft"), capsys)[0] == 0
    traces = (tmp_path / "runs/sl_tiny/traces.jsonl").read_bytes()
    for spelling in (str(tmp_path / "runs/sl_tiny"), "runs/sl_tiny/", "./runs/../runs/sl_tiny"):
        code, err = run(train_sl.main, sl_argv(gguf, prompts, spelling, "--skip-sft"), capsys)
        assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run(train_sl.main, sl_argv(gguf, prompts, "../runs/sl_tiny", "--skip-sft"), capsys)[0] == 0
    shutil.move(tmp_path / "runs/sl_tiny", tmp_path / "moved")
    assert run(train_sl.main, sl_argv(gguf, prompts, tmp_path / "moved", "--skip-sft"), capsys)[0] == 0
    assert (tmp_path / "moved/traces.jsonl").read_bytes() == traces


def test_an_edited_prompts_file_is_refused_on_resume(env, tmp_path, capsys):
    """The measured case: the prompts file edited between two runs of one command mixed old and new
    records in traces.jsonl. Now the second run is refused, naming the file, and nothing changes."""
    gguf, prompts = env
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft"), capsys)[0] == 0
    prompts.write_text("\n".join(f"a different risky request {i}" for i in range(8)) + "\n")
    before = tree(out)
    code, err = run(train_sl.main, sl_argv(gguf, prompts, out, "--skip-sft"), capsys)
    assert code == 2
    assert one_error_line(err) == (f"error: {out / 'config.json'}: --prompts {prompts}: the file changed since "
                                   f"the run in this folder began (its sha256 differs); restore it, use another "
                                   f"--out, or pass --overwrite to start over")
    assert tree(out) == before


def test_input_digests_hash_files_and_stamp_folders(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"abc")
    digests = train.input_digests({"prompts": [str(f), "builtin-red-team"], "policy": str(tmp_path), "lr": 1.0,
                                   "traces": str(f)})
    sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc"), FIPS 180-2
    assert digests == {"prompts[0]": sha_abc, "traces": sha_abc, "policy": train.file_stamp(tmp_path)}  # by hand above


def test_a_folder_of_an_older_version_resumes_without_a_marker(tmp_path):
    """Run folders written before the marker existed still resume (and --overwrite refuses them)."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"out": "runs/old", "lr": 1.0}))
    (out / "traces.jsonl").write_text("{}\n")
    prepare_run_dir(out, {"lr": 1.0})
    assert (out / "traces.jsonl").read_text() == "{}\n"
    with pytest.raises(io_files.InputError, match="has no .minicai-run file"):
        prepare_run_dir(out, {"lr": 2.0}, overwrite=True)
    assert (out / "traces.jsonl").read_text() == "{}\n"


# --------------------------------------------------------------------------------- Ctrl-C, umask
def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    code = run_cli(main, [])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == "interrupted; rerun the same command to resume"


def test_outputs_follow_the_umask(env, tmp_path, capsys, monkeypatch):
    """Files written atomically and checkpoint folders get open()'s and mkdir()'s modes under the
    process umask (here 022: 0644 and 0755), not tempfile's 0600 / 0700."""
    gguf, prompts = env
    monkeypatch.setattr(io_files, "UMASK", 0o022)
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out), capsys)[0] == 0
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out / "config.json") == 0o644
    assert mode(out / "sft_summary.json") == 0o644
    assert mode(out / "model") == 0o755
    monkeypatch.setattr(io_files, "UMASK", 0o077)
    io_files.atomic_write_text(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600


# ------------------------------------------------------------------ a finished stage's checkpoint
def test_finished_sft_drops_its_optimizer_state_unless_asked(env, tmp_path, capsys):
    gguf, prompts = env
    out = tmp_path / "run"
    assert run(train_sl.main, sl_argv(gguf, prompts, out, "--save-every", "1"), capsys)[0] == 0
    assert (out / "model" / "config.json").is_file() and not (out / "ckpt").exists()
    assert run(train_sl.main, sl_argv(gguf, prompts, out), capsys)[0] == 0  # done: nothing retrained
    assert "SFT already done" in OUT[0] and not (out / "ckpt").exists()
    kept = tmp_path / "kept"
    assert run(train_sl.main, sl_argv(gguf, prompts, kept, "--keep-checkpoint"), capsys)[0] == 0
    assert (kept / "ckpt" / "optimizer.safetensors").is_file()


# ------------------------------------------------------ OWN_OUTPUTS covers what every script writes
def test_own_outputs_cover_every_file_the_scripts_write(env, tmp_path, capsys):
    """Run each training script to the end (and keep its checkpoint) on the tiny model: every entry it
    left at the top of its run folder is one --overwrite may delete (train.OWN_OUTPUTS), so a stage's
    own output never blocks a legitimate --overwrite."""
    gguf, prompts = env
    sl = tmp_path / "sl"
    assert run(train_sl.main, sl_argv(gguf, prompts, sl, "--keep-checkpoint", "--save-every", "1"), capsys)[0] == 0
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"question {i}: what about the cat?",
                                         "response_a": f"zebra {i} and the mat", "response_b": f"the old red barn {i}",
                                         "p_a": 1.0 if i % 2 else 0.0}) + "\n" for i in range(8)))
    rm = tmp_path / "rm"
    assert run(train_rm.main, ["--policy", str(gguf), "--out", str(rm), "--preferences", str(prefs), "--epochs", "1",
                               "--batch-size", "4", "--device", "cpu", "--keep-checkpoint"], capsys)[0] == 0
    dpo = tmp_path / "dpo"
    assert run(train_dpo.main, ["--policy", str(gguf), "--out", str(dpo), "--preferences", str(prefs), "--epochs", "1",
                                "--batch-size", "4", "--device", "cpu", "--keep-checkpoint", "--save-every", "1"],
               capsys)[0] == 0
    ppo = tmp_path / "ppo"
    assert run(train_ppo.main, ["--policy", str(gguf), "--out", str(ppo), "--reward-model", str(rm / "rm"),
                                "--prompts", str(prompts), "--iterations", "1", "--batch-size", "2",
                                "--max-new-tokens", "2", "--device", "cpu", "--keep-checkpoint"], capsys)[0] == 0
    for folder in (sl, rm, dpo, ppo):
        assert (folder / MARKER).is_file()
        assert foreign_entries(folder) == [], (folder, foreign_entries(folder))
    assert (sl / "ckpt").is_dir() and (dpo / "ckpt").is_dir() and (ppo / "ckpt").is_dir()
    # a finished PPO run rerun without its checkpoint: done, not trained again from iteration 0
    shutil.rmtree(ppo / "ckpt")
    metrics = (ppo / "metrics.jsonl").read_bytes()
    assert run(train_ppo.main, ["--policy", str(gguf), "--out", str(ppo), "--reward-model", str(rm / "rm"),
                                "--prompts", str(prompts), "--iterations", "1", "--batch-size", "2",
                                "--max-new-tokens", "2", "--device", "cpu"], capsys)[0] == 0
    assert f"PPO already done: {ppo / 'model'}" in OUT[0] and (ppo / "metrics.jsonl").read_bytes() == metrics


def test_inputs_are_compared_by_identity_not_by_how_the_path_is_written(tmp_path, monkeypatch):
    """A prompts file and a policy folder reached through other relative paths from another working
    folder are the same inputs; a named source swapped in a list, or a retrained policy (its files'
    size or mtime), is another run."""
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("a prompt\n")
    Path("pol").mkdir()
    Path("pol/model.safetensors").write_bytes(b"weights")
    out = tmp_path / "run"
    prepare_run_dir(out, {"prompts": ["p.txt", "builtin-red-team"], "policy": "pol", "lr": 1.0})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prepare_run_dir(out, {"prompts": ["../p.txt", "builtin-red-team"], "policy": "../pol", "lr": 1.0})
    with pytest.raises(io_files.InputError, match="field 'prompts' was \\['../p.txt', 'builtin-red-team'\\] in the run in "
                                               "this folder, now \\['../p.txt', 'builtin-helpful'\\]"):
        prepare_run_dir(out, {"prompts": ["../p.txt", "builtin-helpful"], "policy": "../pol", "lr": 1.0})
    st = os.stat("../pol/model.safetensors")
    os.utime("../pol/model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained: a new file
    with pytest.raises(io_files.InputError) as e:
        prepare_run_dir(out, {"prompts": ["../p.txt", "builtin-red-team"], "policy": "../pol", "lr": 1.0})
    assert str(e.value) == (f"{out / 'config.json'}: --policy ../pol: the input changed since the run in this folder "
                            f"began (another file or folder); restore it, use another --out, or pass --overwrite to "
                            f"start over")


def test_file_stamp_by_hand(tmp_path):
    """file_stamp = sha256 over 'name\\0size\\0mtime_ns\\n' per file, written out here by hand."""
    import hashlib

    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "w.bin"
    f.write_bytes(b"12345")
    os.utime(f, ns=(10**18, 1234567890123456789))
    want = hashlib.sha256(b"w.bin\x005\x001234567890123456789\n").hexdigest()
    assert train.file_stamp(tmp_path / "m") == "stamp:" + want
    assert train.file_stamp(f) == "stamp:" + want


def test_the_umask_is_read_from_the_process(tmp_path):
    """A fresh process under umask 027 writes its files 0640: the real umask, read at import (the test
    above patches files.UMASK)."""
    import subprocess

    code = ("import stat, sys; from pathlib import Path; from minicai.io import files; p = Path(sys.argv[1]); "
            "files.atomic_write_text(p / 'f.txt', 'x'); print(oct(files.UMASK), oct(stat.S_IMODE((p / 'f.txt').stat().st_mode)))")
    r = subprocess.run(["bash", "-c", f"umask 027 && {sys.executable} -c \"{code}\" {tmp_path}"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0o27", "0o640"]
