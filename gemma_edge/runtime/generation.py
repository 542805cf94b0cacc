"""The generation loop shared by every backend: prefill the prompt in one call, then decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gemma_edge.errors import GemmaEdgeError
from gemma_edge.runtime.backend import Backend


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only
    finish_reason: str  # "stop" (a stop id), "length" (max_new_tokens or the cache is full)
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # [vocab] per generated token


def greedy(backend: Backend, prompt_ids: Sequence[int], max_new_tokens: int,
           stop_ids: Sequence[int] = (), keep_logits: bool = False) -> GenerationResult:
    """Greedy decoding from an empty cache. Never writes past the cache: stops with "length"."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise GemmaEdgeError("the prompt is empty: give at least one token (Gemma prompts start with <bos>)")
    if len(prompt) > backend.max_seq_len:
        raise GemmaEdgeError(f"the prompt has {len(prompt)} tokens but the cache holds {backend.max_seq_len}; "
                             "shorten it or export with a larger --max-seq-len")
    backend.reset()
    logits = backend.forward_last(prompt, 0)
    out: list[int] = []
    kept: list[np.ndarray] = []
    pos = len(prompt)
    while True:
        token = int(np.argmax(logits))
        out.append(token)
        if keep_logits:
            kept.append(logits)
        if token in stop_ids:
            return GenerationResult(out, "stop", kept)
        if len(out) >= max_new_tokens or pos >= backend.max_seq_len:
            return GenerationResult(out, "length", kept)
        logits = backend.forward_last([token], pos)
        pos += 1
