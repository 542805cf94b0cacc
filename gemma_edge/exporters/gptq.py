"""GPTQ (Frantar et al., 2022): round a linear layer's weights onto a fixed 4-bit grid one input
column at a time, each column's rounding error spread over the columns not yet rounded, weighted
by the inverse Hessian of the layer's squared output error on calibration inputs:

    H = sum over calibration tokens of x x^T        [cols, cols], x the layer's input row
    minimize || x (W - Q)^T ||^2 over Q on the grid  (rows are independent given H)

The grid (each group's scale and zero point or offset) is chosen before any column is rounded,
from the layer's own weights, by the exporter's own rule ("static groups"): the exporter then
stores exactly the values GPTQ chose, and reproduces them when it rounds them again (tests hold
the exported weights to this function's output). A grid is any object with
`round(w [rows], col) -> [rows]`: w rounded to the grid of column `col` and dequantized (and, for
calibration.py, `steps(cols) -> [rows, cols]`: the grid's spacing at each column).

Columns go in the order of their Hessian diagonal, largest first ("act order"), which the
static grid makes free (a column's group does not depend on the order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

# The fraction of the Hessian's mean diagonal added to it before it is inverted (the paper's 1%).
DAMPING = 0.01
# Columns whose errors are spread lazily, as one matrix product per block (the paper's 128).
BLOCK = 128
# A Hessian wider than this (down_proj's at full size, and every one of Gemma 7B's) is factored by one
# Cholesky factorization and one triangular inverse, where the narrow route takes two factorizations
# and an inverse (factor).
WIDE = 2048
# A Hessian wider than this is summed a block of this many rows at a time from its diagonal on
# (add_gram: Gemma 2B's down_proj, 16384 wide, 52% of the products of x^T x), the lower triangle
# mirrored once (symmetric). Per 512-token chunk (2 threads): 2048 wide (the 270M's down_proj) 12.3
# -> 8.6 ms, 16384 wide 886 -> 498 ms (518 in blocks of 2048); 640 wide the same.
GRAM_BLOCK = 512


class Grid(Protocol):
    def round(self, w: torch.Tensor, col: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of a Hessian, for every weight that reads the same input: the column order
    and the upper Cholesky factor of H^-1 in that order (row i: how column i's error moves the later
    columns)."""

    order: torch.Tensor  # int64 [cols]: columns by Hessian diagonal, largest first
    inverse: torch.Tensor  # float32 [cols, cols], upper triangular


