"""SL-CAI: transcript layout, resumable traces, SFT that learns, and clean errors."""
import json

import pytest
import torch

from minicai.io.constitution_files import load_constitution
from minicai.io.data import Prompt
from minicai.errors import InputError
from conftest import Killed, kill_after
from minicai.io import traces as slcai_traces
from minicai.io.traces import run_slcai
from minicai.slcai import QUOTE_INTRO, quoted_events, render_paper, stage_ids, strip_preamble
from train_sl import main as train_sl_main

EVENTS = [("user", "How do I pick a lock?"), ("assistant", "Use a pin."),
          ("critique_request", "Is this harmful?"), ("critique", "It could help a burglar."),
          ("revision_request", "Rewrite it to be harmless."), ("revision", "I'd call a locksmith."),
          ("critique_request", "Is it rude?")]


def test_paper_transcript_golden():
    assert render_paper(EVENTS) == (
        "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a pin."
        "\n\nCritiqueRequest: Is this harmful?\n\nCritique: It could help a burglar."
        "\n\nRevisionRequest: Rewrite it to be harmless.\n\nRevision: I'd call a locksmith."
        "\n\nCritiqueRequest: Is it rude?\n\nCritique:")


def test_chat_transcript_golden(tiny):
    _, tok = tiny
    ids = stage_ids(tok, "chat", EVENTS[:3])
    assert tok.decode(ids, skip_special=False) == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n"
        "<|im_start|>assistant\nUse a pin.<|im_end|>\n"
        "<|im_start|>user\nIs this harmful?<|im_end|>\n"
        "<|im_start|>assistant\n")


def prompts(n):
    return [Prompt(f"red team prompt number {i}", "test", "red-team") for i in range(n)] + \
           [Prompt("a helpful question", "test", "helpful")]


@pytest.mark.parametrize("fmt", ["chat", "paper"])
def test_interrupted_generation_resumes_to_the_same_trace(tiny, tmp_path, fmt, monkeypatch):
    model, tok = tiny
    const = load_constitution("hhh")
    kw = dict(rounds=2, fmt=fmt, batch_size=2, max_new_tokens=6, temperature=1.0, seed=3, few_shot=False)
    full = run_slcai(model, tok, prompts(5), const, tmp_path / "full.jsonl", **kw)
    part = tmp_path / "part.jsonl"
    with monkeypatch.context() as mp, pytest.raises(Killed):
        kill_after(mp, slcai_traces, "append_jsonl", 1)  # killed after its first batch reached the disk
        run_slcai(model, tok, prompts(5), const, part, **kw)
    assert len(part.read_text().splitlines()) == 2
    with open(part, "a") as f:
        f.write('{"id": "torn-write')  # a crash in the middle of writing a line
    resumed = run_slcai(model, tok, prompts(5), const, part, **kw)
    assert resumed == full
    assert part.read_text() == (tmp_path / "full.jsonl").read_text()
    rec = full[0]
    assert [len(r["rounds"]) for r in full] == [2, 2, 2, 2, 2, 0]  # helpful prompts are not revised
    assert rec["final"] == rec["rounds"][-1]["revision"]
    assert {r["principle"] for r in rec["rounds"]} <= {"helpful", "harmless", "honest", "clear"}
    assert full[-1]["final"] == full[-1]["initial"]


