"""Speed and memory of export folders, measured side by side (`gemma-edge bench`).

Each export runs in a process of its own (so that its peak resident memory is its own), loads
once, and then the exports take turns: run 1 of every export, then run 2 of every export, ..., so
that a slow moment of a shared machine hits all of them alike. A run is what `gemma-edge generate`
does without the text: an empty cache, a prefill of the prompt in one call, then greedy decode
steps through the one generation loop (runtime/generation.py), eos ignored.

The machine's memory read bandwidth is measured in the same run: decode of a weight-bound model
cannot be faster than bandwidth / bytes of weights read per token, so a decode speed means more as
a fraction of that ceiling.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gemma_edge.errors import GemmaEdgeError
from gemma_edge.manifest import cache_bytes, program_files, read_manifest

BYTES_PER_WEIGHT = {"none": 4.0, "fp32": 4.0, "int8": 1.0, "int4": 0.5}


@dataclass
class ExportBench:
    folder: str
    format: str
    quant: str  # the decoder's layers / the embedding table
    files_bytes: int  # every file of the export, as on disk
    kv_cache_bytes: int  # the static cache, allocated whole at load
    weights_read_per_token: int  # bytes a decode step reads (approximately: see weights_read_per_token())
    load_s: float = 0.0
    runs: list[dict] = field(default_factory=list)  # Stats.as_dict() of each run, warm-up excluded
    peak_rss_bytes: int = 0  # of the export's own process (and its native runner's), after every run
    runtime: str = "python"  # how a .pte ran (backend.RUNTIMES)

    @property
    def name(self) -> str:
        """The row's name: the folder, and the runtime where it is not the default."""
        return self.folder if self.runtime == "python" else f"{self.folder} ({self.runtime} runner)"

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def spread(self, key: str) -> float:
        """max - min over the runs, as a fraction of the median."""
        values = [r[key] for r in self.runs]
        return (max(values) - min(values)) / max(statistics.median(values), 1e-12)

    def as_dict(self) -> dict:
        keys = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
        return {**asdict(self), "name": self.name, **{f"median_{k}": self.median(k) for k in keys},
                **{f"spread_{k}": self.spread(k) for k in keys}}


def weights_read_per_token(manifest: dict) -> int:
    """Bytes of weights one decode step reads: the program's files, less an embedding table stored
    apart from the output projection (a decode step reads one row of it). ONNX stores Gemma's tied
    table once (the projection reads it whole), and so does a .pte whose head reads the quantized
    table (the manifest's quantization.head_reads_table); earlier .pte exports stored it apart. Scales
    and zero points are counted with the weights they belong to, so this is a slight overestimate."""
    program = sum(manifest["files"][f]["bytes"] for f in program_files(manifest))
    c = manifest["config"]
    tied = c.get("tie_word_embeddings", True)
    shared = tied and (manifest["format"] == "onnx" or (manifest.get("quantization") or {}).get("head_reads_table", False))
    table = 0 if shared else int(c["vocab_size"] * c["hidden_size"] * BYTES_PER_WEIGHT[manifest["export"]["embedding_quant"]])
    return max(program - table, 0)


