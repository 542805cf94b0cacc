"""Export-only rewrites: pure functions module -> module; the eager model stays plain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma_edge.cache import KVCache
from gemma_edge.model import Attention, FeedForward, RMSNorm


class LinearMeanRMSNorm(RMSNorm):
    """RMSNorm whose mean square is a product with a constant 1/d row: XNNPACK runs linear layers of
    any rank inside its graph but averages only over 4-D tensors, so a plain mean would split the
    delegated graph at every norm. Differs from the mean by float32 rounding of 1/d (~1e-7).
    Its scale 1 + weight is a constant, added once at export in float32 as the model adds it on every
    call (the same values): one XNNPACK op less per norm, each set up on every call (real Gemma 3
    270M: 108 a decode step, ~3% of its time; the program's logits unchanged, bit for bit)."""

    mean_row: torch.Tensor
    scale_row: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(F.linear(h * h, self.mean_row) + self.eps)
        h = h * self.scale_row
        return h if x.dtype == torch.float32 else h.type_as(x)


def replace_rmsnorm_mean_with_linear(model: nn.Module) -> nn.Module:
    """Each RMSNorm (its weights filled) as a LinearMeanRMSNorm."""
    for module in model.modules():
        if type(module) is RMSNorm:
            dim = module.weight.shape[0]
            module.__class__ = LinearMeanRMSNorm
            module.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim), persistent=False)
            with torch.no_grad():
                module.register_buffer("scale_row", 1.0 + module.weight.float(), persistent=False)
    return model


class ExplicitTanhGeluFeedForward(FeedForward):
    """GeGLU with GELU's tanh form written out. XNNPACK's GELU ignores approximate="tanh" and computes
    the erf form (measured: 4.7e-4 max abs error on N(0, 3) inputs), which Gemma's weights were not
    trained with; its tanh is accurate to 2.4e-7."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        if self.approximate == "tanh":
            g = 0.5 * g * (1.0 + torch.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # sqrt(2/pi)
        else:
            g = F.gelu(g)
        return self.down_proj(g * self.up_proj(x))


def replace_gelu_with_explicit_tanh_form(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is FeedForward:
            module.__class__ = ExplicitTanhGeluFeedForward
    return model


class TensorKVCache(KVCache):
    """A cache whose contents come in and go out as tensors, for graphs without state (ONNX).

    k4 and v4 [1, kv_heads, slots, head_dim] are the past tensors themselves, set before each
    call; attention reads k and v, reshapes of them (aliases in ONNX Runtime, no copy); update
    scatters this call's rows into new tensors with every index given, which exports as one
    ScatterND on the past tensor: no transpose, no gather, and in place when present is bound to
    past's buffer. (index_copy along the slot axis exports as transpose, scatter, transpose back,
    and a select of batch 0 as a Gather: three copies of every layer's cache per call.)
    Every layer holds max_seq_len slots (no ring): the ecosystem's past/present contract is one
    fixed [batch, kv_heads, max_seq_len, head_dim] per layer. Sliding layers still mask by window.
    """

    @property
    def k(self) -> torch.Tensor:  # [kv_heads, slots, head_dim]
        return self.k4.reshape(self.k4.shape[1:])

    @property
    def v(self) -> torch.Tensor:
        return self.v4.reshape(self.v4.shape[1:])

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv, t = k.shape[0], k.shape[1]
        heads = torch.arange(kv)[:, None].expand(kv, t)
        index = [torch.zeros_like(heads), heads, self.slots_of(input_pos)[None, :].expand(kv, t)]  # each [kv, T]
        self.k4 = torch.ops.aten.index_put(self.k4, index, k)
        self.v4 = torch.ops.aten.index_put(self.v4, index, v)


def pass_caches_as_tensors(model: nn.Module, max_seq_len: int) -> nn.Module:
    for module in model.modules():
        cache = getattr(module, "cache", None)
        if type(cache) is KVCache:
            kv, _, d = cache.k.shape
            dtype = cache.k.dtype
            del cache.k, cache.v
            cache.__class__ = TensorKVCache
            cache.size = cache.slots = max_seq_len
            cache.ring = False
            cache.k4 = cache.v4 = torch.zeros(1, kv, max_seq_len, d, dtype=dtype)  # shape examples; set per call
    return model


class JoinedValuesAttention(Attention):
    """Attention whose probabilities multiply the key blocks' values joined into one [kv, keys, d]
    (a copy of the cache's values per call), where Attention splits the probabilities by block and
    sums the blocks' products. XNNPACK takes no split of a dynamic size, so in a .pte each layer's ran
    outside it and cut the delegated graph in two there: 36 of the 40 XNNPACK calls of a Gemma 3 270M
    step. Joined, the decoder's layers lower as one graph (then cut between layers by weight bytes:
    xnnpack_partitions.PARTITION_BYTES)."""

    def weighted_values(self, probs: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]],
                        dtype: torch.dtype) -> torch.Tensor:
        values = blocks[0][1] if len(blocks) == 1 else torch.cat([bv for _, bv in blocks], dim=1)
        return torch.bmm(probs, values).to(dtype)


def join_value_blocks(model: nn.Module) -> nn.Module:
    """Each Attention as a JoinedValuesAttention (the same attention, one product of the values)."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = JoinedValuesAttention
    return model


class NewKeysOnlyAttention(Attention):
    """Attention for a call starting at position 0 (a fresh prefill): the cache holds nothing such a
    call may see, so it reads this call's keys alone, where Attention also multiplies by every slot of
    the cache and masks them all (a 128-token prompt at 1024 positions: 1024 slots of a full layer,
    513 of a sliding one's ring, against 128 keys). It writes the cache as Attention does."""

    def key_blocks(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k, v)]

    def visible(self, input_pos: torch.Tensor) -> torch.Tensor:
        return self.visible_new(input_pos)


def attend_new_keys_only(model: nn.Module) -> nn.Module:
    """Each Attention (or a rewrite of it) as a NewKeysOnlyAttention: the model for calls at position 0
    only (one key block: its values' product is one either way)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.__class__ = NewKeysOnlyAttention
    return model
