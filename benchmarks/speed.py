"""Prefill and decode speed of exported folders (.pte or ONNX), through the runtime's backends.

One prefill of --prompt tokens in one call, then --decode single-token calls, repeated --repeats
times; prints the best and the median of each. Wall-clock on a shared machine: compare exports
measured in the same run.

    .venv/bin/python benchmarks/speed.py OUTDIR [OUTDIR ...] [--prompt 128] [--decode 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def measure(folder: Path, prompt: int, decode: int, repeats: int) -> tuple[list[float], list[float]]:
    from gemma_edge.runtime.backend import open_backend

    backend = open_backend(folder)
    if prompt + decode > backend.max_seq_len:
        raise SystemExit(f"{folder}: --prompt + --decode must fit in its max_seq_len {backend.max_seq_len}")
    ids = [(7 * i) % 1000 + 100 for i in range(prompt + decode)]  # ordinary vocabulary ids
    prefill, steps = [], []
    for _ in range(repeats):
        backend.reset()
        start = time.perf_counter()
        backend.forward_last(ids[:prompt], 0)
        prefill.append(prompt / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(decode):
            backend.forward_last([ids[prompt + i]], prompt + i)
        steps.append(decode / (time.perf_counter() - start))
    return prefill, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="export folders (gemma-edge export ... -o OUTDIR)")
    parser.add_argument("--prompt", type=int, default=128, help="prefill length in tokens")
    parser.add_argument("--decode", type=int, default=64, help="decode steps after the prefill")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import json

    from gemma_edge.commands import ui
    from rich.table import Table

    table = Table(title=f"prefill {args.prompt} tokens, then {args.decode} decode steps; tok/s, best (median) of {args.repeats}")
    for column in ("export", "format", "quant", "MiB", "prefill", "decode"):
        table.add_column(column, justify="right")
    console = ui.progress()
    for folder in args.folders:
        manifest = json.loads((folder / "gemma_edge.json").read_text())
        with console.status(f"running {folder}"):
            prefill, decode = measure(folder, args.prompt, args.decode, args.repeats)
        size = sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith("model.")) / (1 << 20)
        table.add_row(str(folder), manifest["format"], manifest["export"]["quant"], f"{size:.1f}",
                      f"{max(prefill):.0f} ({statistics.median(prefill):.0f})",
                      f"{max(decode):.1f} ({statistics.median(decode):.1f})")
    ui.results().print(table)


if __name__ == "__main__":
    main()