def memory_bandwidth(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums of a float32 array much larger than the
    caches, split over `threads` threads (numpy releases the GIL inside a reduction)."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def _peak_rss() -> int:
    """The peak resident memory of this process and of its live children (a native runner): each one's
    VmHWM, its own memory map's high-water mark, summed (the sum of peaks: an upper bound of the
    peak of the sum). Linux carries getrusage's ru_maxrss across fork and exec, so a worker would
    start at its parent's size."""
    try:
        return sum(_high_water_mark(pid) for pid in ["self", *_children()])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _high_water_mark(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _children() -> list[str]:
    """The pids of this process's live children (each thread's list, /proc/PID/task/TID/children)."""
    tasks = Path("/proc/self/task")
    return [pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


def serve(conn, load: Callable[[], object], run: Callable[[object, list[int], int], dict]) -> None:
    """The protocol of a measured process: load() once and report its time, then answer each request
    (prompt ids, new tokens) with run(loaded, prompt, new_tokens) (a Stats.as_dict()) and the peak
    resident memory so far, until None. Errors are sent back, to be said as one line by the parent.
    Anything measured beside our exports (benchmarks/peers.py: llama.cpp, ONNX Runtime GenAI) serves
    the same way."""
    try:
        start = time.perf_counter()
        loaded = load()
        conn.send({"load_s": time.perf_counter() - start})
        while (request := conn.recv()) is not None:
            prompt, new_tokens = request
            conn.send({"stats": run(loaded, prompt, new_tokens), "peak_rss_bytes": _peak_rss()})
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})


def _worker(folder: str, threads: int | None, conn, runtime: str = "python") -> None:
    """One export in its own process (the runtime's log lines kept out of the parent's terminal)."""
    import contextlib
    import io

    from gemma_edge.runtime.backend import open_backend
    from gemma_edge.runtime.generation import greedy

    with contextlib.redirect_stderr(io.StringIO()):
        serve(conn, lambda: open_backend(folder, threads=threads, runtime=runtime),
              lambda backend, prompt, new_tokens: greedy(backend, prompt, new_tokens).stats.as_dict())


@dataclass
class Subject:
    """One thing to measure: its result row, its vocabulary (for the prompt) and context, and the
    function run in its own process as worker(source, threads, conn), which serve()s."""
    result: ExportBench
    vocab_size: int
    max_tokens: int
    worker: Callable  # bench's own for an export folder (_worker); benchmarks/peers.py's for the peers
    source: str  # what the worker loads


def export_subject(folder: Path, runtime: str = "python") -> Subject:
    """Our export folder, as bench measures it, run by runtime (a .pte's: backend.RUNTIMES)."""
    m = read_manifest(folder)
    result = ExportBench(str(folder), m["format"], f"{m['export']['quant']}/{m['export']['embedding_quant']}",
                         sum(f["bytes"] for f in m["files"].values()), cache_bytes(m), weights_read_per_token(m),
                         runtime=runtime)
    return Subject(result, int(m["config"]["vocab_size"]), int(m["max_seq_len"]), functools.partial(_worker, runtime=runtime),
                   str(folder))


def export_subjects(folders: Sequence[Path], runtimes: Sequence[str] = ("auto",),
                    progress: Callable[[str], None] = lambda message: None) -> list[Subject]:
    """A row for each folder run by each runtime it has: a .pte by each of runtimes (auto resolved to
    the one it picks here, backend.choose_runtime), an ONNX export by ONNX Runtime, once."""
    from gemma_edge.runtime.backend import choose_runtime

    subjects = []
    for folder in folders:
        fmt = read_manifest(folder).get("format")
        if fmt == "pte":
            mine = list(dict.fromkeys(choose_runtime(r, progress) for r in runtimes))
        else:
            mine = ["python"] if {"auto", "python"} & set(runtimes) else []
        if not mine:
            raise GemmaEdgeError(f"--runtime {' '.join(runtimes)} runs .pte exports; {folder} is {fmt}, which runs in "
                                 "ONNX Runtime: add auto or python to --runtime")
        subjects += [export_subject(folder, r) for r in mine]
    return subjects


def bench_prompt(vocab_size: int, n: int) -> list[int]:
    """n ordinary ids after <bos> (2 in every Gemma vocabulary): the same prompt for every export."""
    return [2] + [100 + (7919 * i) % (min(vocab_size, 32000) - 100) for i in range(n - 1)]


def bench(folders: list[Path], prompt_tokens: int = 128, new_tokens: int = 128, threads: int | None = None,
          runs: int = 5, progress: Callable[[str], None] = lambda message: None,
          others: Sequence[Subject] = (), runtimes: Sequence[str] = ("auto",)) -> tuple[list[ExportBench], float]:
    """Measure every export (each .pte by each of runtimes), then `others` (see the module's
    docstring); returns their results in that order and the bandwidth in bytes/s."""
    if runs < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise GemmaEdgeError("--runs and --prompt-tokens must be at least 1, --new-tokens at least 2 (decode speed)")
    subjects = export_subjects(folders, runtimes, progress) + list(others)  # (a native runner built here, once)
    for s in subjects:
        if prompt_tokens + new_tokens > s.max_tokens:
            raise GemmaEdgeError(f"{s.result.folder}: --prompt-tokens + --new-tokens ({prompt_tokens + new_tokens}) exceed its "
                                 f"max_seq_len {s.max_tokens}")
    context = multiprocessing.get_context("spawn")  # a clean process: nothing of this one's memory
    workers = []
    try:
        for s in subjects:
            progress(f"loading {s.result.name}")
            parent, child = context.Pipe()
            process = context.Process(target=s.worker, args=(s.source, threads, child), daemon=True)
            process.start()
            workers.append((parent, process))
            s.result.load_s = _answer(parent, s.result.name)["load_s"]
        for run in range(runs + 1):  # run 0 warms up
            for s, (conn, _) in zip(subjects, workers):
                progress(f"run {run}/{runs} ({'warm-up' if run == 0 else 'measured'}): {s.result.name}")
                conn.send((bench_prompt(s.vocab_size, prompt_tokens), new_tokens))
                answer = _answer(conn, s.result.name)
                s.result.peak_rss_bytes = answer["peak_rss_bytes"]
                if run:
                    s.result.runs.append({**answer["stats"], "finished_at": time.time()})
    finally:
        for conn, process in workers:
            _close(conn, process)
    progress("measuring the memory read bandwidth")
    bandwidth = memory_bandwidth(threads or len(os.sched_getaffinity(0)))
    return [s.result for s in subjects], bandwidth


def _answer(conn, folder: str) -> dict:
    answer = conn.recv()
    if "error" in answer:
        raise GemmaEdgeError(f"{folder}: {answer['error']}")
    return answer


def _close(conn, process) -> None:
    try:
        conn.send(None)
    except (BrokenPipeError, OSError):
        pass
    process.join(timeout=30)
    if process.is_alive():
        process.kill()

