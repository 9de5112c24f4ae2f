"""Tokenizer from GGUF metadata, chat formats, and rendering to (ids, mask)."""
import pytest

from minicai.io.tokenizer import ChatFormat, chat_format_from_template, tokenizer_from_gguf, transcript
from minicai.errors import InputError


def test_roundtrip_and_digits(tiny):
    _, tok = tiny
    for text in ["the cat in the hat", "héllo wörld ✓ 🙂", "  spaces\n\nand\ttabs", "2024-11-23"]:
        assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("12345")
    assert len(digits) == 5  # digits are split one by one before byte-level BPE
    assert tok.encode(" the") == [tok.tk.token_to_id("Ġthe")]  # merges apply
    assert tok.encode("<|im_end|>") == [2]  # control tokens are single special tokens


def test_chatml_render_golden_and_mask(tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    ids, mask = tok.render(msgs, add_generation_prompt=True)
    golden = ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
              "<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert tok.decode(ids, skip_special=False) == golden
    assert ids == tok.encode(golden)  # piecewise encoding equals encoding the whole string
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained, skip_special=False) == "Hello!<|im_end|>"
    assert len(ids) == len(mask)
    # an explicit system message replaces the template's default
    ids2, _ = tok.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert tok.decode(ids2, skip_special=False) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_render_rejects_bad_messages(tiny):
    _, tok = tiny
    with pytest.raises(InputError, match="message 0"):
        tok.render([{"role": "robot", "content": "x"}])


def test_chat_format_detection():
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
            "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    f = chat_format_from_template(smol)
    assert f.kind == "chatml" and f.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # a ChatML template whose system block is the message itself has no default
    plain_chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
    assert chat_format_from_template(plain_chatml) == ChatFormat("chatml", None)
    assert chat_format_from_template("<|start_header_id|>{{ role }}<|end_header_id|>").kind == "llama3"
    assert chat_format_from_template(None).kind == "plain"
    with pytest.raises(InputError, match="chat template"):
        chat_format_from_template("[INST] {{ content }} [/INST]")


def test_paper_transcript_golden():
    t = transcript([("user", "How do I pick a lock?"), ("assistant", "I can't help with that.")])
    assert t == "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."


def test_gguf_tokenizer_errors():
    with pytest.raises(InputError, match="x.gguf: tokenizer.ggml.model = 'llama'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"}, "x.gguf")
    with pytest.raises(InputError, match="tokenizer.ggml.merges is missing"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")


# ------------------------------------------------------------------------------ Qwen2's pre-tokenizer

def gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (Radford et al. 2019, encoder.py bytes_to_unicode),
    written out here so the test does not ask the library under test: printable Latin-1 bytes map
    to themselves, the other 68 bytes to chr(256 + k) in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    table, k = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + k)
            k += 1
    return table


def byte_level(piece: str) -> str:
    t = gpt2_byte_symbols()
    return "".join(t[b] for b in piece.encode("utf-8"))


def qwen2_tokenizer():
    from conftest import tiny_vocab

    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.pre": "qwen2"}
    return tokenizer_from_gguf(meta), tokens


@pytest.mark.parametrize("text, pieces", [
    # contractions (case-insensitive), one digit at a time, a lone space before digits, newlines
    ("I'm 123 years\n\nold", ["I", "'m", " ", "1", "2", "3", " years", "\n\n", "old"]),
    ("DON'T, she'll say", ["DON", "'T", ",", " she", "'ll", " say"]),
    # CJK letters are letters: a leading space stays on the run; punctuation keeps its newline
    ("\u4f60\u597d \u4e16\u754c!\n", ["\u4f60\u597d", " \u4e16\u754c", "!\n"]),
    # runs of spaces: all but the last space before a word stand alone (\s+(?!\S))
    ("a   b", ["a", "  ", " b"]),
    ("x2024y", ["x", "2", "0", "2", "4", "y"]),
    ("end.\n\n  next", ["end", ".\n\n", " ", " next"]),
])
def test_qwen2_pre_tokenizer_against_hand_splits(text, pieces):
    tok, _ = qwen2_tokenizer()
    got = [p for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str(text)]
    assert got == [byte_level(p) for p in pieces]


def test_qwen2_tokenizer_ids_on_a_small_vocabulary():
    tok, tokens = qwen2_tokenizer()
    idx = {t: i for i, t in enumerate(tokens)}
    # " the 12": pieces " the", " ", "1", "2"; the merges Ġ+t, h+e, Ġt+he make " the" one token
    assert tok.encode(" the 12") == [idx["\u0120the"], idx["\u0120"], idx["1"], idx["2"]]
    assert tok.decode(tok.encode("I'm 123 \u4f60\u597d\n")) == "I'm 123 \u4f60\u597d\n"


def test_unknown_pre_tokenizer_is_one_line():
    from conftest import one_line_error
    from minicai.io.tokenizer import pre_tokenizer_for

    one_line_error(lambda: pre_tokenizer_for("llama-bpe", "x.gguf"), "x.gguf", "llama-bpe", "qwen2")
