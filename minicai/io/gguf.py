"""A small GGUF (v2/v3) reader in numpy: metadata and dequantized float32 tensors.

File layout (GGUF spec, ggml/docs/gguf.md in the ggml / llama.cpp repositories), all
little-endian:

    header      magic b"GGUF", uint32 version (2 or 3), uint64 tensor_count, uint64 kv_count
    metadata    kv_count x { gguf_string key, uint32 value_type, value }
                gguf_string = uint64 byte length + UTF-8 bytes (no terminator)
                ARRAY value = uint32 element type, uint64 count, count x element
    tensor info tensor_count x { gguf_string name, uint32 n_dims, uint64 ne[n_dims],
                                 uint32 ggml_type, uint64 offset }
                ne[0] is the fastest-varying dimension, so the torch shape is reversed(ne)
    padding     to a multiple of general.alignment (default 32)
    tensor data each tensor at data_start + offset (offset a multiple of the alignment)

Public API:
    read_gguf(path, names=None) -> (metadata, tensors)
    read_gguf_metadata(path) -> metadata
    GGML_TYPES: ggml type id -> (name, block_size, type_size) for the types this reader
                can dequantize.

Any problem with the file raises minicai.errors.InputError with a one-line message that starts
with the path and names the offending field. Every length and count read from the file is
checked against the bytes that remain before anything is allocated from it.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from minicai.errors import InputError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8        # arrays of arrays of ...; deeper is rejected (no runaway recursion)
_INT64_MAX = 2**63 - 1
_MAX_ELEMENTS = 2**61        # product of the (non-zero) dims; float32 bytes must fit in int64

# ggml type id -> (name, block size in elements, bytes per block), from ggml.h / ggml.c
# type_traits. Only the types that _DEQUANT below handles.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}

# Names of the other ggml types (enum ggml_type in ggml.h), only for error messages.
_OTHER_TYPE_NAMES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M",
}

# metadata value types (enum gguf_type): id -> (name, struct format or None, min encoded size)
_VT_UINT8, _VT_INT8, _VT_UINT16, _VT_INT16, _VT_UINT32, _VT_INT32, _VT_FLOAT32 = range(7)
_VT_BOOL, _VT_STRING, _VT_ARRAY, _VT_UINT64, _VT_INT64, _VT_FLOAT64 = range(7, 13)
_VALUE_TYPES = {
    _VT_UINT8: ("UINT8", "<B", 1),
    _VT_INT8: ("INT8", "<b", 1),
    _VT_UINT16: ("UINT16", "<H", 2),
    _VT_INT16: ("INT16", "<h", 2),
    _VT_UINT32: ("UINT32", "<I", 4),
    _VT_INT32: ("INT32", "<i", 4),
    _VT_FLOAT32: ("FLOAT32", "<f", 4),
    _VT_BOOL: ("BOOL", "<B", 1),
    _VT_STRING: ("STRING", None, 8),           # uint64 length + bytes
    _VT_ARRAY: ("ARRAY", None, 12),            # uint32 type + uint64 count + elements
    _VT_UINT64: ("UINT64", "<Q", 8),
    _VT_INT64: ("INT64", "<q", 8),
    _VT_FLOAT64: ("FLOAT64", "<d", 8),
}
_SCALAR_STRUCT = {t: struct.Struct(fmt) for t, (_, fmt, _) in _VALUE_TYPES.items() if fmt}
_NP_SCALAR = {
    _VT_UINT8: "<u1", _VT_INT8: "<i1", _VT_UINT16: "<u2", _VT_INT16: "<i2", _VT_UINT32: "<u4",
    _VT_INT32: "<i4", _VT_FLOAT32: "<f4", _VT_UINT64: "<u8", _VT_INT64: "<i8", _VT_FLOAT64: "<f8",
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# ============================================================================ parsing


class _Cursor:
    """Bounds-checked little-endian reads from a buffer (an mmap) of `size` bytes."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, msg: str) -> InputError:
        return InputError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos} but only "
                            f"{self.size - self.pos} remain (file size {self.size})")

    def unpack(self, st: struct.Struct, what: str):
        self.need(st.size, what)
        v = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return v

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} string length")
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} string length {n} runs past the end of the file "
                            f"(offset {self.pos}, size {self.size})")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        info = _VALUE_TYPES.get(vtype)
        if info is None:
            raise self.fail(f"{what} has unknown metadata value type {vtype}")
        if vtype == _VT_STRING:
            return self.string(what)
        if vtype == _VT_ARRAY:
            return self.array(what, depth)
        v = self.unpack(_SCALAR_STRUCT[vtype], what)
        return bool(v) if vtype == _VT_BOOL else v

    def array(self, what: str, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self.u32(f"{what} array element type")
        info = _VALUE_TYPES.get(etype)
        if info is None:
            raise self.fail(f"{what} has unknown array element type {etype}")
        n = self.u64(f"{what} array length")
        if n == 0:
            return []
        remain = self.size - self.pos
        if n > remain // info[2]:
            raise self.fail(f"truncated: {what} array of {n} {info[0]} elements needs at least "
                            f"{n * info[2]} bytes but only {remain} remain (offset {self.pos}, "
                            f"size {self.size})")
        if etype in _NP_SCALAR:
            dt = np.dtype(_NP_SCALAR[etype])
            out = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).tolist()
            self.pos += n * dt.itemsize
            return out
        if etype == _VT_BOOL:
            out = [b != 0 for b in self.buf[self.pos:self.pos + n]]
            self.pos += n
            return out
        if etype == _VT_STRING:
            return self.string_array(n, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]

    def string_array(self, n: int, what: str) -> list:
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = _U64.unpack_from
        i = 0
        try:
            for i in range(n):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"{what}[{i}] string length")
                (ln,) = unpack(buf, pos)
                pos += 8
                if ln > size - pos:
                    raise self.fail(f"truncated: {what}[{i}] string length {ln} runs past the end "
                                    f"of the file (offset {pos}, size {size})")
                out.append(buf[pos:pos + ln].decode("utf-8"))
                pos += ln
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}[{i}] is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        self.pos = pos
        return out


