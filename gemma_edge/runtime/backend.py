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
