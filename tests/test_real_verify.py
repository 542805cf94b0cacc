"""`gemma-edge verify` on the real Gemma 3 270M: int8 and int4, both formats, on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_MAX_SEQ_LEN
from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_real_exports_verify(fmt, quant, real, tmp_path):
    folder = cached_export(real[0], ExportSettings(format=fmt, quant=quant, max_seq_len=REAL_MAX_SEQ_LEN))
    report = tmp_path / "report.json"
    result = subprocess.run([str(Path(sys.executable).with_name("gemma-edge")), "verify", str(folder), "--json", str(report)],
                            capture_output=True, text=True, timeout=1800)
    data = json.loads(report.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    print(f"gemma-3-270m {fmt} {quant}: " + "; ".join(f"{k} top-1 {c['top1']:.1%} KL {c['kl']:.3f} ppl x{c['ppl_ratio']:.3f}"
                                                       for k, c in checks.items()))
    assert result.returncode == 0 and data["passed"] and data["checksums_ok"], result.stdout
    assert checks["prefill"]["rows"] == 128 and checks["decode"]["rows"] == 16
