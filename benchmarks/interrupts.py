"""Ctrl-C or SIGTERM at random moments of an export: how each run ended.

    .venv/bin/python benchmarks/interrupts.py [--runs 40] [--model random:tiny-gemma3] [--format onnx]
        [--signal INT] [--after "✓ resolve"] [--within 0 0.02] [--load 3] [--entry module] [--out DIR]

Each run exports over an earlier export (--overwrite), as tests/test_robustness.py does once, and
sends the signal a uniformly random time within --within seconds after the stderr line holding
--after. --load N keeps N busy loops running beside it (a loaded machine, as CI's two test processes
make it; the races show there). --entry module runs `python -m gemma_edge.cli`, script the
`gemma-edge` console script. Every run is classed:

- interrupted: exit 130 (143 for SIGTERM), the last stderr line ours, no traceback, the earlier
  export byte for byte as it was and no temporary folder left;
- finished: the export was done before the signal came (exit 0, or ended by the signal while Python
  shut down, after the export's last stage; the new export in place);
- anything else: a failure, printed in full.

How the README's "7 of 120 runs before, 0 of 120 since" was counted (--load 3, then --within 1.3 6.3
without load; 80 and 40 runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gemma_edge.manifest import MANIFEST

OURS = ("✓ ", "gemma-edge: ", "expected peak memory ", "--recipe auto: ")


def command(entry: str) -> list[str]:
    if entry == "script":
        return [str(Path(sys.executable).parent / "gemma-edge")]
    return [sys.executable, "-m", "gemma_edge.cli"]


def export_argv(entry: str, model: str, fmt: str, out: Path) -> list[str]:
    return [*command(entry), "export", model, "--format", fmt, "--quant", "fp32", "--max-seq-len", "64",
            "-o", str(out), "--overwrite"]


def tree(folder: Path) -> dict[str, str]:
    """Each file's SHA-256 by its path in folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_run(argv: list[str], out: Path, earlier: Path, signum: int, after: str, within: tuple[float, float]) -> tuple[str, str]:
    """(class, detail) of one export over a copy of earlier, cut by signum."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(earlier, out)
    before, copied = tree(out), (out / MANIFEST).stat().st_ino  # a new export may be the same bytes: tell them apart by file
    # As a terminal delivers Ctrl-C: the child gets SIGINT's default even if this script runs in the background.
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stderr:
        lines.append(line)
        if after in line:
            break
    delay = random.uniform(*within)
    time.sleep(delay)
    process.send_signal(signum)
    err = "".join(lines) + process.stderr.read()
    code = process.wait(timeout=600)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    expected = 143 if signum == signal.SIGTERM else 130
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    detail = f"{delay:.3f} s after {after!r}: exit {code}\n{err}"
    replaced = (out / MANIFEST).is_file() and (out / MANIFEST).stat().st_ino != copied
    if (code == expected and last == f"gemma-edge: {word}" and "Traceback" not in err
            and all(line.startswith(OURS) for line in err.strip().splitlines())
            and not replaced and tree(out) == before and leftovers(out) == []):
        return "interrupted", detail
    if code in (0, -signum) and "✓ write" in err and "Traceback" not in err and replaced and leftovers(out) == []:
        return "finished", detail
    return f"failed (exit {code})", detail


@contextlib.contextmanager
def busy_loops(n: int):
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="exports to cut (default: %(default)s)")
    parser.add_argument("--model", default="random:tiny-gemma3", help="what to export (default: %(default)s)")
    parser.add_argument("--format", choices=("onnx", "pte"), default="onnx", help="(default: %(default)s)")
    parser.add_argument("--signal", choices=("INT", "TERM"), default="INT", help="(default: %(default)s)")
    parser.add_argument("--after", default="✓ resolve", help="the stderr line the delay counts from (default: %(default)s)")
    parser.add_argument("--within", type=float, nargs=2, default=(0.0, 0.02), metavar=("MIN", "MAX"),
                        help="seconds after that line, uniformly (default: 0 0.02)")
    parser.add_argument("--load", type=int, default=0, help="busy loops beside the exports (default: %(default)s)")
    parser.add_argument("--entry", choices=("module", "script"), default="module",
                        help="python -m gemma_edge.cli, or the gemma-edge console script (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=None, help="make the delays reproducible")
    args = parser.parse_args()
    random.seed(args.seed)
    console = Console(stderr=True)
    signum = getattr(signal, f"SIG{args.signal}")

    work = args.out or Path(tempfile.mkdtemp(prefix="gemma-edge-interrupts-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        earlier = work / "earlier"
        if not earlier.is_dir():
            with console.status(f"exporting {args.model} once, to export over ..."):
                subprocess.run(export_argv("module", args.model, args.format, earlier), check=True, capture_output=True)
        argv = export_argv(args.entry, args.model, args.format, work / "out")
        counts: Counter[str] = Counter()
        with busy_loops(args.load), console.status("") as status:
            for i in range(args.runs):
                status.update(f"run {i + 1} of {args.runs}: {dict(counts)}")
                outcome, detail = one_run(argv, work / "out", earlier, signum, args.after, tuple(args.within))
                counts[outcome] += 1
                if outcome.startswith("failed"):
                    console.print(f"{outcome}: {detail}", style="red", highlight=False, markup=False)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)

    console = Console()
    console.print(f"SIG{args.signal} {args.within[0]:g}-{args.within[1]:g} s after {args.after!r}: {args.runs} {args.format} "
                  f"exports of {args.model} ({args.entry}), {args.load} busy loops beside", highlight=False)
    table = Table()
    table.add_column("ended")
    table.add_column("runs", justify="right")
    for outcome, n in sorted(counts.items()):
        table.add_row(outcome, str(n))
    console.print(table)
    return 1 if any(o.startswith("failed") for o in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
