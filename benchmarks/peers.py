"""gemma-edge side by side with its peers on the real Gemma 3 270M and this machine: llama.cpp
(llama-cpp-python, at Q4_0, Q8_0 and Q4_K_M as shipped) and ONNX Runtime GenAI's own model builder
(int4), beside our exports. One table, one plot, and benchmarks/RESULTS.md with the date, machine
and command; `--readme` also puts the table into the README's "Where it stands".

    .venv/bin/python benchmarks/peers.py --out /tmp/peers [--threads 2] [--runs 5]
        [--prompt-tokens 128] [--new-tokens 128] [--ours OUTDIR ...] [--readme]

What it does, once per --out (kept for the next run):
- installs the peers into $GEMMA_EDGE_CACHE/peers (pip --target, apart from .venv): llama-cpp-python
  compiles llama.cpp for this CPU (about 4 minutes on 2 cores), onnxruntime-genai is a wheel;
- exports our recipes with `gemma-edge export` (ONNX and .pte, all-int4 calibrated by GPTQ and the
  phone recipe: int8 layers, int4 table, in ONNX calibrated by GPTQ, in a .pte rounded to nearest, as
  --recipe auto picks; ONNX all-int4 rounded to nearest too), unless --ours names folders;
- llama.cpp: the GGUF as shipped (Q4_K_M: it is the source, so its weights *are* the fp32
  reference's: its quality row measures llama.cpp's arithmetic only), and Q4_0 / Q8_0 made from it
  by llama.cpp's own quantizer (llama_model_quantize with requantization: the Q4_K_M weights widened
  are exactly the reference's weights, so this is quantizing the reference);
- ONNX Runtime GenAI: `onnxruntime_genai.models.builder -p int4 -e cpu` on the Hugging Face folder
  our loader wrote from the GGUF (benchmarks/genai_builder.py adapts Gemma 3's RoPE settings to
  transformers 5 for it);
- quality: perplexity ratio, top-1 agreement and mean KL against the fp32 reference on the two real
  texts of benchmarks/quality.py (the manual's first 512 tokens, all of modeling_gemma.py in windows of
  512, each one prefill, as verify computes them);
- speed: `gemma-edge bench`'s protocol for every row, each in its own process, taking turns run by
  run (the peers through their own generation loops, greedy: llama.cpp's `generate` with temp 0,
  GenAI's Generator); the same token ids, the same 1024-position cache. A peer's prefill rate is
  prompt tokens / time to the first token (ours: prompt tokens / prefill time; one greedy draw apart).

Asserts nothing; prints, and writes --out/peers.json, --out/peers.png and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_PACKAGES = ("llama-cpp-python==0.3.36", "diskcache==5.6.3", "onnxruntime-genai==0.18.0")  # + .venv's numpy, jinja2, onnxruntime
CONTEXT = 1024  # every row's cache: our exports' default --max-seq-len
OURS = {  # folder name: gemma-edge export arguments (the best recipe of each, benchmarks/QUALITY.md; int4 also as plain)
    "ours-onnx-int4": ["--format", "onnx", "--quant", "int4", "--recipe", "rtn"],
    "ours-onnx-int4-gptq": ["--format", "onnx", "--quant", "int4", "--recipe", "gptq"],
    "ours-onnx-phone": ["--format", "onnx", "--quant", "int8", "--embedding-quant", "int4", "--recipe", "gptq"],  # its hot rows 8-bit
    # the .pte rows with their prefill method (prompts at position 0: attention over the prompt's own keys)
    "ours-pte-int4-gptq": ["--format", "pte", "--quant", "int4", "--recipe", "gptq", "--prefill-method"],
    "ours-pte-phone": ["--format", "pte", "--quant", "int8", "--embedding-quant", "int4", "--recipe", "rtn",
                       "--prefill-method"],  # make demo's
}
LLAMA_TYPES = {"Q4_0": 2, "Q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_0, _Q8_0
MIB = 2**20


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def install_peers(site: Path) -> None:
    """llama-cpp-python and onnxruntime-genai into `site` (once), without touching .venv's packages:
    --no-deps, since both need only numpy and onnxruntime, which .venv has."""
    if all((site / name).is_dir() for name in ("llama_cpp", "diskcache", "onnxruntime_genai")):
        return
    say(f"installing {', '.join(PEER_PACKAGES)} into {site} (llama.cpp compiles: minutes, once)")
    log = site.with_suffix(".log")
    site.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count()), "CMAKE_ARGS": llama_cmake_args()}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), *PEER_PACKAGES],
                              stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"installing the peers failed (cmake and a C++ compiler are needed for llama.cpp): see {log}")


def llama_cmake_args() -> str:
    """llama.cpp for this CPU's vector extensions, without AMX: a native build (-march=native) uses
    AMX tiles where the CPU has them, and where the OS or hypervisor does not enable them (these
    machines) its first matrix product dies at `ldtilecfg` (SIGSEGV). Phones have no AMX; neither
    ONNX Runtime nor XNNPACK uses it here."""
    flags = set(" ".join(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    wanted = {"avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
              "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
    return " ".join(["-DGGML_NATIVE=OFF", *(f"-D{option}=ON" for flag, option in wanted.items() if flag in flags)])


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> None:
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed: see {log}")


def export_ours(out: Path) -> list[Path]:
    folders = []
    for name, args in OURS.items():
        folder = out / name
        if not (folder / "gemma_edge.json").exists():
            say(f"exporting {name} (gemma-edge export gemma-3-270m {' '.join(args)})")
            run_logged([str(Path(sys.executable).with_name("gemma-edge")), "export", "gemma-3-270m", *args, "-o", str(folder)],
                       out / f"{name}.log")
        folders.append(folder)
    return folders


def llama_models(gguf: Path, out: Path) -> dict[str, Path]:
    """{type: GGUF}: as shipped, and requantized by llama.cpp's own quantizer."""
    import llama_cpp

    from gemma_edge.runtime.backend import native_log_captured

    models = {"Q4_K_M": gguf}
    for name, ftype in LLAMA_TYPES.items():
        path = out / f"llama-{name}.gguf"
        if not path.exists():
            say(f"llama.cpp: quantizing to {name}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, os.cpu_count()
            partial = path.with_suffix(".partial")
            with native_log_captured() as log:  # a line per tensor
                failed = llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params)
            if failed:
                raise SystemExit(f"llama.cpp could not quantize {gguf} to {name}: " + "\n".join(log[-5:]))
            partial.rename(path)
        models[name] = path
    return models


