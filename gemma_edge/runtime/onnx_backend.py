"""An exported ONNX folder run through ONNX Runtime (CPU), as a generation backend. Needs no torch.

The cache lives in one preallocated buffer per past/present pair, bound as both the input and the
output of every call (IO binding): the graph's scatter writes this call's positions into it in
place, so no call allocates or copies a cache-sized array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gemma_edge.errors import DamagedExportError, GemmaEdgeError, MissingDependencyError
from gemma_edge.manifest import damaged, read_manifest
from gemma_edge.runtime.backend import first_line, pages_released_while_loading


class OnnxBackend:
    def __init__(self, folder: str | Path, threads: int | None = None, profile_dir: Path | None = None):
        """profile_dir: ONNX Runtime's profiler on, its events written there by session.end_profiling()
        (gemma_edge/profiling.py)."""
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        if self.manifest.get("format") != "onnx":
            raise GemmaEdgeError(f"{folder} holds a {self.manifest.get('format')!r} export, not onnx")
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.can_rewind = True  # every layer keeps all max_seq_len positions; the graph reads only those before a call
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the note that logits_to_keep is an overridable initializer
        if threads:
            options.intra_op_num_threads = threads
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "onnxruntime")
        io = self.manifest["io"]
        data = [folder / name for name in io.get("files") or [] if name != io["program"]]
        try:
            with pages_released_while_loading(data):
                self.session = ort.InferenceSession(str(folder / io["program"]), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no base but Exception
            raise DamagedExportError(damaged(folder, io["program"], f"ONNX Runtime cannot load it: {first_line(e)}")) from None
        self._ort = ort
        self._logits_to_keep = any(i.name == "logits_to_keep" for i in self.session.get_overridable_initializers())
        self._caches = {}  # past name -> (present name, OrtValue)
        for spec in io["inputs"]:
            if spec["name"].startswith("past_key_values."):
                self._cache_dtype = np.dtype(spec["dtype"])  # float32, or float16 (--kv-dtype)
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(spec["shape"], self._cache_dtype))
                self._caches[spec["name"]] = (spec["name"].replace("past_key_values.", "present.", 1), buffer)
        self.reset()

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits [len(token_ids), vocab] for token_ids placed at start_pos.., in one call."""
        return self._run(token_ids, start_pos, 0)

    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """The same call computing the last row only [vocab], where the graph offers that."""
        return self._run(token_ids, start_pos, 1)[-1]

    def _run(self, token_ids: Sequence[int], start_pos: int, rows: int) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        if ids.shape[1] == 0 or start_pos < 0 or start_pos + ids.shape[1] > self.max_seq_len:
            raise GemmaEdgeError(f"positions {start_pos}..{start_pos + ids.shape[1] - 1} do not fit the "
                                 f"export's cache of {self.max_seq_len}")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", np.arange(start_pos, start_pos + ids.shape[1], dtype=np.int64)[None, :])
        if rows and self._logits_to_keep:
            # (bind_cpu_input looks the name up among the non-initializer inputs only)
            binding.bind_ortvalue_input("logits_to_keep", self._ort.OrtValue.ortvalue_from_numpy(np.array([rows], np.int64)))
        binding.bind_output("logits")  # first: get_outputs() follows the order of binding
        for past, (present, buffer) in self._caches.items():
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # written in place
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0]

    def reset(self) -> None:
        """Nothing to clear for correctness (a prefill from 0 masks every slot); zeroed anyway so
        that no stale value (or NaN from a failed run) can reach a masked product."""
        for _, buffer in self._caches.values():
            buffer.update_inplace(np.zeros(buffer.shape(), self._cache_dtype))
