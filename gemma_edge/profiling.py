"""Where a decode step's time goes (`gemma-edge bench --profile`): each runtime's own profile of
every operator over decode steps after a prompt, grouped by what the operators do.

- ONNX: ONNX Runtime's profiler (SessionOptions.enable_profiling), one event per node per run; the
  prompt's run is the first and left out.
- .pte: ExecuTorch's ETDump, in which XNNPACK's delegate logs each of its operators; the prompt's
  events are written away before the decode steps (writing the dump clears it). The program runs in
  ExecuTorch's Python bindings (the native runner records no ETDump): the same kernels.

Profiling adds a timestamp around every operator, so a profiled step is somewhat slower than a
measured one (bench's table): read the groups as shares of a step, and compare exports profiled on
one machine.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from gemma_edge.errors import GemmaEdgeError

# What a step's time is split into, in the order tables show them; they sum to the wall time.
GROUPS = {
    "quantized products": "the products with int8/int4 weights: the layers and the output projection "
                          "(their inputs' quantization included)",
    "float products": "products with float32 weights (in a quantized .pte: the norms' means, RoPE's half rotation, "
                      "int4 offsets' group sums)",
    "attention": "the products with the KV cache, softmax, the copies that join cached and new keys and values",
    "norms": "RMSNorm operators (ONNX; a .pte computes them with float products and multiplies)",
    "other operators": "everything else the runtime runs (in a .pte, outside XNNPACK too: cache writes, masks, "
                       "the embedding's lookup)",
    "between operators": "the runtime's time outside its operators: dispatch, threads' hand-offs",
    "outside the runtime": "the generation loop around each call: inputs, the logits' copy, the next token's choice",
}
QUANTIZED = re.compile(r"MatMulNBits|GatherBlockQuantized|MatMulInteger|DynamicQuantize|QD8|QDU8|QP8")
ATTENTION = re.compile(r"GroupQueryAttention|MultiHeadAttention|^Attention$|Batch Matrix Multiply|Softmax|^Copy ")
NORMS = re.compile(r"Normalization")
# ETDump's events around the operators (each call's whole, a delegate's whole, a kernel's wrapper)
EXECUTORCH_FRAMES = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL", "Program::load_method", "Method::init"}


@dataclass
class DecodeProfile:
    folder: str
    format: str
    steps: int  # decode steps profiled, after a prompt of prompt_tokens
    prompt_tokens: int
    wall_ms: float  # a decode step through the generation loop, profiling on
    plain_ms: float  # the same step, profiling off, in the same runtime and process just before: the profiler's cost
    runtime_ms: float  # of which inside the runtime's call (ONNX Runtime's run, ExecuTorch's Method::execute)
    operators: dict[str, float]  # operator type -> ms a step, largest first
    groups: dict[str, float]  # GROUPS -> ms a step; they sum to wall_ms

    def as_dict(self) -> dict:
        return asdict(self)


def group_of(operator: str) -> str:
    """The group (GROUPS) of an operator type (ONNX float products that read an initializer are named
    'MatMul (weights)': the others multiply activations, attention's)."""
    if QUANTIZED.search(operator):
        return "quantized products"
    if operator.startswith("Fully Connected") or operator.endswith("(weights)"):
        return "float products"
    if ATTENTION.search(operator) or operator in ("MatMul", "FusedMatMul", "Gemm"):
        return "attention"
    if NORMS.search(operator):
        return "norms"
    return "other operators"


def grouped(wall_ms: float, runtime_ms: float, operators: dict[str, float]) -> dict[str, float]:
    """GROUPS -> ms a step, from the operators' ms a step, the runtime's and the loop's."""
    groups = dict.fromkeys(GROUPS, 0.0)
    for op, ms in operators.items():
        groups[group_of(op)] += ms
    groups["between operators"] = runtime_ms - sum(operators.values())
    groups["outside the runtime"] = wall_ms - runtime_ms
    return groups


def profile_decode(folder: str | Path, threads: int | None = None, prompt_tokens: int = 128, steps: int = 64) -> DecodeProfile:
    """Profile `steps` greedy decode steps of the export in folder after a prompt of prompt_tokens
    (bench's prompt), in this process."""
    from gemma_edge.bench import bench_prompt
    from gemma_edge.manifest import read_manifest
    from gemma_edge.runtime.generation import GenerationResult, greedy, tokens
    from gemma_edge.runtime.sampling import Sampler

    folder = Path(folder)
    manifest = read_manifest(folder)
    fmt = manifest.get("format")
    if prompt_tokens + steps + 1 > int(manifest["max_seq_len"]):
        raise GemmaEdgeError(f"{folder}: a {prompt_tokens}-token prompt and {steps + 1} tokens exceed its max_seq_len "
                             f"{manifest['max_seq_len']}")
    prompt = bench_prompt(int(manifest["config"]["vocab_size"]), prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="gemma-edge-profile-") as tmp:
        backend = _backend(folder, fmt, threads)
        plain_ms = min(1000.0 / greedy(backend, prompt, steps + 1).stats.decode_tokens_per_s for _ in range(2))
        del backend
        backend = _backend(folder, fmt, threads, Path(tmp))
        result = GenerationResult()
        loop = tokens(backend, prompt, steps + 1, Sampler(), result=result)
        next(loop)  # the prompt's call and the first token
        if fmt == "pte":
            backend.write_etdump(Path(tmp) / "prompt.etdp")  # written away: the dump holds the decode steps only
        for _ in loop:
            pass
        wall_ms = 1000.0 / result.stats.decode_tokens_per_s
        if fmt == "onnx":
            runtime_ms, operators = onnx_profile(Path(backend.session.end_profiling()), steps)
        else:
            runtime_ms, operators = _etdump_profile(backend, Path(tmp) / "decode.etdp", steps)
    operators = dict(sorted(operators.items(), key=lambda kv: -kv[1]))
    return DecodeProfile(str(folder), fmt, steps, prompt_tokens, wall_ms, plain_ms, runtime_ms, operators,
                         grouped(wall_ms, runtime_ms, operators))


def _backend(folder: Path, fmt: str, threads: int | None, profile_dir: Path | None = None):
    """The export's Python runtime, its profiler on where profile_dir is given (ETDump keeps its events
    in memory: written by profile_decode)."""
    if fmt == "onnx":
        from gemma_edge.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(folder, threads=threads, profile_dir=profile_dir)
    if fmt == "pte":
        from gemma_edge.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(folder, threads=threads, etdump=profile_dir is not None)
    raise GemmaEdgeError(f"{folder}: unknown export format {fmt!r} in its manifest; valid: onnx, pte")


def onnx_profile(path: Path, steps: int) -> tuple[float, dict[str, float]]:
    """ONNX Runtime's profile (the JSON file it writes) of the last `steps` runs: ms a run inside it, and
    ms a run per operator type (a MatMul or Gemm that reads an initializer, a weight, as 'MatMul
    (weights)', 'Gemm (weights)'). benchmarks/peers.py reads ONNX Runtime GenAI's with it."""
    events = json.loads(Path(path).read_text())
    runs = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][-steps:]
    if len(runs) != steps:
        raise GemmaEdgeError(f"ONNX Runtime's profile holds {len(runs)} decode runs, expected {steps}")
    operators: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and any(start <= e["ts"] <= end for start, end in runs):
            args = e["args"]
            op = args["op_name"]
            # a weight ONNX Runtime packed at load is no longer among the inputs it lists
            if op in ("MatMul", "Gemm") and (len(args.get("input_type_shape", [])) < 2 or int(args.get("parameter_size", 0)) > 0):
                op += " (weights)"
            operators[op] = operators.get(op, 0.0) + e["dur"] / 1000 / steps
    runtime_ms = sum(end - start for start, end in runs) / 1000 / steps
    return runtime_ms, operators


