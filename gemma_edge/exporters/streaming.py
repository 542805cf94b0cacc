"""Build an export's model layer by layer from a stream of checkpoint weights, never holding the
full-precision model: the habit of llama.cpp's converter (one tensor at a time) applied to export.

    model = Gemma(config) on the meta device    # shapes only
    rewrite(model)                              # fused and quantized layers, still on meta
    model.to_empty(device="cpu")                # allocates the final (quantized) sizes only
    fill_layers(model, iter_weights(ckpt), targets)

The stream yields (name, tensor) in the plain model's names. Each feeds the targets that take
it: a layer whose weight is made from one or more of them (q, k and v fused; a quantized matrix),
filled as soon as its last source arrives (in the checkpoint's dtype: each target takes float32
a block of rows at a time), after which the sources are dropped. A name that is a
parameter of the rewritten model is then copied in, unless a target replaced that parameter. Peak memory is the rewritten model plus one layer's weights
in float32.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from gemma_edge.progress import Progress


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_freed_blocks(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc give each block of `threshold` bytes or more a mapping of its own, returned
    to the system when freed. By default glibc raises that threshold as large blocks are freed (up
    to 32 MiB), so the quantizer's many working blocks come from the heap, and the freed ones stay
    resident, fragmented: building 4 full-width
    Gemma 2B layers held ~340 MiB of them beyond the ~530 MiB model (measured VmRSS, then the live
    tensors). A no-op on other C libraries."""
    _libc_call("mallopt", M_MMAP_THRESHOLD, threshold)


def release_freed_memory() -> None:
    """Have glibc's malloc return what is free in every arena to the system now (malloc_trim), the
    smaller blocks return_freed_blocks leaves to the heaps included. Calibration frees many of them
    on torch's worker threads, whose arenas glibc does not shrink by itself: random:gemma-2b's
    calibrated ONNX export grew ~0.05 GiB a layer beyond its quantized model without this, not at
    all with it (2026-12-04). A no-op on other C libraries."""
    _libc_call("malloc_trim", 0)


def _libc_call(name: str, *args: int) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


@dataclass
class Target:
    """A layer filled from the stream: its sources' rows, concatenated in order, in the checkpoint's
    dtype (fill takes them to float32 a block at a time, where it needs float32)."""

    sources: tuple[str, ...]
    fill: Callable[[torch.Tensor], None]
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)


def fill_layers(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], targets: list[Target],
                total: int, report: Callable[[Progress], None] | None = None) -> None:
    """Fill the allocated, rewritten model from the weight stream (see the module's docstring);
    total: the stream's element count, for report (called after each tensor)."""
    # Names only: a target may replace its layer's parameter (torchao's quantize_), and a reference
    # kept here would keep every replaced float32 weight alive until the end.
    params = {name for name, _ in model.named_parameters()}
    return_freed_blocks()
    consumers: dict[str, list[Target]] = {}
    for target in targets:
        for source in target.sources:
            consumers.setdefault(source, []).append(target)
    start, done, filled = time.perf_counter(), 0, 0
    with torch.no_grad():
        for name, tensor in weights:
            done += tensor.numel()
            if name not in params and name not in consumers:
                raise RuntimeError(f"no layer of the rewritten model takes the checkpoint's {name}")
            before = model.get_parameter(name) if name in params else None
            for target in consumers.get(name, []):
                target.arrived[name] = tensor
                if len(target.arrived) == len(target.sources):
                    # In the checkpoint's dtype: a target quantizes a block of rows at a time, each
                    # in float32, so a bf16 table (Gemma 2 2B: 1.2 GB) never has a whole float32 copy.
                    parts = [target.arrived.pop(s) for s in target.sources]
                    target.fill(parts[0] if len(parts) == 1 else torch.cat(parts))
                    filled += 1
                    del parts
            # The parameter itself, unless a target replaced it (a quantized layer): then its
            # float32 storage was never touched, and is freed now.
            if before is not None and model.get_parameter(name) is before:
                before.copy_(tensor)
            del tensor, before
            if report is not None:
                report(Progress(done, total, time.perf_counter() - start, name))
    if filled != len(targets):
        raise RuntimeError(f"the checkpoint stream ended before {len(targets) - filled} layers had their weights")
