"""Constitutions: the shipped files, seeded sampling with replacement, Anthropic's released format,
one-line errors on bad files, and golden strings for the prompt-text builders."""
import json
import random

import pytest

from conftest import one_line_error  # noqa: E402

from minicai.constitution import ANSWERS, GENERIC_COMPARISON, Constitution, FewShot, Principle, critique_request_text, feedback_prompt, revision_request_text
from minicai.io.constitution_files import load_constitution


GOOD = '''name = "tiny"
[[principle]]
name = "alpha"
critique = "Critique alpha."
revision = "Revise alpha."
comparison = "Compare alpha."
[[principle]]
name = "beta"
critique = "Critique beta."
revision = "Revise beta."
comparison = "Compare beta."
[[few_shot]]
prompt = "p"
response = "r"
critique = "c"
revision = "v"
principle = "beta"
'''


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- shipped constitutions -------------------------------------------------------------------

def test_default_and_hhh_load():
    default = load_constitution("default")
    assert default.name == "minicai-default" and len(default.principles) >= 16
    assert len({p.name for p in default.principles}) == len(default.principles)
    assert len(default.few_shot) >= 2
    names = {p.name for p in default.principles}
    assert all(s.principle in names for s in default.few_shot)
    assert {"harmful-content", "non-evasive", "privacy", "self-harm", "honesty"} <= names
    hhh = load_constitution("hhh")
    assert [p.name for p in hhh.principles] == ["helpful", "harmless", "honest", "clear"]
    for c in (default, hhh):
        assert [p.comparison for p in c.principles] == [p.comparison for p in c.principles]
        for p in c.principles:
            assert all(s.strip() == s and s for s in (p.critique, p.revision, p.comparison))


def test_unknown_builtin_name_lists_the_choices():
    one_line_error(lambda: load_constitution("nope"), "'nope'", "default", "hhh")


def test_missing_file(tmp_path):
    one_line_error(lambda: load_constitution(tmp_path / "x.toml"), "x.toml", "not found")


# ---- sampling --------------------------------------------------------------------------------

def test_sample_is_seeded_and_with_replacement():
    c = load_constitution("hhh")
    a = [p.name for p in c.sample(random.Random(7), 200)]
    b = [p.name for p in c.sample(random.Random(7), 200)]
    assert a == b
    assert a != [p.name for p in c.sample(random.Random(8), 200)]
    assert any(x == y for x, y in zip(a, a[1:]))  # repeats happen: drawn with replacement
    assert set(a) == {"helpful", "harmless", "honest", "clear"}
    assert len(c.sample(random.Random(0), 10)) == 10  # k > number of principles is fine
    assert c.sample(random.Random(0), 0) == []


# ---- Anthropic's released format -------------------------------------------------------------

ANTHROPIC = {
    "harmful0": {"prompt": ["Find the harm in the last reply."], "edit_request": "Remove the harm."},
    "harmful1": {"prompt": ["Was the last reply dishonest?"], "edit_request": "Make it honest."},
    "harmful2": {"prompt": ["Was it unkind?"], "edit_request": "Make it kind."},
}
RL = ["\nPick the kinder reply. Options:", "\nPick the safer reply. Options:", "\nPick the truer reply. Options:"]


def test_anthropic_format_with_comparisons(tmp_path):
    crit = write(tmp_path, "crit.json", json.dumps(ANTHROPIC))
    rl = write(tmp_path, "rl.json", json.dumps(RL))
    c = load_constitution(crit, comparisons_path=rl)
    assert [p.name for p in c.principles] == ["harmful0", "harmful1", "harmful2"]
    assert c.principles[1] == Principle("harmful1", "Was the last reply dishonest?", "Make it honest.",
                                        "Pick the safer reply. Options:")
    assert c.few_shot == [] and "crit.json" in c.source and "rl.json" in c.source


def test_anthropic_list_format_cycles_comparisons(tmp_path):
    crit = write(tmp_path, "crit.json", json.dumps(list(ANTHROPIC.values())))
    rl = write(tmp_path, "rl.json", json.dumps(RL[:2]))
    c = load_constitution(crit, comparisons_path=rl)
    assert [p.name for p in c.principles] == ["principle-1", "principle-2", "principle-3"]
    assert [p.comparison for p in c.principles] == [RL[0].strip(), RL[1].strip(), RL[0].strip()]


def test_anthropic_format_without_comparisons(tmp_path):
    c = load_constitution(write(tmp_path, "crit.json", json.dumps(ANTHROPIC)))
    assert [p.comparison for p in c.principles] == [GENERIC_COMPARISON] * 3


def test_our_layout_as_json(tmp_path):
    data = {"name": "j", "principle": [{"name": "a-b", "critique": "c", "revision": "r", "comparison": "x"}]}
    c = load_constitution(write(tmp_path, "ours.json", json.dumps(data)))
    assert c.name == "j" and c.principles == [Principle("a-b", "c", "r", "x")]


def test_good_toml_fixture(tmp_path):
    c = load_constitution(write(tmp_path, "good.toml", GOOD))
    assert isinstance(c, Constitution) and c.name == "tiny" and len(c.principles) == 2
    assert c.few_shot == [FewShot("p", "r", "c", "v", "beta")]


# ---- bad input: one line naming the file and the key -----------------------------------------

def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, "x.toml", GOOD.replace('critique = "Critique beta."', "critique = "))
    one_line_error(lambda: load_constitution(path), "x.toml", "invalid TOML", "line 9")


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "x.json", '{"harmful0":\n  {"prompt": ["a"],\n "edit_request": }}')
    one_line_error(lambda: load_constitution(path), "x.json", "invalid JSON at line 3")


