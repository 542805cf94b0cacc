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


def test_real_int4_pte_verifies_on_emulated_arm64(real, tmp_path):
    """The real model's int4 program through ExecuTorch's arm64 runtime and XNNPACK kernels, in our
    native runner under QEMU (Cortex-A76): about 3.5 minutes. verify's default 128 + 16 tokens, not
    fewer: the int4 .pte's perplexity ratio over 40 rows is noise around its limit (measured x2.59
    on the host, x2.73 on arm64, x2.05 / x2.05 over 144 rows)."""
    folder = cached_export(real[0], ExportSettings(format="pte", quant="int4", max_seq_len=REAL_MAX_SEQ_LEN))
    reports = {}
    for target in ("host", "arm64"):
        reports[target] = tmp_path / f"{target}.json"
        result = subprocess.run([str(Path(sys.executable).with_name("gemma-edge")), "verify", str(folder), "--target", target,
                                 "--json", str(reports[target])], capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    host, arm = (json.loads(reports[t].read_text()) for t in ("host", "arm64"))
    assert arm["passed"] and (arm["target"], arm["cpu"]) == ("arm64", "cortex-a76")
    for h, a in zip(host["checks"], arm["checks"]):  # the same program on other kernels: close, not equal
        print(f"{a['name']}: KL host {h['kl']:.3f} arm64 {a['kl']:.3f}, ppl x{h['ppl_ratio']:.3f} / x{a['ppl_ratio']:.3f}")
        assert abs(h["kl"] - a["kl"]) < 0.05 and abs(h["ppl_ratio"] - a["ppl_ratio"]) / h["ppl_ratio"] < 0.05