def add_gram(h: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """h [cols, cols] += x^T x for inputs x [tokens, cols]. Wider than `block`, only the blocks on and
    above the diagonal are summed (x^T x is symmetric): complete h with mirrored() before reading it."""
    cols = h.shape[0]
    if cols <= block:
        h.addmm_(x.T, x)
        return
    for start in range(0, cols, block):
        h[start:start + block, start:].addmm_(x[:, start:start + block].T, x[:, start:])


def mirrored(h: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """h summed by add_gram, completed in its own storage: each block below the diagonal written from
    its mirror image above it."""
    for start in range(block, h.shape[0], block):
        h[start:start + block, :start] = h[:start, start:start + block].T
    return h


def factor(hessian: torch.Tensor, damping: float = DAMPING, wide: int = WIDE) -> Factor:
    """hessian [cols, cols] float32 (sum of x x^T) -> its Factor, made in the Hessian's own storage
    (overwritten: no second [cols, cols] matrix, Gemma 7B's down_proj: 2.4 GB). A column no
    calibration input reached (zero diagonal) is rounded to nearest.

    At most `wide` columns: H's lower Cholesky factor, the inverse it gives, and that inverse's factor
    (LAPACK potrf, potri, potrf). Wider, with J the reversal of the columns' order: J H J = L L^T
    gives H^-1 = (J L^-1 J)^T (J L^-1 J), so the upper factor is J L^-1 J, one factorization and one
    triangular inverse (potrf, trtri) of H in the reversed order: Gemma 7B's down_proj 165 -> 78 s,
    2B's 52.8 -> 25.5 s (2 threads), as accurate against a float64 factor (both ~3e-5 of the largest
    entry on rank-deficient Hessians, as 2048 tokens give at 24576 columns)."""
    h = hessian
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # no error to weigh: rounding to nearest is the optimum
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    reverse = h.shape[0] > wide
    permute_in_place(h, order.flip(0) if reverse else order)
    h.diagonal().add_(damping * h.diagonal().mean())
    # LAPACK works on column-major matrices, which h.mT is (h is symmetric), and the lower factor it
    # leaves there, read by rows, is the upper one.
    lower = h.mT
    torch.linalg.cholesky(lower, out=lower)
    if reverse:
        from scipy.linalg.lapack import strtri

        inverse, info = strtri(lower.numpy(), lower=1, overwrite_c=1)  # in place: h holds (L^-1)^T
        if info != 0 or inverse.ctypes.data != h.data_ptr():  # a copy would leave h unchanged
            raise RuntimeError(f"LAPACK strtri did not invert the Hessian's factor in place (info {info})")
        reflect_in_place(h)  # J L^-1 J
    else:
        torch.cholesky_inverse(lower, out=lower)
        torch.linalg.cholesky(lower, out=lower)
    return Factor(order, h)


def gptq(weight: torch.Tensor, hessian: torch.Tensor | Factor, grid: Grid, block: int = BLOCK) -> torch.Tensor:
    """weight [rows, cols] -> the weight on the grid [rows, cols] float32, rounded by GPTQ with the
    Hessian's factor (a raw Hessian is factored first, and overwritten). Two [rows, cols] float32
    matrices at most: the weight in GPTQ's column order, each column replaced by its rounded value
    once rounded, and the result in the weight's own order."""
    f = hessian if isinstance(hessian, Factor) else factor(hessian)
    order, inverse = f.order, f.inverse
    w = weight.float()[:, order]  # a copy of its own (indexing copies)
    cols = w.shape[1]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        # The block's columns as contiguous rows: each column is read and written whole, many times
        # (a strided column of 8192 rows is 8192 cache lines; contiguous, GPTQ measured 1.7-2x faster,
        # with the same values: the same elementwise arithmetic, the same matrix product below).
        part = w[:, start:end].T.contiguous()  # [block, rows]
        errors = torch.empty_like(part)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = part[i]
            rounded = grid.round(column, int(order[start + i]))
            errors[i] = (column - rounded) / local[i, i]
            part[i + 1:] -= local[i, i + 1:, None] * errors[i][None, :]
            column.copy_(rounded)  # done: from now on the column holds its rounded value
        w[:, end:] -= errors.T.contiguous() @ inverse[start:end, end:]
        w[:, start:end] = part.T
    return w[:, torch.argsort(order)]


def permute_in_place(h: torch.Tensor, order: torch.Tensor, rows: int = 512) -> None:
    """h [cols, cols] symmetric -> h[order][:, order], in its own storage, a block of rows at a time
    (no second [cols, cols] matrix): the columns of each block of rows, then (through the transpose,
    since (H P^T)^T = P H) the columns of each block of the result's columns."""
    for m in (h, h.mT):
        for start in range(0, m.shape[0], rows):
            m[start:start + rows] = m[start:start + rows][:, order]


def reflect_in_place(m: torch.Tensor, block: int = 512) -> None:
    """m [n, n] -> J m^T J (m[i, j] = m[n-1-j, n-1-i] before: its mirror image across the
    anti-diagonal), in its own storage, a pair of blocks at a time (blocks cut symmetrically about the
    middle, so that each block's image is a block)."""
    n = m.shape[0]
    firsts = [*range(0, n // 2, block), n // 2]
    cuts = sorted({*firsts, *(n - c for c in firsts)})
    spans = list(zip(cuts, cuts[1:]))
    for rows in spans:
        for cols in spans:
            image = (n - cols[1], n - cols[0]), (n - rows[1], n - rows[0])
            if (rows, cols) > image:
                continue  # swapped with its image already
            here = m[rows[0]:rows[1], cols[0]:cols[1]]
            there = m[image[0][0]:image[0][1], image[1][0]:image[1][1]]
            moved = there.flip(0, 1).T  # flip copies
            there.copy_(here.flip(0, 1).T)
            here.copy_(moved)


def cat_grids(grids: list) -> object:
    """Grids of matrices with the same columns, stacked by rows (every field [rows, ...] or a
    setting shared by all): the grid of their concatenation, for one GPTQ call over layers that read
    the same input (q, k and v; gate and up)."""
    first = grids[0]
    if len(grids) == 1:
        return first
    fields = {}
    for f in dataclasses.fields(first):
        values = [getattr(g, f.name) for g in grids]
        fields[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
    return type(first)(**fields)


def take_grid(grids: dict, name: str):
    """The grid GPTQ rounded weight `name` to, for the exporter that stores it, or None (not
    calibrated). A decoder layer's is removed as it is taken (its one consumer; all of them held to
    the end cost Gemma 7B ~1.9 GB); the table's stays (the embedding and a head may both read it)."""
    return grids.pop(name, None) if name.startswith("layers.") else grids.get(name)
