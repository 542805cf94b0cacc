"""Attention in an ExecuTorch program: ours against ExecuTorch's custom LLM ops.

Six full-attention layers at the real Gemma 3 270M's shapes (fp32 projections, static cache of
--max-seq-len), lowered with the exporter's own pipeline, then timed per decode step at several
cache positions and for one prefill, in three variants:

  ours            gemma_edge's attention: XNNPACK bmm over every cache slot, index_copy writes
                  (made in place by ExecuTorch's reinplace pass in the exporter's pipeline)
  ours+op-writes  the same, with the cache written by llama::update_cache_with_indices
  custom-ops      llama::update_cache + llama::custom_sdpa (reads only the positions written)

The three must compute the same outputs (checked before timing). Figures are wall-clock on a shared
machine: compare the rows of one run, not runs with each other.

    .venv/bin/python benchmarks/attention_ops.py [--layers 6] [--max-seq-len 1024] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from gemma_edge.cache import KVCache
from gemma_edge.config import FULL, VARIANTS
from gemma_edge.exporters.executorch import program_bytes
from gemma_edge.model import Attention, apply_rope, rope_table, rotate_half_matrix

CONFIG = VARIANTS["gemma-3-270m"]
PREFILL = 128


class Block(nn.Module):
    """x [1, T, hidden] -> x + sum of attention outputs, layer after layer (our attention)."""

    def __init__(self, layers: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.attn = nn.ModuleList(Attention(CONFIG, FULL, max_seq_len, torch.float32) for _ in range(layers))
        cos, sin = rope_table(CONFIG, FULL, max_seq_len)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("rotate", rotate_half_matrix(CONFIG.head_dim))

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        x = x[0]
        cos, sin, mask = self.cos[input_pos], self.sin[input_pos], self.attn[0].mask(input_pos, x.dtype)
        for attn in self.attn:
            x = x + attn(x, input_pos, cos, sin, mask, self.rotate)
        return x


class OpWrittenCache(KVCache):
    """Our cache layout, written by llama::update_cache_with_indices (kv heads as its batch)."""

    def __init__(self, base: KVCache):
        nn.Module.__init__(self)
        self.size, self.ring, self.slots = base.size, base.ring, base.slots
        kv, slots, d = base.k.shape
        self.register_buffer("k4", torch.zeros(kv, slots, 1, d), persistent=False)
        self.register_buffer("v4", torch.zeros(kv, slots, 1, d), persistent=False)

    @property
    def k(self) -> torch.Tensor:
        return self.k4.squeeze(2)

    @property
    def v(self) -> torch.Tensor:
        return self.v4.squeeze(2)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        index = input_pos[None, :].expand(k.shape[0], -1)  # full-attention layers: slot = position
        torch.ops.llama.update_cache_with_indices(k.unsqueeze(2), self.k4, 0, index)
        torch.ops.llama.update_cache_with_indices(v.unsqueeze(2), self.v4, 0, index)


class CustomOpsBlock(Block):
    """The same layers with [1, max_seq_len, kv, d] caches, update_cache and custom_sdpa."""

    def __init__(self, layers: int, max_seq_len: int):
        super().__init__(layers, max_seq_len)
        shape = (1, max_seq_len, CONFIG.num_key_value_heads, CONFIG.head_dim)
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.zeros(shape))
            self.register_buffer(f"v{i}", torch.zeros(shape))

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        x = x[0]
        start = input_pos[0].item()
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        for i, a in enumerate(self.attn):
            h, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
            q = a.q_norm(a.q_proj(x).view(-1, h, d).transpose(0, 1))
            k = a.k_norm(a.k_proj(x).view(-1, kv, d).transpose(0, 1))
            q, k = apply_rope(q, cos, sin, self.rotate), apply_rope(k, cos, sin, self.rotate)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            torch.ops.llama.update_cache(k.transpose(0, 1).unsqueeze(0), k_cache, start)
            torch.ops.llama.update_cache(a.v_proj(x).view(1, -1, kv, d), v_cache, start)
            out = torch.ops.llama.custom_sdpa(q.transpose(0, 1).unsqueeze(0), k_cache, v_cache, start,
                                              None, 0.0, True, a.scale)
            x = x + a.o_proj(out.reshape(-1, h * d))
        return x


def lower(module: nn.Module, max_seq_len: int):
    from executorch.runtime import Runtime
    from torch.fx.experimental import _config as fx_config

    tokens = torch.export.Dim("tokens", min=2, max=max_seq_len)
    example = (torch.zeros(1, 2, CONFIG.hidden_size), torch.arange(2))
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=({1: tokens}, {0: tokens}), strict=False)
    data = program_bytes(program, {})
    return data, Runtime.get().load_program(data).load_method("forward")  # data: the program reads it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed at each position")
    args = parser.parse_args()

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::*)
    from gemma_edge.commands import ui
    from rich.table import Table

    torch.manual_seed(0)
    ours = Block(args.layers, args.max_seq_len)
    op_writes = Block(args.layers, args.max_seq_len)
    op_writes.load_state_dict(ours.state_dict())
    for attn in op_writes.attn:
        attn.cache = OpWrittenCache(attn.cache)
    custom = CustomOpsBlock(args.layers, args.max_seq_len)
    custom.load_state_dict(ours.state_dict(), strict=False)

    x = torch.randn(1, PREFILL, CONFIG.hidden_size)
    positions = [p for p in (PREFILL, args.max_seq_len // 2, args.max_seq_len - args.steps - 1) if p + args.steps < args.max_seq_len]
    table = Table(title=f"{args.layers} attention layers, Gemma 3 270M shapes, cache {args.max_seq_len}: ms per call")
    for column in ["variant", f"prefill {PREFILL}"] + [f"decode at {p}" for p in positions]:
        table.add_column(column, justify="right")
    reference = None
    console = ui.progress()
    for name, module in [("ours", ours), ("ours+op-writes", op_writes), ("custom-ops", custom)]:
        with console.status(f"lowering {name}"):
            data, method = lower(module, args.max_seq_len)
        prefill = method.execute([x, torch.arange(PREFILL)])[0]
        step = method.execute([x[:, :1] * 0.5, torch.tensor([PREFILL])])[0]
        if reference is None:
            reference = (prefill, step)
        torch.testing.assert_close((prefill, step), reference, atol=1e-4, rtol=1e-4)  # same function
        start = time.perf_counter()
        method.execute([x, torch.arange(PREFILL)])
        cells = [f"{(time.perf_counter() - start) * 1e3:.1f}"]
        for p in positions:
            start = time.perf_counter()
            for i in range(args.steps):
                method.execute([x[:, :1], torch.tensor([p + i])])
            cells.append(f"{(time.perf_counter() - start) / args.steps * 1e3:.2f}")
        table.add_row(name, *cells)
    ui.results().print(table)


if __name__ == "__main__":
    main()