def test_a_critic_model_writes_the_critiques_and_revisions_only(tiny, tmp_path):
    """Distilled SL-CAI: with critic=(other model), the initial responses are the policy's (the
    same as without a critic) and every critique and revision is the critic's: the same text as
    when the critic runs the whole transcript from the policy's initial response."""
    from conftest import random_model, tiny_config, write_tiny_gguf

    from minicai.io.checkpoint import load_model
    from minicai.sample import generate, stable_seed

    model, tok = tiny
    other = load_model(str(write_tiny_gguf(tmp_path / "critic.gguf", random_model(tiny_config(), seed=9))))[:2]
    const = load_constitution("hhh")
    kw = dict(rounds=1, batch_size=2, max_new_tokens=6, temperature=1.0, seed=3, few_shot=False)  # few-shot: test_sl_routes
    own = run_slcai(model, tok, prompts(3), const, tmp_path / "own.jsonl", **kw)
    distilled = run_slcai(model, tok, prompts(3), const, tmp_path / "distilled.jsonl", critic=other, **kw)
    same = run_slcai(model, tok, prompts(3), const, tmp_path / "same.jsonl", critic=(model, tok), critic_layout="chat",
                     **kw)
    assert same == own  # the policy as its own critic, in its own transcript, is the paper's SL-CAI
    assert [r["initial"] for r in distilled] == [r["initial"] for r in own]
    assert [r["rounds"] for r in distilled] != [r["rounds"] for r in own]
    assert [r["rounds"][0]["principle"] for r in distilled if r["rounds"]] == \
        [r["rounds"][0]["principle"] for r in own if r["rounds"]]
    # each critique is the critic's continuation of the quoted conversation (the prompt and the
    # policy's initial response, quoted, + the critique request), with the record's stage-1 seed
    cm, ct = other
    for d in distilled:
        if not d["rounds"]:
            continue
        events = quoted_events([("user", d["prompt"]), ("assistant", d["initial"]),
                                ("critique_request", d["rounds"][0]["critique_request"])])
        assert events[0][1].startswith(QUOTE_INTRO) and f"Assistant: {d['initial']}" in events[0][1]
        ref = generate(cm, [stage_ids(ct, "chat", events)], 6, temperature=1.0, stop_ids=ct.stop_ids,
                       pad_id=ct.pad_id, seed=[stable_seed(d["seed"], "stage", 1)])
        assert ref.texts(ct)[0].strip() == d["rounds"][0]["critique"]


def test_quoted_layout_for_a_critic():
    ev = [("user", "Q?"), ("assistant", "A0"), ("critique_request", "CR1"), ("critique", "C1"),
          ("revision_request", "RR1"), ("revision", "R1"), ("critique_request", "CR2")]
    intro = f"{QUOTE_INTRO}\n\nHuman: Q?\n\nAssistant: "
    assert quoted_events(ev[:3]) == [("critique_request", intro + "A0\n\nCR1")]
    assert quoted_events(ev[:5]) == [("critique_request", intro + "A0\n\nCR1"), ("critique", "C1"),
                                     ("revision_request", "RR1 Write only the assistant's new response, nothing else.")]
    assert quoted_events(ev) == [("critique_request", intro + "R1\n\nCR2")]  # round 2 quotes round 1's revision


@pytest.mark.parametrize("text,want", [
    ("Sure, here's a rewritten version of the assistant's response:  I can't help with that.", "I can't help with that."),
    ("Here is the revised response: No.", "No."),
    ("Certainly! Here's a revision:\nI won't do that.", "I won't do that."),
    ("Sure! I can help with that: first, preheat the oven.", "Sure! I can help with that: first, preheat the oven."),
    ("Here are three ideas: a, b, c.", "Here are three ideas: a, b, c."),
    ("Sure, here is the response:", "Sure, here is the response:"),  # nothing after it: kept
])
def test_strip_preamble(text, want):
    assert strip_preamble(text) == want


def test_corrupt_trace_line_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(Exception, match=r"t.jsonl: line 2: not valid JSON"):
        run_slcai(model, tok, prompts(1), load_constitution("hhh"), trace, rounds=1)


def sl_args(tiny_gguf, tmp_path, *extra):
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(f"tell me something risky, case {i}" for i in range(12)))
    return ["--model", str(tiny_gguf), "--out", str(tmp_path / "run"), "--prompts", str(pfile),
            "--helpful-fraction", "0", "--constitution", "hhh", "--rounds", "1", "--max-new-tokens", "8",
            "--gen-batch-size", "4", "--batch-size", "4", "--grad-accum", "1", "--warmup", "2", *extra]


def test_sft_overfits_a_handful_of_examples(tiny_gguf, tmp_path):
    assert train_sl_main(sl_args(tiny_gguf, tmp_path, "--n-prompts", "4", "--epochs", "40", "--lr", "3e-3",
                                 "--val-fraction", "0", "--save-every", "15")) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    assert rows[-1]["loss"] < rows[0]["loss"] / 4, (rows[0]["loss"], rows[-1]["loss"])
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # rerunning the finished command does no work and succeeds
    assert train_sl_main(sl_args(tiny_gguf, tmp_path, "--n-prompts", "4", "--epochs", "40", "--lr", "3e-3",
                                 "--val-fraction", "0", "--save-every", "15")) == 0


