"""Tokenizer and chat rendering.

The BPE itself is the `tokenizers` library, built either from a GGUF's tokenizer.ggml.* arrays or
from an HF tokenizer.json. The chat format is read off the checkpoint's own chat template (we do
not run Jinja): ChatML (SmolLM2, Qwen2.5) and Llama-3 headers are recognised; a checkpoint with no
template falls back to the paper's plain "Human: ... Assistant: ..." transcript.

`render(messages)` returns (ids, mask) where mask marks the assistant tokens to train on
(the reply and its end-of-turn marker; never the role header), as in nanochat.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import InputError, first_line

# GGUF token types (llama.cpp llama_token_type): 3 = control, 4 = user-defined.
_SPECIAL_TYPES = (3, 4)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer split (its tokenizer.json "Split" pattern, behaviour "Isolated"), which
llama.cpp keeps as the original of its LLAMA_VOCAB_PRE_TYPE_QWEN2 regex
(https://github.com/ggml-org/llama.cpp/blob/master/src/llama-vocab.cpp, case LLAMA_VOCAB_PRE_TYPE_QWEN2):
contractions, a letter run with at most one leading non-letter, ONE digit at a time, punctuation
runs with their newlines, newline runs, then spaces. Byte-level mapping follows, without its own
regex."""


def pre_tokenizer_for(pre: str, path: str = "<gguf>"):
    """The `tokenizers` pre-tokenizer for a GGUF's tokenizer.ggml.pre:
    - smollm / gpt2 / default / starcoder / refact: digits split one by one, then GPT-2 byte-level
      with its own regex and no prefix space (SmolLM2's tokenizer.json);
    - qwen2: QWEN2_SPLIT (isolated), then byte-level without the regex (Qwen2 / Qwen2.5's tokenizer.json)."""
    if pre in ("smollm", "default", "gpt2", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise InputError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported (known: smollm, gpt2, qwen2)")


@dataclass
class ChatFormat:
    """How a conversation becomes text. kind: 'chatml' | 'llama3' | 'plain'."""

    kind: str
    default_system: str | None = None
    """System message the template inserts when the conversation has none (SmolLM2 and Qwen2.5 do)."""

    def header(self, role: str) -> str:
        if self.kind == "chatml":
            return f"<|im_start|>{role}\n"
        if self.kind == "llama3":
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        return {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}[role]

    def end(self) -> str:
        """End-of-turn marker; part of the trained assistant tokens so the model learns to stop."""
        return {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": ""}[self.kind]

    def separator(self) -> str:
        """Text after the end marker that is not trained on."""
        return "\n" if self.kind == "chatml" else ""

    def prefix(self) -> str:
        return "<|begin_of_text|>" if self.kind == "llama3" else ""


def chat_format_from_template(template: str | None) -> ChatFormat:
    """Recognise the chat format in a Jinja chat template string, and its default system prompt."""
    if not template:
        return ChatFormat("plain")
    if "<|im_start|>" in template:
        # the first system turn written as literal text (Qwen2.5's template first has one built from
        # messages[0], then its default "You are Qwen, ..." when there is no system message)
        found = (m.group(1) for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S))
        default = next((t for t in found if "message" not in t and "{" not in t and "'" not in t), None)
        return ChatFormat("chatml", default)
    if "<|start_header_id|>" in template:
        return ChatFormat("llama3")
    raise InputError(f"chat template: unrecognised format (not ChatML or Llama-3): {template[:60]!r}...")


def transcript(turns: list[tuple[str, str]]) -> str:
    """The paper's raw transcript: "\\n\\nHuman: ...\\n\\nAssistant: ..." (Bai et al. 2022, §3.1 and
    the released prompts). turns: list of (role, text) with role 'user' / 'assistant' / free label."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(r, r)}: {t}" for r, t in turns)


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the ids and chat format the rest of minicai needs."""

    def __init__(self, tk: Tokenizer, eos_id: int, pad_id: int | None, chat: ChatFormat,
                 chat_template: str | None = None, bos_id: int | None = None):
        self.tk, self.eos_id, self.chat = tk, eos_id, chat
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        # Ids that end an assistant turn: eos and the format's end marker.
        stops = {eos_id}
        if chat.end():
            end_id = tk.token_to_id(chat.end())
            if end_id is not None:
                stops.add(end_id)
        self.stop_ids = sorted(stops)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               use_default_system: bool = True) -> tuple[list[int], list[int]]:
        """Render a conversation [{"role", "content"}, ...] in the checkpoint's chat format.
        Returns (ids, mask): mask[i] = 1 for assistant reply tokens and their end marker.
        add_generation_prompt appends the assistant header so the model writes the next turn."""
        fmt = self.chat
        ids: list[int] = []
        mask: list[int] = []

        def add(text: str, train: bool):
            if text:
                t = self.encode(text)
                ids.extend(t)
                mask.extend([int(train)] * len(t))

        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise InputError(f"message {i}: needs role system/user/assistant and a string content, got {m!r}"[:200])
        add(fmt.prefix(), False)
        if (use_default_system and fmt.default_system is not None
                and (not messages or messages[0]["role"] != "system")):
            messages = [{"role": "system", "content": fmt.default_system}] + list(messages)
        for m in messages:
            role, content = m["role"], m["content"]
            is_asst = role == "assistant"
            if fmt.kind == "plain" and role == "system":
                add(content, False)
                continue
            add(fmt.header(role), False)
            add(content, is_asst)
            add(fmt.end(), is_asst)
            add(fmt.separator(), False)
        if add_generation_prompt:
            add(fmt.header("assistant"), False)
        return ids, mask

    def to_json(self) -> str:
        return self.tk.to_str()


