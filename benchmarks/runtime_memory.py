"""Where an export's runtime memory goes: resident memory after loading and after each generation,
split into anonymous memory (the runtime's own copies, the KV cache, activations) and file pages;
for an ONNX export, which initializers of its external data file are resident after the runs
(found page by page in /proc/self/pagemap); a .pte in ExecuTorch's Python bindings, in this process (the
native runner's memory is its own process's: `gemma-edge bench` counts it). Linux only; prints figures,
asserts nothing.

    .venv/bin/python benchmarks/runtime_memory.py OUTDIR [--prompt-tokens 64] [--new-tokens 32] [--runs 2] [--threads 2]

The README's Gemma 7B ONNX figures (full-size section) come from this script.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import struct
import time
from pathlib import Path

MIB = 2**20
PAGE = 4096


def memory() -> dict[str, int]:
    """This process's VmRSS and VmHWM, and its resident anonymous and file-backed bytes."""
    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "VmHWM"))}
    rollup = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/smaps_rollup")
              if line.startswith(("Rss", "Anonymous"))}
    return {"rss": status["VmRSS"], "peak": status["VmHWM"], "anon": rollup["Anonymous"], "file": rollup["Rss"] - rollup["Anonymous"]}


def report(stage: str) -> None:
    m = memory()
    print(f"{stage:24s} RSS {m['rss'] / MIB:7,.0f}  peak {m['peak'] / MIB:7,.0f}  anonymous {m['anon'] / MIB:7,.0f}"
          f"  file pages {m['file'] / MIB:6,.0f} MiB", flush=True)


def resident_initializers(folder: Path, program: str, data: str) -> collections.Counter:
    """Bytes of each initializer of the external data file whose pages this process holds."""
    import onnx

    proto = onnx.load(str(folder / program), load_external_data=False)
    spans = sorted((int(e.get("offset", 0)), int(e["length"]), t.name) for t in proto.graph.initializer
                   for e in [{x.key: x.value for x in t.external_data}] if e)
    starts = [s for s, _, _ in spans]
    path = str((folder / data).resolve())
    found = collections.Counter()
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            if not line.rstrip().endswith(" " + path):
                continue
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            pages = (high - low) // PAGE
            pagemap.seek(low // PAGE * 8)
            for i, entry in enumerate(struct.unpack(f"{pages}Q", pagemap.read(pages * 8))):
                if entry >> 63:  # present in memory
                    offset = int(fields[2], 16) + i * PAGE
                    j = bisect.bisect_right(starts, offset) - 1
                    inside = j >= 0 and offset < spans[j][0] + spans[j][1]
                    found[spans[j][2] if inside else "(between initializers)"] += PAGE
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    report("start")
    from gemma_edge.bench import bench_prompt
    from gemma_edge.manifest import cache_bytes
    from gemma_edge.runtime.backend import open_backend
    from gemma_edge.runtime.generation import greedy

    report("imports")
    backend = open_backend(args.folder, threads=args.threads, runtime="python")  # in this process, where it is measured
    report("loaded")
    manifest = backend.manifest
    prompt = bench_prompt(manifest["config"]["vocab_size"], args.prompt_tokens)
    for run in range(args.runs):
        start = time.perf_counter()
        greedy(backend, prompt, args.new_tokens)
        report(f"run {run + 1} ({time.perf_counter() - start:.0f} s)")
    files, cache = sum(f["bytes"] for f in manifest["files"].values()), cache_bytes(manifest)
    print(f"files {files / MIB:,.0f} MiB + KV cache {cache / MIB:,.0f} MiB + 1 GiB = {(files + cache + 2**30) / MIB:,.0f} MiB; "
          f"peak {memory()['peak'] / MIB:,.0f} MiB")
    io = manifest["io"]
    data = [name for name in io.get("files") or [] if name != io["program"]]
    if manifest["format"] == "onnx" and data:
        found = resident_initializers(args.folder, io["program"], data[0])
        print(f"resident pages of {data[0]}: {sum(found.values()) / MIB:,.1f} MiB, the largest:")
        for name, size in found.most_common(12):
            print(f"  {size / MIB:8.1f} MiB  {name}")


if __name__ == "__main__":
    main()
