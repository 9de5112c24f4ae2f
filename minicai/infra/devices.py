"""Devices and dtypes: --device / --dtype, and whether bf16 matmuls are fast on this machine."""
from __future__ import annotations

import torch

from ..errors import InputError


def add_device_args(parser) -> None:
    """--device and --dtype, shared by every command."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weight dtype; auto = bfloat16 on CUDA, float32 on CPU")


def bf16_is_fast() -> bool:
    """True on CUDA, or on a CPU with bf16 matrix instructions (avx512_bf16 / AMX), where bf16
    matmuls are several times fp32."""
    cpu = torch.cpu
    return torch.cuda.is_available() or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()


def resolve_device(device: str = "auto", dtype: str = "auto"):
    """('auto'|'cpu'|'cuda[:N]', 'auto'|'fast'|'float32'|'bfloat16') -> (torch.device, torch.dtype).
    auto: bfloat16 on CUDA, else float32; fast: bfloat16 where bf16_is_fast(), else float32."""
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
