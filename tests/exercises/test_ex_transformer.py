"""Graded: part 1, the transformer (minicai/model.py): RMSNorm, RoPE, causal GQA attention, the
padding mask. Fixtures: tests/exercises/make_fixtures.py."""
import pytest
import torch

from grading import check, load, mistakes
from minicai import model

ex = pytest.mark.exercise


# ------------------------------------------------------------------------------ rmsnorm
@ex("rmsnorm")
def test_rmsnorm_matches_the_fixture():
    fx = load("rmsnorm")
    norm = model.RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(fx["weight"])
        check(norm(fx["x"]), fx["out"], "RMSNorm (2, 3, 8) fp32", dtype=torch.float32)


@ex("rmsnorm")
def test_rmsnorm_computes_in_fp32_for_a_half_input():
    fx = load("rmsnorm")
    norm = model.RMSNorm(8, 1e-5).half()
    with torch.no_grad():
        norm.weight.copy_(fx["weight16"])
        got = norm(fx["x16"])
    assert torch.isfinite(got).all(), ("RMSNorm fp16: non-finite: |x| ~ 300 squares past fp16's max (65504); "
                                       "compute the mean of squares in fp32 (x.float())")
    check(got, fx["out16"], "RMSNorm fp16 input, |x| ~ 300 (x^2 overflows fp16: compute the mean of squares in fp32)",
          atol=2e-3, rtol=2e-3, dtype=torch.float16)


