"""option_logprobs' shared-prefix KV prefill (feedback.shared_prefix_groups, prefix_last_hidden)
against its slow twin, today's full padded forward of every row (shared_prefix=False)."""
import pytest
import torch

from minicai.feedback import judge_context, option_logprobs, option_tokens, prefix_last_hidden, shared_prefix_groups

COMPS = ["Choose the response that is less harmful.", "Choose the kinder response."]


def norm(groups):
    return sorted((P, sorted(m)) for P, m in groups)


def test_groups_by_hand():
    """Hand-made token tuples: a, b, c share 18 tokens (a, b even 20); d, e share 5 (< 16: no sharing).
    Runs of at most 8: {a, b, c} with P = 18 runs 22 + 23 + 20 - 2 * 18 = 29 tokens, fewer than
    {a, b} (P = 20) + {c}: 22 + 23 - 20 + 20 = 45. Runs of at most 2: {a, b} at P = 20 and c alone."""
    a, b = tuple(range(20)) + (1, 2), tuple(range(20)) + (3, 4, 5)
    c, d, e = tuple(range(18)) + (7, 7), (9,) * 5, (9,) * 5 + (1,)
    assert norm(shared_prefix_groups([a, b, c, d, e], 8)) == [(0, [3]), (0, [4]), (18, [0, 1, 2])]
    assert norm(shared_prefix_groups([a, b, c, d, e], 2)) == [(0, [2]), (0, [3]), (0, [4]), (20, [0, 1])]


def test_prefix_leaves_each_member_a_token():
    """A context that is a prefix of another: P is cut to its length - 1 (20 - 1 = 19), so its last
    hidden state is still computed in the suffix pass."""
    short, long = tuple(range(20)), tuple(range(20)) + (5, 6)
    assert norm(shared_prefix_groups([short, long], 8)) == [(19, [0, 1])]


def contexts_of(tok, prefix):
    """Two conversations x two principles x both orders (8 contexts: the prefixes the groups share
    have different lengths), one context repeated (deduplicated), and a lone short one."""
    out = []
    for conv, r1, r2 in [("Human: hi", "hello there, how can I help you today?", "go away"),
                         ("Human: a much longer question, with more words in it?", "x", "y z w")]:
        for comp in COMPS:
            out += [judge_context(tok, conv, comp, r1, r2) + prefix, judge_context(tok, conv, comp, r2, r1) + prefix]
    return out + [out[0], tok.encode("short") + prefix]


def test_shared_prefix_equals_full_forward(tiny):
    """Equal option log-probs with and without the shared prefix, on the fp32 tiny model, within
    1e-5: the same attention over the same keys at the same RoPE positions, only in other GEMM
    shapes (a different fp32 summation order: differences ~1e-6 on log-probs of size ~5)."""
    model, tok = tiny
    prefix, id_a, id_b = option_tokens(tok)
    ctx = contexts_of(tok, prefix)
    groups = shared_prefix_groups(list(dict.fromkeys(tuple(c) for c in ctx)), 4)
    assert len({P for P, m in groups if P > 0}) >= 2, groups  # prefixes of different lengths in play
    assert any(P == 0 for P, m in groups)  # and a lone context through the full forward
    for bs in (3, 4, 8):
        fast = option_logprobs(model, ctx, (id_a, id_b), tok.pad_id, batch_size=bs)  # (N, 2)
        slow = option_logprobs(model, ctx, (id_a, id_b), tok.pad_id, batch_size=bs, shared_prefix=False)
        assert fast.shape == (len(ctx), 2)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
        assert torch.equal(fast[0], fast[-2])  # the repeated context: scored once


def test_prefix_last_hidden_equals_unpadded_forward(tiny):
    """Rows of two prefixes of different lengths (3 and 5 tokens) and suffixes of different lengths
    (1 to 4 tokens): each row's last hidden state equals the trunk's over the concatenation alone."""
    model, _ = tiny
    prefixes = [[5, 6, 7], [8, 9, 10, 11, 12]]
    suffixes, group = [[13], [14, 15, 16, 17], [18, 19], [20, 21, 22]], [0, 0, 1, 1]
    with torch.no_grad():
        h = prefix_last_hidden(model, prefixes, suffixes, group, pad_id=0)  # (4, C)
        for r, (s, g) in enumerate(zip(suffixes, group)):
            ref = model.trunk(torch.tensor([prefixes[g] + s]))[0, -1]  # (C,)
            torch.testing.assert_close(h[r], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bs", [1, 2])
def test_small_batches_split_groups(tiny, bs):
    """Groups are never larger than a batch; batch_size 1 puts every context alone (full forward)."""
    model, tok = tiny
    prefix, id_a, id_b = option_tokens(tok)
    ctx = contexts_of(tok, prefix)
    groups = shared_prefix_groups(list(dict.fromkeys(tuple(c) for c in ctx)), bs)
    assert max(len(m) for _, m in groups) <= bs
    fast = option_logprobs(model, ctx, (id_a, id_b), tok.pad_id, batch_size=bs)
    slow = option_logprobs(model, ctx, (id_a, id_b), tok.pad_id, batch_size=bs, shared_prefix=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
