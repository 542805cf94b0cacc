"""The eager PyTorch model as a backend: the reference every export is held to."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gemma_edge.model import Gemma


class EagerBackend:
    def __init__(self, model: Gemma):
        self.model = model.eval()
        self.max_seq_len = model.max_seq_len
        self.can_rewind = model.can_rewind
        self.manifest = {"config": model.config.to_dict(), "max_seq_len": model.max_seq_len}

    def _hidden(self, token_ids: Sequence[int], start_pos: int) -> torch.Tensor:
        tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None, :]
        return self.model.hidden_states(tokens, torch.arange(start_pos, start_pos + tokens.shape[1]))

    @torch.no_grad()
    def forward(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        return self.model.logits(self._hidden(token_ids, start_pos))[0].float().numpy()

    @torch.no_grad()
    def forward_last(self, token_ids: Sequence[int], start_pos: int) -> np.ndarray:
        return self.model.logits(self._hidden(token_ids, start_pos)[:, -1])[0].float().numpy()

    def reset(self) -> None:
        self.model.reset_cache()
