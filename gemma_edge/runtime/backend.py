"""The one interface every backend offers to the generation loop."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Protocol, Sequence

import numpy as np


class Backend(Protocol):
    max_seq_len: int  # positions the static cache holds
    can_rewind: bool  # a call may start before the cache's end (else only at its end, or at 0)
    manifest: dict  # the export's gemma_edge.json ({} for the eager model)

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Place token_ids at positions start_pos.. in the cache; float32 logits [len(token_ids), vocab]."""

    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """The same call, returning only the last row [vocab] (all that generation needs)."""

    def reset(self) -> None:
        """Forget the cache."""


def can_rewind(manifest: dict) -> bool:
    """Whether a call may start before the cache's end: not where sliding layers keep a ring of the
    last keys shorter than the cache (a call there would need keys the ring has overwritten)."""
    config = manifest["config"]
    return not ("sliding_attention" in config.get("layer_types", ())
                and (config.get("sliding_window") or 0) < int(manifest["max_seq_len"]))


@contextlib.contextmanager
def native_log_captured() -> Iterator[list[str]]:
    """What a runtime logs inside the block, to fd 2 or through Python's sys.stderr (ExecuTorch's
    pybindings), kept out of the terminal and handed back as lines when the block ends: why a
    program failed to load is said there, and only there."""
    import io

    lines: list[str] = []
    sys.stderr.flush()
    python = io.StringIO()
    with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(python):
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines += log.read().decode(errors="replace").splitlines() + python.getvalue().splitlines()


def first_line(error: BaseException) -> str:
    """A native library's exception message, its first line only (some append pages of context)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_backend(folder, threads: int | None = None) -> Backend:
    """The backend for an export folder, chosen by the format its manifest records."""
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.manifest import read_manifest

    fmt = read_manifest(folder).get("format")
    if threads is not None and threads < 1:
        raise GemmaEdgeError(f"--threads must be at least 1, got {threads}")
    if fmt == "onnx":
        from gemma_edge.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(folder, threads=threads)
    if fmt == "pte":
        from gemma_edge.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(folder, threads=threads)
    raise GemmaEdgeError(f"{folder}: unknown export format {fmt!r} in its manifest; valid: onnx, pte")
