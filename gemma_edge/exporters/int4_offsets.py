"""Asymmetric int4 blocks on XNNPACK's symmetric 4-bit kernels: each group of `group_size` weights
is s * q + m (q in [-8, 7], a bf16 scale s and a float offset m per group), where XNNPACK's blockwise
kernels take s * q only. The offsets are added back by a second, small matrix product (in 8 bits:
its rounding is part of the quantization, which the eager model computes alike):

    x @ W^T = x @ (s * q)^T + sums(x) @ M^T      sums(x) [.., groups]: x's sum over each group
                                                  M [out, groups]: the offsets, int8 per row

The group sums are a float32 product of the input's groups [.., groups, group_size] with a row of
ones (XNNPACK has no sum reduction; it has float matrix products of any rank), the offsets an 8-bit
per-channel layer (0.25 bits a weight at groups of 32). An embedding table adds its rows' offsets,
looked up in an int8 table of its own. (The sums were first a product with a 0/1 matrix [groups,
in]: a float32 constant read whole on every call, 75 MB for each down_proj of Gemma 7B.)

Why: a symmetric grid spends half its levels on the side of zero a group does not reach. On the
real Gemma 3 270M .pte (perplexity ratio on the Python manual / transformers' modeling_gemma.py,
512 tokens each), every linear layer and the table at int4, groups of 32, each group's range
clipped to the least squared error: symmetric x1.884 / x3.245, with offsets x1.435 / x1.242 (ONNX's
asymmetric MatMulNBits blocks: x1.46 on the manual), for 6% more file and the same decode speed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class OffsetLinear(nn.Module):
    """A linear layer (no bias) whose weight is s * q + m per group of its input columns: `weight`
    holds s * q (torchao's symmetric 4-bit tensor), `offsets` the m, `ones` the row [1, group_size]
    that sums each group of an input row. Built on the meta device, filled by quantize_with_offsets.
    pairs_swapped: the weight holds each pair of columns swapped (2k+1, 2k), and the input's pairs are
    swapped to match (a tied head reading the table's bytes: torchao_quant.read_table_as_linear)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, pairs_swapped: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.pairs_swapped = pairs_swapped
        groups = in_features // group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.offsets = nn.Linear(groups, out_features, bias=False)  # [out, groups]
        self.register_buffer("ones", torch.empty(1, group_size), persistent=False)

    def group_sums(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (contiguous) -> [rows, groups]: the sum of each group of each row of x."""
        groups = self.in_features // self.group_size
        # -1 for the rows: a reshape of a dynamic token count that XNNPACK takes (model.py)
        return F.linear(x.view(-1, groups, self.group_size), self.ones).view(-1, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairs_swapped:  # within a group: the group sums are the same
            x = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        out = F.linear(x, self.weight)
        offsets = self.offsets(self.group_sums(x))  # [rows, out]
        # the exported layers and head take [T, in]; the eager head [1, T, in] too
        return out + (offsets if x.dim() == 2 else offsets.view(out.shape))


class OffsetEmbedding(nn.Module):
    """An embedding table whose rows are s * q + m per group: `weight` s * q (4-bit), `offsets` the
    m of each row's groups (an int8 table [rows, groups])."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int):
        super().__init__()
        self.embedding_dim, self.group_size = embedding_dim, group_size
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.offsets = nn.Embedding(num_embeddings, embedding_dim // group_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # [..., dim], in the offsets' dtype (float32) whatever the 4-bit rows come out in (bf16)
        rows = F.embedding(ids, self.weight).to(self.offsets.weight.dtype)
        groups = rows.unflatten(-1, (-1, self.group_size)) + self.offsets(ids).unsqueeze(-1)
        return groups.flatten(-2)


def replace_with_offset_layers(model: nn.Module, names: list[str], group_size: int,
                               pairs_swapped: list[str] = ()) -> nn.Module:
    """Swap the named nn.Linear / nn.Embedding layers for their offset forms (on the meta device,
    before the model is allocated and filled), the linears of pairs_swapped with their column pairs
    swapped."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        with torch.device("meta"):
            new = (OffsetEmbedding(old.num_embeddings, old.embedding_dim, group_size) if isinstance(old, nn.Embedding)
                   else OffsetLinear(old.in_features, old.out_features, group_size, name in pairs_swapped))
        setattr(parent, child, new)
    return model


def offsets_and_scales(block: torch.Tensor, group: int, clips: tuple[float, ...], scale_dtype: torch.dtype):
    """block [rows, cols] float32 -> (scale [rows, groups] in scale_dtype, offset [rows, groups]
    float32): per group, the grid m + s * q (q in [-8, 7]) centred on the group's range and spanning
    a clipping of it, the clipping among clips (evenly spaced) with the least squared error, s
    rounded to scale_dtype as the device stores it. Searched coarse to fine: every fourth clipping,
    then the two on either side of each group's best (10 fits instead of 21 for 100% to 80%)."""
    rows, cols = block.shape
    groups = block.view(rows, cols // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    middle, half_range = (low + high) / 2, (high - low) / 2

    def fit(clip: torch.Tensor | float):
        s = (2 * half_range * clip / 15).clamp(min=torch.finfo(torch.float32).eps).to(scale_dtype).float()
        m = middle + 0.5 * s  # q in [-8, 7]: values m - 8s .. m + 7s, centred on m - s/2
        r = (groups - m[..., None]).div_(s[..., None])
        return r.round().clamp_(-8, 7).sub_(r).square_().sum(-1).mul_(s * s), s, m

    best = (torch.full_like(low, float("inf")), None, None)
    chosen = torch.full_like(low, clips[0])

    def keep(clip, result) -> None:
        nonlocal best, chosen
        better = result[0] < best[0]
        best = tuple(torch.where(better, new, old) if old is not None else new for new, old in zip(result, best))
        chosen = torch.where(better, clip, chosen)

    step = (clips[0] - clips[-1]) / (len(clips) - 1) if len(clips) > 1 else 0.0
    for c in clips[::4]:
        keep(torch.full_like(low, c), fit(c))
    for delta in (-2, -1, 1, 2) if len(clips) > 4 else ():
        clip = (chosen + delta * step).clamp(min(clips), max(clips))
        keep(clip, fit(clip))
    _, scale, offset = best
    return scale.to(scale_dtype), offset


@dataclass
class OffsetGrid:
    """Each group's grid as the device computes it, s * q + m for q in [-8, 7] (gptq.Grid)."""

    scale: torch.Tensor  # [rows, groups] in the dtype the device stores (bf16)
    offset: torch.Tensor  # float32 [rows, groups]: m as the device adds it (after its 8-bit rounding)
    raw_offset: torch.Tensor  # float32 [rows, groups]: m before that rounding, what the exporter quantizes
    group: int

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Column col of a matrix, w [rows], rounded onto its group's grid and dequantized."""
        scales, offsets = self._by_group
        s, m = scales[col // self.group], offsets[col // self.group]
        return torch.round((w - m) / s).clamp_(-8, 7) * s + m

    @functools.cached_property
    def _by_group(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales in float32 and the offsets, [groups, rows] each: a group's column of them
        contiguous, converted once (GPTQ reads one for every column it rounds: 62 -> 47 us a column)."""
        return self.scale.float().T.contiguous(), self.offset.T.contiguous()

    def steps(self, cols: int) -> torch.Tensor:
        """float32 [rows, cols]: the grid's spacing at each column (its group's scale)."""
        return self.scale.float().repeat_interleave(self.group, 1)[:, :cols]
