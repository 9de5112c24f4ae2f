"""Test-only GGUF v3 writer with simple reference quantizers.

Used by the tests to write tiny models. Not part of the package; nothing here is tuned for
quality or speed. The layouts follow the GGUF spec (ggml/docs/gguf.md) and the block structs of
llama.cpp's ggml-common.h; the byte layouts are documented beside the dequantizers in
minicai/io/gguf.py.

    write_gguf(path, metadata, tensors, alignment=32)
        metadata: key -> value. bool -> BOOL, int -> UINT32 (INT32 if negative; UINT64/INT64 when
        it does not fit 32 bits), float -> FLOAT32, str -> STRING, list -> ARRAY typed by its
        first element (an empty list is an ARRAY of STRING). A value may be given as
        (value, "UINT64")-style tuple to force the type (for an array: (list, "ARRAY:INT8")).
        tensors: name -> (float32 array in torch shape, type name).
    quantize(x, type_name) -> bytes   the tensor data bytes of x (flattened, C order).
"""
from __future__ import annotations

import struct

import numpy as np

GGUF_MAGIC = b"GGUF"

# metadata value types (GGUF spec, enum gguf_metadata_value_type)
VT = {
    "UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6,
    "BOOL": 7, "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12,
}
_SCALAR_FMT = {
    "UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
    "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d",
}

# ggml type name -> (type id, block size, bytes per block)
TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}


# ----------------------------------------------------------------------------- encoding

def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _infer_type(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "BOOL"
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if v < 0:
            return "INT32" if v >= -(2**31) else "INT64"
        return "UINT32" if v < 2**32 else "UINT64"
    if isinstance(v, (float, np.floating)):
        return "FLOAT32"
    if isinstance(v, str):
        return "STRING"
    if isinstance(v, (list, tuple)):
        return "ARRAY"
    raise TypeError(f"cannot store metadata value of type {type(v).__name__}")


def _scalar(v, t: str) -> bytes:
    if t == "STRING":
        return _str(v)
    return struct.pack(_SCALAR_FMT[t], v)


def _value(v) -> bytes:
    """Type id + encoded value."""
    forced = None
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str) and (
            v[1] in VT or v[1].startswith("ARRAY:")):
        v, forced = v
    t = forced or _infer_type(v)
    if t.startswith("ARRAY"):
        v = list(v)
        if ":" in t:
            et = t.split(":", 1)[1]
        elif v:
            et = _infer_type(v[0])
            if et in ("UINT32", "INT32", "UINT64", "INT64"):   # one type for the whole array
                lo, hi = min(int(e) for e in v), max(int(e) for e in v)
                et = ("INT32" if lo >= -(2**31) and hi < 2**31 else "INT64") if lo < 0 else (
                    "UINT32" if hi < 2**32 else "UINT64")
        else:
            et = "STRING"
        if et == "ARRAY":   # an element of an array of arrays is (type, count, items)
            items = b"".join(_value(e)[4:] for e in v)
        else:
            items = b"".join(_scalar(e, et) for e in v)
        return struct.pack("<IIQ", VT["ARRAY"], VT[et], len(v)) + items
    return struct.pack("<I", VT[t]) + _scalar(v, t)


# ----------------------------------------------------------------------------- quantizers

