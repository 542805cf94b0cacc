"""Generation from the model or an export. Importable without torch: backends that need it import it lazily."""

from gemma_edge.runtime.generation import GenerationResult, greedy

__all__ = ["GenerationResult", "greedy"]
