"""A plain, export-ready Gemma 1/2/3 text decoder reading and writing a static KV cache.

    logits = model(tokens [1, T], input_pos [T])   # -> [1, T, vocab]

One call can prefill T tokens; the next calls decode one token each at the following positions.
No shape grows: every cache is preallocated at build time (see cache.py). The model holds no
tokenizer and no sampler, and does not branch on quantization or export target: exporters
rewrite it with pure functions instead.

Gemma's quirks, each mirrored from the reference implementation:
- RMSNorm multiplies by (1 + weight), computed in float32: the weights are stored zero-centred.
- Embeddings are multiplied by sqrt(hidden_size) rounded to the model's dtype (in bf16,
  sqrt(2048) = 45.25 becomes 45.25; sqrt(3072) = 55.43 becomes 55.5).
- Queries are scaled by query_pre_attn_scalar**-0.5 (Gemma 2/3), which need not be head_dim.
- Gemma 2 soft-caps attention scores and final logits with cap * tanh(x / cap).
- Gemma 2/3 add RMSNorms after attention and around the feed-forward ("sandwich" norms);
  Gemma 3 also RMS-normalizes each query and key head before RoPE, and uses a different RoPE
  base on sliding (local) and full (global) layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma_edge.cache import KVCache
from gemma_edge.config import FULL, SLIDING, GemmaConfig, check_max_seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-centred: the scale is 1 + weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 (the casts are skipped when x already is: no no-op nodes in exported graphs).
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        h = h * (1.0 + weight)
        return h if x.dtype == torch.float32 else h.type_as(x)


class FeedForward(nn.Module):
    """GeGLU: down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.approximate = "tanh" if config.hidden_activation == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