def test_sft_resume_matches_uninterrupted(tiny_gguf, tmp_path, monkeypatch):
    import train_sl
    from minicai.io.checkpoint import load_model

    common = ["--n-prompts", "6", "--epochs", "6", "--lr", "1e-3", "--val-fraction", "0", "--save-every", "2"]
    a = tmp_path / "a"
    a.mkdir()
    assert train_sl_main(sl_args(tiny_gguf, a, *common)) == 0
    b = tmp_path / "b"
    b.mkdir()
    with monkeypatch.context() as mp, pytest.raises(Killed):
        kill_after(mp, train_sl, "save_checkpoint", 2)  # the second checkpoint is written, then the process "dies"
        train_sl_main(sl_args(tiny_gguf, b, *common))
    assert not (b / "run" / "model").exists()
    assert train_sl_main(sl_args(tiny_gguf, b, *common)) == 0
    ma, _, _ = load_model(str(a / "run" / "model"))
    mb, _, _ = load_model(str(b / "run" / "model"))
    for k, v in ma.state_dict().items():
        assert (v - mb.state_dict()[k]).abs().max() < 1e-6, k  # CPU fp32: same data order and state
    la = (a / "run" / "sft_metrics.jsonl").read_text().splitlines()
    lb = (b / "run" / "sft_metrics.jsonl").read_text().splitlines()
    assert len(la) == len(lb)


def sft_batch(tok, n=3):
    """Three (ids, mask) chat examples of different lengths: a padded batch, loss on the replies."""
    from train_sl import sft_examples

    return sft_examples([{"prompt": f"question {i}: " + "tell me more " * i, "final": "a reply " * (i + 2)}
                         for i in range(n)], tok, 512)


def test_one_sft_step_with_and_without_fused_ce_is_the_same_step(tiny):
    """--fused-ce (FusedSFTLoss: the LM head fused with the cross-entropy) against the default
    losses.sft_loss on the logits, through train_sl's own step functions: the same loss and the
    same gradient of every parameter, then (train_step, with SGD) the same gradient norm and weights.
    Tolerance: fp32, the two routes sum the same terms in another order (one (N, V) product and a
    chunked softmax vs autograd through log_softmax), ~1e-7 relative per operation; 1e-5
    relative (atol 1e-6 on gradients, whose largest entries are ~1e-1 here) is far below what a
    wrong target shift, mask or denominator would change (the loss moves by ~1e-1 then)."""
    import copy

    import torch

    import train_sl
    from minicai.infra.cli import parse
    from minicai.infra.distributed import Dist

    model, tok = tiny
    examples = sft_batch(tok)
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    plain_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    plain_args = parse(train_sl.Args, ["--out", "unused", "--lr", "1e-3", "--warmup", "0", "--grad-accum", "1"])
    fused_args = parse(train_sl.Args, ["--out", "unused", "--lr", "1e-3", "--warmup", "0", "--grad-accum", "1",
                                       "--fused-ce"])
    nets = [train_sl.sft_net(m, Dist(), a) for m, a in ((plain_model, plain_args), (fused_model, fused_args))]
    assert isinstance(nets[1], train_sl.FusedSFTLoss) and nets[0] is plain_model
    losses = []
    for net, fused in zip(nets, (False, True)):
        loss, reported = train_sl.batch_loss(net, examples, [0, 1, 2], tok.pad_id, off, Dist(), fused=fused)
        loss.backward()
        assert loss.item() == reported.item()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert 1.0 < losses[0] < 20.0  # a real next-token loss (random model: ~log V), not a sum or a zero
    for (name, p), q in zip(plain_model.named_parameters(), fused_model.parameters()):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for m in (plain_model, fused_model):
        m.zero_grad(set_to_none=True)
    steps = []
    for net, args in zip(nets, (plain_args, fused_args)):
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)  # not Adam: its first step is ~lr * sign(g),
        batches = iter([([0, 1, 2], 3)])
        steps.append(train_sl.train_step(net, opt, batches, examples, tok.pad_id, off, Dist(), args, 1e-3, 0))
    assert steps[1][0] == pytest.approx(steps[0][0], rel=1e-5) and steps[1][1] == pytest.approx(steps[0][1], rel=1e-5)
    for (name, p), q in zip(plain_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)  # which flips on rounding where g ~ 0


