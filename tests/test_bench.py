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
                 "--threads", "1", "--json", str(report), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{pte} vs {onnx}: decode x" in out and "memory read bandwidth" in out
    data = json.loads(report.read_text())
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
