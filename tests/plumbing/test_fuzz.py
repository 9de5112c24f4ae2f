"""Fuzzed loaders (issue 8): mutated GGUF and safetensors bytes, TOML/JSON constitutions, JSONL /
CSV / TXT prompt files, preference and trace files. Whatever the bytes, only
minicai.errors.InputError (one line) may escape: never another exception, a hang, or a huge
allocation from a forged length or size field.

Every example runs under a guard: a SIGALRM deadline (a hang fails the example instead of hanging
the suite) and, on Linux, an address-space cap (RLIMIT_AS) of 1 GiB above what the process
already uses, so a loader that trusts a forged length and allocates from it fails with
MemoryError instead of passing.

The default suite runs 200 derandomized examples per target; the same targets with many more
examples are marked slow (.ci/run runs them after the default suite).
"""
from __future__ import annotations

import json
import resource
import signal
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # in the dev extra (pyproject.toml)
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import random_model, tiny_config, write_tiny_gguf  # noqa: E402
from minicai.io import gguf  # noqa: E402
from minicai.io.checkpoint import _load_safetensors, load_model, save_hf  # noqa: E402
from minicai.io.constitution_files import load_constitution  # noqa: E402
from minicai.io.data import load_prompts  # noqa: E402
from minicai.io.files import read_preferences  # noqa: E402
from minicai.io.traces import load_done  # noqa: E402
from minicai.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

PROFILES = {
    "default": settings(max_examples=200, derandomize=True, deadline=None, database=None, print_blob=True,
                        suppress_health_check=list(HealthCheck)),
    "long": settings(max_examples=2500, derandomize=True, deadline=None, database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck)),
}
PROFILE_PARAMS = [pytest.param("default"), pytest.param("long", marks=pytest.mark.slow)]

# ------------------------------------------------------------------------------ the guard


class Hang(BaseException):
    """Raised by the deadline alarm. A BaseException so that no loader's `except Exception`
    can swallow it."""


def _vm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def guard(seconds: float = 10.0, headroom: int = 1 << 30):
    """Deadline (SIGALRM, main thread only) and an address-space cap `headroom` bytes above the
    current usage (Linux). Both are restored on exit."""
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    old_handler = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise Hang(f"no result after {seconds} s")
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    old_limit, vm = None, _vm_bytes()
    if vm is not None and sys.platform.startswith("linux"):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = vm + headroom
        if hard == resource.RLIM_INFINITY or cap <= hard:
            old_limit = (soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)


OUTCOMES: dict[str, int] = {}
"""Per test: how many examples loaded fine and how many raised InputError (checked at the end so
that a fuzzer whose every example dies at the first check, or none, is noticed)."""


def only_input_error(fn, *args, **kw):
    """Call fn under the guard: it may return or raise InputError with a one-line message;
    anything else (another exception, Hang, MemoryError) fails the example."""
    with guard():
        try:
            fn(*args, **kw)
        except InputError as e:
            msg = str(e)
            assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
            OUTCOMES["error"] = OUTCOMES.get("error", 0) + 1
            return msg
    OUTCOMES["ok"] = OUTCOMES.get("ok", 0) + 1
    return None


@pytest.fixture(autouse=True)
def outcomes():
    OUTCOMES.clear()
    yield OUTCOMES
    print(f"outcomes: {OUTCOMES}")


def assert_both_outcomes():
    """Some inputs loaded and some were refused: the mutations get past the first check (a
    fuzzer whose every input dies at the magic number tests nothing) and do break things."""
    assert OUTCOMES.get("ok") and OUTCOMES.get("error"), OUTCOMES


def test_the_guard_catches_hangs_and_huge_allocations():
    """The guard itself works, so a passing fuzz test means something."""
    with pytest.raises(Hang):
        with guard(seconds=0.2):
            while True:
                pass
    if _vm_bytes() is not None and sys.platform.startswith("linux"):
        with pytest.raises((MemoryError, RuntimeError)):  # torch reports a failed allocation as RuntimeError
            with guard():
                torch.empty(3 << 30, dtype=torch.uint8).fill_(1)
    torch.empty(1 << 20).fill_(1)  # and the limit is lifted again


# ------------------------------------------------------------------------------ shared strategies

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 255, 256, 4095, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def byte_edits(size: int, hot: int):
    """Lists of (offset, byte) edits, biased to the first `hot` bytes (header and metadata)."""
    offset = st.one_of(st.integers(0, max(0, hot - 1)), st.integers(0, size - 1))
    value = st.one_of(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]), st.integers(0, 255))
    return st.lists(st.tuples(offset, value), min_size=1, max_size=6)