def genai_model(hf_dir: Path, out: Path, site: Path) -> Path:
    """ONNX Runtime GenAI's builder (int4, CPU) on a copy of our Hugging Face folder that names its
    architecture (transformers needs no `architectures` to load it, the builder does)."""
    folder = out / "genai-int4"
    if (folder / "genai_config.json").exists():
        return folder
    source = out / "hf-gemma-3-270m"
    source.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.name != "config.json" and not (source / f.name).exists():
            (source / f.name).symlink_to(f.resolve())
    config = json.loads((hf_dir / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma3ForCausalLM"]}, indent=1))
    say("ONNX Runtime GenAI: building int4 with its model builder")
    run_logged([sys.executable, str(HERE / "genai_builder.py"), "-i", str(source), "-o", str(folder), "-p", "int4",
                "-e", "cpu", "-c", str(out / "genai-cache")], out / "genai-int4.log",
               env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    return folder


# --- the peers, measured by gemma-edge bench's protocol (gemma_edge.bench.serve) ---

def _stream_stats(prompt_tokens: int, start: float, stream, new_tokens: int) -> dict:
    """Stats.as_dict() of a token stream started at `start`: first token, then the decode rate."""
    times = []
    for _ in stream:
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    ttft = times[0] - start
    return {"prompt_tokens": prompt_tokens, "cached_tokens": 0, "generated_tokens": len(times), "ttft_s": ttft,
            "prefill_tokens_per_s": prompt_tokens / ttft, "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0])}


def llama_worker(path: str, threads: int | None, conn) -> None:
    from llama_cpp import Llama

    from gemma_edge.bench import serve
    from gemma_edge.runtime.backend import native_log_captured

    def run(llm, prompt, new_tokens):
        llm.reset()  # else generate() reuses the cached prompt
        start = time.perf_counter()
        stream = llm.generate(prompt, temp=0.0, reset=True)  # temp 0: llama.cpp's greedy sampler
        try:
            return _stream_stats(len(prompt), start, stream, new_tokens)
        finally:
            stream.close()

    def load():
        with native_log_captured():  # llama.cpp says how it lays out the cache even when not verbose
            return Llama(model_path=path, n_ctx=CONTEXT, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    serve(conn, load, run)


def genai_config(folder: str, threads: int | None):
    import onnxruntime_genai as og

    config = og.Config(folder)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return config


def genai_worker(folder: str, threads: int | None, conn) -> None:
    import onnxruntime_genai as og

    from gemma_edge.bench import serve

    def run(model, prompt, new_tokens):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=CONTEXT, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)

        def stream():
            while True:
                generator.generate_next_token()
                yield generator.get_next_tokens()[0]

        return _stream_stats(len(prompt), start, stream(), new_tokens)

    serve(conn, lambda: og.Model(genai_config(folder, threads)), run)


def genai_profile_worker(folder: str, threads: int | None, prompt: list[int], steps: int, conn) -> None:
    """ONNX Runtime's profile of `steps` decode steps of the GenAI model after the prompt, read as
    gemma_edge.profiling reads ours (its profiler on for the session, its file written when the model
    is released); the step's wall time through GenAI's Generator."""
    import contextlib
    import io
    import tempfile

    import onnxruntime_genai as og

    from gemma_edge.profiling import DecodeProfile, grouped, onnx_profile

    try:
        with contextlib.redirect_stderr(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
            def step_ms(config) -> float:
                """ms a decode step after the prompt and its first token; the session ends with it."""
                model = og.Model(config)
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=CONTEXT, do_sample=False)
                generator = og.Generator(model, params)
                generator.append_tokens(prompt)
                generator.generate_next_token()  # the prompt's first token
                start = time.perf_counter()
                for _ in range(steps):
                    generator.generate_next_token()
                return (time.perf_counter() - start) / steps * 1000

            plain_ms = min(step_ms(genai_config(folder, threads)) for _ in range(2))
            config = genai_config(folder, threads)
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"enable_profiling": f"{tmp}/genai"}}}}))
            wall_ms = step_ms(config)  # ONNX Runtime writes its profile when the session ends
            runtime_ms, operators = onnx_profile(max(Path(tmp).glob("genai*.json")), steps)
        operators = dict(sorted(operators.items(), key=lambda kv: -kv[1]))
        conn.send(DecodeProfile(folder, "ORT GenAI", steps, len(prompt), wall_ms, plain_ms, runtime_ms, operators,
                                grouped(wall_ms, runtime_ms, operators)).as_dict())
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})


