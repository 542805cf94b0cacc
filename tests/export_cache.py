"""Exports of the real model made once per content, so the test suite does not lower for minutes
on every run: the key covers the source's files, the export settings, the package modules the
exporter imports (directly or not, found by parsing them: a change to the runtime or the CLI
keeps the cache) and the versions of the libraries that lower it. A new key replaces the old exports of the same
source and settings, so the cache holds one export per (source, settings)."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path

import gemma_edge
from gemma_edge.checkpoints import Checkpoint, cache_dir
from gemma_edge.exporters.manifest import versions
from gemma_edge.manifest import MANIFEST
from gemma_edge.exporters.settings import PTE_TOKENS_PER_CALL, ExportSettings
from gemma_edge.files import exclusive, sha256_file, write_atomic


def content_key(ckpt: Checkpoint, settings: ExportSettings) -> str:
    digest = hashlib.sha256(repr(settings).encode())
    if ckpt.hf_dir is None:
        digest.update(ckpt.source.encode())
    else:
        for f in sorted(p for p in ckpt.hf_dir.iterdir() if p.is_file()):
            digest.update(f"{f.name}:{sha256_file(f)}".encode())
    for adapter in ckpt.adapters:  # its weights and its config (alpha, patterns)
        digest.update(f"{adapter.sha256}:{sha256_file(adapter.folder / 'adapter_config.json')}".encode())
    package = Path(gemma_edge.__file__).parent
    exporter = {"pte": "executorch.py", "onnx": "onnx.py"}[settings.format]
    for f in sorted(_imported_closure(package / "exporters" / exporter, package)):
        digest.update(f"{f.relative_to(package)}:".encode() + f.read_bytes())
    digest.update(repr(sorted(versions("torch", "executorch", "torchao", "transformers").items())).encode())
    return digest.hexdigest()[:16]


def _imported_closure(start: Path, package: Path) -> set[Path]:
    """start and every gemma_edge module it imports, at any depth, also inside functions."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name == "gemma_edge" or not name.startswith("gemma_edge."):
                    continue
                base = package.joinpath(*name.split(".")[1:])
                todo += [p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()]
    return seen


def cached_export(ckpt: Checkpoint, settings: ExportSettings, export=None) -> Path:
    """The export of ckpt with settings, made once per content key. export(ckpt, settings, folder):
    how to make it (default: the exporter's function in this process); what it returns, if not
    None, is kept as JSON beside the export (sidecar(folder)) for as long as the export is.
    Settings are keyed as the export resolves them (--recipe auto's choice: one export for an int8
    recipe asked with auto or rtn)."""
    settings = settings.for_model(ckpt.config)
    fmt = "" if settings.format == "pte" else f"{settings.format}-"  # .pte entries predate the ONNX ones
    # A folder source is named by its last part: the tests' tiny checkpoints live in a new temporary
    # folder each run but are the same bytes, which the key covers, so their exports are reused too.
    name = Path(ckpt.source).name if ckpt.hf_dir is not None else ckpt.source.replace("/", "_")
    ops = "" if settings.ops in (None, "auto") else f"-{settings.ops}"
    kv = "" if settings.kv_dtype == "float32" else f"-kv{settings.kv_dtype}"
    default_calls = None if settings.format != "pte" else min(settings.max_seq_len, PTE_TOKENS_PER_CALL)
    calls = "" if settings.max_tokens_per_call == default_calls else f"-t{settings.max_tokens_per_call}"
    recipe = "" if settings.recipe == "rtn" else f"-{settings.recipe}{settings.calibration_tokens}"
    calibration = "" if settings.calibration is None else f"-c{hashlib.sha256(settings.calibration.encode()).hexdigest()[:8]}"
    int8 = "" if settings.int8_layers is None else "-8" + ("+".join(k.removesuffix("_proj") for k in settings.int8_layers) or "none")
    adapters = "".join(f"-a{adapter.sha256[:8]}" for adapter in ckpt.adapters)
    prefill = "-prefill" if settings.prefill_method else ""
    label = (f"{name}{adapters}-{fmt}{settings.quant}-g{settings.group_size}-e{settings.embedding_quant}-{settings.max_seq_len}"
             f"{ops}{kv}{calls}{recipe}{calibration}{int8}{prefill}")
    root = cache_dir() / "test-exports"
    folder = root / f"{label}-{content_key(ckpt, settings)}"
    # Test processes running side by side (pytest -n) make each export once: the second waits for the first's.
    with exclusive(root / f".{label}.lock"):
        if not (folder / MANIFEST).is_file():
            if export is None:
                if settings.format == "pte":
                    from gemma_edge.exporters.executorch import export_pte as exporter
                else:
                    from gemma_edge.exporters.onnx import export_onnx as exporter
                def export(ckpt, settings, folder):
                    exporter(ckpt, settings, folder, overwrite=True)
            made = export(ckpt, settings, folder)
            if made is not None:
                write_atomic(sidecar(folder), json.dumps(made) + "\n")
            earlier = re.compile(re.escape(label) + r"-[0-9a-f]{16}(\.json)?")  # not another label that starts with this one
            for old in root.glob(f"{label}-*"):
                if earlier.fullmatch(old.name) and not old.name.startswith(folder.name):
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return folder


def sidecar(folder: Path) -> Path:
    """Where cached_export keeps what its export function returned."""
    return folder.with_name(folder.name + ".json")