def apply_edits(raw: bytes, edits) -> bytes:
    b = bytearray(raw)
    for i, v in edits:
        b[i] = v
    return bytes(b)


def forged_int(size: int, file_len: int):
    """An integer to write into a `size`-byte little-endian field."""
    near = [max(0, file_len + d) for d in (-9, -1, 0, 1, 8)]
    return st.one_of(st.sampled_from(INTERESTING + near), st.integers(0, 2 ** (8 * size) - 1)).map(
        lambda v: v % (2 ** (8 * size)))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))


def json_values(keys):
    """JSON-ish values whose object keys are mostly the ones the loader looks for."""
    key = st.one_of(st.sampled_from(keys), st.text(max_size=8)) if keys else st.text(max_size=8)
    return st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                              st.dictionaries(key, inner, max_size=6)),
                        max_leaves=25)


def dumps(v) -> str:
    return json.dumps(v, allow_nan=True)


DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"prompt": ' * 50_000 + "1" + "}" * 50_000


# ------------------------------------------------------------------------------ GGUF

@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_gguf(scratch) -> tuple[bytes, list[tuple[int, int]]]:
    """A valid, small Llama GGUF (with tokenizer) and the (offset, size) of every integer field the
    reader reads through its cursor (counts, lengths, types, dims, offsets and scalar values)."""
    cfg = tiny_config(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=64)
    path = write_tiny_gguf(scratch / "small.gguf", random_model(cfg, seed=5))
    fields = []
    real_unpack = gguf._Cursor.unpack

    def record(self, st_, what):
        fields.append((self.pos, st_.size))
        return real_unpack(self, st_, what)

    gguf._Cursor.unpack = record
    try:
        gguf.read_gguf(path)
    finally:
        gguf._Cursor.unpack = real_unpack
    load_model(str(path))  # the seed file itself loads
    return path.read_bytes(), sorted(set(fields))


def gguf_mutations(raw: bytes, fields):
    hot = max(o for o, _ in fields) + 8
    flips = byte_edits(len(raw), hot).map(lambda e: apply_edits(raw, e))
    cut = st.one_of(st.integers(0, hot), st.integers(0, len(raw) - 1)).map(lambda n: raw[:n])

    def forge(field_and_value):
        (off, size), value = field_and_value
        return raw[:off] + value.to_bytes(size, "little") + raw[off + size:]

    forged = st.sampled_from(fields).flatmap(
        lambda f: forged_int(f[1], len(raw)).map(lambda v: (f, v))).map(forge)
    forged_twice = st.tuples(forged, st.sampled_from(fields), st.sampled_from(INTERESTING)).map(
        lambda t: t[0][:t[1][0]] + (t[2] % 2 ** (8 * t[1][1])).to_bytes(t[1][1], "little") + t[0][t[1][0] + t[1][1]:])
    return st.one_of(flips, cut, forged, forged_twice)


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_mutated_gguf_only_input_error(profile, small_gguf, scratch):
    """Flipped bytes, truncations and forged length/count/dim/offset/value fields of a small valid
    model GGUF, through the whole loader (reader, config, tokenizer, shape checks)."""
    raw, fields = small_gguf
    path = scratch / "mutated.gguf"

    @PROFILES[profile]
    @given(data=gguf_mutations(raw, fields))
    def run(data):
        path.write_bytes(data)
        only_input_error(load_model, str(path))

    run()
    assert_both_outcomes()


# GGUF-typable metadata values (tests/gguf_writer.py infers the type): what a corrupt or hostile
# file could hold under any key.
gguf_scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**64 - 1), st.sampled_from(INTERESTING),
                         st.floats(width=32), st.text(max_size=20))
gguf_values = st.one_of(gguf_scalars, st.lists(st.booleans(), min_size=1, max_size=4),
                        st.lists(st.integers(0, 2**31), min_size=1, max_size=4),
                        st.lists(st.integers(-2**31, -1), min_size=1, max_size=4),
                        st.lists(st.floats(width=32), min_size=1, max_size=4),
                        st.lists(st.text(max_size=6), min_size=0, max_size=4),
                        st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), min_size=1, max_size=2))
