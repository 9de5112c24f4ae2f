"""Load-time transforms that make decoding faster: weight-only int8 matrices and fused projections.

For generation-only stages (SL-CAI revisions, labelling, evaluation, chatting). Never for PPO
rollouts or training: their log-probs must come from the trained weights themselves, so every
module here refuses to run with gradients enabled on a trainable weight.

Checkpoints never see a transform: each replacement module keeps the original nn.Parameter under
the same name (`...q_proj.weight`), and everything it adds (int8 copies, scales, fused matrices) is a
non-persistent buffer, so `model.state_dict()` and checkpoint.save_hf write exactly the original
weights. The plain twin is the model before the transform (the transforms copy it by default).

    model, tok, _ = load_model(spec, dtype=torch.bfloat16)
    fast = int8_weight_only(model)           # model itself is left as it was
    gen = sample.generate(fast, prompts, 128, ...)

int8 scheme: symmetric, per output channel (row) of each weight matrix, as gpt-fast's
WeightOnlyInt8QuantHandler (dynamically_quantize_per_channel and WeightOnlyInt8Linear in
https://github.com/pytorch-labs/gpt-fast/blob/1095a5c465d5f6af734a8b86e3f7be49ecfc7668/quantize.py),
with two differences: codes in [-127, 127] with scale = max|w_row| / 127 rounded *up* to bf16, so no
code is ever clamped and |w - q*s| <= s/2 holds for every entry (gpt-fast divides by 127.5 and
clamps to [-128, 127]); and the product runs through aten._weight_int8pack_mm (bf16 activations,
int8 weights, bf16 scales) rather than F.linear on an upcast weight.

Which rows take the int8 kernel: measured on this repo's 2-core CPU (docs/benchmarks.md, Decoding),
the int8 kernel beats bf16 GEMM up to about 4 rows and loses from about 8 rows on; it beats fp32
GEMM at every row count up to 16 and beyond (fp32 GEMM reads twice the bytes of bf16). So a bf16
model uses int8 for <= 4 rows (batch-1..4 decoding) and its bf16 weights otherwise (prefill,
batch 16); an fp32 model uses int8 for <= 64 rows. Both copies stay in memory: for SmolLM2-135M
that is +135 MB of int8 (+28 MB for the tied LM head) beside the 269 MB bf16 (538 MB fp32) weights.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..model import Transformer, linear

INT8_MAX_ROWS = {torch.bfloat16: 4, torch.float32: 64}
"""Largest row count (batch x query length) sent to the int8 kernel, per weight dtype (see the
module docstring for the measurement). Other dtypes (fp16) never use int8 rows."""


def round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= s, elementwise, for s > 0 fp32. (N,) fp32 -> (N,) bf16.
    Positive floats order like their bit patterns, so the next bf16 up is the pattern + 1."""
    b = s.to(torch.bfloat16)  # round to nearest
    low = b.float() < s
    return torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)


@torch.no_grad()
def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) float -> codes q (N, K) int8 in [-127, 127], scales s (N,) bf16
    with s_n >= max_k |w_nk| / 127, q = round(w / s). Then |w_nk / s_n| <= 127, no clamping is needed,
    and |w_nk - q_nk * s_n| <= s_n / 2 (rounding to the nearest integer moves by at most 1/2).
    An all-zero row gets the smallest normal bf16 scale (its codes are 0)."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1).clamp(min=torch.finfo(torch.bfloat16).tiny * 127)  # (N,)
    s = round_up_bf16(amax / 127)  # (N,) bf16
    q = torch.round(wf / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K); clamp is a no-op
    return q, s


