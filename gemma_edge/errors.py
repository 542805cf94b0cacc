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


class OutputFolderError(GemmaEdgeError):
    """An output folder cannot be written: it is not ours to replace, the disk is full, or it is read-only."""


class DamagedExportError(GemmaEdgeError):
    """A file of an export folder is missing, truncated, changed since export, or cannot be loaded."""


class UnsafeManifestError(GemmaEdgeError):
    """A manifest names a file outside its export folder (a path, '..', or a symlink that leaves it)."""


class ConcurrentUseError(GemmaEdgeError):
    """One Generator was used from two threads at once."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` cleans up on the way out."""