def rope_table(config: GemmaConfig, layer_type: str, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] in float32, computed exactly as the reference does."""
    base = config.rope_theta if layer_type == FULL else config.rope_local_base_freq
    inv_freq = 1.0 / (base ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
    if layer_type == FULL:
        inv_freq = inv_freq / config.rope_scaling_factor  # "linear" RoPE scaling (Gemma 3 4B+)
    freqs = torch.arange(max_seq_len).float()[:, None] * inv_freq[None, :]  # [max_seq_len, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]: halves rotate together
    return emb.cos(), emb.sin()


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R [head_dim, head_dim] with x @ R.T == cat(-x2, x1) for x = cat(x1, x2)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half), torch.arange(half) + half] = -1.0  # out[i] = -x[i + half]
    r[torch.arange(half) + half, torch.arange(half)] = 1.0  # out[i + half] = x[i]
    return r


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
    """x [heads, T, head_dim]; cos, sin [T, head_dim]. Rotate-half layout, as Gemma checkpoints use.

    The half rotation is a product with a signed permutation matrix: exact (one nonzero term per
    output), and a linear layer XNNPACK runs inside its graph, where slicing a dynamic-length
    tensor would split the graph.
    """
    return x * cos + F.linear(x, rotate) * sin


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_type: str, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        # Sliding layers keep only the last `sliding_window` keys, so their cache is a ring.
        self.window = config.sliding_window if layer_type == SLIDING else None
        ring = bool(self.window) and self.window < max_seq_len
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.use_qk_norm else None
        self.cache = KVCache(self.num_kv_heads, self.window if ring else max_seq_len, d, dtype, ring)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
        # Batch 1: heads lead, so attention is batched 3-D matmuls. Shapes use -1 for the token
        # count, which keeps reshapes of a dynamic T exportable to XNNPACK.
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(-1, h, d).transpose(0, 1)  # [heads, T, d]
        k = self.k_proj(x).view(-1, kv, d).transpose(0, 1)  # [kv, T, d]
        v = self.v_proj(x).view(-1, kv, d).transpose(0, 1)  # [kv, T, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, rotate), apply_rope(k, cos, sin, rotate)
        if self.cache.k.dtype != k.dtype:  # a half-precision cache: this call's keys as the cache keeps them
            k, v = k.to(self.cache.k.dtype), v.to(self.cache.k.dtype)
        out = self._attend(q, k, v, mask)  # [heads, T, d]
        self.cache.update(input_pos, k, v)
        # contiguous, then a view with -1: reshape of the transposed tensor traces as a view with
        # T's symbol, which XNNPACK rejects, so each layer's lowered graph ended there.
        return self.o_proj(out.transpose(0, 1).contiguous().view(-1, h * d))  # [T, hidden]

    def key_blocks(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values [kv, n, d] attention reads, in the mask's column order: what the
        cache held before this call, then this call's.

        Reading the cache before writing it lets a prefill longer than a sliding layer's ring see
        every key it needs, and neither block is copied into the other.
        """
        return [(self.cache.k, self.cache.v), (k, v)]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend over the key blocks (key_blocks): one softmax across them, one product per block."""
        blocks = self.key_blocks(k, v)
        # Query heads sharing a kv head are stacked along the sequence axis, so the kv heads are
        # used as they are instead of being repeated: head h reads kv head h // groups.
        qg = q.contiguous().view(self.num_kv_heads, -1, self.head_dim)  # [kv, groups*T, d]
        if self.cache.k.dtype != q.dtype:
            return self._attend_half(qg, blocks, mask).to(q.dtype).view(self.num_heads, -1, self.head_dim)
        # bmm, not @: matmul lowers to expand + view + bmm, and XNNPACK rejects views of a dynamic T.
        scores = _joined([torch.bmm(qg, bk.transpose(1, 2)) for bk, _ in blocks]) * self.scale
        if self.softcap is not None:  # [kv, groups*T, keys]
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores + mask  # 0 where visible, -inf elsewhere
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype) if q.dtype != torch.float32 else torch.softmax(scores, dim=-1)
        out = self.weighted_values(probs, blocks, q.dtype)  # [kv, groups*T, d]
        return out.view(self.num_heads, -1, self.head_dim)

    def _attend_half(self, qg: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
        """The same attention over a cache kept in a narrower float (float16): both products in the
        cache's type, as the device's half-precision matmuls compute them, everything between them
        (soft-cap, mask, softmax) in float32. The queries are scaled first, so that no product of
        unscaled queries and keys can pass float16's 65504. Returns [kv, groups*T, d] in float32."""
        half = self.cache.k.dtype
        qh = (qg * self.scale).to(half)
        scores = _joined([torch.bmm(qh, bk.transpose(1, 2)) for bk, _ in blocks]).float()
        if self.softcap is not None:  # [kv, groups*T, keys]
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = torch.softmax(scores + mask.float(), dim=-1).to(half)
        return self.weighted_values(probs, blocks, torch.float32)

    def weighted_values(self, probs: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]],
                        dtype: torch.dtype) -> torch.Tensor:
        """probs [kv, groups*T, keys] times the key blocks' values: each block's own product (in
        the values' type), summed in dtype. [kv, groups*T, d]."""
        return _summed([torch.bmm(p, bv).to(dtype) for p, (_, bv) in zip(_parts(probs, blocks), blocks)])

    def mask(self, input_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[groups*T, keys] additive mask in dtype (keys: the key blocks' columns): 0 for the keys
        each query may see, -inf elsewhere.

        The same for every layer of one type, so the model computes it once per type; additive,
        so that applying it is an add, which XNNPACK runs inside its delegated graph.
        """
        visible = self.visible(input_pos)  # [T, keys]
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
        return mask.repeat(self.num_heads // self.num_kv_heads, 1)  # one copy per query head of a group

    def visible(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[T, slots+T] bool: the cached keys, then this call's, each query may see."""
        q_pos = input_pos[:, None]  # [T, 1]
        start = input_pos[0]
        cached = self.cache.positions(start)[None, :]  # [1, slots]
        # Only what precedes this call: re-prefilling from an earlier position (a rewound chat)
        # must not see the stale entries it is about to overwrite.
        old = (cached >= 0) & (cached < start)
        if self.window is not None:  # a key is visible while q - key < window
            old = old & (cached > q_pos - self.window)
        return torch.cat((old.expand(q_pos.shape[0], -1), self.visible_new(input_pos)), dim=-1)

    def visible_new(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[T, T] bool: this call's keys each of its queries may see (causal, within the window)."""
        q_pos = input_pos[:, None]  # [T, 1]
        new = input_pos[None, :] <= q_pos
        if self.window is not None:
            new = new & (input_pos[None, :] > q_pos - self.window)
        return new


def _joined(scores: list[torch.Tensor]) -> torch.Tensor:
    """The key blocks' scores side by side (a block alone as it is: no copy)."""
    return scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)


def _parts(probs: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The probabilities of each key block: split, not slices (no shape guards in export)."""
    return [probs] if len(blocks) == 1 else list(probs.split([bk.shape[1] for bk, _ in blocks], dim=-1))


def _summed(parts: list[torch.Tensor]) -> torch.Tensor:
    return sum(parts[1:], parts[0])


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_type: str, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        self.layer_type = layer_type
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config, layer_type, max_seq_len, dtype)
        self.ffn_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = FeedForward(config)
        # Gemma 2/3 normalize each sub-block's output before adding it to the residual.
        self.attn_post_norm = RMSNorm(config.hidden_size, eps) if config.use_post_norms else None
        self.ffn_post_norm = RMSNorm(config.hidden_size, eps) if config.use_post_norms else None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), input_pos, cos, sin, mask, rotate)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.mlp(self.ffn_norm(x))
        if self.ffn_post_norm is not None:
            h = self.ffn_post_norm(h)
        return x + h


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 cache_dtype: torch.dtype | None = None):
        """cache_dtype: the KV cache's element type, when narrower than dtype (float16: half the
        cache; attention then multiplies in it, see Attention._attend_half)."""
        super().__init__()
        self.config = config
        self.max_seq_len = check_max_seq_len(config, max_seq_len)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t, max_seq_len, dtype) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Gemma ties the output projection to the embedding; an untied checkpoint gets its own.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for layer_type in sorted(set(config.layer_types)):
            self.register_buffer(f"rope_cos_{layer_type}", torch.empty(max_seq_len, config.head_dim), persistent=False)  # [max_seq_len, head_dim]
            self.register_buffer(f"rope_sin_{layer_type}", torch.empty(max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("embed_scale", torch.empty(()), persistent=False)
        self.register_buffer("rope_rotate", torch.empty(config.head_dim, config.head_dim), persistent=False)
        self.to(dtype)
        for layer in self.layers:  # after to(dtype), which would convert the caches too
            cache = layer.attn.cache
            cache.k, cache.v = cache.k.to(cache_dtype or dtype), cache.v.to(cache_dtype or dtype)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the derived buffers (RoPE tables, embedding scale, empty caches).

        Kept apart from __init__ so a model built on the meta device and then allocated with
        to_empty() gets correct buffers without initializing its weights.
        """
        for layer_type in sorted(set(self.config.layer_types)):
            cos, sin = rope_table(self.config, layer_type, self.max_seq_len)
            getattr(self, f"rope_cos_{layer_type}").copy_(cos)  # computed in float32, rounded to dtype
            getattr(self, f"rope_sin_{layer_type}").copy_(sin)
        # float32 first, then the model dtype: the same two roundings as the reference.
        self.embed_scale.copy_(torch.tensor(self.config.embedding_scale, dtype=torch.float32))
        self.rope_rotate.copy_(rotate_half_matrix(self.config.head_dim))
        self.reset_cache()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | int) -> torch.Tensor:
        """tokens [1, T] int64 at positions input_pos [T] (consecutive) -> logits [1, T, vocab]."""
        if isinstance(input_pos, int):
            input_pos = torch.arange(input_pos, input_pos + tokens.shape[1], device=tokens.device)
        return self.logits(self.hidden_states(tokens, input_pos))

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """The decoder stack, writing the caches: [1, T, hidden], before the final norm."""
        dtype = self.embed_scale.dtype  # the model's dtype (the embedding may be a quantized table)
        # Batch 1: the residual stream is [T, hidden] inside the stack.
        x = self.embed_tokens(tokens[0]) * self.embed_scale.to(dtype)  # sqrt(hidden), rounded to dtype
        # RoPE rows and attention masks depend only on the layer type: computed once per type.
        per_type = {}
        for layer in self.layers:
            t = layer.layer_type
            if t not in per_type:
                per_type[t] = (getattr(self, f"rope_cos_{t}")[input_pos], getattr(self, f"rope_sin_{t}")[input_pos],
                               layer.attn.mask(input_pos, dtype))
            x = layer(x, input_pos, *per_type[t], self.rope_rotate)
        return x.unsqueeze(0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[1, T, hidden] -> [1, T, vocab]: final norm, output projection, Gemma 2's soft-cap."""
        head = self.lm_head if self.lm_head is not None else (lambda h: F.linear(h, self.embed_tokens.weight))
        logits = head(self.norm(hidden))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def can_rewind(self) -> bool:
        """Whether a prefill may restart at any earlier position and stay exact.

        Appending (the next position) and restarting at 0 are always exact. A ring has already
        overwritten the keys before an earlier position, so with one, restart at 0 instead.
        """
        return not any(layer.attn.cache.ring for layer in self.layers)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache.reset()


__all__ = ["Gemma", "RMSNorm", "rope_table", "apply_rope"]