def dequantize_per_channel(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8, s (N,) -> q * s (N, K) fp32 (exact: an 8-bit code times an 8-bit-mantissa scale)."""
    return q.float() * s.float()[:, None]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (..., K) any float dtype -> x @ (q * s)^T (..., N) in x's dtype, through the CPU/CUDA kernel
    aten._weight_int8pack_mm (bf16 activations: on CPU its fp32 path is ~5x slower than bf16)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # (R, K)
    y = torch.ops.aten._weight_int8pack_mm(x2, q, s)  # (R, N) bf16
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


def _refuse_grad(weight: torch.Tensor):
    if weight.requires_grad:
        raise RuntimeError("minicai.io.quant: a transformed (int8/fused) model is for generation only; "
                           "train and score PPO log-probs on the plain model")


class FastLinear(nn.Module):
    """A drop-in for one nn.Linear (or the tied LM head) that model.linear dispatches to.

    weight (N, K): the original parameter (registered, so the state dict is unchanged) or, for the
    tied LM head, the embedding matrix (not registered: `register=False`). int8: keep int8 codes
    and scales (non-persistent buffers) and use them for inputs of at most max_rows rows; larger
    inputs go through the original weight exactly as model.linear would."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, int8: bool = True,
                 max_rows: int | None = None, register: bool = True):
        super().__init__()
        if register:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            self.bias = bias
        else:  # a plain attribute: no state-dict entry (the tied LM head is saved as the embedding)
            self.__dict__["weight"] = weight
            self.__dict__["bias"] = bias
        rows = INT8_MAX_ROWS.get(weight.dtype, 0) if max_rows is None else max_rows
        self.max_rows = rows if int8 else 0
        if int8:
            q, s = quantize_per_channel(weight)
            self.register_buffer("q", q, persistent=False)
            self.register_buffer("s", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N)."""
        if torch.is_grad_enabled():
            _refuse_grad(self.weight)
        if x.shape[:-1].numel() <= self.max_rows:
            if x.dtype == torch.bfloat16:  # the common case, with the fewest dispatcher calls (batch-1 decoding
                # is overhead-bound: ~210 of these per token)
                y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.s)  # (R, N)
                y = y.view(*x.shape[:-1], y.shape[-1])  # (..., N)
            else:
                y = int8_matmul(x, self.q, self.s)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)


class FusedGroup(nn.Module):
    """One matrix for several projections of the same input (Q/K/V, or gate/up): the rows of the
    parts stacked, built at load time (never saved). Its FusedPart modules call it with the same x
    one after another; the first call computes all parts in one product and keeps them until the
    last part has been handed out, so the Attention/MLP forwards of model.py stay as they are."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], int8: bool,
                 max_rows: int | None):
        super().__init__()
        w = torch.cat([w.detach() for w in weights])  # (sum N_i, K) a new tensor
        b = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.sizes = [w.shape[0] for w in weights]
        self.mat = FastLinear(w, b, int8=int8, max_rows=max_rows, register=False)  # never in the state dict
        self._x, self._parts, self._left = None, None, 0

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Output i of the fused product for input x (..., K) -> (..., N_i)."""
        if self._x is not x:  # a new input (identity, not value: we hold x, so its id is not reused)
            self._x, self._parts = x, self.mat(x).split(self.sizes, dim=-1)  # views (..., N_i)
            self._left = len(self.sizes)
        y = self._parts[i]
        self._left -= 1
        if self._left == 0:  # every part handed out: drop the references
            self._x, self._parts = None, None
        return y


class FusedPart(nn.Module):
    """Stands in for one nn.Linear of a FusedGroup; keeps that linear's weight (and bias) registered
    under the same names so that the state dict is unchanged."""

    def __init__(self, lin: nn.Linear, group: FusedGroup, index: int):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.__dict__["group"] = group  # not a submodule: the owning block holds it (see fuse)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            _refuse_grad(self.weight)
        return self.group.part(x, self.index)


def _check(model):
    if not isinstance(model, Transformer):
        raise InputError(f"quant: expected a minicai Transformer, got {type(model).__name__}")


def int8_weight_only(model: Transformer, *, max_rows: int | None = None, fuse: bool = False,
                     inplace: bool = False) -> Transformer:
    """Replace every projection of every block and the LM head by a FastLinear with int8 weights.
    fuse: also stack Q/K/V and gate/up into one int8 matrix each (fuse_projections).
    max_rows: rows sent to the int8 kernel (default INT8_MAX_ROWS[dtype]). Returns the transformed
    model, a deep copy unless inplace (the input model is the plain twin)."""
    _check(model)
    m = model if inplace else copy.deepcopy(model)
    if fuse:  # first, so that the loop below quantizes only what is left unfused (o_proj, down_proj)
        fuse_projections(m, int8=True, max_rows=max_rows, inplace=True)
    for block in m.layers:
        for mod, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                           (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                lin = getattr(mod, name)
                if isinstance(lin, nn.Linear):
                    setattr(mod, name, FastLinear(lin.weight, lin.bias, max_rows=max_rows))
    if m.lm_head is None:  # tied: an int8 copy of the embedding, which stays the one saved
        m.lm_head = FastLinear(m.embed_tokens.weight.detach(), max_rows=max_rows, register=False)
    elif isinstance(m.lm_head, nn.Linear):
        m.lm_head = FastLinear(m.lm_head.weight, m.lm_head.bias, max_rows=max_rows)
    return m


def fuse_projections(model: Transformer, *, int8: bool = False, max_rows: int | None = None,
                     inplace: bool = False) -> Transformer:
    """Stack q/k/v_proj into one (H*D + 2*K*D, C) matrix and gate/up_proj into one (2*hidden, C)
    matrix per block, built now and never saved (the original parameters stay registered under
    their names). int8: the stacked matrices are int8 (per-row scales: the same codes as
    quantizing each part alone). Returns the transformed model (a deep copy unless inplace)."""
    _check(model)
    m = model if inplace else copy.deepcopy(model)
    for block in m.layers:
        for mod, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            lins = [getattr(mod, n) for n in names]
            group = FusedGroup([x.weight for x in lins], [x.bias for x in lins], int8, max_rows if int8 else 0)
            mod.fused = group  # registered once, on the owning Attention/MLP (moves with .to())
            for i, (name, lin) in enumerate(zip(names, lins)):
                setattr(mod, name, FusedPart(lin, group, i))
    return m


def is_transformed(model: nn.Module) -> bool:
    """Whether any module of model comes from this file (checkpoint writers and PPO can refuse it)."""
    return any(isinstance(x, (FastLinear, FusedPart, FusedGroup)) for x in model.modules())


def apply_quantize(model: Transformer, mode: str, inplace: bool = False) -> Transformer:
    """The --quantize flag of the generation CLIs: 'none' (the model itself), 'int8', 'int8+fused';
    and 'fused' (bf16/fp32 fused projections, no int8: measured no faster, kept for the bench only).
    A deep copy unless inplace."""
    if mode == "none":
        return model
    if mode == "int8":
        return int8_weight_only(model, inplace=inplace)
    if mode == "int8+fused":
        return int8_weight_only(model, fuse=True, inplace=inplace)
    if mode == "fused":
        return fuse_projections(model, inplace=inplace)
    raise InputError(f"--quantize: unknown mode {mode!r} (none, int8, int8+fused, fused)")
