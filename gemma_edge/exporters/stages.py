"""What the two exporters share about a run: its named stages, each timed and shown through the
caller's hook (the command line's progress lines), and what a run returns.

Kept apart from both exporters so that neither imports the other: an export's cache key in the
tests covers the modules its exporter imports, and a change to the ExecuTorch exporter should not
make the ONNX exports again (tests/export_cache.py)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

Stage = Callable[[str], ContextManager]  # name -> a context the stage runs in (progress shown by the caller)


def no_stage(name: str) -> ContextManager:
    return contextlib.nullcontext()


@dataclass
class ExportResult:
    folder: Path
    manifest: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    @contextlib.contextmanager
    def timed(self, name: str, stage: Stage):
        """Run a stage inside the caller's hook and record its seconds under its name."""
        start = time.perf_counter()
        with stage(name):
            yield
        self.seconds[name] = time.perf_counter() - start
