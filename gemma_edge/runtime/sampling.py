"""Choosing the next token from one row of logits: greedy, or seeded sampling with temperature,
top-k, top-p and a repetition penalty. numpy only.

The order is transformers' (its logits processors): repetition penalty, temperature, top-k,
top-p, then a draw from the softmax. temperature 0 is greedy (argmax), whatever the rest says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gemma_edge.errors import GemmaEdgeError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the context less likely
    seed: int | None = None  # a fixed seed makes sampling reproducible

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GemmaEdgeError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GemmaEdgeError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GemmaEdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GemmaEdgeError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplingConfig = SamplingConfig()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, context: Sequence[int] = ()) -> int:
        """logits [vocab] -> a token id; context: the ids so far (prompt and generated)."""
        c = self.config
        if c.repetition_penalty != 1.0 and len(context):
            seen = np.unique(np.asarray(context, dtype=np.int64))
            logits = np.array(logits, dtype=np.float64)  # a copy: the caller's row stays as it was
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / c.repetition_penalty, logits[seen] * c.repetition_penalty)
        if c.greedy:
            return int(np.argmax(logits))
        return int(self.rng.choice(len(logits), p=probabilities(logits, c)))


def probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution a (non-greedy) draw uses: softmax(logits / temperature), cut to top-k and
    top-p and renormalized. float64 [vocab]."""
    z = np.asarray(logits, dtype=np.float64) / config.temperature
    if 0 < config.top_k < len(z):
        kth = np.partition(z, -config.top_k)[-config.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if config.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        # keep every token until the sum reaches top_p, including the one that crosses it
        keep = order[: int(np.searchsorted(cumulative, config.top_p) + 1)]
        cut = np.zeros_like(p)
        cut[keep] = p[keep]
        p = cut / cut.sum()
    return p
