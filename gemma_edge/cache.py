"""A static, preallocated KV cache for one attention layer.

Every shape is fixed when the model is built, so an exported program never grows a tensor.

- Full-attention layers: `size` = max_seq_len slots, position p in slot p.
- Sliding-window layers only ever look back `sliding_window` positions, so when the window is
  shorter than max_seq_len they get a ring of `size` = sliding_window slots, position p in slot
  p % size. On Gemma 3 (window 512, 5 of every 6 layers sliding) this cuts cache memory at a 32k
  context about 5x. A ring has one spare slot more (see `update`).

The cache holds no record of what it holds: positions 0..start-1 are taken to have been written
in order, which is how generation uses it (a prefill from 0, then one position after another).
So the position in every slot follows from `start` alone (`positions`). That matters on device:
ExecuTorch gives mutated buffers no initial value, so a "slot is empty" marker could not be
trusted, while slots at or past `start` are masked whatever they contain.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, kv_heads: int, size: int, head_dim: int, dtype: torch.dtype, ring: bool):
        super().__init__()
        self.size = size
        self.ring = ring
        self.slots = size + 1 if ring else size
        # Batch 1 is implied: 3-D buffers let attention run as batched matmuls over kv heads,
        # which XNNPACK takes whole (4-D matmuls decompose into expand + view it does not).
        shape = (kv_heads, self.slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)  # [kv_heads, slots, head_dim]
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)  # [kv_heads, slots, head_dim]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [kv_heads, T, head_dim] for the consecutive positions input_pos [T]."""
        slots = self.slots_of(input_pos)
        self.k.index_copy_(1, slots, k)
        self.v.index_copy_(1, slots, v)

    def slots_of(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[T] int64: the slot each of the consecutive positions input_pos [T] is written to."""
        if not self.ring:
            return input_pos
        # A prefill longer than the ring maps several positions to one slot, and which write
        # wins would be undefined. Positions that a later one of this call displaces go to the
        # spare slot instead, which is never read: every shape stays static (no slicing by T).
        live = input_pos > input_pos[-1] - self.size
        return torch.where(live, input_pos % self.size, self.size)

    def positions(self, start: torch.Tensor) -> torch.Tensor:
        """[slots] int64: the position each slot holds once 0..start-1 were written; < 0 or >= start: none."""
        slot = torch.arange(self.slots, device=self.k.device)
        if not self.ring:
            return slot
        last = start - 1  # the newest position written; a slot holds the newest p <= last with p % size == slot
        held = last - torch.remainder(last - slot, self.size)
        return torch.where(slot < self.size, held, -1)  # the spare slot holds nothing

    def reset(self) -> None:
        """Zero the buffers. Not needed for correctness (a prefill from 0 masks every slot); it keeps
        uninitialized memory (possibly NaN, and 0 * NaN = NaN in probs @ v) out of the eager model."""
        self.k.zero_()
        self.v.zero_()
