"""The two SL routes of issue 25: few-shot critique/revision requests (route revise) and context
distillation with best-of-k (route distill); and that no training path reads the yardstick."""
import ast
from pathlib import Path

import pytest
import torch

from minicai import slcai
from minicai.constitution import Constitution, FewShot, Principle
from minicai.io.data import Prompt
from minicai.errors import InputError

P1 = Principle("harm", "CRIT-REQ-HARM", "REV-REQ-HARM", "cmp")
SHOT = FewShot("SHOT-PROMPT", "SHOT-RESPONSE", "SHOT-CRITIQUE", "SHOT-REVISION", "harm")
CONST = Constitution("t", [P1], [SHOT], "test")
PROMPTS = [Prompt("red one", "test", "red-team"), Prompt("red two", "test", "red-team"),
           Prompt("a helpful question", "test", "helpful")]


class Recorder:
    """Stands in for sample.generate: records the text each row was asked to continue (prefix + row,
    decoded) and answers with a fixed text per call."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, model, ids, max_new_tokens, *, prefix=None, **kw):
        texts = [self.tok.decode((prefix or []) + row, skip_special=False) for row in ids]
        self.calls.append((model, texts))
        self.prefixes = getattr(self, "prefixes", []) + [len(prefix or [])]
        answer = f"ANSWER{len(self.calls)}"

        class Gen:
            def texts(_, tok):
                return [answer] * len(ids)
        return Gen()


@pytest.mark.parametrize("layout", ["own", "quoted"])
def test_few_shot_examples_are_in_every_critique_and_revision_request_only(tiny, monkeypatch, layout):
    model, tok = tiny
    rec = Recorder(tok)
    monkeypatch.setattr(slcai, "generate", rec)
    critic = (model, tok) if layout == "quoted" else None
    out = [r for b in slcai.traces(model, tok, PROMPTS, CONST, rounds=2, batch_size=8, critic=critic) for r in b]
    stages = [texts for _, texts in rec.calls]
    assert len(stages) == 1 + 2 * 2  # the initial response, then critique + revision twice
    assert all("SHOT-" not in t for t in stages[0])  # the initial response is the policy's own
    for texts in stages[1:]:
        assert len(texts) == 2  # the red-team prompts only
        for t in texts:
            assert all(x in t for x in ("SHOT-PROMPT", "SHOT-RESPONSE", "SHOT-CRITIQUE", "SHOT-REVISION"))
            assert t.index("SHOT-REVISION") < t.index("red ")  # in front of the conversation
    # the fast path: the few-shot block is prefilled once per batch in every critique/revision call
    assert rec.prefixes[0] == 0 and all(n > 0 for n in rec.prefixes[1:]) and len(set(rec.prefixes[1:])) == 1
    assert all("CRIT-REQ-HARM" in t for t in stages[1] + stages[3])
    assert all("REV-REQ-HARM" in t for t in stages[2] + stages[4])
    # the SFT target is the last revision itself: no few-shot text reaches it
    assert [r["final"] for r in out] == ["ANSWER5", "ANSWER5", "ANSWER1"]
    off = Recorder(tok)
    monkeypatch.setattr(slcai, "generate", off)
    list(slcai.traces(model, tok, PROMPTS, CONST, rounds=1, critic=critic, few_shot=False))
    assert all("SHOT-" not in t for _, texts in off.calls for t in texts)


def test_generation_with_a_shared_prefix_is_the_same_as_with_the_whole_prompt(tiny):
    """generate(prefix=C) against its twin, generate on [C + p]: same tokens, same log-probs."""
    from minicai.sample import generate

    model, tok = tiny
    ctx = slcai.distill_context(CONST)
    pre = tok.render(ctx)[0]
    full = [tok.render(ctx + [{"role": "user", "content": q}], add_generation_prompt=True)[0]
            for q in ("red one", "a much longer helpful question here")]
    shared, rows = slcai.shared_prefix(full, pre)
    assert shared == pre and [pre + r for r in rows] == full
    for temp, n in ((0.0, 1), (1.0, 2)):
        a = generate(model, full, 8, temperature=temp, n=n, seed=[4, 5], pad_id=tok.pad_id)
        b = generate(model, rows, 8, temperature=temp, n=n, seed=[4, 5], pad_id=tok.pad_id, prefix=pre)
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert slcai.shared_prefix([[1, 2], [1, 3]], [1, 2]) == (None, [[1, 2], [1, 3]])  # a row with nothing after it


def test_context_distillation_trains_on_the_answer_without_its_context(tiny, monkeypatch):
    """The teacher sees system line + few-shot exchanges + the prompt; SFT's tokens are the prompt
    and the kept answer alone (token-level: train_sl.sft_examples)."""
    from train_sl import sft_examples

    model, tok = tiny
    rec = Recorder(tok)
    monkeypatch.setattr(slcai, "generate", rec)
    out = [r for b in slcai.distill(model, tok, PROMPTS, CONST, teacher=(model, tok)) for r in b]
    (_, policy_rows), (_, teacher_rows) = rec.calls
    assert all("SHOT-" not in t and slcai.DISTILL_SYSTEM not in t for t in policy_rows)
    assert all("SHOT-PROMPT" in t and "SHOT-REVISION" in t and slcai.DISTILL_SYSTEM in t for t in teacher_rows)
    assert "SHOT-RESPONSE" not in teacher_rows[0]  # the exchange shows the revised answer only
    assert [r["initial"] for r in out] == ["ANSWER1"] * 3 and [r["final"] for r in out] == ["ANSWER2"] * 3
    for r, (ids, mask) in zip(out, sft_examples(out, tok, 512)):
        want = tok.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "ANSWER2"}])
        assert (ids, mask) == want
        text = tok.decode(ids, skip_special=False)
        assert "SHOT" not in text and slcai.DISTILL_SYSTEM not in text
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "ANSWER2"  # the loss is on the answer only


def test_best_of_k_keeps_the_labellers_choice():
    """A stub labeller that prefers the longer text: every candidate plays every other once."""
    seen = []

    def prefer(pairs):
        seen.extend(pairs)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for _, a, b in pairs]

    items = [("q1", ["aa", "aaaa", "a"]), ("q2", ["x", "x"]), ("q3", ["only"])]
    (i1, s1), (i2, s2), (i3, s3) = slcai.best_of_k(items, prefer)
    assert (i1, s1) == (1, [0.5, 1.0, 0.0])  # hand count: 1 win of 2, 2 of 2, 0 of 2
    assert (i2, s2) == (0, [0.5, 0.5])  # identical texts are not judged: a tie, the first kept
    assert (i3, s3) == (0, [1.0])
    assert seen == [("Human: q1", "aa", "aaaa"), ("Human: q1", "aa", "a"), ("Human: q1", "aaaa", "a")]
    with pytest.raises(InputError, match="labels for"):
        slcai.best_of_k(items, lambda pairs: [])


def test_distill_with_best_of_k_records_the_labellers_pick(tiny):
    model, tok = tiny
    pick_last = lambda pairs: [0.0] * len(pairs)  # noqa: E731  b always better: the last candidate wins
    out = [r for b in slcai.distill(model, tok, PROMPTS[:2], CONST, k=3, prefer=pick_last, max_new_tokens=6,
                                    temperature=1.0) for r in b]
    distinct = [r for r in out if len(set(r["candidates"])) == 3]
    assert distinct, "temperature 1.0 should give distinct candidates; the check below would be empty"
    for r in out:
        assert len(r["candidates"]) == 3
        assert r["final"] == r["candidates"][r["chosen"]]
    for r in distinct:
        assert r["chosen"] == 2 and r["final"] == r["candidates"][2]
    with pytest.raises(InputError, match="needs a labeller"):
        next(slcai.distill(model, tok, PROMPTS, CONST, k=2))


TRAINING_ENTRIES = ["train_sl.py", "train_rm.py", "train_ppo.py", "train_dpo.py"]
ROOT = Path(__file__).resolve().parents[2]
YARDSTICK = ROOT / "minicai" / "eval" / "yardstick.py"
assert YARDSTICK.is_file()


def minicai_imports(path: Path) -> set[Path]:
    """The minicai files `path` imports, at any depth in the file (function-level imports too)."""
    pkg = path.parent
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                anchor = pkg
                for _ in range(node.level - 1):
                    anchor = anchor.parent
                base = ".".join(anchor.relative_to(ROOT).parts + ((base,) if base else ()))
            mods = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            f = ROOT.joinpath(*m.split("."))
            for cand in (f.with_suffix(".py"), f / "__init__.py"):
                if m.split(".")[0] in ("minicai", "train_sl", "train_rm", "train_ppo", "train_dpo") and cand.is_file():
                    out.add(cand)
    return out


def reaches(start: Path, target: Path) -> list[Path] | None:
    """An import chain from `start` to `target` (breadth first), or None."""
    seen, todo = {start: None}, [start]
    while todo:
        f = todo.pop(0)
        if f == target:
            chain = []
            while f is not None:
                chain.append(f)
                f = seen[f]
            return chain[::-1]
        for g in sorted(minicai_imports(f)):
            if g not in seen:
                seen[g] = f
                todo.append(g)
    return None


@pytest.mark.parametrize("entry", TRAINING_ENTRIES)
def test_no_training_path_imports_the_yardstick(entry):
    """The measuring stick never trains: nothing a training script imports, directly or through
    other modules (function-level imports too), is eval/yardstick.py (the refusal detectors:
    is_refusal_strict, outcome, garak's list), so no training data can be chosen, filtered or
    weighted by them."""
    chain = reaches(ROOT / entry, YARDSTICK)
    assert chain is None, " -> ".join(str(c.relative_to(ROOT)) for c in chain)


def test_the_no_yardstick_check_can_fail():
    """The same walk finds the evaluation's own path to the yardstick."""
    chain = reaches(ROOT / "minicai" / "eval" / "evaluate.py", YARDSTICK)
    assert chain is not None and chain[-1] == YARDSTICK


def test_few_shot_is_on_by_default_and_can_be_turned_off():
    from minicai.infra import cli
    from train_sl import Args

    assert cli.parse(Args, ["--out", "x"]).few_shot is True
    assert cli.parse(Args, ["--out", "x", "--no-few-shot"]).few_shot is False
    args = cli.parse(Args, ["--out", "x", "--route", "distill", "--best-of", "3"])
    assert (args.route, args.best_of) == ("distill", 3)
    with pytest.raises(InputError, match=r"--best-of: 0 is not allowed \(must be in \[1, 16\]\)"):
        cli.parse(Args, ["--out", "x", "--best-of", "0"])
