"""Small shared helpers: atomic writes, the umask, devices."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError, WriteError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


UMASK = _umask()
"""The process's umask when minicai was imported: what it writes gets the modes that open() and mkdir()
would give (tempfile's files and folders are 0600 / 0700 whatever the umask, and a report written that
way could not be shared without chmod)."""


def follow_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a file or folder made by tempfile the mode a plain open() / mkdir() would have given it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~UMASK)


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file in the same folder, fsync, rename.
    A crash leaves either the old file or the new one, never a torn one; an OSError (a full disk)
    becomes a WriteError and leaves the old file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        follow_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, _reason(e), kept=path.exists()) from None
        raise


def append_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    """Append `text` to `path` in one write (a killed process leaves all of it or none; a full disk
    or a power cut at worst a torn last line, which the readers of our JSONL files drop).
    An OSError becomes a WriteError naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, _reason(e), kept=False) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def add_device_args(parser) -> None:
    """--device and --dtype, shared by every command."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weight dtype; auto = bfloat16 on CUDA, float32 on CPU")


def bf16_is_fast() -> bool:
    """True on CUDA, or on a CPU with bf16 matrix instructions (avx512_bf16 / AMX), where bf16
    matmuls are several times fp32."""
    import torch  # here, not at the top: io/files.py and the CLI's error path load without torch

    cpu = torch.cpu
    return torch.cuda.is_available() or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """('auto'|'cpu'|'cuda[:N]', 'auto'|'fast'|'float32'|'bfloat16') -> (torch.device, torch.dtype).
    auto: bfloat16 on CUDA, else float32; fast: bfloat16 where bf16_is_fast(), else float32."""
    import torch  # here, not at the top: io/files.py and the CLI's error path load without torch

    if dtype == "fast":
        dtype = "bfloat16" if bf16_is_fast() else "float32"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (the class name when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
