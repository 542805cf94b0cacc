"""A static, preallocated KV cache for one attention layer.

Every shape is fixed when the model is built, so an exported program never grows a tensor.

- Full-attention layers: `size` = max_seq_len slots, position p in slot p.
- Sliding-window layers only ever look back `sliding_window` positions, so when the window is
  shorter than max_seq_len they get a ring of `size` = sliding_window slots, position p in slot
  p % size. On Gemma 3 (window 512, 5 of every 6 layers sliding) this cuts cache memory at a 32k
  context about 5x. A ring has one spare slot more (see `update`).

`pos` records the absolute position each slot holds (-1: empty). Attention masks by it, which is
what makes the ring, and re-prefilling from an earlier position (a chat turn that rewinds the
cache), exact.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, kv_heads: int, size: int, head_dim: int, dtype: torch.dtype, ring: bool):
        super().__init__()
        self.size = size
        self.ring = ring
        slots = size + 1 if ring else size
        shape = (1, kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)  # [1, kv_heads, slots, head_dim]
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)  # [1, kv_heads, slots, head_dim]
        self.register_buffer("pos", torch.full((slots,), -1, dtype=torch.long), persistent=False)  # [slots]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [1, kv_heads, T, head_dim] for the consecutive positions input_pos [T]."""
        slots, held = input_pos, input_pos
        if self.ring:
            # A prefill longer than the ring maps several positions to one slot, and which write
            # wins would be undefined. Positions that a later one of this call displaces go to the
            # spare slot instead, marked empty: every shape stays static (no slicing by T).
            live = input_pos > input_pos[-1] - self.size
            slots = torch.where(live, input_pos % self.size, self.size)
            held = torch.where(live, input_pos, -1)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.pos.index_copy_(0, slots, held)

    def reset(self) -> None:
        """Forget every position. k and v are zeroed too: a masked slot still takes part in
        probs @ v with weight 0, and 0 * NaN from uninitialized memory would poison the output."""
        self.pos.fill_(-1)
        self.k.zero_()
        self.v.zero_()