MODEL_KEYS = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
              "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
              "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.bos_token_id", "tokenizer.chat_template", "general.alignment"]


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_gguf_metadata_values_only_input_error(profile, small_gguf, scratch):
    """Well-formed GGUF files whose model or tokenizer metadata holds a value of the wrong type or
    an absurd size (head_count 0, block_count 2**32 - 1, tokens that are numbers, a NaN eos id...):
    the config and tokenizer checks, not the byte parser, must catch them."""
    import gguf_writer

    raw, _ = small_gguf
    path = scratch / "retyped.gguf"
    path.write_bytes(raw)
    meta, tensors = gguf.read_gguf(path)
    typed = {"tokenizer.ggml.token_type": (meta["tokenizer.ggml.token_type"], "ARRAY:INT32")}

    @PROFILES[profile]
    @given(changes=st.dictionaries(st.sampled_from(MODEL_KEYS), st.one_of(st.none(), gguf_values),
                                   min_size=1, max_size=3))
    @example(changes={"llama.attention.head_count": 0})
    @example(changes={"llama.attention.head_count": 3})
    @example(changes={"llama.block_count": 2**32 - 1})
    @example(changes={"general.architecture": ["llama"]})
    @example(changes={"tokenizer.ggml.tokens": [1, 2, 3]})
    @example(changes={"tokenizer.ggml.eos_token_id": float("nan")})
    def run(changes):
        md = {**meta, **typed}
        for k, v in changes.items():
            if v is None:
                md.pop(k, None)  # a missing key
            else:
                md[k] = v
        try:
            data = gguf_writer.encode_gguf(md, {k: (v, "F32") for k, v in tensors.items()})
        except (struct.error, TypeError, ValueError, OverflowError):
            hypothesis.assume(False)  # not encodable as GGUF (e.g. a mixed-type list)
        path.write_bytes(data)
        only_input_error(load_model, str(path))

    run()
    assert_both_outcomes()


# ------------------------------------------------------------------------------ safetensors

@pytest.fixture(scope="module")
def small_hf(scratch) -> Path:
    """A valid, small HF folder written by save_hf."""
    cfg = tiny_config(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=64)
    src = write_tiny_gguf(scratch / "for_hf.gguf", random_model(cfg, seed=6))
    model, tok, _ = load_model(str(src))
    return save_hf(scratch / "hf", model, tok)


def safetensors_parts(raw: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def header_tensors(names):
    dtype = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", ""])
    dim = st.one_of(st.integers(0, 40), st.sampled_from(INTERESTING), st.integers(-5, -1))
    entry = st.fixed_dictionaries({"dtype": dtype, "shape": st.lists(dim, max_size=4),
                                   "data_offsets": st.lists(st.one_of(st.integers(0, 5000), st.sampled_from(INTERESTING),
                                                                      st.integers(-3, -1)), min_size=0, max_size=3)})
    anything = json_values(["dtype", "shape", "data_offsets", "__metadata__"])
    return st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=10)), st.one_of(entry, anything),
                           max_size=4)


def safetensors_mutations(raw: bytes):
    n, header, body = safetensors_parts(raw)
    names = list(header)

    def with_header(h, pad_to=None):
        text = h if isinstance(h, (bytes, str)) else json.dumps(h)
        b = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        return struct.pack("<Q", len(b)) + b + body

    flips = byte_edits(len(raw), n + 8).map(lambda e: apply_edits(raw, e))
    # edits of the tensor bytes alone: a valid file with other weights, which must load (without them
    # few examples load, and how many depends on the order hypothesis happens to draw in)
    body_flips = st.lists(st.tuples(st.integers(n + 8, len(raw) - 1), st.integers(0, 255)), min_size=1,
                          max_size=6).map(lambda e: apply_edits(raw, e))
    cut = st.integers(0, len(raw) - 1).map(lambda k: raw[:k])
    forged_len = forged_int(8, len(raw)).map(lambda v: v.to_bytes(8, "little") + raw[8:])
    new_header = header_tensors(names).map(with_header)

    def tweak(args):  # one field of one real entry replaced
        name, field, value = args
        h = json.loads(json.dumps(header))
        if name in h and isinstance(h[name], dict):
            h[name][field] = value
        return with_header(h)

    one_field = st.tuples(st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]),
                          json_values(["dtype"])).map(tweak)
    junk_header = st.binary(max_size=64).map(with_header)
    return st.one_of(flips, body_flips, cut, forged_len, new_header, one_field, junk_header)


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_mutated_safetensors_only_input_error(profile, small_hf, scratch):
    """Forged header length, generated JSON headers (dtypes, shapes, offsets), flips and
    truncations of a real model.safetensors, read by checkpoint's loader and by load_model on the
    HF folder (whose shape checks then run)."""
    import shutil

    folder = scratch / "hf_mutated"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(small_hf, folder)
    st_path = folder / "model.safetensors"
    raw = (small_hf / "model.safetensors").read_bytes()

    @PROFILES[profile]
    @given(data=safetensors_mutations(raw), whole=st.booleans())
    def run(data, whole):
        st_path.write_bytes(data)
        if whole:
            only_input_error(load_model, str(folder))
        else:
            only_input_error(_load_safetensors, st_path)

    run()
    assert_both_outcomes()