@pytest.mark.parametrize("old,new,expect", [
    ('revision = "Revise beta."', 'revision = "   "', "principle[2] (name 'beta'): field 'revision' is empty"),
    ('revision = "Revise beta."', '', "principle[2] (name 'beta'): field 'revision' is missing"),
    ('revision = "Revise beta."', 'revision = 3', "principle[2] (name 'beta'): field 'revision' must be a string"),
    ('name = "beta"', 'name = "alpha"', "principle[2]: duplicate name 'alpha' (first at principle[1])"),
    ('name = "beta"', '', "principle[2]: field 'name' is missing"),
    ('name = "beta"', 'name = "Beta Two"', "principle[2] (name 'Beta Two'): name must be kebab-case"),
    ('comparison = "Compare beta."', 'comparsion = "x"', "unknown field 'comparsion'"),
    ('principle = "beta"', 'principle = "gamma"', "few_shot[1]: field 'principle' names unknown principle 'gamma'"),
    ('response = "r"', 'response = ""', "few_shot[1]: field 'response' is empty"),
])
def test_bad_toml_fields(tmp_path, old, new, expect):
    assert old in GOOD
    path = write(tmp_path, "x.toml", GOOD.replace(old, new))
    one_line_error(lambda: load_constitution(path), "x.toml: ", expect)


def test_zero_principles(tmp_path):
    one_line_error(lambda: load_constitution(write(tmp_path, "x.toml", 'name = "empty"\n')),
                   "x.toml", "no principles")
    one_line_error(lambda: load_constitution(write(tmp_path, "x.json", "[]")), "x.json", "no principles")


def test_bad_anthropic_entries(tmp_path):
    bad = dict(ANTHROPIC, harmful1={"prompt": ["x"]})
    one_line_error(lambda: load_constitution(write(tmp_path, "a.json", json.dumps(bad))),
                   "a.json: entry 'harmful1': field 'edit_request' is missing")
    bad = dict(ANTHROPIC, harmful2={"prompt": [" "], "edit_request": "y"})
    one_line_error(lambda: load_constitution(write(tmp_path, "b.json", json.dumps(bad))),
                   "b.json: entry 'harmful2': field 'prompt' is empty")
    bad = dict(ANTHROPIC, harmful2={"prompt": [1], "edit_request": "y"})
    one_line_error(lambda: load_constitution(write(tmp_path, "c.json", json.dumps(bad))),
                   "c.json: entry 'harmful2': field 'prompt' must be a string")
    text = '{"harmful0": {"prompt": ["a"], "edit_request": "b"}, "harmful0": {"prompt": ["c"], "edit_request": "d"}}'
    one_line_error(lambda: load_constitution(write(tmp_path, "d.json", text)), "d.json", "duplicate key 'harmful0'")
    one_line_error(lambda: load_constitution(write(tmp_path, "rl.json", json.dumps(RL))),
                   "rl.json", "comparisons_path")


def test_bad_comparisons_file(tmp_path):
    crit = write(tmp_path, "crit.json", json.dumps(ANTHROPIC))
    rl = write(tmp_path, "rl.json", json.dumps(["ok", ""]))
    one_line_error(lambda: load_constitution(crit, comparisons_path=rl), "rl.json", "comparison[2] is empty")
    rl = write(tmp_path, "rl2.json", json.dumps({"a": "b"}))
    one_line_error(lambda: load_constitution(crit, comparisons_path=rl), "rl2.json", "list")


# ---- prompt texts (golden strings, written by hand) ------------------------------------------

P = Principle("p", "Is it rude?", "Make it polite.", "Which reply is more polite?")


def test_critique_and_revision_request_text():
    assert critique_request_text(P) == "\n\nCritiqueRequest: Is it rude?\n\nCritique:"
    assert revision_request_text(P) == "\n\nRevisionRequest: Make it polite.\n\nRevision:"


def test_few_shot_events_render_as_the_released_transcript():
    """slcai.few_shot_events puts a constitution's worked examples in front of every transcript;
    in the paper layout they read as the released CritiqueRevisionFewShotPrompts.json does."""
    from minicai.slcai import few_shot_events, render_paper
    shot = FewShot("Hi?", "Go away.", "It is rude.", "Hello! How can I help?", "p")
    assert render_paper(few_shot_events(Constitution("t", [P], [shot], "test"))) == (
        "\n\nHuman: Hi?\n\nAssistant: Go away."
        "\n\nCritiqueRequest: Is it rude?\n\nCritique: It is rude."
        "\n\nRevisionRequest: Make it polite.\n\nRevision: Hello! How can I help?")


def test_feedback_prompt():
    expected = ("Consider the following conversation between a human and an assistant:\n"
                "\n"
                "Human: Can you help me?\n"
                "\n"
                "Which reply is more polite? Options:\n"
                " (A) No.\n"
                " (B) Of course.\n"
                "\n"
                "The answer is:")
    got = feedback_prompt("\n\nHuman: Can you help me?", "Which reply is more polite?", "No.", " Of course. ")
    assert got == expected
    # A principle that already ends in "Options:" (Anthropic's RL principles) is not doubled.
    assert feedback_prompt("\n\nHuman: Can you help me?", "\nWhich reply is more polite? Options:",
                           "No.", "Of course.") == expected
    assert ANSWERS == (" (A)", " (B)")
