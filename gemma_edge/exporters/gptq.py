"""GPTQ (Frantar et al., 2022): round a linear layer's weights onto a fixed 4-bit grid one input
column at a time, each column's rounding error spread over the columns not yet rounded, weighted
by the inverse Hessian of the layer's squared output error on calibration inputs:

    H = sum over calibration tokens of x x^T        [cols, cols], x the layer's input row
    minimize || x (W - Q)^T ||^2 over Q on the grid  (rows are independent given H)

The grid (each group's scale and zero point or offset) is chosen before any column is rounded,
from the layer's own weights, by the exporter's own rule ("static groups"): the exporter then
stores exactly the values GPTQ chose, and reproduces them when it rounds them again (tests hold
the exported weights to this function's output). A grid is any object with
`round(w [rows], col) -> [rows]`: w rounded to the grid of column `col` and dequantized.

Columns go in the order of their Hessian diagonal, largest first ("act order"), which the
static grid makes free (a column's group does not depend on the order)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

# The fraction of the Hessian's mean diagonal added to it before it is inverted (the paper's 1%).
DAMPING = 0.01
# Columns whose errors are spread lazily, as one matrix product per block (the paper's 128).
BLOCK = 128


class Grid(Protocol):
    def round(self, w: torch.Tensor, col: int) -> torch.Tensor: ...


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, damping: float = DAMPING,
         block: int = BLOCK) -> torch.Tensor:
    """weight [rows, cols], hessian [cols, cols] float32 (sum of x x^T; overwritten: it is the
    working copy) -> the weight on the grid [rows, cols] float32, rounded by GPTQ. A column no
    calibration input reached (zero diagonal) is rounded to nearest."""
    w = weight.float().clone()
    h = hessian
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # no error to weigh: rounding to nearest is the optimum
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    w = w[:, order]
    # The upper Cholesky factor of H^-1 (row i: how column i's error moves the later columns), each
    # step's result copied back into the caller's matrix (the caller still holds it, so a new one per
    # step would make three): two [cols, cols] matrices at most (Gemma 7B's down_proj: 2.4 GB each).
    for step in (lambda m: m[order], lambda m: m[:, order]):
        h.copy_(step(h))
    h.diagonal().add_(damping * h.diagonal().mean())
    for step in (torch.linalg.cholesky, torch.cholesky_inverse, lambda m: torch.linalg.cholesky(m, upper=True)):
        h.copy_(step(h))
    inverse = h
    q = torch.empty_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part, errors = w[:, start:end].clone(), torch.empty_like(w[:, start:end])
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = part[:, i]
            rounded = grid.round(column, int(order[start + i]))
            q[:, start + i] = rounded
            errors[:, i] = (column - rounded) / local[i, i]
            part[:, i + 1:] -= errors[:, i:i + 1] * local[i, i + 1:]
        w[:, end:] -= errors @ inverse[start:end, end:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


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


def split_grid(grid, rows: list[int]) -> list:
    """The inverse of cat_grids: one grid per block of rows, each tensor of its own (not a view of
    the joined one: an exporter keeps them, and ExecuTorch's lowering frees weights by storage)."""
    parts = [{} for _ in rows]
    for f in dataclasses.fields(grid):
        value = getattr(grid, f.name)
        pieces = [p.clone() for p in value.split(rows)] if isinstance(value, torch.Tensor) else [value] * len(rows)
        for part, piece in zip(parts, pieces):
            part[f.name] = piece
    return [type(grid)(**p) for p in parts]


def take_grid(grids: dict, name: str):
    """The grid GPTQ rounded weight `name` to, for the exporter that stores it, or None (not
    calibrated). A decoder layer's is removed as it is taken (its one consumer; all of them held to
    the end cost Gemma 7B ~1.9 GB); the table's stays (the embedding and a head may both read it)."""
    return grids.pop(name, None) if name.startswith("layers.") else grids.get(name)
