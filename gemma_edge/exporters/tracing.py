"""torch.export of the model with a dynamic token count, shared by both exporters."""

from __future__ import annotations

import torch
from torch.fx.experimental import _config as fx_config

from gemma_edge.model import Gemma


def export_model(model: Gemma, max_tokens: int | None = None) -> torch.export.ExportedProgram:
    """Trace forward(tokens [1, T], input_pos [T]) with T dynamic up to max_tokens (default: max_seq_len).

    The symbolic range starts at 2 because torch.export specializes sizes 0 and 1; the traced
    graph holds no branch on T, so the same program runs T = 1 (a decode step) unchanged, which
    the tests check. Size-oblivious reasoning keeps the tracer from guarding on strides that
    only differ when T == 1.
    """
    # (max at least 3: a range needs two ends; a runtime never calls with more than max_tokens)
    t = torch.export.Dim("tokens", min=2, max=max(max_tokens or model.max_seq_len, 3))
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        return torch.export.export(model, example, dynamic_shapes=({1: t}, {0: t}), strict=False)
