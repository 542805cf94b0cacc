"""What a long step reports as it goes (reading a checkpoint, converting a GGUF, exporting), for the
command line's progress bar: one module below both checkpoints.py and the exporters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """Work done of total (elements, tensors, partitions), seconds so far, what is being done."""

    done: int
    total: int
    seconds: float
    name: str

    @property
    def eta(self) -> float | None:
        return self.seconds * (self.total - self.done) / self.done if self.done else None
