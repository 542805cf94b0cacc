"""gemma-edge bench on two tiny exports (one per format): every figure it reports, checked against
what it stands for (the cache against the backends' real buffers, turns taken run by run)."""

from __future__ import annotations

import json

import numpy as np

from gemma_edge.cli import main
from gemma_edge.manifest import read_manifest


def test_bench_measures_exports_side_by_side(tiny_exports, tiny_with_tokenizers, tmp_path, capsys):
    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime.onnx_backend import OnnxBackend

    onnx, pte = tiny_exports("tiny-gemma3", "onnx", "fp32"), tiny_exports("tiny-gemma3", "pte", "fp32")
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", str(onnx), str(pte), "--prompt-tokens", "8", "--new-tokens", "8", "--runs", "2",
                 "--threads", "1", "--json", str(report), "--plot", str(plot), "--profile"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(report.read_text())
    check_profiles(data["profiles"], [onnx, pte])
    assert "where a decode step goes" in out
    # --runtime auto: the .pte in the native runner where it can be built (named so), else the bindings
    name = f"{pte} (native runner)" if data["exports"][1]["runtime"] == "native" else str(pte)
    assert f"{name} vs {onnx}: decode x" in out and "memory read bandwidth" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["bandwidth_bytes_per_s"] > 1e8  # any machine reads more than 100 MB/s
    first, second = data["exports"]
    for e in (first, second):
        assert len(e["runs"]) == 2 and e["load_s"] > 0 and e["peak_rss_bytes"] > e["files_bytes"]
        assert all(r["generated_tokens"] == 8 and r["prompt_tokens"] == 8 and r["decode_tokens_per_s"] > 0 for r in e["runs"])
        assert e["median_decode_tokens_per_s"] == float(np.median([r["decode_tokens_per_s"] for r in e["runs"]]))
    # turns: run 1 of both, then run 2 of both
    times = [first["runs"][0]["finished_at"], second["runs"][0]["finished_at"],
             first["runs"][1]["finished_at"], second["runs"][1]["finished_at"]]
    assert times == sorted(times)
    # the cache: ONNX Runtime's bound buffers; the .pte's mutable buffers are the eager model's caches
    assert first["kv_cache_bytes"] == sum(b.numpy().nbytes for _, b in OnnxBackend(onnx)._caches.values())
    model = load_model(tiny_with_tokenizers["tiny-gemma3"], read_manifest(pte)["max_seq_len"])
    eager = sum(layer.attn.cache.k.nbytes + layer.attn.cache.v.nbytes for layer in model.layers)
    assert second["kv_cache_bytes"] == eager < first["kv_cache_bytes"]  # the .pte's sliding layers keep a ring
    # a decode step of the ONNX export reads its whole program (the tied table is stored once, as the head)
    assert first["weights_read_per_token"] == read_manifest(onnx)["files"]["model.onnx"]["bytes"]


def check_profiles(profiles: list[dict], folders) -> None:
    """--profile's rows for float32 exports: 7 decode steps each (the prompt's call left out: profiling
    raises when the runtime recorded another count), no quantized product, the layers' products and
    attention's each found among the operators, whose times fit inside the runtime's, itself inside the
    step's."""
    from gemma_edge.profiling import GROUPS

    assert [p["folder"] for p in profiles] == [str(f) for f in folders]
    for p in profiles:
        groups, ops = p["groups"], p["operators"]
        assert p["steps"] == 7 and p["prompt_tokens"] == 8 and list(groups) == list(GROUPS)
        assert 0 < p["runtime_ms"] < p["wall_ms"] and groups["between operators"] >= 0 and p["plain_ms"] > 0
        assert groups["quantized products"] == 0 and groups["float products"] > 0 and groups["attention"] > 0
        # which operators: ONNX Runtime's node types, XNNPACK's operator names
        weights, attention = (("Gemm (weights)", "GroupQueryAttention") if p["format"] == "onnx"
                              else ("Fully Connected (NC, F32) GEMM", "Batch Matrix Multiply (NC, F32) GEMM"))
        assert ops[weights] > 0 and ops[attention] > 0, ops


