"""A Llama-family decoder in plain PyTorch (Llama, SmolLM2, Qwen2).

Read top to bottom: config -> RMSNorm -> RoPE -> attention (GQA, static KV cache) -> SwiGLU MLP
-> block -> Transformer (trunk + LM head) -> ScalarHead (reward / value models).

Parameter names follow the HF checkpoints minus the leading "model." (embed_tokens,
layers.{i}.self_attn.q_proj, ...), so saving and loading an HF folder needs no name table.

Shapes: B batch, T query length, S key length (cache slots), C model dim, H query heads,
K key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    """Rows of the embedding and of the LM head."""
    dim: int = 576
    """Width of the residual stream (hidden_size)."""
    n_layers: int = 30
    """Number of transformer blocks."""
    n_heads: int = 9
    """Query heads; head_dim = dim // n_heads."""
    n_kv_heads: int = 3
    """Key/value heads (grouped-query attention: n_heads // n_kv_heads query heads share one)."""
    hidden_dim: int = 1536
    """Inner width of the SwiGLU MLP (intermediate_size)."""
    rope_base: float = 100000.0
    """RoPE base theta (rope_theta)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_seq_len: int = 8192
    """Longest context the checkpoint was trained for; prompts beyond it are refused."""
    tie_embeddings: bool = True
    """LM head shares the embedding matrix (SmolLM2, Qwen2.5-0.5B/1.5B)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    arch: str = "llama"
    """'llama' or 'qwen2': decides the HF class name when saving."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def linear(x: torch.Tensor, layer: nn.Linear | torch.Tensor) -> torch.Tensor:
    """F.linear, except that a single row (batch-1 decoding) goes through torch.mv: on CPU the
    bf16 matrix-vector kernel is about 2x faster than bf16 GEMM with one row (bench/)."""
    if not isinstance(layer, (nn.Linear, torch.Tensor)):  # a load-time replacement (io/quant.py)
        return layer(x)
    w = layer if isinstance(layer, torch.Tensor) else layer.weight
    b = None if isinstance(layer, torch.Tensor) else layer.bias
    if x.shape[:-1].numel() == 1:
        y = torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])  # (..., out)
        return y if b is None else y + b
    return F.linear(x, w, b)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (Zhang & Sennrich 2019; HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    # exercise
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# exercise
def rope_cos_sin(pos: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """RoPE tables for arbitrary per-row positions (Su et al. 2021, RoFormer eq. 34), in the
    rotate_half layout: frequencies repeated as [f0..f_{D/2-1}, f0..f_{D/2-1}].
    pos (B, T) int -> cos, sin (B, 1, T, D), broadcast over heads."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the GPT-NeoX / HF Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by position: x*cos + rotate_half(x)*sin."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static, preallocated key/value cache for all layers (gpt-fast style).

    Slot s of row b holds the key/value of the token at column s of that row's (left-padded)
    sequence. Every row writes the same slots at each step; padding is hidden by the mask."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, K, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) at slots [start, start+T); return all keys/values so far,
        (B, K, start+T, D) views into the cache."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n: int) -> "KVCache":
        """A new cache whose row b*n + j is a copy of row b (n samples per prompt, one prefill)."""
        L, B, K, S, D = self.k.shape
        new = KVCache(L, B * n, K, S, D, self.k.dtype, self.k.device)
        new.k.copy_(self.k.repeat_interleave(n, dim=1))  # (L, B*n, K, S, D)
        new.v.copy_(self.v.repeat_interleave(n, dim=1))
        return new


