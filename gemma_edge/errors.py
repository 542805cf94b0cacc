"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class GemmaEdgeError(Exception):
    """Base class: the message names the problem and what to do about it."""


class ConfigError(GemmaEdgeError):
    """An architecture or export setting is out of range or unknown."""


class UnsupportedModelError(GemmaEdgeError):
    """The checkpoint is not a Gemma text model that gemma-edge supports."""


class CheckpointError(GemmaEdgeError):
    """A checkpoint is missing, unreadable, or its tensors do not match the architecture."""


class MissingDependencyError(GemmaEdgeError):
    """An optional package is needed for this path and is not installed."""