def profiles(ours: list[Path], genai: Path, args, vocab_size: int) -> list:
    """Where a decode step goes in each of our exports and in GenAI's model (llama.cpp has no per-operator
    profile in its Python package), as `gemma-edge bench --profile` shows ours."""
    from gemma_edge.bench import bench_prompt
    from gemma_edge.profiling import DecodeProfile, answer_in_process, profile

    steps = args.new_tokens - 1
    found = profile(ours, args.threads, args.prompt_tokens, steps, progress=say)
    say(f"profiling {steps} decode steps of {genai}")
    answer = answer_in_process(genai_profile_worker, (str(genai), args.threads, bench_prompt(vocab_size, args.prompt_tokens), steps))
    if "error" in answer:
        raise SystemExit(f"profiling {genai} failed: {answer['error']}")
    return found + [DecodeProfile(**answer)]


def peer_subjects(llama: dict[str, Path], genai: Path, config: dict):
    from gemma_edge.bench import ExportBench, Subject

    layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    kv = lambda dtype_bytes: 2 * layers * kv_heads * head_dim * CONTEXT * dtype_bytes  # noqa: E731
    subjects = []
    for name, path in llama.items():
        size = path.stat().st_size  # the tied table is stored once: the head reads it
        subjects.append(Subject(ExportBench(str(path), "llama.cpp", name, size, kv(2), size), config["vocab_size"], CONTEXT,
                                llama_worker, str(path)))
    size = sum(f.stat().st_size for f in genai.iterdir() if f.name.startswith("model.onnx"))
    subjects.append(Subject(ExportBench(str(genai), "ORT GenAI", "int4", size, kv(4), size - rope_tables_bytes(genai)),
                            config["vocab_size"], CONTEXT, genai_worker, str(genai)))
    return subjects


