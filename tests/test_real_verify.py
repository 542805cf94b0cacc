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
    folder = cached_export(real[0], ExportSettings(format=fmt, quant=quant, max_seq_len=REAL_MAX_SEQ_LEN, recipe="rtn"))
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
    native runner under QEMU (Cortex-A76): about 3.5 minutes. Host and arm64 run the same program on
    other kernels (XNNPACK's NEON kernels against its x86 ones: other float summation orders, before
    activations are rounded to int8 again at every layer): close, not equal. Compared on what verify judges,
    each check's mean KL and the perplexity ratio over all 144 rows, not a check's own ratio: the
    decode check's 16 rows are noise (measured 2026-12-02, clipped int4 table: decode x1.820 on the
    host, x1.935 on arm64, 6% apart, from a KL 0.012 apart; the same checks over all rows: x2.130 / x2.156)."""
    folder = cached_export(real[0], ExportSettings(format="pte", quant="int4", max_seq_len=REAL_MAX_SEQ_LEN, recipe="rtn"))
    reports = {}
    for target in ("host", "arm64"):
        reports[target] = tmp_path / f"{target}.json"
        result = subprocess.run([str(Path(sys.executable).with_name("gemma-edge")), "verify", str(folder), "--target", target,
                                 "--json", str(reports[target])], capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    host, arm = (json.loads(reports[t].read_text()) for t in ("host", "arm64"))
    assert arm["passed"] and (arm["target"], arm["cpu"]) == ("arm64", "cortex-a76")
    for h, a in zip(host["checks"], arm["checks"]):
        print(f"{a['name']}: KL host {h['kl']:.3f} arm64 {a['kl']:.3f}, ppl x{h['ppl_ratio']:.3f} / x{a['ppl_ratio']:.3f}")
        assert (h["name"], h["rows"]) == (a["name"], a["rows"]) and abs(h["kl"] - a["kl"]) < 0.05
    print(f"all {sum(c['rows'] for c in arm['checks'])} rows: ppl x{host['ppl_ratio']:.3f} / x{arm['ppl_ratio']:.3f}")
    assert abs(host["ppl_ratio"] - arm["ppl_ratio"]) / host["ppl_ratio"] < 0.05
