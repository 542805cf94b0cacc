"""An exported .pte run through ExecuTorch's Python runtime, as a generation backend."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gemma_edge.errors import DamagedExportError, GemmaEdgeError, MissingDependencyError
from gemma_edge.manifest import damaged, program_files, read_manifest
from gemma_edge.runtime.backend import can_rewind, first_line, native_log_captured, release_mapped_pages

KERNEL_MODULES = ("executorch.kernels.quantized",)


class ExecuTorchBackend:
    def __init__(self, folder: str | Path, threads: int | None = None, etdump: bool = False):
        """etdump: ExecuTorch's profiler on, every operator's time recorded until write_etdump()
        (gemma_edge/profiling.py)."""
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.can_rewind = can_rewind(self.manifest)  # not on ring caches (cache.py)
        self.max_tokens_per_call = int(self.manifest["io"].get("tokens_per_call", [1, self.max_seq_len])[1])
        try:
            import importlib

            import torch
            from executorch.runtime import Runtime

            # Importing these registers kernels a program calls outside its delegate (the quantized
            # embeddings); without them loading fails with
            # "Missing operator: ...". Only modules of this list are imported, whatever the manifest says.
            for name in self.manifest["io"].get("kernels", []):
                if name not in KERNEL_MODULES:
                    raise GemmaEdgeError(f"{folder}: the manifest asks for unknown kernels {name!r}; re-export with this gemma-edge")
                importlib.import_module(name)
        except ImportError:
            raise MissingDependencyError("running a .pte needs executorch: pip install executorch==1.5.1") from None
        self._torch = torch
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)  # before loading: XNNPACK takes the pool then
        # The program, then its weights' data file (exports since model.ptd; earlier programs hold them).
        files, name = program_files(self.manifest), self.manifest["io"]["program"]
        data = [n for n in files if n != name]
        try:
            with native_log_captured() as log:  # ExecuTorch logs the reason; the exception has only a code
                program = Runtime.get().load_program(folder / name, data_path=folder / data[0] if data else None,
                                                     enable_etdump=etdump)
                # The bindings' methods (the Runtime API's Method wraps one and always clones its outputs)
                self._method = program.load_method(self.manifest["io"]["method"])._method
                # Calls at position 0 (exports since the prefill method; it shares forward's cache).
                prefill = self.manifest["io"].get("prefill_method")
                self._prefill = program.load_method(prefill)._method if prefill else self._method
            self._program = program
        except RuntimeError as e:  # "Failed to load program, error: 0x23"
            reason = next((line.split("] ", 1)[-1] for line in reversed(log) if "] " in line), "")
            named = name + (f" (or its weights, {data[0]})" if data else "")
            raise DamagedExportError(damaged(folder, named, f"ExecuTorch cannot load it: {first_line(e)}"
                                             + (f"; {reason}" if reason else ""))) from None
        # ExecuTorch's loader maps the program and reads and locks its constants whole, the embedding
        # table among them (0.3 GiB at Gemma 2B), though a step reads one row of it; XNNPACK has
        # copied the delegated weights into its own layout by now. (Loading holds the GIL, so this
        # cannot run while it loads, as it does for ONNX Runtime.)
        for file in files:
            release_mapped_pages(folder / file, unlock=True)

    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits [vocab] of the last of token_ids, placed at start_pos..: one program call per chunk
        of at most the program's tokens per call (the manifest's tokens_per_call)."""
        torch = self._torch
        ids, step = list(token_ids), self.max_tokens_per_call
        if not ids:
            raise GemmaEdgeError("forward_last needs at least one token")
        for start in range(0, len(ids), step):
            tokens = torch.tensor([ids[start:start + step]], dtype=torch.long)
            pos = torch.arange(start_pos + start, start_pos + start + tokens.shape[1], dtype=torch.long)
            method = self._prefill if start_pos + start == 0 else self._method
            # Not cloned: torch copies a tensor this large on its OpenMP threads, whose worker then
            # spins on the cores XNNPACK's threads need (Gemma 3 270M, 2 cores: a decode step 19.0-19.9
            # -> 16.3-17.4 ms). The logits are the program's output buffer, which the next call
            # overwrites: copied here, once, by numpy.
            logits = method([tokens, pos], clone_outputs=False)[0][0]
        return logits.numpy().copy()

    def write_etdump(self, path: Path) -> None:
        """Write what ETDump recorded since loading or the last write (which clears it) to path: a
        backend made with etdump=True."""
        self._program.write_etdump_result_to_file(str(path), str(path.with_suffix(".debug")))

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits [len(token_ids), vocab]. The program returns the last row only, so every row
        costs one call; generation uses forward_last and prefills in one call."""
        return np.stack([self.forward_last([t], start_pos + i) for i, t in enumerate(token_ids)])

    def reset(self) -> None:
        """Nothing to clear: a prefill from position 0 masks every cached slot."""