def _open(path):
    """(mmap or None for an empty file, size). OS errors become InputError."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None, 0
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise InputError(f"{path}: cannot read file: {reason}".replace("\n", " ")) from None


def _close(mm) -> None:
    if mm is not None:
        try:
            mm.close()
        except BufferError:    # a numpy view still refers to it; the GC will unmap it
            pass


def _parse_header(cur: _Cursor) -> tuple[int, int, dict]:
    """Magic, version, counts and metadata. Returns (version, tensor_count, metadata)."""
    path = cur.path
    if cur.size < 4 or cur.buf[:4] != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, "
                         f"file size {cur.size})")
    cur.pos = 4
    version = cur.u32("header version")
    if version not in SUPPORTED_VERSIONS:
        hint = ""
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            hint = " (a big-endian GGUF file; only little-endian is supported)"
        raise InputError(f"{path}: unsupported GGUF version {version}{hint}; "
                         f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = cur.u64("header tensor_count")
    n_kv = cur.u64("header metadata_kv_count")
    min_kv = 8 + 4 + 1        # empty key + type + the smallest value
    if n_kv > (cur.size - cur.pos) // min_kv:
        raise cur.fail(f"truncated: header metadata_kv_count {n_kv} needs at least "
                       f"{n_kv * min_kv} bytes but only {cur.size - cur.pos} remain")
    min_ti = 8 + 4 + 8 + 4 + 8   # empty name + n_dims + one dim + type + offset
    if n_tensors > (cur.size - cur.pos) // min_ti:
        raise cur.fail(f"truncated: header tensor_count {n_tensors} needs at least "
                       f"{n_tensors * min_ti} bytes but only {cur.size - cur.pos} remain")
    metadata: dict = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        what = f"metadata key #{i} {_short(key)}"
        if key in metadata:
            raise cur.fail(f"duplicate {what}")
        vtype = cur.u32(f"{what} value type")
        metadata[key] = cur.value(vtype, what)
    return version, n_tensors, metadata


def _alignment(metadata: dict, path) -> int:
    a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a & (a - 1) or a > 2**30:
        raise InputError(f"{path}: metadata 'general.alignment' = {_short(a)} is not a power of two "
                         f"in [1, 2**30]")
    return a


def _parse_tensor_infos(cur: _Cursor, n_tensors: int, alignment: int) -> dict:
    """name -> (type id, ne list, absolute data offset, n bytes), checked against the file."""
    infos: dict = {}
    for i in range(n_tensors):
        name = cur.string(f"tensor info #{i} name")
        what = f"tensor {_short(name)}"
        if name in infos:
            raise cur.fail(f"duplicate tensor name {_short(name)} (tensor info #{i})")
        n_dims = cur.u32(f"{what} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{what} n_dims {n_dims} is not in [1, {MAX_DIMS}]")
        ne = [cur.u64(f"{what} dim {j}") for j in range(n_dims)]
        for j, d in enumerate(ne):
            if d > _INT64_MAX:
                raise cur.fail(f"{what} dim {j} = {d} is negative or too large")
        prod = 1
        for d in ne:
            prod *= max(d, 1)
        if prod > _MAX_ELEMENTS:
            raise cur.fail(f"{what} dims {ne} are too large (more than 2**61 elements)")
        ttype = cur.u32(f"{what} ggml type")
        if ttype not in GGML_TYPES:
            tname = _OTHER_TYPE_NAMES.get(ttype)
            desc = f"unsupported ggml type {ttype} ({tname})" if tname else f"unknown ggml type {ttype}"
            raise cur.fail(f"{what}: {desc}; supported: "
                           + ", ".join(n for n, _, _ in GGML_TYPES.values()))
        tname, bs, ts = GGML_TYPES[ttype]
        if ne[0] % bs:
            raise cur.fail(f"{what}: first dim {ne[0]} (element count {_nel(ne)}) is not a "
                           f"multiple of the {tname} block size {bs}")
        offset = cur.u64(f"{what} offset")
        if offset % alignment:
            raise cur.fail(f"{what}: data offset {offset} is not a multiple of the "
                           f"alignment {alignment}")
        infos[name] = (ttype, ne, offset, _nel(ne) // bs * ts)
    data_start = cur.pos + (-cur.pos) % alignment
    out = {}
    for name, (ttype, ne, offset, nbytes) in infos.items():
        start = data_start + offset
        end = start + nbytes
        if end > cur.size:
            raise cur.fail(f"tensor {_short(name)}: data [{start}, {end}) runs past the end of the "
                           f"file ({cur.size} bytes)")
        out[name] = (ttype, ne, start, nbytes)
    return out


def _short(name, limit: int = 80) -> str:
    """repr() of a key or tensor name for a message: one line, at most about `limit` chars."""
    r = repr(name)
    return r if len(r) <= limit else r[:limit] + "...(" + str(len(name)) + " chars)"


def _nel(ne) -> int:
    n = 1
    for d in ne:
        n *= d
    return n


# ============================================================================ dequantization
# Each function takes the raw bytes as a 1-D uint8 array (length n_blocks * type_size) and the
# number of elements, and returns a flat float32 array. Layouts are the block structs of
# llama.cpp ggml/src/ggml-common.h; the math is that of dequantize_row_* in
# ggml/src/ggml-quants.c. All fp16 fields are IEEE half, little-endian.


def _deq_f32(raw, n):
    return np.frombuffer(raw, dtype="<f4", count=n).astype(np.float32)


def _deq_f16(raw, n):
    return np.frombuffer(raw, dtype="<f2", count=n).astype(np.float32)


def _deq_bf16(raw, n):
    # bfloat16 = the top 16 bits of an IEEE float32 (ggml_bf16_to_fp32: bits << 16)
    u = np.frombuffer(raw, dtype="<u2", count=n).astype(np.uint32)
    u <<= 16
    return u.view(np.float32)


# block_q8_0 (34 bytes, 32 weights): ggml_half d; int8_t qs[32];
#   x[j] = d * qs[j]
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def _deq_q8_0(raw, n):
    b = np.frombuffer(raw, dtype=_Q8_0)
    out = b["qs"].astype(np.float32)
    out *= b["d"].astype(np.float32)[:, None]
    return out.reshape(n)


def _nibbles32(qs):
    """(nb, 16) bytes -> (nb, 32) uint8: byte j's low nibble is weight j, high nibble j+16
    (ggml-quants.c dequantize_row_q4_0/q4_1: y[j] = qs[j] & 0x0F, y[j+16] = qs[j] >> 4)."""
    q = np.empty((qs.shape[0], 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


# block_q4_0 (18 bytes, 32 weights): ggml_half d; uint8_t qs[16];  (nibbles as _nibbles32)
#   x = (q - 8) * d
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


def _deq_q4_0(raw, n):
    b = np.frombuffer(raw, dtype=_Q4_0)
    out = _nibbles32(b["qs"]).view(np.int8).astype(np.float32)
    out -= 8.0
    out *= b["d"].astype(np.float32)[:, None]
    return out.reshape(n)


# block_q4_1 (20 bytes, 32 weights): ggml_half d; ggml_half m; uint8_t qs[16];
#   x = q * d + m
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])


def _deq_q4_1(raw, n):
    b = np.frombuffer(raw, dtype=_Q4_1)
    out = _nibbles32(b["qs"]).astype(np.float32)
    out *= b["d"].astype(np.float32)[:, None]
    out += b["m"].astype(np.float32)[:, None]
    return out.reshape(n)


# block_q4_K (144 bytes, QK_K = 256 weights = 8 sub-blocks of 32):
#   ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128];
# scales holds 8 six-bit scales sc[] and 8 six-bit mins mn[] (get_scale_min_k4):
#   j < 4:  sc[j] = scales[j] & 63;                 mn[j] = scales[j+4] & 63
#   j >= 4: sc[j] = (scales[j+4] & 15) | (scales[j-4] >> 6) << 4
#           mn[j] = (scales[j+4] >> 4) | (scales[j]   >> 6) << 4
# qs is 4 chunks of 32 bytes; chunk c gives sub-block 2c (low nibbles) and 2c+1 (high nibbles).
#   x = (d * sc[s]) * q - (dmin * mn[s])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))])


def _deq_q4_k(raw, n):
    b = np.frombuffer(raw, dtype=_Q4_K)
    nb = b.shape[0]
    s = b["scales"]
    sc = np.empty((nb, 8), np.uint8)
    mn = np.empty((nb, 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    d = b["d"].astype(np.float32)[:, None] * sc.astype(np.float32)        # (nb, 8)
    m = b["dmin"].astype(np.float32)[:, None] * mn.astype(np.float32)
    qs = b["qs"].reshape(nb, 4, 32)
    q = np.empty((nb, 4, 2, 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :, 0])
    np.right_shift(qs, 4, out=q[:, :, 1])
    out = q.reshape(nb, 8, 32).astype(np.float32)
    out *= d[:, :, None]
    out -= m[:, :, None]
    return out.reshape(n)


# block_q6_K (210 bytes, 256 weights = 16 sub-blocks of 16):
#   uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d;
# Two halves of 128 weights, each with 64 bytes of ql and 32 of qh; within a half, l in 0..31:
#   q[l]    = (ql[l]    & 15) | ((qh[l] >> 0) & 3) << 4
#   q[l+32] = (ql[l+32] & 15) | ((qh[l] >> 2) & 3) << 4
#   q[l+64] = (ql[l]    >> 4) | ((qh[l] >> 4) & 3) << 4
#   q[l+96] = (ql[l+32] >> 4) | ((qh[l] >> 6) & 3) << 4
#   x[i] = (d * scales[i // 16]) * (q[i] - 32)        (i over the whole 256-weight block)
_Q6_K = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")])


def _deq_q6_k(raw, n):
    b = np.frombuffer(raw, dtype=_Q6_K)
    nb = b.shape[0]
    ql = b["ql"].reshape(nb, 2, 2, 32)          # (block, half, first/second 32 bytes, l)
    qh = b["qh"].reshape(nb, 2, 32)
    q = np.empty((nb, 2, 4, 32), np.uint8)
    q[:, :, 0] = (ql[:, :, 0] & 15) | ((qh & 3) << 4)
    q[:, :, 1] = (ql[:, :, 1] & 15) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 1] >> 4) | ((qh >> 6) << 4)
    scale = b["d"].astype(np.float32)[:, None] * b["scales"].astype(np.float32)   # (nb, 16)
    out = q.reshape(nb, 16, 16).astype(np.float32)
    out -= 32.0
    out *= scale[:, :, None]
    return out.reshape(n)


_DEQUANT = {0: _deq_f32, 1: _deq_f16, 2: _deq_q4_0, 3: _deq_q4_1, 8: _deq_q8_0,
            12: _deq_q4_k, 14: _deq_q6_k, 30: _deq_bf16}


# ============================================================================ public API

# A safety net only: every check above should fire first. Anything of these kinds that still
# escapes the parser means a malformed file, and is reported as one.
_UNEXPECTED = (struct.error, ValueError, IndexError, OverflowError, TypeError, KeyError,
               UnicodeError, RecursionError)


def _malformed(path, e: BaseException) -> InputError:
    msg = " ".join(str(e).split())[:200]
    return InputError(f"{path}: malformed GGUF file ({type(e).__name__}: {msg})")



def read_gguf_metadata(path) -> dict:
    """Header and metadata of a GGUF file (tensor infos and data are not read)."""
    path = os.fspath(path)
    mm, size = _open(path)
    try:
        cur = _Cursor(mm if mm is not None else b"", size, path)
        return _parse_header(cur)[2]
    except InputError:
        raise
    except _UNEXPECTED as e:
        raise _malformed(path, e) from e
    finally:
        _close(mm)


def read_gguf(path, names=None) -> tuple[dict, dict]:
    """Read a GGUF file: (metadata, tensors).

    metadata: key -> str, int, float, bool or list (arrays; nested arrays as nested lists).
    tensors: name -> float32 numpy array in torch shape (reversed GGUF ne), dequantized.
    names: optional iterable of tensor names; only those are dequantized (a name missing from
    the file raises InputError). All tensor infos are validated either way.
    """
    path = os.fspath(path)
    if isinstance(names, str):
        names = [names]
    mm, size = _open(path)
    try:
        cur = _Cursor(mm if mm is not None else b"", size, path)
        _, n_tensors, metadata = _parse_header(cur)
        alignment = _alignment(metadata, path)
        infos = _parse_tensor_infos(cur, n_tensors, alignment)
        if names is None:
            wanted = list(infos)
        else:
            wanted = list(dict.fromkeys(names))
            missing = [n for n in wanted if n not in infos]
            if missing:
                raise InputError(f"{path}: tensor(s) not found: "
                                 + ", ".join(_short(n) for n in missing[:5])
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        tensors = {}
        for name in wanted:
            ttype, ne, start, nbytes = infos[name]
            n = _nel(ne)
            if n == 0:
                arr = np.zeros(0, np.float32)
            else:
                raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
                with np.errstate(all="ignore"):     # inf/nan scales give inf/nan, quietly
                    arr = _DEQUANT[ttype](raw, n)
                del raw
            tensors[name] = np.ascontiguousarray(arr.reshape(tuple(reversed(ne))))
        return metadata, tensors
    except InputError:
        raise
    except _UNEXPECTED as e:
        raise _malformed(path, e) from e
    finally:
        _close(mm)
