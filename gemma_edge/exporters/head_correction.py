"""A tied output projection that reads an int4 table, corrected on the few columns that carry most
of its error.

The head's logits are h @ W^T with h the final norm's output. h is far from even across its
columns: on the real Gemma 3 270M a handful of the 640 carry values of 40-50 where the median is
2.7 (the residual stream's outlier dimensions), so the table's 4-bit error there dominates the
logits' (measured: 8 columns carry 56% of the expected squared error, 32 carry 68%). A .pte's head
reads the table's own 4-bit bytes (torchao_quant.read_table_as_linear); this adds back the
table's error on those columns exactly, in 8 bits:

    logits = h @ Wq^T + (h @ P^T) @ E^T      P [k, hidden]: 0/1, picks the k columns
                                             E [vocab, k]: (W - Wq) on them, int8 per row

The columns are those with the largest expected error, E[h_j^2] * mean_i (W - Wq)_ij^2, the first
measured on a calibration text: the model runs once over it after its layers are quantized. The
embedding lookup is not changed (its error costs little: x1.033 of the phone recipe's x1.11).
Measured on the real 270M, int8 layers with an int4 table (the .pte, 512 tokens of the Python
manual / of transformers' modeling_gemma.py): x1.118 / x1.126, top-1 82.2% / 87.1% without; 32
columns x1.048 / x1.121, 87.5% / 88.1%, for 9 MiB (eager: 16 columns x1.054 / x1.094, 64 x1.038 /
x1.088). All-int4: x1.462 -> x1.380 on the manual. Picked from the norm's weights alone (no
calibration) the columns share none with these and help nothing: the outliers come from the
residual stream.
"""

from __future__ import annotations

import hashlib
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

COLUMNS = 32  # corrected columns of the head
CALIBRATION_TOKENS = 512
CALL_TOKENS = 128  # calibration tokens per call of the model (its cache restarts at 0 each call)


class CorrectedHead(nn.Module):
    """head(x) + correction(x's picked columns). Built on the meta device; filled by correct_head."""

    def __init__(self, head: nn.Module, in_features: int, out_features: int, columns: int):
        super().__init__()
        self.head = head
        self.register_buffer("pick", torch.empty(columns, in_features), persistent=False)  # [k, hidden], 0/1
        self.correction = nn.Linear(columns, out_features, bias=False, device="meta")  # [vocab, k], int8 once filled
        self.calibration = ""  # what the columns were measured on (the manifest's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The pick is a product with a 0/1 matrix: exact, and a linear layer XNNPACK runs in its
        # graph (a gather of columns it would not).
        return self.head(x) + self.correction(F.linear(x, self.pick))


def calibration_text() -> str:
    """The calibration text: the standard library's `email` package's sources (English comments
    and docstrings among code), which every Python has. Not the text verify or the tests measure
    on (the Python reference manual's topics, transformers' modeling_gemma.py)."""
    import email

    folder = pathlib.Path(email.__file__).parent
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.py")))


def calibration_ids(tokenizer_file: pathlib.Path | None, vocab_size: int) -> tuple[list[int], str]:
    """CALIBRATION_TOKENS ids of calibration_text and a description of them for the manifest; a
    source without a tokenizer (random weights) gets fixed random ids."""
    if tokenizer_file is None:
        ids = torch.randint(0, vocab_size, (CALIBRATION_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        return ids, "random ids (the source has no tokenizer)"
    from tokenizers import Tokenizer

    text = calibration_text()
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids[:CALIBRATION_TOKENS]
    return ids, f"the standard library's email package, {len(ids)} tokens, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


@torch.no_grad()
def column_energy(model, ids: list[int]) -> torch.Tensor:
    """E[h_j^2] [hidden] of the final norm's output over ids, in calls of up to CALL_TOKENS tokens,
    each from position 0 (the layers must be filled; the head is not used). Leaves the cache empty."""
    total, count = torch.zeros(model.config.hidden_size), 0
    step = min(CALL_TOKENS, model.max_seq_len)
    for start in range(0, len(ids), step):
        chunk = torch.tensor([ids[start:start + step]])
        model.reset_cache()
        h = model.norm(model.hidden_states(chunk, torch.arange(chunk.shape[1])))[0].float()  # [T, hidden]
        total += (h * h).sum(0)
        count += h.shape[0]
    model.reset_cache()
    return total / max(count, 1)


def quantized_rows(table: nn.Module, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1 [rows, hidden] float32 of an int4 table (an OffsetEmbedding), as its lookup
    computes them: torchao's lookup dequantizes the whole table first (Gemma 2B: 2 GiB in float32),
    a slice of its rows only those."""
    values = table.weight[start:end].dequantize().to(table.offsets.weight.dtype)
    return values + table.offsets.weight[start:end].dequantize().repeat_interleave(table.group_size, dim=1)


class RowLookup(nn.Module):
    """An int4 table's lookup, one row at a time (quantized_rows): the calibration pass's."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([quantized_rows(self.table, i, i + 1) for i in ids.flatten().tolist()]).view(*ids.shape, -1)


def table_error(table_weight: torch.Tensor, table: nn.Module, elements: int = 1 << 22):
    """Yields W - Wq [rows, hidden] float32 over the table, a block of rows of about `elements`
    weights at a time (a few float32 copies of a block are held while it is computed: 16 MiB
    each, so the correction stays inside the export's memory estimate): W the checkpoint's table,
    Wq the quantized table's (an OffsetEmbedding)."""
    rows = max(1, elements // table_weight.shape[1])
    for start in range(0, table_weight.shape[0], rows):
        end = min(start + rows, table_weight.shape[0])
        yield table_weight[start:end].float() - quantized_rows(table, start, end)


def correct_head(model, table_weight: torch.Tensor, tokenizer_file: pathlib.Path | None, columns: int = COLUMNS) -> CorrectedHead:
    """Replace model.lm_head (reading model.embed_tokens, an int4 table) by a CorrectedHead on the
    `columns` columns of the largest expected error (its correction int8 per row, with int8 dynamic
    activations, as the int8 layers); table_weight: the checkpoint's table."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis

    from gemma_edge.exporters.torchao_quant import quantize_rows

    hidden = model.config.hidden_size
    columns = min(columns, hidden)
    squared = torch.zeros(hidden)
    for error in table_error(table_weight, model.embed_tokens):
        squared += (error * error).sum(0)
    ids, described = calibration_ids(tokenizer_file, model.config.vocab_size)
    table = model.embed_tokens
    model.embed_tokens = RowLookup(table)
    try:
        energy = column_energy(model, ids)
    finally:
        model.embed_tokens = table
    picked = (energy * squared).argsort(descending=True)[:columns]
    correction = torch.cat([error[:, picked] for error in table_error(table_weight, model.embed_tokens)])
    head = CorrectedHead(model.lm_head, hidden, table_weight.shape[0], columns)
    head.pick = torch.zeros(columns, hidden).index_put_((torch.arange(columns), picked), torch.tensor(1.0))
    quantize_rows(head.correction, correction,
                  Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    head.calibration = f"{columns} columns {picked.tolist()}, measured on {described}"
    model.lm_head = head
    return head
