"""Does our model compute what the transformers reference computes?

One prompt is prefilled in a single call, then the reference's greedy continuation is fed one
token per call through the static cache (teacher forcing, so every row stays comparable even if
the two would pick different tokens). The reference runs the whole sequence in one pass without
a cache. Greedy token ids are compared separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from gemma_edge.runtime.backend import Backend
from gemma_edge.runtime.generation import greedy

# float32 eager vs float32 eager: only summation order differs.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-4


@dataclass
class ParityReport:
    prompt_tokens: int
    ours: np.ndarray = field(repr=False)  # [prompt + decode steps, vocab] float32
    reference: np.ndarray = field(repr=False)  # the same rows from the reference
    greedy_ours: list[int]
    greedy_reference: list[int]
    atol: float = FP32_ATOL
    rtol: float = FP32_RTOL

    def _max_abs(self, rows: slice) -> float:
        return float(np.abs(self.ours[rows] - self.reference[rows]).max())

    @property
    def prefill_max_abs(self) -> float:
        return self._max_abs(slice(0, self.prompt_tokens))

    @property
    def decode_max_abs(self) -> float:
        return self._max_abs(slice(self.prompt_tokens, None)) if len(self.ours) > self.prompt_tokens else 0.0

    @property
    def top1_agreement(self) -> float:
        return float((self.ours.argmax(-1) == self.reference.argmax(-1)).mean())

    @property
    def first_divergence(self) -> int | None:
        for i, (a, b) in enumerate(zip(self.greedy_ours, self.greedy_reference)):
            if a != b:
                return i
        return None if len(self.greedy_ours) == len(self.greedy_reference) else min(len(self.greedy_ours), len(self.greedy_reference))

    @property
    def logits_close(self) -> bool:
        return bool(np.all(np.abs(self.ours - self.reference) <= self.atol + self.rtol * np.abs(self.reference)))

    @property
    def passed(self) -> bool:
        return self.logits_close and self.first_divergence is None


def reference_greedy(reference: torch.nn.Module, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False), with no stop token: exactly new_tokens ids."""
    from transformers import GenerationConfig

    ids = torch.tensor([list(prompt_ids)])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


def check_against_reference(backend: Backend, reference: torch.nn.Module, prompt_ids: Sequence[int],
                            new_tokens: int) -> ParityReport:
    prompt = [int(t) for t in prompt_ids]
    if len(prompt) + new_tokens > backend.max_seq_len:
        raise ValueError(f"{len(prompt)} prompt + {new_tokens} new tokens exceed max_seq_len {backend.max_seq_len}")
    ref_tokens = reference_greedy(reference, prompt, new_tokens)
    sequence = prompt + ref_tokens[:-1]  # the last generated token is never fed back
    with torch.no_grad():
        ref_logits = reference(torch.tensor([sequence])).logits[0].float().numpy()
    backend.reset()
    rows = [backend.forward(prompt, 0)]
    rows += [backend.forward([t], len(prompt) + i) for i, t in enumerate(ref_tokens[:-1])]
    ours = greedy(backend, prompt, new_tokens).token_ids
    return ParityReport(len(prompt), np.concatenate(rows), ref_logits, ours, ref_tokens)
