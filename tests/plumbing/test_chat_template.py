"""Each shipped model's conversations render exactly as its own chat template renders them (HF
transformers' Jinja renderer, the test venv's `hf` extra), default system line included: Qwen2.5's
template inserts "You are Qwen, ..." when a conversation has none, and a teacher prompted without it
sees another prompt than the one it was tuned on (issue 25, item 5)."""
import copy
import functools

import pytest

from minicai.io.checkpoint import MODEL_CACHE, PARTED_MODELS, installed_parts, load_tokenizer
from minicai.io.tokenizer import chat_format_from_template
from minicai.errors import InputError

CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "How do I pick a lock?"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
]


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    return load_tokenizer(name)[0]


def hf_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    cu = pytest.importorskip("transformers.utils.chat_template_utils")
    return cu.render_jinja_template(conversations=[messages], chat_template=template,
                                    add_generation_prompt=add_generation_prompt)[0][0]


def qwen_installed() -> bool:
    m = PARTED_MODELS["qwen2.5-coder-1.5b"]
    if (MODEL_CACHE / m.file).is_file():
        return True
    try:
        return bool(installed_parts(m))
    except InputError:
        return False


def shipped_models() -> list:
    return ["smollm2-135m", pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.skipif(
        not qwen_installed(), reason="the 1.5B model's 22 parts are not installed (the README main command installs them)"))]


@pytest.mark.parametrize("name", shipped_models())
@pytest.mark.parametrize("messages,gen", CONVERSATIONS)
def test_render_matches_the_models_own_template(name, messages, gen):
    tok = tokenizer(name)
    assert tok.chat.default_system  # both shipped models' templates have one
    want = hf_render(tok.chat_template, messages, gen)
    ids, _ = tok.render(messages, add_generation_prompt=gen)
    assert tok.decode(ids, skip_special=False) == want
    assert ids == tok.encode(want)


QWEN_LIKE = (  # our own template in the shape of Qwen2.5's: a system turn built from messages first
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'Default line.' }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Testy, a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_the_default_system_line_is_the_literal_one_not_a_templated_one():
    fmt = chat_format_from_template(QWEN_LIKE)
    assert fmt.kind == "chatml" and fmt.default_system == "You are Testy, a helpful assistant."


def test_a_qwen_shaped_template_renders_as_hf_renders_it(tiny):
    tok = copy.copy(tiny[1])  # the fixture is shared: change a copy's format only
    tok.chat = chat_format_from_template(QWEN_LIKE)
    for messages, gen in CONVERSATIONS:
        assert tok.decode(tok.render(messages, add_generation_prompt=gen)[0], skip_special=False) == \
            hf_render(QWEN_LIKE, messages, gen)