def _f16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def _blocks(x: np.ndarray, n: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size % n:
        raise ValueError(f"{x.size} elements is not a multiple of the block size {n}")
    return x.reshape(-1, n)


def _pack_nibbles32(q: np.ndarray) -> np.ndarray:
    """q: (nb, 32) values 0..15 -> (nb, 16) bytes; byte j = q[j] | q[j+16] << 4."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _safe_inv(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, dtype=np.float32)
    out = np.zeros_like(d)
    nz = d != 0
    out[nz] = 1.0 / d[nz]
    return out


def quantize_q8_0(x) -> bytes:
    b = _blocks(x, 32)
    d = _f16(np.abs(b).max(axis=1) / 127.0)
    q = np.clip(np.round(b * _safe_inv(d.astype(np.float32))[:, None]), -127, 127).astype(np.int8)
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def quantize_q4_0(x) -> bytes:
    # as llama.cpp quantize_row_q4_0_ref: d = (value with largest |x|) / -8, q = x/d + 8
    b = _blocks(x, 32)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), idx]
    d = _f16(mx / -8.0)
    q = np.clip(np.round(b * _safe_inv(d.astype(np.float32))[:, None]) + 8, 0, 15)
    out = np.empty((b.shape[0], 18), np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack_nibbles32(q)
    return out.tobytes()


def quantize_q4_1(x) -> bytes:
    b = _blocks(x, 32)
    mn, mx = b.min(axis=1), b.max(axis=1)
    d = _f16((mx - mn) / 15.0)
    m = _f16(mn)
    q = np.clip(np.round((b - m.astype(np.float32)[:, None]) * _safe_inv(d.astype(np.float32))[:, None]), 0, 15)
    out = np.empty((b.shape[0], 20), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = m.view(np.uint8).reshape(-1, 2)
    out[:, 4:] = _pack_nibbles32(q)
    return out.tobytes()


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of llama.cpp get_scale_min_k4: sc, mn (nb, 8) 6-bit values -> (nb, 12) bytes.
    bytes 0..3: sc[0..3] | (sc[4..7] >> 4) << 6;  bytes 4..7: mn[0..3] | (mn[4..7] >> 4) << 6;
    bytes 8..11: (sc[4..7] & 15) | (mn[4..7] & 15) << 4."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    return out


def quantize_q4_k(x) -> bytes:
    """Simple Q4_K: per 32-element sub-block x ~= q*(d*sc) - dmin*mn, q in 0..15, sc,mn in 0..63.
    (Not llama.cpp's iterative search; just min/max with 6-bit quantized scale and min.)"""
    b = _blocks(x, 256).reshape(-1, 8, 32)
    nb = b.shape[0]
    lo = np.minimum(b.min(axis=2), 0.0)           # sub-block min (<= 0, stored as -dmin*mn)
    hi = b.max(axis=2)
    scale = (hi - lo) / 15.0                      # (nb, 8)
    minv = -lo                                    # >= 0
    d = _f16(scale.max(axis=1) / 63.0)
    dmin = _f16(minv.max(axis=1) / 63.0)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(scale * _safe_inv(df)[:, None]), 0, 63)
    # round the min up so that every x - (-min) stays >= 0
    mn = np.clip(np.ceil(minv * _safe_inv(dminf)[:, None] - 1e-6), 0, 63)
    eff_d = df[:, None] * sc                      # (nb, 8)
    eff_m = dminf[:, None] * mn
    q = np.clip(np.round((b + eff_m[:, :, None]) * _safe_inv(eff_d)[:, :, None]), 0, 15).astype(np.uint8)
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low nibbles, 2c+1 in the high
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = _pack_scale_min_k4(sc, mn)
    out[:, 16:] = qs
    return out.tobytes()


def quantize_q6_k(x) -> bytes:
    """Simple Q6_K: per 16-element sub-block x ~= d*sc*(q-32), q in 0..63, sc int8."""
    b = _blocks(x, 256)
    nb = b.shape[0]
    s = b.reshape(nb, 16, 16)
    amax = np.abs(s).max(axis=2)                  # (nb, 16)
    scale = amax / 31.0
    d = _f16(scale.max(axis=1) / 127.0)
    df = d.astype(np.float32)
    sc = np.clip(np.round(scale * _safe_inv(df)[:, None]), -128, 127).astype(np.int8)
    eff = df[:, None] * sc.astype(np.float32)
    q = (np.clip(np.round(s * _safe_inv(eff)[:, :, None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(nb, 256)
    # layout (dequantize_row_q6_K): two halves of 128; within half h, for l in 0..31:
    #   y[l]    = ql[l]    & 15 | (qh[l] >> 0 & 3) << 4
    #   y[l+32] = ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4
    #   y[l+64] = ql[l]    >> 4 | (qh[l] >> 4 & 3) << 4
    #   y[l+96] = ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4
    h = q.reshape(nb, 2, 4, 32)                   # (nb, half, quarter, l)
    lo4, hi2 = h & 15, h >> 4
    ql = np.concatenate([lo4[:, :, 0] | (lo4[:, :, 2] << 4), lo4[:, :, 1] | (lo4[:, :, 3] << 4)],
                        axis=2)                   # (nb, 2, 64)
    qh = hi2[:, :, 0] | (hi2[:, :, 1] << 2) | (hi2[:, :, 2] << 4) | (hi2[:, :, 3] << 6)  # (nb,2,32)
    out = np.empty((nb, 210), np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return out.tobytes()


def quantize(x: np.ndarray, type_name: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if type_name == "F32":
        return x.astype("<f4").tobytes()
    if type_name == "F16":
        return x.astype("<f2").tobytes()
    if type_name == "BF16":
        # round to nearest even on the top 16 bits
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return r.astype("<u2").tobytes()
    fn = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1,
          "Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}.get(type_name)
    if fn is None:
        raise ValueError(f"unknown type {type_name!r}")
    return fn(x)


# ----------------------------------------------------------------------------- file

def _pad(n: int, alignment: int) -> int:
    return (-n) % alignment


def encode_gguf(metadata: dict, tensors: dict, alignment: int = 32, version: int = 3) -> bytes:
    """The bytes of a GGUF file. `tensors` values are (array, type name) or
    (array, type name, raw bytes) to store given bytes as the tensor's data."""
    md = dict(metadata)
    if alignment != 32 and "general.alignment" not in md:
        md["general.alignment"] = (alignment, "UINT32")
    head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(md)))
    for k, v in md.items():
        head += _str(k) + _value(v)
    datas = []
    off = 0
    for name, spec in tensors.items():
        arr, tname = spec[0], spec[1]
        arr = np.asarray(arr, dtype=np.float32)
        raw = spec[2] if len(spec) > 2 else quantize(arr, tname)
        ne = list(reversed(arr.shape)) or [1]
        head += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", TYPES[tname][0], off)
        datas.append(raw)
        off += len(raw) + _pad(len(raw), alignment)
    head += b"\0" * _pad(len(head), alignment)
    body = bytearray()
    for raw in datas:
        body += raw + b"\0" * _pad(len(raw), alignment)
    return bytes(head + body)


def write_gguf(path, metadata: dict, tensors: dict, alignment: int = 32) -> None:
    with open(path, "wb") as f:
        f.write(encode_gguf(metadata, tensors, alignment))