HF_CONFIG_KEYS = ["architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "rope_scaling", "eos_token_id"]
TOKENIZER_CONFIG_KEYS = ["eos_token", "pad_token", "bos_token", "chat_template"]


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_hf_config_values_only_input_error(profile, small_hf, scratch):
    """An HF folder whose config.json / tokenizer_config.json fields hold wrong types or absurd
    sizes (0 heads, 2**31 layers, a string rope_theta, rope_scaling that is not an object...)."""
    import shutil

    folder = scratch / "hf_config"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(small_hf, folder)
    config = json.loads((small_hf / "config.json").read_text())
    tok_config = json.loads((small_hf / "tokenizer_config.json").read_text())
    value = st.one_of(json_scalars, st.sampled_from(INTERESTING), st.integers(-3, 3), json_values(["type", "rope_type"]),
                      st.sampled_from([["LlamaForCausalLM"], "LlamaForCausalLM", ["Qwen2ForCausalLM"], [None]]))

    @PROFILES[profile]
    @given(changes=st.dictionaries(st.sampled_from(HF_CONFIG_KEYS), st.one_of(st.none(), value), min_size=1, max_size=3),
           tok_changes=st.dictionaries(st.sampled_from(TOKENIZER_CONFIG_KEYS), st.one_of(st.none(), value), max_size=2))
    @example(changes={"num_attention_heads": 0}, tok_changes={})
    @example(changes={"num_hidden_layers": 2**31 - 1}, tok_changes={})
    @example(changes={"rope_scaling": "yes"}, tok_changes={})
    @example(changes={"architectures": 5}, tok_changes={})
    @example(changes={"rope_theta": "big"}, tok_changes={})
    def run(changes, tok_changes):
        for src, name, ch in ((config, "config.json", changes), (tok_config, "tokenizer_config.json", tok_changes)):
            d = dict(src)
            for k, v in ch.items():
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v
            (folder / name).write_text(dumps(d))
        only_input_error(load_model, str(folder))

    run()
    assert_both_outcomes()


# ------------------------------------------------------------------------------ constitutions

CONSTITUTION_KEYS = ["name", "description", "principle", "few_shot", "critique", "revision", "comparison",
                     "prompt", "response", "edit_request"]
GOOD_TOML = (ROOT / "constitutions" / "hhh.toml").read_text(encoding="utf-8")
GOOD_JSON = json.dumps({"name": "x", "principle": [
    {"name": "a", "critique": "c", "revision": "r", "comparison": "p"}],
    "few_shot": [{"prompt": "p", "response": "r", "critique": "c", "revision": "v", "principle": "a"}]})
TOML_ALPHABET = st.sampled_from(list('[]{}="\'\\#.,:-_ \n\t0123456789abcxyz') + ["[[principle]]", '"""', "'''",
                                                                                 "name", "critique", " = ", "\x00",
                                                                                 "\ud7ff", "é"])


def text_edits(good: str):
    """good text with a few spans deleted, replaced or duplicated."""
    span = st.tuples(st.integers(0, len(good)), st.integers(0, 40))
    edit = st.tuples(st.sampled_from(["delete", "insert", "replace", "dup"]), span,
                     st.lists(TOML_ALPHABET, max_size=6).map("".join))

    def apply(edits):
        t = good
        for kind, (i, n), s in edits:
            i = min(i, len(t))
            if kind == "delete":
                t = t[:i] + t[i + n:]
            elif kind == "insert":
                t = t[:i] + s + t[i:]
            elif kind == "replace":
                t = t[:i] + s + t[i + n:]
            else:
                t = t[:i] + t[i:i + n] + t[i:]
        return t
    return st.lists(edit, min_size=1, max_size=5).map(apply)


def constitution_inputs():
    as_json = json_values(CONSTITUTION_KEYS).map(lambda v: (".json", dumps(v).encode()))
    json_edits = text_edits(GOOD_JSON).map(lambda t: (".json", t.encode("utf-8", "surrogatepass")))
    toml_edits = text_edits(GOOD_TOML).map(lambda t: (".toml", t.encode("utf-8", "surrogatepass")))
    raw = st.tuples(st.sampled_from([".json", ".toml"]), st.binary(max_size=200))
    return st.one_of(as_json, json_edits, toml_edits, raw)


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_fuzzed_constitutions_only_input_error(profile, scratch):
    """Generated JSON documents (our layout and Anthropic's), edited copies of a valid TOML and
    JSON constitution, raw bytes; sometimes with a fuzzed comparisons file too."""

    @PROFILES[profile]
    @given(doc=constitution_inputs(), comparisons=st.one_of(st.none(), json_values([]).map(dumps)))
    @example(doc=(".json", DEEP_JSON.encode()), comparisons=None)
    @example(doc=(".toml", ("a = " + "[" * 100_000).encode()), comparisons=None)
    @example(doc=(".toml", ("a = " + "{b=" * 50_000).encode()), comparisons=None)
    @example(doc=(".json", GOOD_JSON.encode()), comparisons=DEEP_JSON)
    def run(doc, comparisons):
        suffix, data = doc
        path = scratch / f"c{suffix}"
        path.write_bytes(data)
        comp = None
        if comparisons is not None:
            comp = scratch / "comparisons.json"
            comp.write_text(comparisons, encoding="utf-8", errors="surrogatepass")
        only_input_error(load_constitution, str(path), comp)

    run()
    assert_both_outcomes()


# ------------------------------------------------------------------------------ prompt files

PROMPT_KEYS = ["prompt", "messages", "text", "role", "content", "user", "assistant", "q"]


def jsonl_lines():
    line = st.one_of(json_values(PROMPT_KEYS).map(dumps),
                     st.fixed_dictionaries({"prompt": json_values(PROMPT_KEYS)}).map(dumps),
                     st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
                         {"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": json_scalars}),
                         max_size=3)}).map(dumps),
                     st.text(max_size=30))
    return st.lists(line, max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))


