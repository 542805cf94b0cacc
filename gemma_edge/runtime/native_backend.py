"""A .pte run by gemma-edge's native runner (gemma_edge/native/) in a child process, as a
generation backend: no torch, no executorch Python package. Built for this machine
(native_build.host_runner) it is `--runtime native`; under QEMU (a command prefix) it runs the arm64
build on this x86 machine; on an arm64 board, the same runner runs as it is.

The child speaks the binary protocol of native/runner_main.cpp over its stdin and stdout.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from gemma_edge.errors import DamagedExportError, GemmaEdgeError
from gemma_edge.manifest import damaged, program_files, read_manifest
from gemma_edge.runtime.backend import can_rewind

READY = struct.Struct("=4siqqq")  # "GERN", version, vocab_size, max_seq_len, has a prefill method (0/1)
REQUEST = struct.Struct("=iq")  # count, start_pos; then count int64 tokens
PROTOCOL = 2


class NativeBackend:
    def __init__(self, folder: str | Path, runner: str | Path, prefix: Sequence[str] = (), env: dict | None = None,
                 threads: int | None = None):
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        if self.manifest.get("format") != "pte":
            raise GemmaEdgeError(f"{folder}: the native runner runs .pte exports, this one is {self.manifest.get('format')}")
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.can_rewind = can_rewind(self.manifest)
        # The runtime's own log lines (cpuinfo, XNNPACK) go to a file, shown only when the runner fails.
        self._log = tempfile.TemporaryFile()
        files = [folder / name for name in program_files(self.manifest)]  # the program, then its data file
        if threads is not None and threads < 1:
            raise GemmaEdgeError(f"--threads must be at least 1, got {threads}")
        options = ["--threads", str(threads)] if threads else []  # else ExecuTorch's default
        self._process = subprocess.Popen([*prefix, str(runner), *options, *map(str, files)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._closer = weakref.finalize(self, _close, self._process, self._log)
        _widen_pipe(self._process.stdout)
        ready = self._process.stdout.read(READY.size)
        if len(ready) != READY.size:
            raise self._load_failure(folder, files)
        magic, version, self.vocab_size, runner_seq_len, prefill = READY.unpack(ready)
        if magic != b"GERN" or version != PROTOCOL:
            raise GemmaEdgeError(f"{runner} is not a gemma-edge runner of protocol {PROTOCOL}")
        self.prefill_method = bool(prefill)  # the runner sends calls at position 0 to the program's prefill method
        if (runner_seq_len != self.max_seq_len or self.vocab_size != self.manifest["config"]["vocab_size"]
                or self.prefill_method != bool(self.manifest["io"].get("prefill_method"))):
            raise GemmaEdgeError(f"{folder}: the program and its manifest disagree (max_seq_len {runner_seq_len} vs "
                                 f"{self.max_seq_len}, vocab {self.vocab_size}, prefill method {self.prefill_method}); "
                                 "re-export the folder")

    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits [vocab] of the last of token_ids, placed at start_pos..: one program call."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        self._process.stdin.write(REQUEST.pack(len(tokens), start_pos) + tokens.tobytes())
        self._process.stdin.flush()
        (status,) = struct.unpack("=i", self._read(4, "a forward call"))
        if status:
            (length,) = struct.unpack("=i", self._read(4, "a forward call"))
            raise GemmaEdgeError(f"the native runner: {self._read(length, 'a forward call').decode(errors='replace')}")
        return np.frombuffer(self._read(4 * self.vocab_size, "a forward call"), dtype=np.float32)

    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        """Logits [len(token_ids), vocab]: the program returns the last row only, so one call per row."""
        return np.stack([self.forward_last([t], start_pos + i) for i, t in enumerate(token_ids)])

    def reset(self) -> None:
        """Nothing to clear: a prefill from position 0 masks every cached slot."""

    def close(self) -> None:
        self._closer()

    def _read(self, size: int, doing: str) -> bytes:
        data = self._process.stdout.read(size)
        if len(data) == size:
            return data
        code, log = self._stopped()
        raise GemmaEdgeError(f"the native runner stopped while {doing} (exit {code}): " + " | ".join(log[-5:]))

    def _stopped(self) -> tuple[int, list[str]]:
        """The runner's exit code once it has stopped, and its log."""
        code = self._process.wait()
        self._log.seek(0)
        return code, self._log.read().decode(errors="replace").strip().splitlines()

    def _load_failure(self, folder: Path, files: list[Path]) -> GemmaEdgeError:
        """Why the runner stopped before it was ready: a program ExecuTorch refused (the runner says
        which call failed, ExecuTorch's log why), said as ExecuTorchBackend says it, or anything else
        (a runner that could not start) as the runner's last lines."""
        code, log = self._stopped()
        refused = next((line.split(" failed: ", 1)[1] for line in log if line.startswith("gemma-edge-runner: loading")), None)
        if refused is None:
            return GemmaEdgeError(f"the native runner stopped while loading the program (exit {code}): " + " | ".join(log[-5:]))
        why = next((line.split("] ", 1)[1] for line in log if line.startswith("E ") and "] " in line), "")
        named = files[0].name + (f" (or its weights, {files[1].name})" if len(files) > 1 else "")
        return DamagedExportError(damaged(folder, named, f"ExecuTorch cannot load it: {refused}" + (f"; {why}" if why else "")))


PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged process (/proc/sys/fs/pipe-max-size)


def _widen_pipe(pipe) -> None:
    """Let the pipe hold a whole answer (the 262k logits of a Gemma 3 step are 1 MiB), where Linux's
    64 KiB default made the runner wait for the reader 16 times a step (Gemma 3 270M, 2 threads:
    decode 61-67 -> 68-69 tok/s). Where the system has no such call or refuses, the pipe stays as it is."""
    import fcntl

    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):
        pass


def _close(process: subprocess.Popen, log) -> None:
    if process.poll() is None:
        try:
            process.stdin.write(struct.pack("=i", 0))
            process.stdin.close()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
    log.close()
