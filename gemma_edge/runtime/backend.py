"""The one interface every backend offers to the generation loop."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path
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


# How a .pte runs (--runtime): "native", gemma-edge's native runner (gemma_edge/native/) in a child
# process, built for this machine on first use; "python", ExecuTorch's Python bindings in this
# process; "auto", the native runner where it can be built here (a C++ compiler, executorch's
# runtime libraries), else the bindings. Measured on the real Gemma 3 270M's phone recipe with its
# prefill method (`gemma-edge bench`, 2 threads, alternating): peak RSS 1,164 -> 593 MiB (no torch; the
# program's methods share their packed weights through XNNPACK's weight cache, which the bindings
# cannot turn on), load 4.0 -> 1.2 s, decode x1.02-1.04, the same logits bit for bit.
RUNTIMES = ("auto", "native", "python")


def choose_runtime(runtime: str, progress=lambda message: None) -> str:
    """A .pte's runtime for --runtime (RUNTIMES): auto is native where the native runner can be built
    here (native_build.host_runner, progress told of a first build), else python."""
    from gemma_edge.errors import GemmaEdgeError

    if runtime not in RUNTIMES:
        raise GemmaEdgeError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    from gemma_edge.native_build import host_runner

    try:
        host_runner(progress)
    except GemmaEdgeError:  # no compiler, no runtime libraries, a failed build: the bindings run it
        return "python"
    return "native"


def open_backend(folder, threads: int | None = None, runtime: str = "auto", progress=lambda message: None) -> Backend:
    """The backend for an export folder, chosen by the format its manifest records; a .pte's by
    runtime (RUNTIMES)."""
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.manifest import read_manifest

    fmt = read_manifest(folder).get("format")
    if threads is not None and threads < 1:
        raise GemmaEdgeError(f"--threads must be at least 1, got {threads}")
    if fmt == "onnx":
        if runtime not in ("auto", "python"):
            raise GemmaEdgeError(f"--runtime {runtime} runs .pte exports; {folder} is ONNX, which runs in ONNX Runtime: "
                                 "leave --runtime out")
        from gemma_edge.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(folder, threads=threads)
    if fmt == "pte" and choose_runtime(runtime, progress) == "native":
        from gemma_edge.native_build import host_runner
        from gemma_edge.runtime.native_backend import NativeBackend

        return NativeBackend(folder, host_runner(progress), threads=threads)
    if fmt == "pte":
        from gemma_edge.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(folder, threads=threads)
    raise GemmaEdgeError(f"{folder}: unknown export format {fmt!r} in its manifest; valid: onnx, pte")


@contextlib.contextmanager
def pages_released_while_loading(files: list[Path], every_s: float = 0.2) -> Iterator[None]:
    """While ONNX Runtime loads (it releases the GIL): release the pages it has read of the
    memory-mapped weight files (release_mapped_pages), every every_s seconds and once at the end.

    ONNX Runtime maps model.onnx.data and reads each weight once to repack it for its kernels (an
    anonymous copy: MatMulNBits' int8 kernels take their own block layout), but keeps the file
    mapped, and the pages it read stay resident beside the copies: the scales, which it never reads
    again (a fifth of an int4 file: 0.3 GiB at Gemma 2B, 1 GiB at 7B), and while loading, every weight
    packed so far (Gemma 7B int4: 7.6 GiB at the peak of loading, 6.1 of it the copies). Released, a
    page is read again from the file if it is ever needed."""
    if not files:
        yield
        return
    done = threading.Event()

    def release() -> None:
        while not done.wait(every_s):
            for f in files:
                release_mapped_pages(f)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for f in files:
            release_mapped_pages(f)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages (clean file pages are dropped; any other is kept)


def release_mapped_pages(path: Path, unlock: bool = False) -> int:
    """Give back the resident pages of this process's mappings of the file at path; those read again
    are read again from the page cache or the file, so nothing changes but memory. unlock: unlock
    them first (ExecuTorch's loader mlocks the program's constants). Returns the mappings released
    (0 where /proc or madvise is missing: other systems keep the pages)."""
    import ctypes

    try:
        real = str(Path(path).resolve())
        with open("/proc/self/maps") as f:
            ranges = [[int(x, 16) for x in line.split()[0].split("-")] for line in f if line.rstrip().endswith(" " + real)]
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return 0
    libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for low, high in ranges:
        if unlock:
            libc.munlock(low, high - low)
        released += libc.madvise(low, high - low, MADV_PAGEOUT) == 0
    return released
