"""The real Gemma 3 270M exported to ONNX at int8 and int4: quality on real English, size, and
ONNX Runtime GenAI running the folder with its own API. Exports are cached by content."""

from __future__ import annotations

import json

import pytest

from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.runtime.generation import greedy
from gemma_edge.runtime.onnx_backend import OnnxBackend
from test_real_executorch import MAX_SEQ_LEN, MIB, TOKENS, quality

pytestmark = pytest.mark.slow


# int8+e4: int8 decoder layers, the tied table (embedding and output projection) in int4.
RECIPES = {"int8": {"quant": "int8"}, "int4": {"quant": "int4", "recipe": "rtn"},
           "int8+e4": {"quant": "int8", "embedding_quant": "int4", "recipe": "rtn"}}


@pytest.fixture(scope="module")
def exports(real):
    ckpt = real[0]
    return {q: cached_export(ckpt, ExportSettings(format="onnx", max_seq_len=MAX_SEQ_LEN, **r)) for q, r in RECIPES.items()}


# Measured on the same text as the .pte tests (fp32 perplexity 21.61), default settings (block 32;
# embeddings int8 with int8, int4 with int4, the tied table stored once, a 4-bit one with 8-bit copies of
# the calibration text's rows (HotRowsTable); asymmetric blocks; MatMulNBits accuracy level 4; the
# contrib graph). Sizes: int8 298 MiB, int4 166.5 MiB (170.4 with the hot rows).
BOUNDS = {
    "int8": {"ppl_ratio": 1.03, "top1": 0.92, "kl": 0.02},  # measured x1.002, top-1 97.1%, KL 0.0035
    # measured x1.457, top-1 66.9%, KL 0.380 (x1.493 unclipped); with the hot rows x1.396, 74.2%, 0.304 (2026-12-05);
    # with k and v 8-bit too (--int8-layers' default) x1.287, 76.7%, 0.219 in 173.4 MiB (2026-12-05)
    "int4": {"ppl_ratio": 1.60, "top1": 0.64, "kl": 0.45},
    # The product's target, x1.10: measured x1.092, top-1 81.4%, KL 0.103 (the table's int4 blocks clipped:
    # x1.108 in simulation without it, benchmarks/int4_quality.py); with the hot rows x1.015, 93.7%, 0.024
    "int8+e4": {"ppl_ratio": 1.10, "top1": 0.78, "kl": 0.12},
}
# measured 298.3, 166.5, 215.8: one copy of the tied table; with the hot rows' 8-bit copies 170.4, 219.7; int4
# with k and v 8-bit 173.4
SIZE_MIB = {"int8": 310, "int4": 175, "int8+e4": 220}


@pytest.mark.parametrize("quant", list(RECIPES))
def test_real_onnx_quality_on_real_english(quant, real, exports):
    ckpt, tokenizer, ids, fp32 = real
    backend = OnnxBackend(exports[quant])
    got = quality(backend.forward(ids, 0), fp32, ids)  # one prefill: every row
    size = sum(f["bytes"] for n, f in json.loads((exports[quant] / "gemma_edge.json").read_text())["files"].items()
               if n.startswith("model."))
    print(f"gemma-3-270m {quant} ONNX ({size / MIB:.1f} MiB) on {TOKENS} tokens: perplexity {got['ppl']:.2f} vs fp32 "
          f"{got['ppl_fp32']:.2f} (x{got['ppl_ratio']:.3f}), top-1 agreement {got['top1']:.1%}, KL {got['kl']:.3f}")
    bounds = BOUNDS[quant]
    assert size / MIB <= SIZE_MIB[quant]
    assert got["ppl_ratio"] <= bounds["ppl_ratio"] and got["top1"] >= bounds["top1"] and got["kl"] <= bounds["kl"], got


def test_onnx_runtime_genai_generates_what_our_runtime_generates(real, exports):
    """ONNX Runtime GenAI (its runtime also ships for Android and iOS) loads the folder as it is."""
    import onnxruntime_genai as og

    tokenizer = real[1]
    folder = exports["int4"]
    prompt = tokenizer.encode("The capital of France is").ids  # with <bos>: GenAI's encode() adds none
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=MAX_SEQ_LEN, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    theirs = []
    while not generator.is_done() and len(theirs) < 24:
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = greedy(OnnxBackend(folder), prompt, 24, stop_ids=[1, 106]).token_ids
    assert theirs == ours and len(ours) == 24
    print("GenAI and ours:", repr(tokenizer.decode(ours)))



def test_real_int4_verifies_on_emulated_arm64(exports, tmp_path):
    """The real model's int4 graph through ONNX Runtime's ARM kernels (QEMU, Cortex-A76): a short check."""
    import subprocess
    import sys
    from pathlib import Path

    report = tmp_path / "arm.json"
    result = subprocess.run([str(Path(sys.executable).with_name("gemma-edge")), "verify", str(exports["int4"]), "--target", "arm64",
                             "--prefill", "32", "--decode", "8", "--greedy", "8", "--json", str(report)],
                            capture_output=True, text=True, timeout=1800)
    data = json.loads(report.read_text())
    print({c["name"]: (round(c["kl"], 3), round(c["ppl_ratio"], 3)) for c in data["checks"]})
    assert result.returncode == 0 and data["passed"] and data["target"] == "arm64", result.stdout + result.stderr[-2000:]