# exercise
def manual_attention(q, k, v, mask):
    """Reference attention, written out: softmax(q k^T / sqrt(D) + mask) v (Vaswani et al. 2017,
    eq. 1), with GQA by repeating each key/value head n_heads // n_kv_heads times.
    q (B, H, T, D); k, v (B, K, S, D); mask (B, 1, T, S) bool (True = may attend) or None = causal."""
    H, K = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
    att = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    att = att.masked_fill(~mask, float("-inf"))
    return (att.softmax(-1) @ v.float()).to(q.dtype)  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.use_manual = False  # switch to the reference path (tests compare the two)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape
        q = linear(x, self.q_proj).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = linear(x, self.k_proj).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = linear(x, self.v_proj).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, K, S, D), S = start + T
        if self.use_manual:
            y = manual_attention(q, k, v, mask)
        elif T == 1:
            # Decoding one token: query head h uses key/value head h // rep, so the rep query heads
            # of a group can stand in the query-length slot of their shared K/V head. No copy of
            # the cache, unlike repeat_interleave. mask (B, 1, 1, S) broadcasts over the group.
            rep = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, rep, self.head_dim), k, v,
                                               attn_mask=mask)  # (B, K, rep, D)
            y = y.view(B, self.n_heads, 1, self.head_dim)  # (B, H, 1, D)
        else:
            # Repeat K/V heads ourselves rather than SDPA's enable_gqa: on CPU the fused kernels
            # take the expanded layout, and the copy is small next to the matmuls.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            if mask is None:  # no padding: plain causal (fast kernels); T == S or T == 1 here
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return linear(y, self.o_proj)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return linear(F.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def padding_positions(attn_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a padded batch: the count of real tokens before each column.
    attn_mask (B, T) with 1 for real tokens -> (B, T) positions (0 on leading padding).
    Works for left and right padding alike."""
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)


# exercise
def padding_attn_mask(key_valid: torch.Tensor, T: int, start: int = 0) -> torch.Tensor:
    """Boolean attention mask for queries at slots [start, start+T) over keys at slots
    [0, start+T): key j is visible from query i iff j <= i and key j is a real token.
    A padding query sees itself so that no softmax row is empty (its output is never used).
    key_valid (B, S) bool, S >= start + T -> (B, 1, T, start+T)."""
    S = start + T
    i = torch.arange(start, S, device=key_valid.device)[:, None]  # (T, 1)
    j = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    causal = j <= i  # (T, S)
    mask = causal[None] & key_valid[:, None, :S]  # (B, T, S)
    mask = mask | (i == j)[None]  # a padding query attends to itself only
    return mask[:, None]  # (B, 1, T, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def trunk(self, idx: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states.
        idx (B, T) token ids; pos (B, T) RoPE positions (default start..start+T-1);
        mask (B, 1, T, start+T) bool or None for plain causal; cache and start: write keys/values
        at cache slots [start, start+T). Returns (B, T, C)."""
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)  # (B, T)
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_base, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return self.norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight (V, C): the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head: (B, T, C) -> (B, T, V)."""
        return linear(h, self.head_weight if self.lm_head is None else self.lm_head)

    def forward(self, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training/scoring forward (what DDP and FSDP wrap): ids (B, T) -> logits (B, T, V);
        with attn_mask (B, T) (1 = real token) a padded batch (padded_forward), without it plain
        causal. Losses are computed on these logits by the caller (losses.sft_loss,
        rl.logprobs_from_logits); the fused LM head + cross-entropy is infra/fast.FusedSFTLoss."""
        if attn_mask is None:
            return self.logits(self.trunk(ids))
        return self.padded_forward(ids, attn_mask)

    def set_manual_attention(self, on: bool = True):
        for layer in self.layers:
            layer.self_attn.use_manual = on

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.dtype, p.device)

    def padded_forward(self, ids: torch.Tensor, attn_mask: torch.Tensor, hidden: bool = False) -> torch.Tensor:
        """Full forward over a padded batch (left or right padding), no cache: what training and
        the PPO log-prob pass use. ids, attn_mask (B, T) -> logits (B, T, V) or hidden (B, T, C)."""
        valid = attn_mask.bool()
        mask = None if bool(valid.all()) else padding_attn_mask(valid, ids.shape[1])
        h = self.trunk(ids, padding_positions(attn_mask), mask)
        return h if hidden else self.logits(h)


class ScalarHead(nn.Module):
    """Scalar output on the trunk's final hidden state: a reward model (read at the last real
    token) or a value model (read at every token). Init follows OpenAI lm-human-preferences:
    reward head weights ~ N(0, 1/sqrt(C+1)), value head zero, biases zero
    (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/language/model.py#L251-L254;
    Huang et al. 2023, "The N Implementation Details of RLHF with PPO", reward model detail 2 and
    policy detail 2)."""

    def __init__(self, dim: int, init_std: float | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        if init_std is None:
            nn.init.zeros_(self.proj.weight)
        else:
            nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("gain", torch.ones(()))  # reward normalization (set after RM training)
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T) in fp32."""
        return (self.proj(h).squeeze(-1).float()) * self.gain + self.bias


class ScalarModel(nn.Module):
    """A trunk plus a ScalarHead: the reward model and the value model."""

    def __init__(self, trunk: Transformer, head: ScalarHead):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """ids, attn_mask (B, T) -> scalar per token (B, T)."""
        return self.head(self.trunk.padded_forward(ids, attn_mask, hidden=True))


def last_token_scores(model: nn.Module, ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """A ScalarModel's score of each sequence of a padded batch (left or right padding): its output
    at the last real token, never at a pad (OpenAI reads the reward at the last token:
    https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/rewards.py#L132,
    and at the last response token, before the padding, in
    https://github.com/openai/summarize-from-feedback/blob/8af822a428c93432aa80ffbe5b065a8f93895669/summarize_from_feedback/reward_model.py#L59).
    model may be wrapped (DDP):
    it is called, so its forward runs. ids, attn_mask (B, T) -> (B,) fp32. The reward model
    (training, normalisation, PPO's score, evaluation) reads rewards only through here."""
    r = model(ids, attn_mask)  # (B, T) a scalar at every position
    return r[torch.arange(r.shape[0], device=r.device), last_real_index(attn_mask)].float()  # (B,)


def last_real_index(attn_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, correct for left and right padding.
    attn_mask (B, T) -> (B,) long. (DeepSpeed-Chat reads the score at the last non-pad token.)"""
    T = attn_mask.shape[1]
    cols = torch.arange(T, device=attn_mask.device).expand_as(attn_mask)  # (B, T)
    return torch.where(attn_mask.bool(), cols, -1).max(-1).values  # (B,)
