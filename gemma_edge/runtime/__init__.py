"""Generation from an export (or the eager model). Importable without torch: only the backends
that need it (ExecuTorch, eager) import it, when used."""

from gemma_edge.runtime.generation import GenerationResult, Stats, greedy
from gemma_edge.runtime.generator import Generator
from gemma_edge.runtime.sampling import SamplingConfig

__all__ = ["Generator", "GenerationResult", "SamplingConfig", "Stats", "greedy"]
