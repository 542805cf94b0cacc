"""Terminal output shared by the verbs: progress on stderr, results (tables) on stdout."""

from __future__ import annotations

import sys

from rich.console import Console


def results() -> Console:
    """stdout; when piped into a file or another program, wide enough that tables are not wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def progress() -> Console:
    """stderr, for spinners and stage messages that must not mix with results."""
    return Console(stderr=True)
