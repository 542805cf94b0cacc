"""gemma-edge: Gemma language models exported for phones and edge boards."""

from gemma_edge.errors import GemmaEdgeError

__version__ = "0.1.0"
__all__ = ["GemmaEdgeError", "__version__"]