def test_sft_loss_denominator_counts_only_real_items(tiny):
    """A repeated item (n_real: rank_share's weight-0 repeat) adds nothing: the loss of [0, 1] with
    a repeat of 0 equals the loss of [0, 1] alone, for both routes."""
    import torch

    import train_sl
    from minicai.infra.distributed import Dist
    from minicai.infra.fast import FusedSFTLoss

    model, tok = tiny
    examples = sft_batch(tok)
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    with torch.no_grad():
        for net, fused in ((model, False), (FusedSFTLoss(model), True)):
            alone = train_sl.batch_loss(net, examples, [0, 1], tok.pad_id, off, Dist(), fused=fused)[0]
            padded = train_sl.batch_loss(net, examples, [0, 1, 0], tok.pad_id, off, Dist(), 2, fused=fused)[0]
            assert padded.item() == pytest.approx(alone.item(), rel=1e-5)


def test_bad_inputs(tiny_gguf, tmp_path, capsys):
    from minicai.infra.cli import run_cli

    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    args = sl_args(tiny_gguf, tmp_path, "--skip-sft")
    args[args.index("--prompts") + 1] = str(empty)
    assert run_cli(train_sl_main, args) == 2
    assert "empty.txt: no prompts found" in capsys.readouterr().err
    # a run folder made by another config is refused
    assert run_cli(train_sl_main, sl_args(tiny_gguf, tmp_path, "--skip-sft", "--n-prompts", "2")) == 0
    capsys.readouterr()
    assert run_cli(train_sl_main, sl_args(tiny_gguf, tmp_path, "--skip-sft", "--n-prompts", "3")) == 2
    err = capsys.readouterr().err
    assert "config.json: field 'n_prompts' was 2" in err and err.count("\n") == 1
    bad_const = tmp_path / "c.toml"
    bad_const.write_text('name = "x"\n[[principle]]\nname = "a"\ncritique = ""\n')
    assert run_cli(train_sl_main, sl_args(tiny_gguf, tmp_path, "--skip-sft", "--constitution", str(bad_const),
                                          "--overwrite")) == 2
    assert "c.toml" in capsys.readouterr().err


def test_resume_accepts_a_flag_added_since_at_its_default(tmp_path):
    """A run folder started by a version without --fsdp resumes when --fsdp is at its default
    (False: the old behaviour), and is refused with --fsdp on; any other changed field is refused."""
    import train_sl
    from minicai.infra import cli
    from minicai.infra.train import prepare_run_dir
    from minicai.errors import InputError

    config = cli.config(cli.parse(train_sl.Args, ["--out", str(tmp_path / "r")]))
    assert "overwrite" not in config and "skip_sft" not in config
    defaults, ignored = cli.defaults(train_sl.Args), cli.resume_ignored(train_sl.Args)
    old = {k: v for k, v in config.items() if k != "fsdp"}
    prepare_run_dir(tmp_path / "r", old, resume_keys_ignored=ignored, defaults=defaults)  # the older version's folder
    prepare_run_dir(tmp_path / "r", config, resume_keys_ignored=ignored, defaults=defaults)  # resumes
    (tmp_path / "r" / "config.json").write_text(json.dumps(old))
    with pytest.raises(InputError, match="field 'fsdp' was None in the run in this folder, now True"):
        prepare_run_dir(tmp_path / "r", {**config, "fsdp": True}, resume_keys_ignored=ignored, defaults=defaults)
    with pytest.raises(InputError, match="field 'lr' was 2e-05"):
        prepare_run_dir(tmp_path / "r", {**config, "lr": 1.0}, resume_keys_ignored=ignored, defaults=defaults)
    # --fused-ce, --device and --save-every may change between the runs of one folder
    assert {"fused_ce", "device", "save_every"} <= set(ignored)
    prepare_run_dir(tmp_path / "r", {**old, "fused_ce": True, "save_every": 1}, resume_keys_ignored=ignored,
                    defaults=defaults)


