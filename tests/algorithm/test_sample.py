"""The batched sampler against its slow twin (a full uncached forward), seeds, stops, filters."""
import pytest
import torch

from conftest import random_model, tiny_config
from minicai.infra.fast import compiled_decode_one_token
from minicai.sample import filter_logits, generate, sample_token
from minicai.errors import InputError


def full_forward_check(model, gen, temperature):
    """Re-run prompt + response through an uncached full forward; return (argmax, logprobs) at
    each response position, the slow reference for the cached decode loop."""
    ids = torch.cat([gen.prompt_ids, gen.tokens], 1)  # (N, P+G)
    att = torch.cat([gen.prompt_mask, gen.mask.long()], 1)  # (N, P+G)
    logits = model.padded_forward(ids, att).float()  # (N, P+G, V)
    P = gen.prompt_ids.shape[1]
    pred = logits[:, P - 1:-1]  # logits that produced each response token (N, G, V)
    t = 1.0 if temperature == 0 else temperature
    lp = (pred / t).log_softmax(-1).gather(-1, gen.tokens[..., None]).squeeze(-1)  # (N, G)
    return pred.argmax(-1), lp


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=1)


def test_cached_greedy_equals_uncached_argmax(model):
    prompts = prompts_of([5, 11, 8], model.cfg.vocab_size)
    gen = generate(model, prompts, 20, temperature=0, pad_id=2)
    assert gen.tokens.shape == (3, 20) and bool(gen.mask.all())
    argmax, lp = full_forward_check(model, gen, 0)
    assert torch.equal(argmax, gen.tokens)
    assert torch.allclose(lp, gen.logprobs, atol=1e-5)


def test_sampled_logprobs_match_full_forward_with_n_copies(model):
    prompts = prompts_of([4, 9], model.cfg.vocab_size)
    gen = generate(model, prompts, 12, temperature=0.7, n=3, seed=5, pad_id=2)
    assert gen.tokens.shape == (6, 12)
    _, lp = full_forward_check(model, gen, 0.7)
    assert torch.allclose(lp[gen.mask], gen.logprobs[gen.mask], atol=1e-5)
    # the prompt copies are the same prompt
    assert torch.equal(gen.prompt_ids[0], gen.prompt_ids[2]) and torch.equal(gen.prompt_ids[3], gen.prompt_ids[5])
    # three samples of one prompt differ (different generators)
    assert not torch.equal(gen.tokens[0], gen.tokens[1])


def test_greedy_row_independent_of_batch_and_padding(model):
    target = prompts_of([6], model.cfg.vocab_size, seed=3)[0]
    alone = generate(model, [target], 16, temperature=0, pad_id=2).tokens[0]
    others = prompts_of([3, 20, 14, 1], model.cfg.vocab_size, seed=4)
    for batch, row in [([target] + others, 0), (others[:2] + [target], 2), ([others[1], target], 1)]:
        gen = generate(model, batch, 16, temperature=0, pad_id=2)
        assert torch.equal(gen.tokens[row], alone), f"row {row} changed with batch composition"


def test_seeded_sampling_reproducible_and_batch_independent(model):
    p = prompts_of([7, 3], model.cfg.vocab_size, seed=9)
    a = generate(model, p, 15, temperature=1.0, seed=[11, 12], pad_id=2)
    b = generate(model, p, 15, temperature=1.0, seed=[11, 12], pad_id=2)
    assert torch.equal(a.tokens, b.tokens)
    c = generate(model, [p[1]], 15, temperature=1.0, seed=[12], pad_id=2)
    assert torch.equal(c.tokens[0], a.tokens[1])
    d = generate(model, p, 15, temperature=1.0, seed=[13, 14], pad_id=2)
    assert not torch.equal(a.tokens, d.tokens)


def test_stop_ids_mask_and_padding(model):
    p = prompts_of([5, 6, 7], model.cfg.vocab_size, seed=2)
    free = generate(model, p, 10, temperature=0, pad_id=2)
    stop = int(free.tokens[0, 3])  # row 0 will stop at step 3 (or earlier if it occurs before)
    gen = generate(model, p, 10, temperature=0, stop_ids=[stop], pad_id=2)
    first = (free.tokens[0] == stop).nonzero()[0].item()
    assert gen.mask[0].tolist() == [True] * (first + 1) + [False] * (gen.tokens.shape[1] - first - 1)
    assert bool(gen.stopped[0])
    assert (gen.tokens[0, first + 1:] == 2).all() and (gen.logprobs[0, first + 1:] == 0).all()
    # other rows are unaffected up to their own stop
    for r in (1, 2):
        n = int(gen.mask[r].sum())
        assert torch.equal(gen.tokens[r, :n], free.tokens[r, :n])


