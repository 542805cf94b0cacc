"""Full-size exports: wall time and peak resident memory of `gemma-edge export`, each run in a
process of its own (its peak measured by the kernel, os.wait4), beside the targets and the
memory the export said it expected. Full-size runs are minutes to an hour each: a benchmark,
never a CI test.

    .venv/bin/python benchmarks/full_size.py MODEL [MODEL ...] [--formats onnx pte] [--quants int4 int8]
        [--out /tmp/full-size] [--max-seq-len 1024] [--json FILE]

MODEL is random:<variant> or a folder (benchmarks/sharded_checkpoint.py writes a sharded bf16
one, as Google ships them). Then run the exports: gemma-edge bench OUT/...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
# The full-size issue's limits on the export's peak memory, in GiB (int8: 1.5x int4's).
PEAK_TARGET = {"gemma-7b": 16, "gemma-2b": 6}
TIME_TARGET_MIN = {("gemma-2b", "onnx"): 10, ("gemma-2b", "pte"): 20, ("gemma-7b", "onnx"): 30, ("gemma-7b", "pte"): 60}


def run_export(model: str, fmt: str, quant: str, out: Path, max_seq_len: int) -> dict:
    """One export in a child process: its wall time, peak RSS and exit status."""
    argv = [sys.executable, "-m", "gemma_edge.cli", "export", model, "--format", fmt, "--quant", quant,
            "--max-seq-len", str(max_seq_len), "-o", str(out), "--overwrite", "--force"]
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # the kernel's figure for this child alone
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    lines = log.read_text().splitlines()
    expected = next((line for line in lines if line.startswith("expected peak memory")), "")
    stages = [line for line in lines if line.startswith("✓")]
    ok = process.returncode == 0
    return {"model": model, "format": fmt, "quant": quant, "ok": ok, "seconds": seconds,
            "peak_bytes": usage.ru_maxrss * 1024, "expected": expected, "stages": stages,
            "files_bytes": sum(p.stat().st_size for p in out.iterdir()) if ok else 0,
            "error": "" if ok else "\n".join(lines[-5:]) or f"exit status {process.returncode}"}


def variant_of(model: str) -> str:
    if model.startswith("random:"):
        return model.split(":", 1)[1]
    config = json.loads((Path(model) / "config.json").read_text())
    return {(18, 2048): "gemma-2b", (28, 3072): "gemma-7b"}.get((config["num_hidden_layers"], config["hidden_size"]), model)


def main() -> None:
    from gemma_edge.commands import ui
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="random:<variant> or checkpoint folders")
    parser.add_argument("--formats", nargs="+", default=["onnx", "pte"])
    parser.add_argument("--quants", nargs="+", default=["int4", "int8"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/full-size"), help="where the exports go (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    console = ui.progress()
    rows = []
    for model in args.models:
        for fmt in args.formats:
            for quant in args.quants:
                name = f"{Path(model.replace('random:', 'random-')).name}-{fmt}-{quant}"
                console.print(f"exporting {model} as {fmt} {quant} -> {args.out / name} ...")
                row = run_export(model, fmt, quant, args.out / name, args.max_seq_len)
                rows.append(row)
                console.print(f"  {'done' if row['ok'] else 'FAILED'} in {row['seconds'] / 60:.1f} min, "
                              f"peak {row['peak_bytes'] / GIB:.2f} GiB; {row['expected']}" + (f"\n{row['error']}" if not row["ok"] else ""))
    table = Table(title=f"gemma-edge export at full size (max-seq-len {args.max_seq_len}), {os.cpu_count()} CPUs")
    for col in ("model", "format", "quant", "minutes", "target min", "peak GiB", "target GiB", "expected", "files MiB", "stages"):
        table.add_column(col)
    for r in rows:
        v = variant_of(r["model"])
        peak_target = PEAK_TARGET.get(v)
        if peak_target and r["quant"] == "int8":
            peak_target *= 1.5
        table.add_row(r["model"], r["format"], r["quant"], f"{r['seconds'] / 60:.1f}" if r["ok"] else "failed",
                      str(TIME_TARGET_MIN.get((v, r["format"]), "")), f"{r['peak_bytes'] / GIB:.2f}",
                      f"{peak_target:g}" if peak_target else "", r["expected"].replace("expected peak memory ", ""),
                      f"{r['files_bytes'] / 2**20:,.0f}", "; ".join(s.lstrip("✓ ") for s in r["stages"][1:]))
    ui.results().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
