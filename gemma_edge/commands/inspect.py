"""gemma-edge inspect: an export's manifest as a table, and whether its files match their checksums."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gemma_edge.commands.ui import results
    from gemma_edge.manifest import file_problems, read_manifest

    folder = Path(args.outdir)
    m = read_manifest(folder)
    c, e = m["config"], m["export"]
    about = Table(title=f"{folder}", show_header=False)
    about.add_column(style="bold")
    about.add_column()
    rows = [
        ("format", m["format"] + (f" ({m['io']['ops']} operators)" if "ops" in m.get("io", {}) else "")),
        ("source", str(m["source"])),
        ("architecture", f"{c['model_type']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                         f"heads {c['num_attention_heads']} / kv {c['num_key_value_heads']}, head_dim {c['head_dim']}, vocab {c['vocab_size']}"),
        ("quantization", f"{e['quant']} (group {e['group_size']}), embedding {e['embedding_quant']}"),
        *((f"adapter {i + 1}", f"{a['name']}: rank {a['rank']}, alpha {a['alpha']:g}{', rsLoRA' if a['use_rslora'] else ''}, "
           f"on {', '.join(a['target_modules'])}"
           + (f", saved {', '.join(a['modules_to_save'])}" if a["modules_to_save"] else "") + f", sha256 {a['sha256'][:16]}")
          for i, a in enumerate(m.get("adapters") or [])),
        ("prompt format", e.get("template") or "not given (generate: plain, chat: gemma)"),
        ("max_seq_len", str(m["max_seq_len"])),
        # (gemma-edge's runtimes call the prefill method; ExecuTorch's stock runner and LlmModule forward alone)
        *((("methods", f"forward; {m['io']['prefill_method']} (a prompt's first call, at position 0)"),)
          if m.get("io", {}).get("prefill_method") else ()),
        ("on the device", _device_memory(m)),
        ("special tokens", ", ".join(f"{k} {v}" for k, v in m["special_tokens"].items())),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
    ]
    for key, value in rows:
        about.add_row(key, value)
    files = Table(title="files")
    for col in ("file", "size", "sha256", "check"):
        files.add_column(col, justify="right" if col == "size" else "left")
    bad = file_problems(folder, m, checksums=not args.no_verify)
    for name, info in m["files"].items():
        status = f"[red]{bad[name].split(':')[0].upper()}[/red]" if name in bad else "not checked" if args.no_verify else "[green]ok[/green]"
        files.add_row(name, f"{info['bytes'] / 2**20:,.1f} MiB", info["sha256"][:16], status)
    out = results()
    out.print(about)
    out.print(files)
    if bad:
        out.print(f"[red]{len(bad)} file(s) do not match the manifest: re-export, or copy the folder again[/red]")
        return 1
    return 0


def _device_memory(m: dict) -> str:
    """What loading the export takes: the weights (the program's files, mapped), the KV cache the
    program allocates at max_seq_len positions, and their sum."""
    from gemma_edge.manifest import cache_bytes, program_files

    weights = sum(m["files"][f]["bytes"] for f in program_files(m) if f in m["files"])
    cache = cache_bytes(m)
    dtype = m.get("cache", {}).get("dtype", "float32")
    return (f"weights {weights / 2**20:,.1f} MiB + KV cache {cache / 2**20:,.1f} MiB ({dtype}, {m['max_seq_len']} positions) "
            f"= {(weights + cache) / 2**20:,.1f} MiB")
