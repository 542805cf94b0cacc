"""A .pte's 4-bit table with 8-bit copies of its hot rows (the calibration text's tokens), which the
embedding and the tied output projection read in place of the 4-bit ones (as onnx_quant.HotRowsTable
does for ONNX; why there).

    embedding   slot = slots[ids]; where(slot >= 0, hot[slot], table[ids])      slots [vocab] int32: -1 or the row
    head        logits = head(x), then logits[..., hot_ids] = hot(x)             hot [hot, hidden] int8 per row

The copies are one int8 table (ExecuTorch's embedding_byte kernel) that the head also reads as a
linear layer with int8 dynamic activations (XNNPACK), the same bytes stored once (model.ptd). The
hot logits are written over the 4-bit product's with an index_copy outside XNNPACK: a copy of the
logits and one write per hot row.
"""

from __future__ import annotations

import torch
from torch import nn


class HotRowsEmbedding(nn.Module):
    """The embedding lookup: a hot id's 8-bit row, any other id's row of `table` (an OffsetEmbedding)."""

    def __init__(self, table: nn.Module, hot: nn.Embedding, slots: torch.Tensor):
        super().__init__()
        self.table, self.hot = table, hot
        self.register_buffer("slots", slots)  # int32 [vocab]: each id's row among the hot ones, or -1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slots[ids].long()  # [T] (ExecuTorch's embedding kernels take int64 ids only)
        return torch.where((slot >= 0).unsqueeze(-1), self.hot(slot.clamp(min=0)), self.table(ids))


class HotRowsHead(nn.Module):
    """The output projection: `head`'s logits (the 4-bit table's product), the hot rows' 8-bit
    product written over theirs."""

    def __init__(self, head: nn.Module, hot: nn.Linear, hot_ids: torch.Tensor):
        super().__init__()
        self.head, self.hot = head, hot
        self.register_buffer("hot_ids", hot_ids)  # int64 [hot], sorted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).index_copy(-1, self.hot_ids, self.hot(x))


def keep_hot_rows(model: nn.Module, table_weight: torch.Tensor, hot_ids: torch.Tensor, record: dict) -> nn.Module:
    """Give a model whose tied head reads its 4-bit table (torchao_quant) 8-bit copies of the rows
    hot_ids (int64, sorted, distinct) of table_weight (the checkpoint's [vocab, hidden]), read by
    both in place of the 4-bit rows; record: the manifest's description of them (model.hot_rows)."""
    from gemma_edge.exporters.torchao_quant import TABLE_INT8, quantize_rows, read_table_as_linear, torchao_configs

    vocab, hidden = table_weight.shape
    hot = nn.Embedding(len(hot_ids), hidden, device="meta")
    quantize_rows(hot, table_weight[hot_ids].float(), torchao_configs(32)[TABLE_INT8])
    head = nn.Linear(hidden, len(hot_ids), bias=False, device="meta")
    read_table_as_linear(head, hot)
    slots = torch.full((vocab,), -1, dtype=torch.int32)
    slots[hot_ids] = torch.arange(len(hot_ids), dtype=torch.int32)
    model.embed_tokens = HotRowsEmbedding(model.embed_tokens, hot, slots)
    model.lm_head = HotRowsHead(model.lm_head, head, hot_ids.clone())
    model.hot_rows = record
    return model
