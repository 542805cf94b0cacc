"""Memory at export: the model is built at its quantized size (one layer in float32 at a time), and an
export that cannot fit is refused before it starts (--force tries anyway).

Full-size figures (Gemma 2B/7B peaks against the issue's limits) come from benchmarks/full_size.py:
minutes to an hour each, so not here. These tests bound the same mechanism on a model of a few
hundred MB, in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
import pytest

from gemma_edge.checkpoints import weight_shapes
from gemma_edge.cli import main
from gemma_edge.config import variant
from gemma_edge.exporters import memory
from gemma_edge.exporters.settings import ExportSettings

# gemma-2b's width with its vocabulary cut: 4 decoder layers of full size, a 16k-row table.
_2B = variant("gemma-2b")
MID = dataclasses.replace(_2B, num_hidden_layers=4, vocab_size=16384, layer_types=_2B.layer_types and _2B.layer_types[:4])
FP32_BYTES = 4 * sum(math.prod(shape) for shape in weight_shapes(MID).values())

PEAK = "import json, resource; print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))"
IMPORTS = textwrap.dedent("""
    import json, sys
    import torch, torchao, onnx
    from gemma_edge.checkpoints import Checkpoint
    from gemma_edge.config import GemmaConfig
    from gemma_edge.exporters.executorch import build_model as build_pte
    from gemma_edge.exporters.onnx import build_model as build_onnx
    from gemma_edge.exporters.onnx_contrib import FUSED
    from gemma_edge.exporters.settings import ExportSettings
""")
BUILD = IMPORTS + textwrap.dedent("""
    ckpt = Checkpoint("random:mid", GemmaConfig.from_dict(json.loads(sys.argv[2])), None)
    settings = ExportSettings(format=sys.argv[1], quant="int4", max_seq_len=64)
    model, _ = build_onnx(ckpt, settings, FUSED) if sys.argv[1] == "onnx" else build_pte(ckpt, settings)
""")


def _peak_of(code: str, *argv: str) -> int:
    """Peak RSS of a fresh Python running code, in bytes."""
    result = subprocess.run([sys.executable, "-c", code + "\n" + PEAK, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_building_an_int4_model_never_holds_it_in_float32(fmt):
    """Peak RSS of build_model (4 full-width gemma-2b layers, 1.8 GB in float32) over a process that
    only imported the libraries: the quantized model as the exporter holds it plus less than two
    layers in float32 (the layer being quantized and the quantizer's working copies), where a
    load-then-quantize export held the whole float32 model and more."""
    grew = _peak_of(BUILD, fmt, json.dumps(MID.to_dict())) - _peak_of(IMPORTS)
    held = memory.weight_bytes(MID, ExportSettings(format=fmt, quant="int4", max_seq_len=64), held=True)
    two_layers = 2 * 4 * memory.layer_weights(MID)
    print(f"{fmt}: float32 {FP32_BYTES / 2**20:.0f} MiB, held quantized {held / 2**20:.0f} MiB, two layers in float32 "
          f"{two_layers / 2**20:.0f} MiB; building grew the peak by {grew / 2**20:.0f} MiB")
    assert held < grew < held + two_layers


def test_an_export_that_cannot_fit_is_refused_before_it_starts(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(memory, "available_memory", lambda: 256 << 20)  # a machine with 256 MiB free
    code = main(["export", str(tiny_checkpoints["tiny-gemma"]), "--format", "onnx", "--max-seq-len", "64", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(tmp_path.iterdir())
    last = err.strip().splitlines()[-1]
    assert last.startswith("gemma-edge: error: this export needs about") and "--force" in last and "Traceback" not in err


def test_force_and_the_estimate(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    config = variant("gemma-7b")
    settings = ExportSettings(format="onnx", quant="int4")
    need, have = memory.check_memory(config, settings, force=True)  # no error: tried anyway
    assert have == 1 << 20 and need == memory.expected_peak(config, settings)
    with pytest.raises(Exception, match="--force"):
        memory.check_memory(config, settings, force=False)
    # The estimate orders what it should: fp32 over int8 and int4, 7B over 2B, ONNX int8 over int4
    # (a .pte's int4 is held as int8 values with group scales until XNNPACK packs it: no smaller).
    peak = {(v, f, q): memory.expected_peak(variant(v), ExportSettings(format=f, quant=q))
            for v in ("gemma-2b", "gemma-7b") for f in ("onnx", "pte") for q in ("int4", "int8", "fp32")}
    for v in ("gemma-2b", "gemma-7b"):
        assert peak[(v, "onnx", "int4")] < peak[(v, "onnx", "int8")]
        for f in ("onnx", "pte"):
            assert max(peak[(v, f, "int4")], peak[(v, f, "int8")]) < peak[(v, f, "fp32")]
            assert peak[("gemma-2b", f, "int4")] < peak[("gemma-7b", f, "int4")]
    # int4 weights: 2B about 1.5 GiB and 7B about 4.7 GiB in ONNX (the measured files, README).
    assert 1.3 < memory.weight_bytes(variant("gemma-2b"), ExportSettings(format="onnx")) / 2**30 < 1.6
