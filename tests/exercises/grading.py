"""Helpers of the graded exercise tests: load a fixture, compare with a message that says which
property broke (type, shape, dtype, non-finite values, sign, off-by-one, a named typical mistake,
then the values themselves, with the worst position)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load(name: str) -> dict:
    """fixtures/<name>.safetensors as {key: tensor}, or fixtures/<name>.json as its object."""
    st = FIXTURES / f"{name}.safetensors"
    return load_file(str(st)) if st.exists() else json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def mistakes(fx: dict) -> dict:
    """{what: tensor} of the fixture's stored typical mistakes (keys 'mistake.<what>')."""
    return {k.split(".", 1)[1]: v for k, v in fx.items() if k.startswith("mistake.")}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True))


def check(got, want: torch.Tensor, what: str, *, atol: float = 1e-5, rtol: float = 1e-4,
          known: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Assert got == want (within atol/rtol), or fail with the first property that broke.
    known: {description: tensor} of typical mistakes; a match names the mistake.
    dtype: the dtype got must have (None: not checked)."""
    assert isinstance(got, torch.Tensor), f"{what}: type: expected a torch.Tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), \
        f"{what}: shape: expected {tuple(want.shape)}, got {tuple(got.shape)}"
    if dtype is not None:
        assert got.dtype == dtype, f"{what}: dtype: expected {dtype}, got {got.dtype}"
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.dtype == torch.bool or w.dtype == torch.bool:
        bad = (g.bool() != w.bool()).nonzero()
        assert len(bad) == 0, (f"{what}: values: {len(bad)} entries differ, first at index "
                               f"{tuple(bad[0].tolist())}: expected {bool(w[tuple(bad[0])])}, got {bool(g[tuple(bad[0])])}")
        return
    g, w = g.double(), w.double()
    if _matches(g, w, atol, rtol):
        return
    for desc, t in (known or {}).items():
        if _matches(g, t.detach().cpu().double(), atol, rtol):
            raise AssertionError(f"{what}: {desc.replace('_', ' ')}: your result equals the stored output of this "
                                 "typical mistake (see the hint in docs/exercises.md)")
    w_inf, g_inf = torch.isinf(w), torch.isinf(g)
    if not torch.equal(w_inf, g_inf) or not torch.equal(w[w_inf], g[w_inf]):
        idx = tuple(((w_inf != g_inf) | (w_inf & (w != g))).nonzero()[0].tolist())
        raise AssertionError(f"{what}: masking: the -inf/inf pattern differs, first at index {idx}: "
                             f"expected {w[idx].item()}, got {g[idx].item()}")
    fin = ~w_inf
    if bool(torch.isnan(g[fin]).any()) and not bool(torch.isnan(w[fin]).any()):
        idx = tuple((torch.isnan(g) & fin).nonzero()[0].tolist())
        raise AssertionError(f"{what}: non-finite: NaN at index {idx} (a log of 0, 0/0, inf * 0, or an empty softmax row?)")
    g, w = torch.where(fin, g, 0.0), torch.where(fin, w, 0.0)
    if bool(w.abs().max() > atol) and _close(g, -w, atol, rtol):
        raise AssertionError(f"{what}: sign: you return the negative of the expected values")
    if w.dim() >= 1 and w.shape[-1] > 1:
        if _close(g[..., 1:], w[..., :-1], atol, rtol) or _close(g[..., :-1], w[..., 1:], atol, rtol):
            raise AssertionError(f"{what}: off-by-one: your values are shifted by one position along the last dim")
    err = (g - w).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.dim() else ()
    raise AssertionError(f"{what}: values: max |error| {err.max().item():.3g} at index {idx}: "
                         f"expected {w[idx].item():.6g}, got {g[idx].item():.6g}")


def _matches(g: torch.Tensor, w: torch.Tensor, atol: float, rtol: float) -> bool:
    """Same shape, same inf entries, NaN where NaN, and close elsewhere."""
    if g.shape != w.shape:
        return False
    wi = torch.isinf(w)
    if not torch.equal(wi, torch.isinf(g)) or not torch.equal(w[wi], g[wi]):
        return False
    return _close(torch.where(wi, 0.0, g), torch.where(wi, 0.0, w), atol, rtol)


def check_float(got, want: float, what: str, *, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """A Python float (or 0-d tensor) against a number."""
    if isinstance(got, torch.Tensor):
        assert got.numel() == 1, f"{what}: shape: expected a scalar, got shape {tuple(got.shape)}"
        got = got.item()
    assert isinstance(got, (float, int)), f"{what}: type: expected a number, got {type(got).__name__}"
    if abs(got - want) <= atol + rtol * abs(want):
        return
    if abs(want) > atol and abs(got + want) <= atol + rtol * abs(want):
        raise AssertionError(f"{what}: sign: expected {want!r}, got its negative {got!r}")
    raise AssertionError(f"{what}: values: expected {want!r}, got {got!r}")


def garbage_on(x: torch.Tensor, mask: torch.Tensor, value: float = 1e6) -> torch.Tensor:
    """x with `value` on the padding positions (mask False): a result must not change."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def check_text(got, want: str, what: str) -> None:
    """A string against the expected string: the first line that differs, both shown with repr."""
    assert isinstance(got, str), f"{what}: type: expected a str, got {type(got).__name__}"
    if got == want:
        return
    gl, wl = got.split("\n"), want.split("\n")
    i = next((i for i, (a, b) in enumerate(zip(gl, wl)) if a != b), min(len(gl), len(wl)))
    exp = repr(wl[i]) if i < len(wl) else "(end of text)"
    raise AssertionError(f"{what}: layout: line {i + 1} differs: expected {exp}, got "
                         f"{repr(gl[i]) if i < len(gl) else '(end of text)'} ({len(wl)} lines expected, {len(gl)} got)")