def tokenizer_from_gguf(meta: dict, path: str = "<gguf>") -> ChatTokenizer:
    """Build the byte-level BPE from tokenizer.ggml.{tokens,merges,token_type} (model 'gpt2'), with
    the pre-tokenizer that tokenizer.ggml.pre names (pre_tokenizer_for: 'smollm' for SmolLM2,
    'qwen2' for Qwen2 / Qwen2.5)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise InputError(f"{path}: tokenizer.ggml.model = {model!r}: only byte-level BPE ('gpt2') is supported")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        if key not in meta:
            raise InputError(f"{path}: metadata key {key} is missing")
    tokens = meta["tokenizer.ggml.tokens"]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not isinstance(meta[key], list) or not all(isinstance(t, str) for t in meta[key]):
            raise InputError(f"{path}: metadata key {key} is not an array of strings")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for m in meta["tokenizer.ggml.merges"]:
        a, sep, b = m.partition(" ")
        if not sep:
            raise InputError(f"{path}: tokenizer.ggml.merges: malformed merge {m!r:.60}")
        merges.append((a, b))
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the tokenizers library raises its own Exception subclass (e.g. a merge not in the vocabulary)
        raise InputError(f"{path}: tokenizer.ggml.merges: {(str(e).splitlines() or [repr(e)])[0]}") from None

    def token_id(key, required=False):
        v = meta.get(key)
        if v is None and not required:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
            raise InputError(f"{path}: metadata key {key} = {v!r:.40} is not a token id (0..{len(tokens) - 1})")
        return v

    eos, pad, bos = (token_id("tokenizer.ggml.eos_token_id", True), token_id("tokenizer.ggml.padding_token_id"),
                     token_id("tokenizer.ggml.bos_token_id"))
    tk.pre_tokenizer = pre_tokenizer_for(meta.get("tokenizer.ggml.pre", "default"), path)
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not isinstance(types, list):
        raise InputError(f"{path}: metadata key tokenizer.ggml.token_type is not an array")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TYPES]
    tk.add_special_tokens(special)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise InputError(f"{path}: metadata key tokenizer.chat_template is not a string")
    return ChatTokenizer(tk, eos, pad, chat_format_from_template(template), template, bos)


def tokenizer_from_hf(folder) -> ChatTokenizer:
    """tokenizer.json + tokenizer_config.json (chat_template, eos_token, pad_token) of an HF folder."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise InputError(f"{tj}: file not found (an HF model folder needs tokenizer.json)")
    try:
        tk = Tokenizer.from_file(str(tj))
    except Exception as e:  # the tokenizers library raises its own Exception subclass
        raise InputError(f"{tj}: cannot parse: {first_line(e)}") from None
    cfg = {}
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        try:
            cfg = json.loads(tc.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"{tc}: invalid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{tc}: expected a JSON object")

    def tok_id(field):
        v = cfg.get(field)
        if isinstance(v, dict):
            v = v.get("content")
        return tk.token_to_id(v) if isinstance(v, str) else None

    eos = tok_id("eos_token")
    if eos is None:
        gen = folder / "config.json"
        try:
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.exists() else None
        except (ValueError, RecursionError, AttributeError):  # load_hf has read config.json already; defensive
            eos = None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)
                                or not 0 <= eos < tk.get_vocab_size(with_added_tokens=True)):
            raise InputError(f"{gen}: eos_token_id = {eos!r:.40} is not a token id")
    if eos is None:
        raise InputError(f"{tc}: eos_token: missing, and config.json has no eos_token_id")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise InputError(f"{tc}: chat_template is not a string")
    return ChatTokenizer(tk, eos, tok_id("pad_token"), chat_format_from_template(template), template, tok_id("bos_token"))


def tokenizer_config_json(tok: ChatTokenizer) -> dict:
    """The tokenizer_config.json we write beside tokenizer.json (read by us and by HF)."""
    name = lambda i: tok.tk.id_to_token(i) if i is not None else None  # noqa: E731
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(tok.eos_id),
           "pad_token": name(tok.pad_id), "bos_token": name(tok.bos_id), "add_bos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return cfg
