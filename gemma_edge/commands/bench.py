"""gemma-edge bench: speed and memory of export folders side by side, with the machine's bandwidth ceiling."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

MIB = 2**20


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gemma_edge.bench import bench
    from gemma_edge.commands.ui import progress, results, write_json
    from gemma_edge.errors import GemmaEdgeError

    if args.threads is not None and args.threads < 1:
        raise GemmaEdgeError(f"--threads must be at least 1, got {args.threads}")
    console = progress()
    with console.status("starting") as status:
        exports, bandwidth = bench([Path(f) for f in args.outdir], args.prompt_tokens, args.new_tokens, args.threads,
                                   args.runs, progress=status.update, runtimes=args.runtime)
    table = Table(title=f"{args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, median of {args.runs} "
                        f"runs (± spread), threads {args.threads or 'default'}")
    for col in ("export", "format", "quant", "load s", "first token ms", "prefill tok/s", "decode tok/s",
                "of ceiling", "peak RSS MiB", "files MiB", "KV cache MiB"):
        table.add_column(col, justify="left" if col in ("export", "format", "quant") else "right")
    for e in exports:
        ceiling = bandwidth / max(e.weights_read_per_token, 1)
        table.add_row(e.name, e.format, e.quant, f"{e.load_s:.1f}", f"{e.median('ttft_s') * 1000:.0f}",
                      f"{e.median('prefill_tokens_per_s'):.1f} ±{e.spread('prefill_tokens_per_s'):.0%}",
                      f"{e.median('decode_tokens_per_s'):.1f} ±{e.spread('decode_tokens_per_s'):.0%}",
                      f"{e.median('decode_tokens_per_s') / ceiling:.0%}", f"{e.peak_rss_bytes / MIB:,.0f}",
                      f"{e.files_bytes / MIB:,.1f}", f"{e.kv_cache_bytes / MIB:,.1f}")
    out = results()
    out.print(table)
    out.print(f"memory read bandwidth {bandwidth / 2**30:.1f} GiB/s; ceiling = bandwidth / weights read per decoded token",
              soft_wrap=True)
    first = exports[0]
    for e in exports[1:]:
        out.print(f"{e.name} vs {first.name}: decode x{e.median('decode_tokens_per_s') / first.median('decode_tokens_per_s'):.2f}, "
                  f"prefill x{e.median('prefill_tokens_per_s') / first.median('prefill_tokens_per_s'):.2f}, "
                  f"peak RSS x{e.peak_rss_bytes / first.peak_rss_bytes:.2f}", soft_wrap=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "processor": platform.processor(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads, "runs": args.runs,
              "bandwidth_bytes_per_s": bandwidth, "exports": [e.as_dict() for e in exports]}
    if args.profile:
        from gemma_edge.profiling import profile

        with console.status("starting") as status:
            profiles = profile(list(dict.fromkeys(Path(e.folder) for e in exports)), args.threads, args.prompt_tokens,
                               args.new_tokens - 1, progress=status.update)
        out.print(profile_table(profiles))
        out.print("each runtime's own profiler, which times every operator (a .pte in ExecuTorch's Python bindings); "
                  "'unprofiled': the same step in the same process just before, profiling off; README.md, "
                  "'Where a decode step goes'", soft_wrap=True)
        report["profiles"] = [p.as_dict() for p in profiles]
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(report, Path(args.plot))
        out.print(f"plot: {args.plot}", soft_wrap=True)
    return 0


def profile_table(profiles):
    """Where a decode step goes, a row per export: ms a step per group (profiling.GROUPS) and its share."""
    from rich.table import Table

    from gemma_edge.profiling import table_rows

    p0 = profiles[0]
    table = Table(title=f"where a decode step goes: ms a step (share), {p0.steps} steps after a {p0.prompt_tokens}-token "
                        "prompt, profiling on")
    header, rows = table_rows(profiles)
    table.add_column("export", overflow="fold")
    for col in header:
        table.add_column(col, justify="right")
    for p, cells in zip(profiles, rows):
        table.add_row(p.folder, *cells)
    return table


def plot(report: dict, path: Path) -> None:
    """Decode and prefill tok/s (median, with the runs' range) and peak RSS per export, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    from gemma_edge.files import write_atomic

    exports = report["exports"]
    names = [Path(e["name"]).name for e in exports]  # a .pte run by both runtimes: two bars, two names
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 2 + 1.1 * len(exports)), 11))  # one panel above the other
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tok/s"), (axes[1], "prefill_tokens_per_s", "prefill tok/s")):
        medians = [e[f"median_{key}"] for e in exports]
        lows = [m - min(r[key] for r in e["runs"]) for m, e in zip(medians, exports)]
        highs = [max(r[key] for r in e["runs"]) - m for m, e in zip(medians, exports)]
        ax.bar(names, medians, yerr=[lows, highs], capsize=4, color="tab:blue" if "decode" in key else "tab:orange")
        ax.set_title(title)
    axes[2].bar(names, [e["peak_rss_bytes"] / MIB for e in exports], color="tab:gray", label="peak RSS")
    axes[2].bar(names, [e["files_bytes"] / MIB for e in exports], color="tab:green", alpha=0.7, label="files")
    axes[2].set_title("memory, MiB")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"gemma-edge bench, {report['prompt_tokens']}-token prompt, {report['new_tokens']} tokens,\n"
                 f"{report['date']}, bandwidth {report['bandwidth_bytes_per_s'] / 2**30:.1f} GiB/s")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