def test_profile_groups_operators_by_what_they_compute():
    from gemma_edge.profiling import group_of

    expected = {"MatMulNBits": "quantized products", "GatherBlockQuantized": "quantized products",
                "Fully Connected (NC, QDU8, F32, QB4W) GEMM": "quantized products",
                "Fully Connected (NC, QDU8, F32, QC8W) GEMM": "quantized products",
                "Fully Connected (NC, F32) GEMM": "float products", "MatMul (weights)": "float products",
                "Gemm (weights)": "float products", "MatMul": "attention", "FusedMatMul": "attention",
                "GroupQueryAttention": "attention", "Softmax (NC, F32)": "attention",
                "Batch Matrix Multiply (NC, F32) GEMM": "attention", "Copy (NC, X32)": "attention",
                "SkipSimplifiedLayerNormalization": "norms", "RMSNormalization": "norms",
                "Add (ND)": "other operators", "index_put_ (outside XNNPACK)": "other operators", "Reshape": "other operators"}
    assert {op: group_of(op) for op in expected} == expected


def _counting_worker(source: str, threads, conn) -> None:
    """A runtime that is not ours (benchmarks/peers.py's llama.cpp and GenAI rows serve the same way):
    its stats say which prompt it got and how many runs it has answered."""
    from gemma_edge.bench import serve

    runs = []

    def run(loaded, prompt, new_tokens):
        runs.append(prompt)
        return {"prompt_tokens": len(prompt), "cached_tokens": 0, "generated_tokens": new_tokens, "ttft_s": 0.01,
                "prefill_tokens_per_s": len(prompt) / 0.01, "decode_tokens_per_s": float(len(runs)), "first_id": prompt[1]}

    serve(conn, lambda: source, run)


def test_bench_measures_other_runtimes_beside_ours(tiny_exports):
    from gemma_edge.bench import ExportBench, Subject, bench, bench_prompt

    onnx = tiny_exports("tiny-gemma3", "onnx", "fp32")
    other = Subject(ExportBench("other", "peer", "q4", 100, 0, 100), 1005, 64, _counting_worker, "other")
    measured, _ = bench([onnx], prompt_tokens=8, new_tokens=4, threads=1, runs=2, others=[other])
    ours, peer = measured
    assert ours.folder == str(onnx) and peer is other.result
    # the same prompt as ours, one warm-up then two measured runs taken in turn with our export's
    assert [r["decode_tokens_per_s"] for r in peer.runs] == [2.0, 3.0]
    assert all(r["first_id"] == bench_prompt(1005, 8)[1] for r in peer.runs)
    assert ours.runs[0]["finished_at"] < peer.runs[0]["finished_at"] < ours.runs[1]["finished_at"] < peer.runs[1]["finished_at"]
    assert peer.load_s >= 0 and peer.peak_rss_bytes > 0 and peer.median("decode_tokens_per_s") == 2.5


def test_bench_runs_a_pte_in_both_runtimes_and_counts_the_native_runner_s_memory(tiny_exports):
    """`--runtime python native`: a row for the .pte in each (the ONNX export once, in ONNX Runtime),
    taken in turns; the native row's memory is its worker's and its runner's (a child process), and
    still below the Python bindings' row, which loads torch (measured on the real 270M's phone recipe
    with its prefill method: 593 against 1,164 MiB)."""
    import subprocess
    import sys

    from gemma_edge.bench import _peak_rss, bench

    onnx, pte = tiny_exports("tiny-gemma3", "onnx", "fp32"), tiny_exports("tiny-gemma3", "pte", "fp32")
    measured, _ = bench([onnx, pte], prompt_tokens=8, new_tokens=4, threads=1, runs=1, runtimes=("python", "native"))
    assert [(e.folder, e.runtime) for e in measured] == [(str(onnx), "python"), (str(pte), "python"), (str(pte), "native")]
    assert measured[2].name == f"{pte} (native runner)" and measured[1].name == str(pte)
    python, native = measured[1:]
    assert all(r["generated_tokens"] == 4 and r["decode_tokens_per_s"] > 0 for e in measured for r in e.runs)
    print(f"peak RSS: python {python.peak_rss_bytes / 2**20:.0f} MiB, native {native.peak_rss_bytes / 2**20:.0f} MiB")
    assert native.peak_rss_bytes < python.peak_rss_bytes

    # a child's memory counts: one that holds 200 MB more than this process
    before = _peak_rss()
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(200 << 20); print(1, flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"1"
    during = _peak_rss()
    child.stdin.close()
    child.wait(timeout=60)
    assert during - before > 200 << 20