def rope_tables_bytes(genai: Path) -> int:
    """Bytes of the GenAI model's RoPE cos/sin tables (32768 positions each, of which a decode step
    reads one row): not weights a step reads. Its tied table is stored once (GatherBlockQuantized
    reads lm_head's 4-bit rows), so the rest is."""
    import onnx

    model = onnx.load(str(genai / "model.onnx"), load_external_data=False)
    size = lambda t: int(next((e.value for e in t.external_data if e.key == "length"), len(t.raw_data)))  # noqa: E731
    return sum(size(t) for t in model.graph.initializer if "cos_cache" in t.name or "sin_cache" in t.name)


# --- quality: the logits of each row on the texts, against fp32 ---

def llama_logits(path: Path, ids: list[int], threads: int | None):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=CONTEXT, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    llm.close()
    return logits


def genai_logits(folder: Path, ids: list[int], threads: int | None):
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(genai_config(str(folder), threads))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=CONTEXT, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.array(generator.get_output("logits"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the models (kept for later runs), peers.json, peers.png")
    parser.add_argument("--ours", type=Path, nargs="+", help="our export folders (default: export the four recipes into --out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the Markdown report to write")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md's 'Where it stands'")
    parser.add_argument("--profile", action="store_true",
                        help="then show where a decode step goes in our exports and GenAI's (each runtime's profiler), "
                             "as `gemma-edge bench --profile` does; into peers.json too")
    args = parser.parse_args()
    command = "benchmarks/peers.py " + " ".join(sys.argv[1:])
    logging.disable(logging.WARNING)  # the libraries' warnings (torchao's, torch's) are not results
    warnings.simplefilter("ignore")

    from gemma_edge.checkpoints import cache_dir, resolve

    site = cache_dir() / "peers" / "site"
    install_peers(site)
    sys.path.insert(0, str(site))  # spawned workers inherit it
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve("gemma-3-270m")
    gguf = Path(json.loads((ckpt.hf_dir / "gemma_edge_source.json").read_text())["gguf"])
    ours = args.ours or export_ours(args.out)
    llama = llama_models(gguf, args.out)
    genai = genai_model(ckpt.hf_dir, args.out, site)

    rows = quality_rows(ckpt, ours, llama, genai, args.threads)
    say(f"speed: {len(rows)} rows taking turns, {args.runs} runs each after a warm-up")
    from gemma_edge.bench import bench

    config = json.loads((ckpt.hf_dir / "config.json").read_text())
    measured, bandwidth = bench(ours, args.prompt_tokens, args.new_tokens, args.threads, args.runs, progress=say,
                                others=peer_subjects(llama, genai, config))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "command": command,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads, "runs": args.runs,
              "bandwidth_bytes_per_s": bandwidth, "exports": [{**e.as_dict(), **q} for e, q in zip(measured, rows)]}
    found = profiles(ours, genai, args, config["vocab_size"]) if args.profile else []
    if found:
        report["profiles"] = [p.as_dict() for p in found]
    write_outputs(report, args)
    if found:
        from gemma_edge.commands.bench import profile_table
        from gemma_edge.commands.ui import results

        results().print(profile_table(found))


def quality_rows(ckpt, ours: list[Path], llama: dict[str, Path], genai: Path, threads: int | None) -> list[dict]:
    """Per row (ours, then llama.cpp's, then GenAI's: bench's order), {text: (ratio, top-1, KL)} and a name."""
    from quality import measure, reference  # benchmarks/quality.py: the texts and measure of QUALITY.md

    from gemma_edge.runtime.backend import native_log_captured, open_backend

    say(f"quality: {len(ours) + len(llama) + 1} rows against the fp32 reference, a window of text at a time")
    ids, fp32 = reference(ckpt, CONTEXT)
    with native_log_captured():  # ExecuTorch's and llama.cpp's log lines
        backends = {folder.name: open_backend(folder, threads=threads) for folder in ours}
        subjects = {name: lambda t, b=b: b.forward(t, 0) for name, b in backends.items()}
        subjects.update({f"llama.cpp {name}": lambda t, path=path: llama_logits(path, t, threads) for name, path in llama.items()})
        subjects["ORT GenAI int4"] = lambda t: genai_logits(genai, t, threads)
        measured = measure(subjects, ids, fp32)
    sizes = [*(path.stat().st_size for path in llama.values()),
             sum(f.stat().st_size for f in genai.iterdir() if f.name.startswith("model.onnx"))]
    return ([ours_row(folder, measured[folder.name]) for folder in ours]
            + [{"name": name, "model_bytes": size, "quality": measured[name]} for name, size in zip(list(subjects)[len(ours):], sizes)])


def ours_row(folder: Path, measured: dict) -> dict:
    """An export folder's row: its name, the bytes of its program files, its quality."""
    from gemma_edge.manifest import program_files, read_manifest

    manifest = read_manifest(folder)
    return {"name": folder.name, "model_bytes": sum(manifest["files"][f]["bytes"] for f in program_files(manifest)),
            "quality": measured}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{platform.machine()}, {cpu}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()}"


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The results' columns and one row of cells per export: the terminal's table and the Markdown's."""
    texts = list(report["exports"][0]["quality"])
    exported = any(e.get("export_s") for e in report["exports"])  # benchmarks/speed.py's rows
    header = ["row", "model MiB", *(f"{t}: ppl ratio / top-1" for t in texts), "prefill tok/s", "decode tok/s",
              "of ceiling", "first token ms", "peak RSS MiB", *(["export s"] if exported else [])]
    rows = []
    for e in report["exports"]:
        decode, ceiling = e["median_decode_tokens_per_s"], report["bandwidth_bytes_per_s"] / max(e["weights_read_per_token"], 1)
        rows.append([e["name"], f"{e['model_bytes'] / MIB:,.0f}",
                     *(f"x{e['quality'][t][0]:.3f} / {e['quality'][t][1]:.1%}" for t in texts),
                     f"{e['median_prefill_tokens_per_s']:,.0f} ±{e['spread_prefill_tokens_per_s']:.0%}",
                     f"{decode:.1f} ±{e['spread_decode_tokens_per_s']:.0%}", f"{decode / ceiling:.0%}",
                     f"{e['median_ttft_s'] * 1000:.0f}", f"{e['peak_rss_bytes'] / MIB:,.0f}",
                     *([f"{e['export_s']:.0f}" if e.get("export_s") else "-"] if exported else [])])
    return header, rows


