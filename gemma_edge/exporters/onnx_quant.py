"""Block-quantized weights for ONNX Runtime's MatMulNBits and GatherBlockQuantized, as modules.

The model is quantized in PyTorch before it is traced, layer by layer as the checkpoint is read
(exporters/streaming.py), so the exporter never holds a full-precision model: the traced graph
already calls the quantized operators, and its initializers are the quantized bytes.

- Linear layers (every decoder projection, and the output projection) become MatMulNBits: 4-bit
  (int4) or 8-bit (int8) blocks of --group-size along the input dimension, asymmetric (a zero
  point per block), round to nearest. A width that is not a multiple of the block is padded with
  zeros inside the block, which is exact.
- The embedding becomes GatherBlockQuantized, 4-bit or 8-bit asymmetric blocks along hidden, each
  block on its least-squared-error clipped range (CLIPS).
- Gemma ties the output projection to the embedding: quantized alike (same bits, hidden a whole
  number of blocks), the projection's MatMulNBits reads the embedding's own bytes (one copy, no
  fp32 copy). Otherwise each gets its own.
- A 4-bit tied table may also hold some rows at 8 bits (HotRowsTable), read in place of their 4-bit
  ones: the rows of the tokens a text uses, where most of the table's 4-bit error reaches the logits.

Eager calls compute with the dequantized weights, so the rewritten model is the export's exact
twin in PyTorch (tests hold the graph to it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MatMulNBits' compute precision. 4: activations quantized to int8 per block, int8 dot products.
# Measured on the real Gemma 3 270M int4 (512 tokens, perplexity vs fp32): level 4 x1.931, level 0
# (float32 arithmetic) x1.940, level 1 the same: no loss.
ACCURACY_LEVEL = 4
# Blocks are asymmetric. Measured, int4 block 32 with an int4 embedding: symmetric x1.93,
# asymmetric x1.56 (its zero points cost 4 bits per block, 1.6% of the weights). Asymmetric blocks
# fit weights whose range is not centred on zero, which the symmetric grid wastes half of.
# int8 is 8-bit MatMulNBits, not onnxruntime's per-channel dynamic quantization (quantize_dynamic:
# int8 weights per channel, activations quantized per tensor at run time, MatMulInteger), which
# measured on the real Gemma 3 270M: x6.72 perplexity (top-1 40%) at 445 MiB, against x1.007
# (top-1 97%) at 298 MiB here. Per-tensor activation scales cannot hold Gemma's activation
# outliers; it was faster (prefill 2.2x, decode 1.2x) but that quality is no int8.
BITS = {"int4": 4, "int8": 8}
# The clippings of each block's range tried for the embedding table: the one with the least
# squared error wins. Measured on the real Gemma 3 270M's tied table (int8 linears, 512 tokens):
# perplexity x1.108 with the full range (round to nearest), x1.080 with the search
# (benchmarks/int4_quality.py). Linear layers use the full range (NEAREST).
CLIPS = tuple(1.0 - 0.01 * i for i in range(21))
NEAREST = (1.0,)
MS = "com.microsoft"


def quantize_blocks(w: torch.Tensor, bits: int, block: int, clips: tuple[float, ...] = NEAREST,
                    rows_at_once: int = 64, grid: BlockGrid | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (q uint8 [rows, blocks * block], scales float32 [rows, blocks], zero points
    uint8 [rows, blocks]), asymmetric blocks of `block` along cols on 0 .. 2^bits - 1, each on the
    clipping of its range [min(w, 0), max(w, 0)] (clips) with the least squared error, or on the
    grid given (a calibrated layer's, see block_grid). Columns are zero-padded to whole blocks.
    Rows go in small chunks, whose temporaries stay in the CPU's cache through the search's passes
    (measured: 9x faster than 4096-row chunks)."""
    parts = []
    for i in range(0, w.shape[0], rows_at_once):
        rows = w[i:i + rows_at_once].float()
        g = BlockGrid(*_grid_rows(rows, bits, block, clips), bits, block) if grid is None else grid.rows(i, i + rows_at_once)
        parts.append((g.values(rows), g.scales, g.zero.to(torch.uint8)))
    return tuple(torch.cat(p) for p in zip(*parts))