def test_stop_strings(tiny):
    model, tok = tiny
    ids = tok.render([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    free = generate(model, [ids], 12, temperature=0, pad_id=tok.pad_id)
    text = tok.decode(free.tokens[0].tolist())
    needle = text[2:4]
    assert needle
    gen = generate(model, [ids], 12, temperature=0, pad_id=tok.pad_id, stop_strings=[needle], tokenizer=tok)
    out = gen.texts(tok)[0]
    assert needle in out and bool(gen.stopped[0])
    assert len(gen.tokens[0][gen.mask[0]]) <= len(free.tokens[0])
    # stopped as soon as it appeared: dropping the last token removes the needle
    assert needle not in tok.decode(gen.tokens[0][gen.mask[0]][:-1].tolist())


def test_filter_logits_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p07 = filter_logits(logits, top_p=0.7)  # 0.5 < 0.7 -> keep 0.3 too; 0.8 >= 0.7 -> drop the rest
    assert torch.isfinite(p07[0, :2]).all() and torch.isinf(p07[0, 2:]).all()
    p05 = filter_logits(logits, top_p=0.5)  # the top token alone reaches 0.5
    assert torch.isfinite(p05[0, :1]).all() and torch.isinf(p05[0, 1:]).all()


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(6000, 3)
    gens = [torch.Generator().manual_seed(i) for i in range(6000)]
    tok, lp = sample_token(logits, 1.0, 0, 1.0, gens)
    freq = torch.bincount(tok, minlength=3).float() / 6000
    # binomial std at n=6000 is <= 0.0065: 4 sigma
    assert torch.allclose(freq, probs, atol=0.026), freq
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)


def test_topk1_is_greedy(model):
    p = prompts_of([5, 8], model.cfg.vocab_size, seed=6)
    g = generate(model, p, 8, temperature=0, pad_id=2)
    s = generate(model, p, 8, temperature=0.9, top_k=1, seed=3, pad_id=2)
    assert torch.equal(g.tokens, s.tokens)


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(InputError, match="prompt 1: 4100 tokens .* context of 4096"):
        generate(model, [[5, 6], [5] * 4100], 4, temperature=0)
    with pytest.raises(InputError, match="prompt 0: 2100 tokens after a 2000-token shared prefix .* context of 4096"):
        generate(model, [[5] * 2100], 4, temperature=0, prefix=[5] * 2000)
    # generation stops at the context length instead of writing past the cache
    gen = generate(model, [[5] * 4090], 20, temperature=0, pad_id=2)
    assert gen.tokens.shape[1] == 6
    gen = generate(model, [[5] * 90], 20, temperature=0, pad_id=2, prefix=[5] * 4000)  # the prefix counts too
    assert gen.tokens.shape[1] == 6


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(model):
    """torch.compile'd decode step (generate(decode=compiled_decode_one_token())) against the eager loop: padded batch,
    greedy tokens equal, log-probs within fused-kernel rounding; then the uncached slow twin."""
    prompts = prompts_of([5, 11, 8], model.cfg.vocab_size)
    eager = generate(model, prompts, 12, temperature=0, pad_id=2)
    compiled = generate(model, prompts, 12, temperature=0, pad_id=2, decode=compiled_decode_one_token())
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-4)
    argmax, _ = full_forward_check(model, compiled, 0)
    assert torch.equal(argmax, compiled.tokens)
    again = generate(model, prompts_of([3, 7], model.cfg.vocab_size, seed=9), 6, temperature=0.7, pad_id=2,
                     decode=compiled_decode_one_token())  # another batch size and length: no crash, real tokens
    assert again.tokens.shape[0] == 2 and bool(again.mask[:, 0].all())


def test_zero_probability_tokens_are_never_sampled():
    """Filtered tokens (probability 0) own an empty CDF interval: over many rows, with the only
    allowed tokens in the middle and at the end of the vocabulary, nothing else comes out."""
    logits = torch.full((4000, 7), float("-inf"))
    logits[:, 3] = 0.0
    logits[:, 6] = 0.0
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tok, _ = sample_token(logits, 1.0, 0, 1.0, gens)
    assert set(tok.tolist()) == {3, 6}
    assert abs((tok == 3).float().mean().item() - 0.5) < 0.04  # 5 sigma at n=4000