def markdown(report: dict) -> str:
    header, rows = table(report)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])


def profile_markdown(profiles: list[dict]) -> str:
    """--profile's table: where a decode step goes in each row (gemma_edge.profiling.GROUPS)."""
    from gemma_edge.profiling import DecodeProfile, table_rows

    found = [DecodeProfile(**p) for p in profiles]
    header, rows = table_rows(found)
    lines = ["| " + " | ".join(cells) + " |"
             for cells in [["row", *header], ["---"] * (len(header) + 1), *([Path(p.folder).name, *r] for p, r in zip(found, rows))]]
    return (f"Where a decode step goes (`--profile`): ms a step and share, {found[0].steps} steps after a "
            f"{found[0].prompt_tokens}-token prompt, each runtime's own profiler (ONNX Runtime's; ExecuTorch's ETDump, "
            "the .pte in its Python bindings), rows one after another; \"unprofiled\": the same step in the same process "
            "just before, profiling off (README.md, \"Where a decode step goes\").\n\n" + "\n".join(lines) + "\n")


def show(report: dict, title: str) -> None:
    """The results' table in the terminal."""
    from rich.table import Table

    from gemma_edge.commands.ui import results

    header, rows = table(report)
    shown = Table(title=f"{title}, {report['prompt_tokens']}-token prompt, {report['new_tokens']} greedy tokens, "
                        f"median of {report['runs']} runs (± spread), {report['threads']} threads")
    for col in header:
        shown.add_column(col, justify="left" if col == "row" else "right")
    for cells in rows:
        shown.add_row(*cells)
    results().print(shown)