@dataclass
class BlockGrid:
    """Each block's grid, (q - zero) * scale for q in 0 .. 2^bits - 1."""

    scales: torch.Tensor  # float32 [rows, blocks]
    zero: torch.Tensor  # float32 [rows, blocks], whole numbers
    bits: int
    block: int

    def values(self, w: torch.Tensor) -> torch.Tensor:
        """w [rows, cols] rounded onto the grid: q uint8 [rows, blocks * block] (cols zero-padded)."""
        rows, cols = w.shape
        blocks = F.pad(w.float(), (0, -cols % self.block)).view(rows, -1, self.block)
        safe = torch.where(self.scales == 0, 1.0, self.scales)
        q = (torch.round(blocks / safe[..., None]) + self.zero[..., None]).clamp(0, (1 << self.bits) - 1)
        return q.to(torch.uint8).view(rows, -1)

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Column col of a matrix, w [rows], rounded onto its block's grid and dequantized (gptq.Grid)."""
        scales, safe, zeros = self._by_block
        scale, zero = scales[col // self.block], zeros[col // self.block]
        q = (torch.round(w / safe[col // self.block]) + zero).clamp(0, (1 << self.bits) - 1)
        return (q - zero) * scale

    @functools.cached_property
    def _by_block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scales, the scales with 1 for 0 (a divisor) and the zero points, [blocks, rows] each:
        a block's column of them contiguous, made once (GPTQ reads one for every column it rounds)."""
        return (self.scales.T.contiguous(), torch.where(self.scales == 0, 1.0, self.scales).T.contiguous(),
                self.zero.T.contiguous())

    def steps(self, cols: int) -> torch.Tensor:
        """float32 [rows, cols]: the grid's spacing at each column (its block's scale)."""
        return self.scales.repeat_interleave(self.block, 1)[:, :cols]

    def rows(self, start: int, end: int) -> BlockGrid:
        return BlockGrid(self.scales[start:end], self.zero[start:end], self.bits, self.block)


def block_grid(w: torch.Tensor, bits: int, block: int, clips: tuple[float, ...] = NEAREST,
               rows_at_once: int = 64) -> BlockGrid:
    """The grid quantize_blocks rounds w [rows, cols] onto: per block, the clipping of its range with
    the least squared error."""
    parts = [_grid_rows(w[i:i + rows_at_once].float(), bits, block, clips) for i in range(0, w.shape[0], rows_at_once)]
    scales, zero = (torch.cat(p) for p in zip(*parts))
    return BlockGrid(scales, zero, bits, block)


def _grid(lo: torch.Tensor, hi: torch.Tensor, high: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block: the scale mapping [lo, hi] onto 0 .. high, a divisor safe for empty ranges, the zero point."""
    scales = (hi - lo) / high
    safe = torch.where(scales == 0, 1.0, scales)
    return scales, safe, torch.round(-lo / safe).clamp(0, high)


def _grid_rows(w: torch.Tensor, bits: int, block: int, clips: tuple[float, ...]):
    rows, cols = w.shape
    blocks = F.pad(w, (0, -cols % block)).view(rows, -1, block)
    high = (1 << bits) - 1
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)  # [rows, blocks]
    clip = torch.ones_like(lo)
    if len(clips) > 1:
        best = torch.full_like(lo, float("inf"))
        x = torch.empty_like(blocks)
        for c in clips:  # the squared error of each block on this clipping, in place
            scales, safe, zero = _grid(lo * c, hi * c, high)
            torch.div(blocks, safe[..., None], out=x)
            x.round_().add_(zero[..., None]).clamp_(0, high).sub_(zero[..., None]).mul_(scales[..., None]).sub_(blocks).square_()
            err = x.sum(-1)
            better = err < best
            best, clip = torch.where(better, err, best), torch.where(better, c, clip)
    scales, _, zero = _grid(lo * clip, hi * clip, high)
    return scales, zero


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, values] -> uint8 [rows, bytes]: 4-bit values two per byte, low nibble first."""
    if bits == 8:
        return q
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, bytes] -> int16 [rows, values]; 4-bit values packed low nibble first."""
    if bits == 8:
        return data.astype(np.int16)
    out = np.empty((data.shape[0], data.shape[1] * 2), np.int16)
    out[:, 0::2], out[:, 1::2] = data & 0x0F, data >> 4
    return out


class QuantizedMatrix(nn.Module):
    """A [rows, cols] weight in asymmetric blocks of `block` along cols, as ONNX Runtime stores it:

        data         uint8 [rows, blocks, block * bits / 8]  (cols zero-padded to whole blocks)
        scales       float32 [rows, blocks]
        zero_points  uint8 [rows, ceil(blocks * bits / 8)]   (4-bit: two per byte)

    GatherBlockQuantized reads data as [rows, ceil(cols * bits / 8)], without padding (padded=False).
    When cols is a whole number of blocks the two layouts are the same bytes: one matrix then
    serves a tied embedding and output projection."""

    def __init__(self, rows: int, cols: int, bits: int, block: int, clips: tuple[float, ...] = NEAREST,
                 padded: bool = True):
        super().__init__()
        self.rows, self.cols, self.bits, self.block, self.clips = rows, cols, bits, block, clips
        blocks = -(-cols // block)
        shape = (rows, blocks, block * bits // 8) if padded or cols % block == 0 else (rows, -(-cols * bits // 8))
        self.register_buffer("data", torch.empty(shape, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(rows, blocks))
        self.register_buffer("zero_points", torch.empty(rows, -(-blocks * bits // 8), dtype=torch.uint8))

    @torch.no_grad()
    def set(self, w: torch.Tensor, grid: BlockGrid | None = None, rows: int = 4096, ids: torch.Tensor | None = None) -> None:
        """Quantize w [rows, cols] (or its rows ids, in that order) into the buffers, on its own grid
        (block_grid) or the one given (of the rows stored), a block of rows at a time, each written in
        place: no whole-matrix temporaries (a 256k-row table's unpacked values, their join and their
        packing were 1.3 GB at Gemma 2B's width)."""
        data = self.data.view(self.rows, -1)
        for i in range(0, self.rows, rows):
            source = w[i:i + rows] if ids is None else w[ids[i:i + rows]]
            q, scales, zero = quantize_blocks(source, self.bits, self.block, self.clips,
                                              grid=None if grid is None else grid.rows(i, i + rows))
            if self.data.dim() == 2:  # unpadded rows
                q = q[:, :self.cols]
            data[i:i + rows] = pack(q, self.bits)
            self.scales[i:i + rows] = scales
            self.zero_points[i:i + rows] = pack(zero, self.bits)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: the weight the operators compute with."""
        blocks = self.scales.shape[1]
        data, zero = (x.numpy().reshape(self.rows, -1) for x in (self.data, self.zero_points))
        q = np.zeros((self.rows, blocks * self.block), np.int16)
        q[:, :self.cols] = unpack(data, self.bits)[:, :self.cols]
        z = unpack(zero, self.bits)[:, :blocks, None]
        w = (q.reshape(self.rows, blocks, self.block) - z) * self.scales.numpy()[..., None]
        return torch.from_numpy(w.reshape(self.rows, -1)[:, :self.cols].astype(np.float32))


def matmul_nbits(x: torch.Tensor, w: QuantizedMatrix) -> torch.Tensor:
    """x @ W^T as one com.microsoft MatMulNBits node (export only)."""
    return torch.onnx.ops.symbolic(
        f"{MS}::MatMulNBits", (x, w.data, w.scales, w.zero_points),
        {"K": w.cols, "N": w.rows, "bits": w.bits, "block_size": w.block, "accuracy_level": ACCURACY_LEVEL},
        dtype=x.dtype, shape=(*x.shape[:-1], w.rows), version=1)


def gather_block_quantized(t: QuantizedMatrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids of t as one com.microsoft GatherBlockQuantized node (export only)."""
    return torch.onnx.ops.symbolic(
        f"{MS}::GatherBlockQuantized", (t.data.reshape(t.rows, -1), ids, t.scales, t.zero_points),
        {"bits": t.bits, "block_size": t.block, "gather_axis": 0, "quantize_axis": 1},
        dtype=torch.float32, shape=(*ids.shape, t.cols), version=1)


class MatMulNBits(nn.Module):
    """A bias-free linear layer, y = x @ W^T, as one com.microsoft MatMulNBits on a QuantizedMatrix."""

    def __init__(self, weight: QuantizedMatrix):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return F.linear(x, self.weight.dequantize())
        return matmul_nbits(x, self.weight)


class GatherBlockQuantized(nn.Module):
    """An embedding lookup, rows of a QuantizedMatrix, as one com.microsoft GatherBlockQuantized."""

    def __init__(self, table: QuantizedMatrix):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return F.embedding(ids, self.table.dequantize())
        return gather_block_quantized(self.table, ids)


class HotRowsTable(nn.Module):
    """A tied [vocab, hidden] 4-bit table (`table`, as without hot rows) and 8-bit copies of its `hot`
    rows (the tokens a text uses, ids `hot_ids`; `slot`: each id's row among them, or -1), which the
    embedding and the head read in place of the 4-bit ones.

    Why: at 4 bits the table's error reaches the logits through the rows of the tokens that are
    likely next, and those are a text's own tokens. Measured on the real Gemma 3 270M (eager, every
    other weight in fp32, the table's 4-bit blocks on their clipped ranges; perplexity ratio on the
    Python manual / transformers' modeling_gemma.py, 512 tokens each): all rows 4-bit x1.077 / x1.112,
    KL 0.099 / 0.124; the 4,555 tokens of the default calibration text (Python's module docs, neither
    evaluation text) at 8 bits x1.005 / x1.028, KL 0.019 / 0.051, for 3 MB. (The first 32k tokens by
    the tokenizer's merge order instead, no text at all: x1.009 / x1.032, for 20 MB.)
    The hot rows are copies, not a second part of a split table: a split's logits must be put back in
    vocabulary order, and ONNX Runtime's Gather of the 262k logits took 1.26 ms a decode step (a copy
    per element), where writing the hot rows' logits over the full product's (ScatterElements) takes
    a copy of the logits and one write per hot row."""

    def __init__(self, vocab: int, hidden: int, hot: int, block: int):
        super().__init__()
        self.table = QuantizedMatrix(vocab, hidden, 4, block, CLIPS, padded=False)
        self.hot = QuantizedMatrix(hot, hidden, 8, block, padded=False)
        self.register_buffer("hot_ids", torch.empty(hot, dtype=torch.long))
        self.register_buffer("slot", torch.empty(vocab, dtype=torch.int16))  # hot < 2^15 (HOT_TOKENS): 0.5 MB at 262k

    def set_rows(self, hot_ids: torch.Tensor) -> None:
        """The hot rows' ids (int64 [hot], distinct, sorted)."""
        self.hot_ids.copy_(hot_ids)
        self.slot.fill_(-1)
        if len(hot_ids) >= 1 << 15:
            raise ValueError(f"{len(hot_ids)} hot rows: at most {(1 << 15) - 1} (their slots are int16)")
        self.slot[hot_ids] = torch.arange(len(hot_ids), dtype=torch.int16)

    @torch.no_grad()
    def set(self, w: torch.Tensor, grid: BlockGrid | None = None) -> None:
        """Quantize the table w [vocab, hidden]: every row 4-bit on its own grid or on `grid` (a
        calibrated recipe's), and the hot rows again 8-bit (to nearest)."""
        self.table.set(w, grid)
        self.hot.set(w, ids=self.hot_ids)

    def dequantize(self) -> torch.Tensor:
        """float32 [vocab, hidden]: what the embedding and the head read."""
        w = self.table.dequantize()
        w[self.hot_ids] = self.hot.dequantize()
        return w


class HotRowsHead(nn.Module):
    """The output projection reading a HotRowsTable: the 4-bit table's product, the hot rows'
    8-bit product written over their logits (ScatterElements)."""

    def __init__(self, table: HotRowsTable):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.table
        if not torch.compiler.is_exporting():
            return F.linear(x, t.dequantize())
        hot = matmul_nbits(x, t.hot)  # [.., hot]
        return matmul_nbits(x, t.table).scatter(-1, t.hot_ids.expand(hot.shape), hot)


class HotRowsEmbedding(nn.Module):
    """The embedding lookup of a HotRowsTable: a hot id's 8-bit row, any other id's 4-bit row."""

    def __init__(self, table: HotRowsTable):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        if not torch.compiler.is_exporting():
            return F.embedding(ids, t.dequantize())
        slot = t.slot[ids].int()
        return torch.where((slot >= 0)[..., None], gather_block_quantized(t.hot, slot.clamp(min=0)),
                           gather_block_quantized(t.table, ids))


def replace_weights_with_block_quantized(model: nn.Module, quant: str, embedding_quant: str, block: int,
                                         hot_rows: int = 0, layer_quant: Callable[[str], str] | None = None) -> dict[str, str]:
    """On a model still on the meta device: every nn.Linear -> MatMulNBits (quant, or layer_quant(its
    path) where given: int8 for the layers an int4 export keeps at 8 bits), the embedding
    -> GatherBlockQuantized (embedding_quant), and a tied output projection -> its own layer: the
    embedding's matrix where it is quantized alike, else a matrix (or fp32 weight) of its own. A
    tied 4-bit table of whole blocks with hot_rows > 0 is a HotRowsTable (its rows chosen later:
    set_rows). Returns {layer: scheme} for the manifest. The new buffers are empty:
    streaming.fill_layers fills them from the checkpoint."""
    plan: dict[str, str] = {}
    table = None
    vocab, hidden = model.embed_tokens.weight.shape
    if hot_rows and embedding_quant == "int4" and model.lm_head is None and hidden % block == 0 and quant != "fp32":
        table = HotRowsTable(vocab, hidden, hot_rows, block)
        model.embed_tokens, model.lm_head = HotRowsEmbedding(table), HotRowsHead(table)
        rows = f"4-bit, its {hot_rows:,} rows of the calibration text's tokens also 8-bit (read in their place)"
        plan["embed_tokens"] = f"GatherBlockQuantized, block {block}, asymmetric, clipped blocks: {rows}"
        plan["lm_head"] = (f"MatMulNBits, block {block}, accuracy level {ACCURACY_LEVEL} (the tied embedding table: "
                           f"{rows}; their logits written over the 4-bit ones)")
        embedding_quant, table = "none", None  # done: the linear layers follow
    if embedding_quant != "none":
        table = QuantizedMatrix(vocab, hidden, BITS[embedding_quant], block, CLIPS, padded=False)
        model.embed_tokens = GatherBlockQuantized(table)
        plan["embed_tokens"] = f"GatherBlockQuantized {table.bits}-bit, block {block}, asymmetric, clipped blocks"
    if model.lm_head is None and (table is not None or quant != "fp32"):
        if quant == "fp32":  # a float head beside a quantized table
            model.lm_head = nn.Linear(hidden, vocab, bias=False)
        else:
            bits = table.bits if table is not None else BITS[quant]
            shared = table if table is not None and hidden % block == 0 else QuantizedMatrix(vocab, hidden, bits, block, CLIPS)
            model.lm_head = MatMulNBits(shared)
            plan["lm_head"] = (f"MatMulNBits {shared.bits}-bit, block {block}, asymmetric, clipped blocks, "
                               f"accuracy level {ACCURACY_LEVEL} (the tied embedding table)")
    if quant == "fp32":
        return plan
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            bits = BITS[quant if layer_quant is None else layer_quant(name)]
            layer = MatMulNBits(QuantizedMatrix(module.out_features, module.in_features, bits, block))
            setattr(model.get_submodule(parent), leaf, layer)
            plan[name] = f"MatMulNBits {bits}-bit, block {block}, asymmetric, accuracy level {ACCURACY_LEVEL}"
    return plan


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: float32 weight} for every quantized layer of a rewritten model, in the plain
    model's names (a shared table under both embed_tokens.weight and lm_head.weight)."""
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, MatMulNBits):
            out[f"{name}.weight"] = module.weight.dequantize()
        elif isinstance(module, (GatherBlockQuantized, HotRowsEmbedding, HotRowsHead)):
            out[f"{name}.weight"] = module.table.dequantize()
    return out
