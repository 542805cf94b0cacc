"""gemma_edge.json: the contract between the workstation that exports and the device that runs.

An export folder holds its program, its tokenizer and this manifest: the architecture, the export
settings, the program's I/O contract, the special tokens, and the size and SHA-256 of every other
file. The exporters write it (exporters/manifest.py builds the content) and the runtime, verify,
inspect and the Android app (ExportManifest.java) read it; this module owns the rules both sides
keep, and imports neither torch nor exporter code:

- every file it names is a plain file name inside the folder: no path, no "..", no symlink that
  leaves the folder, so a manifest from a stranger cannot make us load or hash another file;
- a file whose size differs from the manifest's is damaged (a truncated copy or download), named
  before ONNX Runtime or ExecuTorch trips over it; its SHA-256 on request.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gemma_edge.errors import DamagedExportError, GemmaEdgeError, UnsafeManifestError

MANIFEST = "gemma_edge.json"
VERSION = 1  # gemma_edge_manifest: bumped when a reader of the old layout would misread the new
FORMATS = ("onnx", "pte")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, with every file name it holds checked (safe_path)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise GemmaEdgeError(f"{folder}: no {MANIFEST}; is this a folder written by 'gemma-edge export'?")
    safe_path(folder, MANIFEST)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedExportError(f"{path}: not valid JSON ({e}); copy the export folder again or export anew") from None
    if not isinstance(manifest, dict) or manifest.get("gemma_edge_manifest") != VERSION:
        found = manifest.get("gemma_edge_manifest") if isinstance(manifest, dict) else None
        raise GemmaEdgeError(f"{path}: manifest version {found!r}, this gemma-edge reads {VERSION}; "
                             "export again with this version")
    for name in named_files(manifest):
        safe_path(folder, name)
    return manifest


def named_files(manifest: dict[str, Any]) -> list[str]:
    """Every file name the manifest refers to: its file table, the program, the tokenizer's files."""
    io, tokenizer = manifest.get("io") or {}, manifest.get("tokenizer") or {}
    names = list(manifest.get("files") or {})
    names += [io["program"]] if "program" in io else []
    names += list(io.get("files") or []) + list(tokenizer.get("files") or [])
    return names


def prompt_template(manifest: dict[str, Any], fallback: str) -> str:
    """The prompt format generate, chat and the Android app use unless told otherwise: the one given
    at export (--template: a fine-tune's format), else fallback."""
    return (manifest.get("export") or {}).get("template") or fallback


def program_files(manifest: dict[str, Any]) -> list[str]:
    """The files the runtime loads as the model: the program and its external weights."""
    io = manifest.get("io") or {}
    return list(io.get("files") or [io["program"]])


def cache_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of the static KV cache the program allocates when it loads, at max_seq_len positions:
    the manifest's "cache" (exports since --kv-dtype), else what earlier exports allocate: float32,
    every ONNX layer at max_seq_len, a .pte's sliding layers a ring of window + 1 slots (cache.py)."""
    if "cache" in manifest:
        return int(manifest["cache"]["bytes"])
    if manifest["format"] == "onnx":
        return sum(4 * math.prod(i["shape"]) for i in manifest["io"]["inputs"] if i["name"].startswith("past_key_values."))
    c, n = manifest["config"], int(manifest["max_seq_len"])
    window = c.get("sliding_window") or n
    types = c.get("layer_types") or ["full_attention"] * c["num_hidden_layers"]
    slots = [window + 1 if t == "sliding_attention" and window < n else n for t in types]
    return sum(2 * 4 * c["num_key_value_heads"] * s * c["head_dim"] for s in slots)


def safe_path(folder: Path, name: Any) -> Path:
    """folder / name, if name is a plain file name whose file (after symlinks) stays in folder."""
    folder = Path(folder)
    where = f"{folder / MANIFEST}"
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain:
        raise UnsafeManifestError(f"{where} names the file {name!r}, which is not a plain file name in {folder}; "
                                  "refusing to load anything outside the export folder. Export again")
    path = folder / name
    if path.is_symlink():
        real, home = path.resolve(), folder.resolve()
        if real.parent != home:
            raise UnsafeManifestError(f"{path} is a symlink to {real}, outside the export folder; refusing to load "
                                      "it. Copy the real file into the folder (cp -L) or export again")
    return path


def file_problems(folder: str | Path, manifest: dict[str, Any], checksums: bool = True) -> dict[str, str]:
    """{file: problem} for the manifest's files that are missing, of another size than the export
    wrote (cheap: a truncated copy), or (checksums=True) of another SHA-256."""
    from gemma_edge.files import sha256_file

    folder = Path(folder)
    problems = {}
    for name, info in (manifest.get("files") or {}).items():
        path = safe_path(folder, name)
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size != info["bytes"]:
            size = path.stat().st_size
            problems[name] = f"{'truncated' if size < info['bytes'] else 'wrong size'}: {size:,} bytes, the export wrote {info['bytes']:,}"
        elif checksums and sha256_file(path) != info["sha256"]:
            problems[name] = "changed: its SHA-256 differs from the manifest's"
    return problems


def check_files(folder: str | Path, manifest: dict[str, Any], checksums: bool = False) -> None:
    """Raise DamagedExportError naming the first damaged file (see file_problems)."""
    problems = file_problems(folder, manifest, checksums)
    if problems:
        name, problem = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise DamagedExportError(damaged(Path(folder), name, problem + more))


def damaged(folder: Path, name: str, problem: str) -> str:
    """The one line that names a damaged file and what to do."""
    return (f"{folder / name} is damaged ({problem}): copy the export folder again or export it anew; "
            f"'gemma-edge verify {folder}' checks every file")


def export_contents_problem(folder: Path) -> str | None:
    """None if folder is an export that --overwrite may replace: its manifest is readable and it holds
    nothing but the manifest and the files the manifest lists. Otherwise why not, naming what is there."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return "it is a symlink" if folder.is_symlink() else "it is a file"
    entries = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    if MANIFEST not in entries:
        return f"it has no {MANIFEST} and holds {shown or 'nothing'}" if entries else f"it is an empty folder without {MANIFEST}"
    try:
        listed = set((read_manifest(folder).get("files") or {})) | {MANIFEST}
    except GemmaEdgeError as e:
        return f"its {MANIFEST} cannot be read ({e})"
    foreign = [n for n in entries if n not in listed or not (folder / n).is_file() or (folder / n).is_symlink()]
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}, which the export did not write"
    return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """gemma_edge.json in folder, written whole or not at all."""
    from gemma_edge.files import write_atomic

    write_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