def write_readme_table(name: str, report: dict, body: str) -> None:
    """Put a Markdown table, stamped with its command, date and machine, between README.md's
    <!-- NAME table --> and <!-- /NAME table --> lines."""
    from gemma_edge.files import write_atomic

    readme = HERE.parent / "README.md"
    start, end = f"<!-- {name} table -->", f"<!-- /{name} table -->"
    current = readme.read_text()
    if start not in current or end not in current:
        raise SystemExit(f"README.md has no {start} ... {end} section to replace")
    head, rest = current.split(start, 1)
    stamp = f"\n`{report['command']}`, {report['date']} ({report['machine']}):\n\n"
    write_atomic(readme, (head + start + stamp + body + "\n" + end + rest.split(end, 1)[1]).encode())
    say("updated README.md's table")


def write_outputs(report: dict, args) -> None:
    from gemma_edge.commands.bench import plot
    from gemma_edge.files import write_atomic

    show(report, "real Gemma 3 270M")
    write_atomic(args.out / "peers.json", json.dumps(report, indent=1).encode())
    plot(report, args.out / "peers.png")  # each row under its name
    body = markdown(report)
    text = (f"# gemma-edge and its peers, side by side\n\nWritten by `{report['command']}` on {report['date']}\n"
            f"({report['machine']}; memory read bandwidth {report['bandwidth_bytes_per_s'] / 2**30:.1f} GiB/s).\n\n"
            f"Real Gemma 3 270M. Quality: against the fp32 reference on the manual's first 512 tokens and all of "
            f"modeling_gemma.py in windows of 512 (perplexity ratio, "
            f"top-1 agreement). Speed: a {report['prompt_tokens']}-token prompt, {report['new_tokens']} greedy tokens, "
            f"median of {report['runs']} runs taken in turns, {report['threads']} threads; \"of ceiling\": decode as a "
            f"fraction of bandwidth / bytes of weights read per token. llama.cpp Q4_K_M is the source GGUF itself (its "
            f"weights are the reference's). How each row is made: benchmarks/peers.py's docstring.\n\n{body}\n")
    if report.get("profiles"):
        text += "\n" + profile_markdown(report["profiles"])
    write_atomic(args.results, text.encode())
    say(f"wrote {args.results}, {args.out / 'peers.json'}, {args.out / 'peers.png'}")
    if args.readme:
        write_readme_table("peers.py", report, body)


if __name__ == "__main__":
    main()
