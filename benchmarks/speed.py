"""Our exports of the real Gemma 3 270M in both formats, made and measured in one run: each row
exported by `gemma-edge export` (its wall-clock time taken, Python's start included), its quality
against the fp32 reference on benchmarks/quality.py's two texts, its program files, and its speed
and memory by `gemma-edge bench`'s protocol (each row in its own process, rows taking turns run by
run, the machine's read bandwidth as decode's ceiling). Prints a table; writes --out/speed.json and
--out/speed.png; `--readme` puts the table into README.md's "Our exports in more detail".

    .venv/bin/python benchmarks/speed.py --out /tmp/speed [--rows onnx-int4 pte-phone ...]
        [--threads 2] [--runs 5] [--prompt-tokens 128] [--new-tokens 128] [--readme]

The rows are the commands a user types (every option at its default but those named: `--recipe
auto` calibrates all-int4 and the ONNX phone recipe by GPTQ), in both formats: all-int4, the phone recipe (int8 layers, int4
table; the `.pte` with its prefill method, as `make demo` makes it) and int8. Every run exports
afresh into --out (each row's folder is replaced); `--ours DIR...` measures folders made before
instead (their export time unknown: "-"). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from peers import machine, markdown, ours_row, run_logged, say, show, write_readme_table  # benchmarks/peers.py

ROWS = {  # row name: gemma-edge export gemma-3-270m arguments
    "onnx-int4": ["--format", "onnx", "--quant", "int4"],
    "onnx-phone": ["--format", "onnx", "--quant", "int8", "--embedding-quant", "int4"],  # make demo's
    "onnx-int8": ["--format", "onnx", "--quant", "int8"],
    "pte-int4": ["--format", "pte", "--quant", "int4"],
    "pte-phone": ["--format", "pte", "--quant", "int8", "--embedding-quant", "int4", "--prefill-method"],  # make demo's
    "pte-int8": ["--format", "pte", "--quant", "int8"],
}
COMMAND = "gemma-edge export gemma-3-270m"


def export(name: str, out: Path) -> float:
    """Export a row into out/name with the command line, replacing what is there; its seconds."""
    folder, log = out / name, out / f"{name}.log"
    say(f"exporting {name} ({COMMAND} {' '.join(ROWS[name])})")
    start = time.perf_counter()
    run_logged([str(Path(sys.executable).with_name("gemma-edge")), "export", "gemma-3-270m", *ROWS[name],
                "-o", str(folder), "--overwrite"], log)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the exports, speed.json and speed.png")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which exports (default: all)")
    parser.add_argument("--ours", type=Path, nargs="+", help="measure these export folders instead of exporting --rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--readme", action="store_true", help="put the table into README.md's 'Our exports in more detail'")
    args = parser.parse_args()
    command = "benchmarks/speed.py " + " ".join(sys.argv[1:])
    logging.disable(logging.WARNING)  # the libraries' warnings (torchao's, torch's) are not results
    warnings.simplefilter("ignore")

    from quality import exports_quality, reference  # benchmarks/quality.py

    from gemma_edge.bench import bench
    from gemma_edge.checkpoints import resolve
    from gemma_edge.commands.bench import plot
    from gemma_edge.files import write_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve("gemma-3-270m")
    seconds = {}
    if args.ours:
        folders = args.ours
    else:
        folders = [args.out / name for name in args.rows]
        for name in args.rows:  # one after another, nothing else of ours running
            seconds[name] = export(name, args.out)
    say(f"quality: {len(folders)} rows against the fp32 reference, a window of text at a time")
    ids, fp32 = reference(ckpt)
    quality = exports_quality(folders, ids, fp32, args.threads)
    rows = [ours_row(folder, quality[folder.name]) for folder in folders]
    say(f"speed: {len(folders)} rows taking turns, {args.runs} runs each after a warm-up")
    measured, bandwidth = bench(folders, args.prompt_tokens, args.new_tokens, args.threads, args.runs, progress=say)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "command": command,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads, "runs": args.runs,
              "bandwidth_bytes_per_s": bandwidth,
              "exports": [{**e.as_dict(), **q, "export_s": seconds.get(q["name"]),
                           "export_args": ROWS.get(q["name"]) if not args.ours else None}
                          for e, q in zip(measured, rows)]}
    show(report, "our exports of the real Gemma 3 270M")
    write_atomic(args.out / "speed.json", json.dumps(report, indent=1).encode())
    plot(report, args.out / "speed.png")
    say(f"wrote {args.out / 'speed.json'}, {args.out / 'speed.png'}")
    if args.readme:
        commands = "".join(f"\n- `{e['name']}`: `{COMMAND} {' '.join(e['export_args'])}`"
                           for e in report["exports"] if e["export_args"])
        write_readme_table("speed.py", report, markdown(report) + ("\n" + commands if commands else ""))


if __name__ == "__main__":
    main()