def prompt_files():
    jsonl = st.tuples(st.just(".jsonl"), st.one_of(jsonl_lines(), st.binary(max_size=120)))
    csv = st.tuples(st.just(".csv"), st.one_of(
        st.lists(st.lists(st.text(alphabet=st.sampled_from(list('ab,"\n\r\x00 Behavior prompt')), max_size=12),
                          max_size=4).map(",".join), max_size=5).map(lambda r: "\n".join(r).encode()),
        st.binary(max_size=120)))
    txt = st.tuples(st.just(".txt"), st.binary(max_size=120))
    return st.one_of(jsonl, csv, txt)


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_fuzzed_prompt_files_only_input_error(profile, scratch):
    """JSONL (our fields, TRL messages, junk lines, bad UTF-8), CSV and TXT prompt files."""

    @PROFILES[profile]
    @given(f=prompt_files(), column=st.one_of(st.none(), st.sampled_from(["prompt", "text", "Behavior", "nope"])))
    @example(f=(".jsonl", DEEP_JSON.encode()), column=None)
    @example(f=(".jsonl", DEEP_OBJECT.encode()), column=None)
    @example(f=(".csv", b"prompt\n" + b"x" * 200_000), column=None)
    @example(f=(".csv", b'prompt\n"unterminated'), column=None)
    @example(f=(".csv", b"prompt\nab\x00c"), column=None)
    def run(f, column):
        suffix, data = f
        path = scratch / f"prompts{suffix}"
        path.write_bytes(data)
        if column is not None and suffix == ".txt":
            column = None
        only_input_error(load_prompts, str(path), None, column)

    run()
    assert_both_outcomes()


# ------------------------------------------------------------------------------ preferences and traces

PREF_KEYS = ["prompt", "response_a", "response_b", "p_a", "chosen", "rejected", "id", "key", "role", "content",
             "final"]


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_fuzzed_preference_and_trace_files_only_input_error(profile, scratch):
    """The run files a resumed run reads back (preferences.jsonl for train_rm / train_dpo,
    traces.jsonl for SL-CAI), with junk records and torn lines."""
    line = st.one_of(json_values(PREF_KEYS).map(dumps), st.text(max_size=20),
                     st.fixed_dictionaries({"prompt": json_scalars, "response_a": json_scalars,
                                            "response_b": json_scalars, "p_a": json_scalars}).map(dumps),
                     st.fixed_dictionaries({"id": json_scalars, "final": json_scalars}).map(dumps))
    files = st.one_of(st.lists(line, max_size=5).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
                      st.binary(max_size=100))

    @PROFILES[profile]
    @given(data=files, trailing_newline=st.booleans())
    @example(data=DEEP_JSON.encode(), trailing_newline=True)
    def run(data, trailing_newline):
        data = data + (b"\n" if trailing_newline else b"")
        path = scratch / "records.jsonl"
        for fn in (read_preferences, load_done):
            path.write_bytes(data)
            only_input_error(fn, path)

    run()
    assert_both_outcomes()