@ex("rmsnorm")
def test_rmsnorm_hand_value():
    # x = [3, 4]: mean(x^2) = (9 + 16) / 2 = 12.5, rms = sqrt(12.5) = 3.5355339;
    # y = x / rms * w with w = [2, 0.5]: [2 * 3 / 3.5355339, 0.5 * 4 / 3.5355339] = [1.6970563, 0.5656854]
    norm = model.RMSNorm(2, 0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
        check(norm(torch.tensor([[3.0, 4.0]])), torch.tensor([[1.6970563, 0.5656854]]), "RMSNorm([3, 4])")


# ------------------------------------------------------------------------------ rope
@ex("rope")
def test_rope_tables_match_the_fixture():
    fx = load("rope")
    cos, sin = model.rope_cos_sin(fx["pos"], 8, 10000.0, torch.float32)
    check(cos, fx["cos"], "rope cos (B, 1, T, D)", known={"interleaved_layout [f0, f0, f1, f1, ...]": fx["mistake.interleaved"]})
    check(sin, fx["sin"], "rope sin (B, 1, T, D)")


@ex("rope")
def test_rope_tables_have_the_requested_dtype():
    cos, sin = model.rope_cos_sin(torch.arange(4)[None], 8, 10000.0, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16, f"rope: dtype: expected bfloat16 tables, got {cos.dtype}, {sin.dtype}"


@ex("rope")
def test_rope_hand_value():
    # D = 4, base = 100: inv_freq_i = 100^(-2i/4) = [1, 0.1]; at position 1 the angles are [1, 0.1],
    # written twice (rotate_half layout): cos = [cos 1, cos 0.1, cos 1, cos 0.1]
    # = [0.5403023, 0.9950042, 0.5403023, 0.9950042], sin = [0.8414710, 0.0998334, 0.8414710, 0.0998334];
    # at position 0 every angle is 0: cos = 1, sin = 0.
    cos, sin = model.rope_cos_sin(torch.tensor([[0, 1]]), 4, 100.0, torch.float32)
    check(cos, torch.tensor([[[[1.0] * 4, [0.5403023, 0.9950042, 0.5403023, 0.9950042]]]]), "rope cos, D=4")
    check(sin, torch.tensor([[[[0.0] * 4, [0.8414710, 0.0998334, 0.8414710, 0.0998334]]]]), "rope sin, D=4")


# ------------------------------------------------------------------------------ attention
@ex("attention")
def test_attention_matches_the_fixture():
    fx = load("attention")
    known = {k: v for k, v in mistakes(fx).items() if k != "tril_not_aligned"}
    check(model.manual_attention(fx["q"], fx["k"], fx["v"], None), fx["out_causal"],
          "attention, causal (mask=None), H=4, K=2", known=known)
    check(model.manual_attention(fx["q"], fx["k"], fx["v"], fx["mask"]), fx["out_mask"],
          "attention with a boolean padding mask (True = may attend)")
    check(model.manual_attention(fx["q1"], fx["k6"], fx["v6"], None), fx["out_decode"],
          "attention, one query over 6 cached keys (T=1, S=6)")
    check(model.manual_attention(fx["q2"], fx["k6"], fx["v6"], None), fx["out_chunk"],
          "attention, 2 queries at slots 4, 5 over 6 keys (T=2, S=6)",
          known={"causal_mask_not_aligned_to_the_last_key (use tril(diagonal=S - T))": fx["mistake.tril_not_aligned"]})


@ex("attention")
def test_attention_is_causal():
    fx = load("attention")
    q, k, v = fx["q"], fx["k"].clone(), fx["v"].clone()
    out = model.manual_attention(q, k, v, None)
    k[:, :, 3:] += 5.0
    v[:, :, 3:] -= 7.0  # change keys/values 3, 4: queries 0..2 must not see them
    out2 = model.manual_attention(q, k, v, None)
    assert torch.allclose(out[:, :, :3], out2[:, :, :3], atol=1e-6), \
        "attention: masking: changing keys/values at positions 3, 4 changed the output of queries 0..2 (not causal)"


@ex("attention")
def test_attention_hand_values():
    # one head, D = 1, q = [1, 1], k = [0, 2], v = [1, 3] (T = S = 2, causal):
    # query 0 sees key 0 only -> v_0 = 1;
    # query 1: scores [1*0, 1*2] / sqrt(1) = [0, 2], softmax = [1, e^2] / (1 + e^2) = [0.1192029, 0.8807971],
    #          output 0.1192029 * 1 + 0.8807971 * 3 = 2.7615942
    q, k, v = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1), torch.tensor([0.0, 2.0]).view(1, 1, 2, 1), \
        torch.tensor([1.0, 3.0]).view(1, 1, 2, 1)
    check(model.manual_attention(q, k, v, None), torch.tensor([1.0, 2.7615942]).view(1, 1, 2, 1),
          "attention, 1 head, q=[1,1], k=[0,2], v=[1,3]")
    # GQA, H = 4 query heads, K = 2 kv heads, one key: softmax over one key is 1, so head h returns
    # the value of its kv head h // (H // K) = h // 2: v = [10, 20] -> [10, 10, 20, 20] (tiling would give [10, 20, 10, 20])
    q, k = torch.ones(1, 4, 1, 1), torch.ones(1, 2, 1, 1)
    v = torch.tensor([10.0, 20.0]).view(1, 2, 1, 1)
    check(model.manual_attention(q, k, v, None).flatten(), torch.tensor([10.0, 10.0, 20.0, 20.0]),
          "attention GQA: query head h uses kv head h // (H // K)")


# ------------------------------------------------------------------------------ padding_mask
@ex("padding_mask")
def test_padding_mask_matches_the_fixture():
    fx = load("padding_mask")
    v = fx["valid"]
    check(model.padding_attn_mask(v, 7), fx["full"], "padding_attn_mask(valid, T=7) (B, 1, T, S)")
    check(model.padding_attn_mask(v, 2, start=5), fx["chunk"], "padding_attn_mask(valid, T=2, start=5)")
    check(model.padding_attn_mask(v, 1, start=6), fx["step"], "padding_attn_mask(valid, T=1, start=6)")


@ex("padding_mask")
def test_padding_mask_hand_value():
    # key_valid = [pad, x, x], T = 3: query i sees key j iff j <= i and j is real, and itself:
    #   i=0 (a pad): itself only      [T, F, F]
    #   i=1:         key 1            [F, T, F]
    #   i=2:         keys 1, 2        [F, T, T]
    got = model.padding_attn_mask(torch.tensor([[False, True, True]]), 3)
    check(got, torch.tensor([[[[True, False, False], [False, True, False], [False, True, True]]]]),
          "padding_attn_mask([pad, x, x], T=3)")
    assert got.dtype == torch.bool, f"padding_attn_mask: dtype: expected torch.bool, got {got.dtype}"
