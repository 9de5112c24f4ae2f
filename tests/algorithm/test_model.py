"""The decoder: reference attention vs SDPA, RoPE conventions, the Q/K un-permutation, padding."""
import math

import numpy as np
import torch

from conftest import llamacpp_permute, random_model, tiny_config
from minicai.io.checkpoint import unpermute_qk
from minicai.model import (ModelConfig, RMSNorm, ScalarHead, ScalarModel, Transformer, last_real_index,
                           padding_attn_mask, padding_positions, rope_cos_sin, rotate_half)


def test_rmsnorm_hand_value():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = [3, 4]: mean(x^2) = 12.5, rms = sqrt(12.5)
    y = norm(torch.tensor([[3.0, 4.0]]))
    r = math.sqrt(12.5)
    assert torch.allclose(y, torch.tensor([[3 / r, 8 / r]]))


def test_rope_hand_value():
    # head_dim 2: one frequency 1.0; position 1 rotates (x, y) by 1 radian.
    cos, sin = rope_cos_sin(torch.tensor([[1]]), 2, 10000.0, torch.float32)
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    y = x * cos + rotate_half(x) * sin
    assert torch.allclose(y.flatten(), torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_sdpa_equals_manual_attention_with_padding():
    cfg = tiny_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    fast = model.padded_forward(ids, mask)
    model.set_manual_attention(True)
    slow = model.padded_forward(ids, mask)
    model.set_manual_attention(False)
    real = mask.bool()
    assert torch.allclose(fast[real], slow[real], atol=1e-5)
    # and without any padding (the is_causal fast path)
    full = torch.ones_like(mask)
    a = model.padded_forward(ids, full)
    model.set_manual_attention(True)
    b = model.padded_forward(ids, full)
    model.set_manual_attention(False)
    assert torch.allclose(a, b, atol=1e-5)


def test_left_padding_does_not_change_real_logits():
    cfg = tiny_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    plain = model(ids)  # (1, 7, V)
    padded = torch.cat([torch.full((1, 5), 2), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    out = model.padded_forward(padded, mask)[:, 5:]
    assert torch.allclose(plain, out, atol=1e-5)


def test_forward_is_logits_of_the_padded_forward():
    """forward has one output, the logits: with a mask it is padded_forward (the LM head on its
    hidden states), without one the plain causal pass, equal to an all-ones mask."""
    cfg = tiny_config(tie_embeddings=False)
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    att = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    out = model(ids, att)
    assert out.shape == (2, 6, cfg.vocab_size)
    torch.testing.assert_close(out, model.logits(model.padded_forward(ids, att, hidden=True)))
    torch.testing.assert_close(model(ids), model(ids, torch.ones_like(ids)), atol=1e-5, rtol=1e-5)
    assert model.head_weight is model.lm_head.weight
    tied = random_model(tiny_config(tie_embeddings=True))
    assert tied.lm_head is None and tied.head_weight is tied.embed_tokens.weight


def test_padding_helpers():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert padding_positions(m).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    assert last_real_index(m).tolist() == [3, 2]
    am = padding_attn_mask(m.bool(), 4)[:, 0]  # (B, T, S)
    # row 0, query 3 sees keys 2 and 3 only; padding query 0 sees itself only
    assert am[0, 3].tolist() == [False, False, True, True]
    assert am[0, 0].tolist() == [True, False, False, False]
    assert am[1, 2].tolist() == [True, True, True, False]


def interleaved_rope(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """GPT-J / llama.cpp 'normal' RoPE on (..., D): pairs (x[2i], x[2i+1]) rotate by pos * f_i."""
    D = x.shape[-1]
    f = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    a = pos * f
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * torch.cos(a) - x1 * torch.sin(a)
    out[..., 1::2] = x0 * torch.sin(a) + x1 * torch.cos(a)
    return out


def test_qk_unpermute_matches_interleaved_rope():
    """llama.cpp stores Q/K rows permuted for interleaved-pair RoPE. Interleaved RoPE on the raw
    rows must give the same attention scores as rotate_half RoPE on the un-permuted rows."""
    rng = np.random.default_rng(0)
    n_head, hd, dim, base = 3, 8, 12, 10000.0
    w_hf = rng.standard_normal((n_head * hd, dim))  # rotate_half layout (HF)
    w_raw = llamacpp_permute(w_hf, n_head)  # as found in the GGUF
    assert np.array_equal(unpermute_qk(w_raw, n_head), w_hf)
    x = torch.tensor(rng.standard_normal((2, dim)))  # two tokens
    q_raw = (x @ torch.tensor(w_raw).T).view(2, n_head, hd)
    q_hf = (x @ torch.tensor(unpermute_qk(w_raw, n_head)).T).view(2, n_head, hd)
    for p in (0, 1, 5, 37):
        a = interleaved_rope(q_raw, p, base)
        cos, sin = rope_cos_sin(torch.tensor([[p]]), hd, base, torch.float64)
        b = q_hf * cos[0, 0, 0] + rotate_half(q_hf) * sin[0, 0, 0]
        # same vectors up to the pair -> half reordering of dims within each head
        order = torch.tensor([2 * i for i in range(hd // 2)] + [2 * i + 1 for i in range(hd // 2)])
        assert torch.allclose(a[..., order], b, atol=1e-10)
        # hence identical attention scores q_i . q_j
        assert torch.allclose(a @ a.transpose(-1, -2), b @ b.transpose(-1, -2), atol=1e-9)
    # the un-permutation is wrong in the other direction: a naive reshape fails the check
    naive = w_raw.reshape(n_head, 2, hd // 2, dim).swapaxes(1, 2).reshape(n_head * hd, dim)
    assert not np.allclose(naive, w_hf)


def test_scalar_head_reads_last_real_token():
    cfg = tiny_config()
    trunk = random_model(cfg)
    head = ScalarHead(cfg.dim, init_std=1 / math.sqrt(cfg.dim + 1))
    rm = ScalarModel(trunk, head)
    ids = torch.randint(3, cfg.vocab_size, (1, 6))
    v = rm(ids, torch.ones_like(ids))  # (1, 6)
    left = torch.cat([torch.full((1, 3), 2), ids], 1)
    lmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    right = torch.cat([ids, torch.full((1, 3), 2)], 1)
    rmask = lmask.flip(1)
    vl, vr = rm(left, lmask), rm(right, rmask)
    il, ir = last_real_index(lmask), last_real_index(rmask)
    assert il.item() == 8 and ir.item() == 5
    assert torch.allclose(vl[0, il], v[0, -1], atol=1e-5)
    assert torch.allclose(vr[0, ir], v[0, -1], atol=1e-5)


def test_value_head_init_zero_and_qkv_bias():
    assert torch.count_nonzero(ScalarHead(8).proj.weight) == 0
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, qkv_bias=True)
    m = Transformer(cfg)
    assert m.layers[0].self_attn.q_proj.bias is not None and m.layers[0].self_attn.o_proj.bias is None
