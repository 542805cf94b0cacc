"""The generation loop shared by every backend: prefill the prompt in one call, then decode one
token per call, choosing each with the same sampler and stopping by the same rules.

Stops, with finish_reason: "stop" on a stop id (eos, <end_of_turn>) or a stop string (checked by
the caller, which owns the text), "length" at max_new_tokens or when the cache is full (the
loop never writes past it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from gemma_edge.errors import GemmaEdgeError
from gemma_edge.runtime.backend import Backend
from gemma_edge.runtime.sampling import Sampler


@dataclass
class Stats:
    prompt_tokens: int = 0  # the whole prompt
    cached_tokens: int = 0  # of which were already in the cache (a chat's earlier turns)
    generated_tokens: int = 0
    ttft_s: float = 0.0  # call to first token: the prefill and one draw
    prefill_tokens_per_s: float = 0.0  # prompt tokens computed / prefill time
    decode_tokens_per_s: float = 0.0  # tokens after the first / their time

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    finish_reason: str = ""  # "stop" or "length"
    text: str = ""  # filled by callers that detokenize (Generator)
    stats: Stats = field(default_factory=Stats)
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # [vocab] per generated token, on request


def check_prompt(prompt: Sequence[int], max_seq_len: int) -> list[int]:
    ids = [int(t) for t in prompt]
    if not ids:
        raise GemmaEdgeError("the prompt is empty: give at least one token (Gemma prompts start with <bos>)")
    if len(ids) > max_seq_len:
        raise GemmaEdgeError(f"the prompt has {len(ids)} tokens but the cache holds {max_seq_len}; shorten it, "
                             "truncate it from the left (truncate='left', --truncate left) or export with a larger --max-seq-len")
    return ids


def tokens(backend: Backend, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
           stop_ids: Sequence[int] = (), cached: int = 0, result: GenerationResult | None = None,
           keep_logits: bool = False) -> Iterator[int]:
    """Yield generated ids one by one; `result` receives ids, finish reason and stats as they come.

    cached: how many leading prompt ids the backend's cache already holds at their positions
    (the caller checked they are the same ids); only the rest is computed. Stopping early (closing
    the iterator) is fine: the cache then holds the prompt and every yielded id but the last.
    """
    prompt = check_prompt(prompt_ids, backend.max_seq_len)
    if max_new_tokens < 1:
        raise GemmaEdgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cached = min(cached, len(prompt) - 1)  # at least one prompt token is computed: its logits start decoding
    result = result if result is not None else GenerationResult()
    stats = result.stats
    stats.prompt_tokens, stats.cached_tokens = len(prompt), cached
    stop = set(int(s) for s in stop_ids)
    context = list(prompt)
    start = time.perf_counter()
    logits = backend.forward_last(prompt[cached:], cached)
    prefill_end = time.perf_counter()
    stats.prefill_tokens_per_s = (len(prompt) - cached) / max(prefill_end - start, 1e-9)
    pos = len(prompt)
    while True:
        token = sampler(logits, context)
        if not result.token_ids:
            stats.ttft_s = time.perf_counter() - start
            first = time.perf_counter()
        result.token_ids.append(token)
        context.append(token)
        stats.generated_tokens = len(result.token_ids)
        if keep_logits:
            result.logits.append(logits)
        if len(result.token_ids) > 1:
            stats.decode_tokens_per_s = (len(result.token_ids) - 1) / max(time.perf_counter() - first, 1e-9)
        if token in stop:
            result.finish_reason = "stop"
        elif len(result.token_ids) >= max_new_tokens or pos >= backend.max_seq_len:
            result.finish_reason = "length"
        yield token
        if result.finish_reason:
            return
        logits = backend.forward_last([token], pos)
        pos += 1


def greedy(backend: Backend, prompt_ids: Sequence[int], max_new_tokens: int,
           stop_ids: Sequence[int] = (), keep_logits: bool = False) -> GenerationResult:
    """Greedy decoding from an empty cache. Never writes past the cache: stops with "length"."""
    backend.reset()
    result = GenerationResult()
    for _ in tokens(backend, prompt_ids, max_new_tokens, Sampler(), stop_ids, result=result, keep_logits=keep_logits):
        pass
    return result
