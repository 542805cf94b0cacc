"""Terminal output shared by the verbs: progress on stderr, results (tables) on stdout."""

from __future__ import annotations

import sys

from rich.console import Console


def results() -> Console:
    """stdout; when piped into a file or another program, wide enough that tables are not wrapped."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def write_json(path, data: dict) -> None:
    """data as indented JSON at path, written to a temporary file and renamed: never half written."""
    import json

    from gemma_edge.files import write_atomic

    write_atomic(path, json.dumps(data, indent=2) + "\n")


def progress() -> Console:
    """stderr, for spinners and stage messages that must not mix with results; when piped into a log
    or another program, each message stays one line (rich would wrap it at 80 columns)."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())