def _etdump_profile(backend, path: Path, steps: int) -> tuple[float, dict[str, float]]:
    """ETDump's events of the decode steps: ms a step inside Method::execute, ms a step per operator
    type (XNNPACK's by their names; kernels outside the delegate as 'name (outside XNNPACK)')."""
    backend.write_etdump(path)
    with warnings.catch_warnings():  # "Output Buffer not found. Tensor Debug Data will not be available."
        warnings.simplefilter("ignore")
        from executorch.devtools import Inspector

        inspector = Inspector(etdump_path=str(path))
    runtime_ms, calls, operators = 0.0, 0, {}
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            ms = sum(event.perf_data.raw) / steps
            if event.name == "Method::execute":
                runtime_ms += ms
                calls = len(event.perf_data.raw)
            elif event.name not in EXECUTORCH_FRAMES:
                name = re.sub(r" #\d+$", "", event.name)  # XNNPACK numbers each operator of a graph
                if name.startswith("native_call_"):
                    name = f"{name.removeprefix('native_call_')} (outside XNNPACK)"
                operators[name] = operators.get(name, 0.0) + ms
    if calls != steps:
        raise GemmaEdgeError(f"ExecuTorch's ETDump holds {calls} calls of the program, expected {steps} decode steps")
    return runtime_ms, operators


def _worker(folder: str, threads: int | None, prompt_tokens: int, steps: int, conn) -> None:
    """profile_decode in a process of its own (its runtime's log lines kept out of the parent's terminal)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            conn.send(profile_decode(folder, threads, prompt_tokens, steps).as_dict())
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})


def answer_in_process(target: Callable, args: tuple) -> dict:
    """target(*args, conn) in a fresh (spawned) process: what it sent, or {"error": ...} if it died first.
    benchmarks/peers.py profiles ONNX Runtime GenAI's model this way too."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    child.close()  # the worker's end: a worker that dies ends recv() with EOFError
    try:
        return parent.recv()
    except EOFError:
        process.join(5)
        return {"error": f"its process ended without an answer (exit code {process.exitcode})"}
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def profile(folders: Sequence[Path], threads: int | None = None, prompt_tokens: int = 128, steps: int = 64,
            progress: Callable[[str], None] = lambda message: None) -> list[DecodeProfile]:
    """profile_decode of each folder, one after another, each in a fresh process."""
    profiles = []
    for folder in folders:
        progress(f"profiling {steps} decode steps of {folder}")
        answer = answer_in_process(_worker, (str(folder), threads, prompt_tokens, steps))
        if "error" in answer:
            raise GemmaEdgeError(f"{folder}: profiling failed: {answer['error']}")
        profiles.append(DecodeProfile(**answer))
    return profiles


def table_rows(profiles: Sequence[DecodeProfile]) -> tuple[list[str], list[list[str]]]:
    """The header and a row per profile (after its name) of where a decode step goes: the step, profiled and
    not, and each group's ms and share (bench's table, peers.py's Markdown)."""
    header = ["step ms", "unprofiled", *GROUPS]
    rows = [[f"{p.wall_ms:.2f}", f"{p.plain_ms:.2f}", *(f"{p.groups[g]:.2f} ({p.groups[g] / p.wall_ms:.0%})" for g in GROUPS)]
            for p in profiles]
    return header, rows
