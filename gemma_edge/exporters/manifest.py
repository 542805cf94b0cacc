"""What an exporter writes into gemma_edge.json (the schema and its reader: gemma_edge/manifest.py)."""

from __future__ import annotations

import functools
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma_edge import __version__
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.files import sha256_file
from gemma_edge.manifest import MANIFEST, VERSION
from gemma_edge.manifest import write_manifest as write_manifest_file

if TYPE_CHECKING:  # the runtime reads manifests where torch (which checkpoints needs) is absent
    from gemma_edge.checkpoints import Checkpoint

END_OF_TURN = "<end_of_turn>"  # Gemma's chat turns end here; instruction-tuned models stop on it


def special_tokens(ckpt: Checkpoint) -> dict[str, Any]:
    """bos/eos/pad from the config; <end_of_turn> from the tokenizer when it has one."""
    config = ckpt.config
    end_of_turn = None
    for f in ckpt.tokenizer_files:
        if f.name == "tokenizer.json":
            end_of_turn = _token_id(str(f), f.stat().st_size, f.stat().st_mtime_ns, END_OF_TURN)
    stop = list(config.eos_token_id) + ([end_of_turn] if end_of_turn is not None and end_of_turn not in config.eos_token_id else [])
    return {"bos_token_id": config.bos_token_id, "eos_token_ids": list(config.eos_token_id),
            "pad_token_id": config.pad_token_id, "end_of_turn_id": end_of_turn, "stop_token_ids": stop}


@functools.lru_cache(maxsize=4)
def _token_id(tokenizer_json: str, size: int, mtime_ns: int, token: str) -> int | None:
    """A token's id in a tokenizer.json, kept for the file as it is (size, time of change): an export
    asks several times, and loading Gemma 3's 33 MB tokenizer takes ~2 s each time."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_json).token_to_id(token)


def cache_section(dtype, shapes, max_seq_len: int, layout: str) -> dict[str, Any]:
    """The manifest's "cache": what the program's static KV cache takes on the device beside the
    weights. dtype: the cache's torch dtype; shapes: every key and value buffer's shape."""
    import math

    itemsize = dtype.itemsize
    return {"dtype": str(dtype).removeprefix("torch."), "bytes": sum(itemsize * math.prod(s) for s in shapes),
            "positions": max_seq_len, "layout": layout}


def copy_tokenizer(ckpt: Checkpoint, folder: Path) -> list[str]:
    names = []
    for f in ckpt.tokenizer_files:
        shutil.copyfile(f, folder / f.name)
        names.append(f.name)
    return names


def versions(*packages: str) -> dict[str, str]:
    found = {"gemma-edge": __version__}
    for p in packages:
        try:
            found[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(folder: Path, ckpt: Checkpoint, settings: ExportSettings, special: dict[str, Any],
                   **sections: Any) -> dict[str, Any]:
    """Write gemma_edge.json with a SHA-256 of every other file in the folder; special: special_tokens(ckpt)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "gemma_edge_manifest": VERSION,
        "format": settings.format,
        "source": ckpt.source,
        "config": ckpt.config.to_dict(),
        "export": settings.to_dict(),
        "max_seq_len": settings.max_seq_len,
        "special_tokens": special,
        **({"adapters": [a.describe() for a in ckpt.adapters]} if ckpt.adapters else {}),
        **sections,
        "files": files,
    }
    write_manifest_file(folder, manifest)
    return manifest
