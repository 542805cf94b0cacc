"""The one interface every backend offers to the generation loop."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Backend(Protocol):
    max_seq_len: int  # positions the static cache holds

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Place token_ids at positions start_pos.. in the cache; float32 logits [len(token_ids), vocab]."""

    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """The same call, returning only the last row [vocab] (all that generation needs)."""

    def reset(self) -> None:
        """Forget the cache."""


def open_backend(folder) -> Backend:
    """The backend for an export folder, chosen by the format its manifest records."""
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.exporters.manifest import read_manifest

    fmt = read_manifest(folder).get("format")
    if fmt == "onnx":
        from gemma_edge.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(folder)
    if fmt == "pte":
        from gemma_edge.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(folder)
    raise GemmaEdgeError(f"{folder}: unknown export format {fmt!r} in its manifest; valid: onnx, pte")