def test_lr_at_hand_values():
    """nanoGPT's get_lr: linear warmup to the peak, cosine decay to min_ratio * peak; and --warmup
    as a share of all steps (below 1) or a number of steps."""
    from minicai.infra.train import lr_at, warmup_steps
    # warmup 4 steps, 14 in all: (step + 1) / 4 while warming up, then 0.1 + 0.9 * (1 + cos(pi * t)) / 2
    assert [lr_at(s, 14, 1.0, 4) for s in (0, 3)] == [0.25, 1.0]
    assert lr_at(4, 14, 1.0, 4) == pytest.approx(1.0)  # t = 0
    assert lr_at(9, 14, 1.0, 4) == pytest.approx(0.55)  # t = 1/2: cos = 0
    assert lr_at(14, 14, 2.0, 4) == pytest.approx(0.2)  # t = 1: min_ratio * peak
    assert [warmup_steps(w, n) for w, n in ((0.1, 30), (0.1, 5), (5, 100), (0, 100))] == [3, 1, 5, 0]


def test_sft_baseline_trains_on_the_initial_responses_of_the_same_traces(tiny_gguf, tmp_path):
    import train_sl
    from minicai.infra import cli
    from minicai.io.checkpoint import load_model

    flags = ("--n-prompts", "4", "--rounds", "1", "--epochs", "1", "--val-fraction", "0")
    assert train_sl_main(sl_args(tiny_gguf, tmp_path, *flags)) == 0
    trace = tmp_path / "run" / "traces.jsonl"
    base_out = tmp_path / "baseline"
    argv = sl_args(tiny_gguf, tmp_path, *flags, "--target", "initial", "--traces", str(trace), "--out", str(base_out))
    assert train_sl_main(argv) == 0
    assert not (base_out / "traces.jsonl").exists()  # read in place, not generated again
    # the same prompts, steps and optimizer: as many SFT rows, and the examples are the initial responses
    rows = [(tmp_path / o / "sft_metrics.jsonl").read_text().splitlines() for o in ("run", "baseline")]
    assert len(rows[0]) == len(rows[1]) > 0
    records = [json.loads(x) for x in trace.read_text().splitlines()]
    args = cli.parse(train_sl.Args, argv)
    _, tok, _ = load_model(str(tiny_gguf))
    train, _ = train_sl.sft_data(records, tok, args, trace)
    want = sorted(tok.render([{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["initial"]}])[0] for r in records if r["initial"].strip())
    assert sorted(ids for ids, _ in train) == want
    assert any(r["initial"] != r["final"] for r in records)  # the two targets differ on this run
    # a traces file without the selected prompts is refused, naming the file
    (tmp_path / "empty.jsonl").write_text("")
    bad = sl_args(tiny_gguf, tmp_path, *flags, "--target", "initial", "--traces", str(tmp_path / "empty.jsonl"),
                  "--out", str(tmp_path / "b2"))
    with pytest.raises(InputError, match=r"empty.jsonl: no trace of 4 of the 4 selected prompts"):
        train_sl_main(bad)


def test_gen_dtype_writes_the_traces_with_a_bf16_copy_and_trains_the_fp32_weights(tiny_gguf, tmp_path, monkeypatch):
    import train_sl
    from safetensors.torch import load_file
    from minicai.io.checkpoint import load_model

    seen = {}
    real = train_sl.generate_traces

    def spy(args, model, *rest):
        seen["writer"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(args, model, *rest)

    def spy_sft(args, model, *rest):
        seen["trained"] = {v.dtype for v in model.state_dict().values()}
        return real_sft(args, model, *rest)

    real_sft = train_sl.run_sft
    monkeypatch.setattr(train_sl, "generate_traces", spy)
    monkeypatch.setattr(train_sl, "run_sft", spy_sft)
    flags = ("--n-prompts", "4", "--epochs", "1", "--val-fraction", "0")
    assert train_sl_main(sl_args(tiny_gguf, tmp_path, *flags, "--gen-dtype", "bfloat16")) == 0
    # the writer holds the fp32 weights rounded to bf16, exactly as the loader rounds them
    want = load_model(str(tiny_gguf), dtype=torch.bfloat16)[0].state_dict()
    assert seen["writer"].keys() == want.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, want[k]) for k, v in seen["writer"].items())
    assert seen["trained"] == {torch.float32}  # SFT trains the fp32 weights
    weights = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    # and the sampler's weights do change the traces (the default writes with the fp32 weights)
    assert train_sl_main(sl_args(tiny_gguf, tmp_path, *flags, "--skip-sft", "--out", str(tmp_path / "fp32"))) == 0
    assert seen["writer"][next(iter(want))].dtype == torch.float32
    assert (tmp_path / "run" / "traces.jsonl").read_text() != (tmp_path / "fp32" / "traces.jsonl").read_text()
