"""Full-size exports: wall time and peak resident memory of `gemma-edge export`, each run in a
process of its own (its peak measured by the kernel, os.wait4), beside the targets and the memory
the export said it expected; then `gemma-edge bench` on the int4 exports of each model, both formats
side by side (load time, prefill and decode speed, decode as a fraction of the bandwidth ceiling,
runtime peak RSS against the files + KV cache + 1 GiB). Full-size runs are minutes to an hour
each: a benchmark, never a CI test.

    .venv/bin/python benchmarks/full_size.py MODEL [MODEL ...] [--formats onnx pte] [--quants int4 int8]
        [--kv-dtype float32] [--out /tmp/full-size] [--max-seq-len 1024] [--reuse]
        [--bench-quants int4] [--prompt-tokens 64] [--new-tokens 32] [--runs 2] [--threads 2]
        [--json FILE] [--markdown FILE] [--adapter DIR ...]

MODEL is random:<variant> or a folder (benchmarks/sharded_checkpoint.py writes a sharded bf16
one, as Google ships them). --reuse keeps exports already made in --out (their figures are kept in
OUT/NAME.json beside them) and benches them again.
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
# The full-size issue's limits on the export's peak memory, in GiB (int8: 1.5x int4's), and on its
# time in minutes; Gemma 2 2B and Gemma 3 1B are held to Gemma 2B's.
PEAK_TARGET = {"gemma-7b": 16, "gemma-2b": 6, "gemma-2-2b": 6, "gemma-3-1b": 6}
TIME_TARGET_MIN = {"gemma-7b": {"onnx": 30, "pte": 60}, "gemma-2b": {"onnx": 10, "pte": 20}}
TIME_TARGET_MIN.update({v: TIME_TARGET_MIN["gemma-2b"] for v in ("gemma-2-2b", "gemma-3-1b")})


def run_export(model: str, fmt: str, quant: str, out: Path, max_seq_len: int, kv_dtype: str = "float32",
               adapters: list[str] = ()) -> dict:
    """One export in a child process: its wall time, peak RSS and exit status."""
    argv = [sys.executable, "-m", "gemma_edge.cli", "export", model, "--format", fmt, "--quant", quant,
            "--max-seq-len", str(max_seq_len), "--kv-dtype", kv_dtype, "-o", str(out), "--overwrite", "--force"]
    argv += [arg for adapter in adapters for arg in ("--adapter", adapter)]
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
    return {"model": model, "variant": variant_of(model), "format": fmt, "quant": quant, "kv_dtype": kv_dtype,
            "adapters": [Path(a).name for a in adapters],
            "folder": str(out), "ok": ok, "seconds": seconds,
            "peak_bytes": usage.ru_maxrss * 1024, "expected": expected, "stages": stages,
            "files_bytes": sum(p.stat().st_size for p in out.iterdir()) if ok else 0,
            "error": "" if ok else "\n".join(lines[-5:]) or f"exit status {process.returncode}"}


def variant_of(model: str) -> str:
    """The named variant whose shapes a source has (its name, if none)."""
    from gemma_edge.checkpoints import resolve
    from gemma_edge.config import VARIANTS

    config = resolve(model).config
    shape = lambda c: (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)  # noqa: E731
    return next((name for name, v in VARIANTS.items() if shape(v) == shape(config)), model)


def bench_exports(rows: list[dict], args) -> None:
    """gemma-edge bench on the exports of each (model, quant) in --bench-quants, both formats side by
    side (two workers at a time: a 7B int8 pair would not fit beside another); results into the rows."""
    from gemma_edge.bench import bench

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["ok"] and r["quant"] in args.bench_quants:
            groups.setdefault((r["model"], r["quant"]), []).append(r)
    for (model, quant), group in groups.items():
        print(f"bench {model} {quant}: {', '.join(r['folder'] for r in group)} ...", flush=True)
        exports, bandwidth = bench([Path(r["folder"]) for r in group], args.prompt_tokens, args.new_tokens,
                                   args.threads, args.runs)
        for r, e in zip(group, exports):
            ceiling = bandwidth / max(e.weights_read_per_token, 1)
            r["bench"] = {"load_s": e.load_s, "prefill": e.median("prefill_tokens_per_s"), "decode": e.median("decode_tokens_per_s"),
                          "of_ceiling": e.median("decode_tokens_per_s") / ceiling, "rss": e.peak_rss_bytes,
                          "budget": e.files_bytes + e.kv_cache_bytes + GIB, "bandwidth": bandwidth}


COLUMNS = ("model", "format", "quant", "export min", "target min", "export peak GiB", "target GiB", "expected GiB",
           "files MiB", "load s", "prefill tok/s", "decode tok/s", "of ceiling", "runtime RSS MiB", "files + KV + 1 GiB")


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        v = r["variant"]
        peak_target = PEAK_TARGET.get(v)
        if peak_target and r["quant"] == "int8":
            peak_target *= 1.5
        b = r.get("bench")
        run = ([f"{b['load_s']:.1f}", f"{b['prefill']:.1f}", f"{b['decode']:.2f}", f"{b['of_ceiling']:.0%}",
                f"{b['rss'] / 2**20:,.0f}", f"{b['budget'] / 2**20:,.0f}"] if b else [""] * 6)
        adapters = "".join(f" + {a}" for a in r.get("adapters") or [])
        out.append([v + adapters, r["format"], r["quant"], f"{r['seconds'] / 60:.1f}" if r["ok"] else "failed",
                    str(TIME_TARGET_MIN.get(v, {}).get(r["format"], "")), f"{r['peak_bytes'] / GIB:.2f}",
                    f"{peak_target:g}" if peak_target else "", f"{expected_gib(r):.1f}",
                    f"{r['files_bytes'] / 2**20:,.0f}", *run])
    return out


def expected_gib(row: dict) -> float:
    """What the export says it expects to need (memory.expected_peak), by this code: the printed figure
    of the run, if the estimate has been recalibrated since."""
    from gemma_edge.config import variant
    from gemma_edge.exporters.memory import GIB, expected_peak
    from gemma_edge.exporters.settings import ExportSettings

    settings = ExportSettings(format=row["format"], quant=row["quant"], max_seq_len=row.get("max_seq_len", 1024),
                              kv_dtype=row.get("kv_dtype", "float32"))
    return expected_peak(variant(row["variant"]), settings) / GIB


def main() -> None:
    from gemma_edge.commands import ui
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="random:<variant> or checkpoint folders")
    parser.add_argument("--formats", nargs="+", default=["onnx", "pte"])
    parser.add_argument("--quants", nargs="+", default=["int4", "int8"])
    parser.add_argument("--kv-dtype", default="float32", help="the exports' --kv-dtype (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/full-size"), help="where the exports go (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--reuse", action="store_true", help="keep an export already in --out (its figures from its .json)")
    parser.add_argument("--bench-quants", nargs="*", default=["int4"], help="run gemma-edge bench on these (default: int4)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown (for the README)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="merge these LoRA adapters into every export (benchmarks/random_adapter.py writes one of a "
                             "variant's full shapes)")
    parser.add_argument("--table", action="store_true",
                        help="export and bench nothing: the table of the runs recorded in --out (OUT/*.json), for MODELs")
    args = parser.parse_args()

    console = ui.progress()
    rows = []
    if args.table:
        records = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
        rows = [r for model in args.models for r in records if isinstance(r, dict) and r.get("model") == model]  # not --json lists
        args.models, args.bench_quants = [], []
    for model in args.models:
        for fmt in args.formats:
            for quant in args.quants:
                name = f"{Path(model.replace('random:', 'random-')).name}-{fmt}-{quant}" + (
                    "" if args.kv_dtype == "float32" else f"-kv{args.kv_dtype}") + "".join(f"-{Path(a).name}" for a in args.adapter)
                out, record = args.out / name, args.out / f"{name}.json"
                if args.reuse and record.is_file() and (out / "gemma_edge.json").is_file():
                    rows.append(json.loads(record.read_text()))
                    continue
                console.print(f"exporting {model} as {fmt} {quant} -> {out} ...")
                row = {**run_export(model, fmt, quant, out, args.max_seq_len, args.kv_dtype, args.adapter),
                       "max_seq_len": args.max_seq_len}
                record.write_text(json.dumps(row, indent=2) + "\n")
                rows.append(row)
                console.print(f"  {'done' if row['ok'] else 'FAILED'} in {row['seconds'] / 60:.1f} min, "
                              f"peak {row['peak_bytes'] / GIB:.2f} GiB; {row['expected']}" + (f"\n{row['error']}" if not row["ok"] else ""))
    if args.bench_quants:
        bench_exports(rows, args)
        for r in rows:  # with the bench's figures
            Path(f"{r['folder']}.json").write_text(json.dumps(r, indent=2) + "\n")
    table = Table(title=f"gemma-edge at full size (max-seq-len {args.max_seq_len}, KV cache {args.kv_dtype}), "
                        f"{os.cpu_count()} CPUs")
    for col in COLUMNS:
        table.add_column(col)
    for cells in table_rows(rows):
        table.add_row(*cells)
    ui.results().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
