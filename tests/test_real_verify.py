"""`gemma-edge verify` on the real Gemma 3 270M: the phone recipe (int8 layers, int4 table: `make
demo`'s) and all-int4, both formats, on this CPU. (Plain int8, an int8 table too, was verified here
until 2026-12-06: its .pte was an export of ~3 minutes that no other test reads; its ONNX quality is
tests/test_real_onnx.py's, and its int8 layers are the phone recipe's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_MAX_SEQ_LEN
from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from test_real_executorch import ALL_INT4

pytestmark = pytest.mark.slow


# The exports test_real_executorch.py and test_real_onnx.py make (the same settings: cached once); the
# .pte all-int4 is test_real_executorch's, rounded by GPTQ as --recipe auto makes it.
RECIPES = {"phone": {"quant": "int8", "embedding_quant": "int4", "recipe": "rtn"}, "int4": {"quant": "int4", "recipe": "rtn"}}


def verified(ckpt, fmt: str, recipe: str, tmp_path: Path, target: str = "host") -> dict:
    """`gemma-edge verify`'s JSON report on `target` of the real model's export, which passed: every
    check, every file's checksum, verify's 128 prefill and 16 decode rows."""
    settings = ALL_INT4 if (fmt, recipe) == ("pte", "int4") else \
        ExportSettings(format=fmt, max_seq_len=REAL_MAX_SEQ_LEN, **RECIPES[recipe])
    folder = cached_export(ckpt, settings)
    report = tmp_path / f"{target}.json"
    result = subprocess.run([str(Path(sys.executable).with_name("gemma-edge")), "verify", str(folder), "--target", target,
                             "--json", str(report)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    data = json.loads(report.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    print(f"gemma-3-270m {fmt} {recipe} on {target}: " + "; ".join(
        f"{k} top-1 {c['top1']:.1%} KL {c['kl']:.3f} ppl x{c['ppl_ratio']:.3f}" for k, c in checks.items()))
    assert data["passed"] and data["checksums_ok"], result.stdout
    assert checks["prefill"]["rows"] == 128 and checks["decode"]["rows"] == 16
    return data


# (The .pte int4 on this CPU: test_real_int4_pte_verifies_on_emulated_arm64, beside arm64.)
@pytest.mark.parametrize("fmt, recipe", [("onnx", "phone"), ("onnx", "int4"), ("pte", "phone")])
def test_real_exports_verify(fmt, recipe, real, tmp_path):
    verified(real[0], fmt, recipe, tmp_path)


def test_real_int4_pte_verifies_on_emulated_arm64(real, tmp_path):
    """The real model's all-int4 program (GPTQ) through ExecuTorch's arm64 runtime and XNNPACK
    kernels, in our native runner under QEMU (Cortex-A76): about 3.5 minutes. Host and arm64 run the
    same program on other kernels (XNNPACK's NEON kernels against its x86 ones: other float summation
    orders, before activations are rounded to int8 again at every layer): close, not equal. Compared
    on what verify judges, each check's mean KL, and over all 144 rows the mean KL and the perplexity
    ratio.

    How far apart they may be, measured on 256 tokens of the same text (Intel Xeon, 2026-12-06; the
    all-int4 programs rounded to nearest and by GPTQ, each against the eager model carrying its
    weights): the host's programs are KL 0.020 / 0.036 from their eager models (the rounding of the
    activations to int8 crossing other boundaries; GPTQ's layers, not smoothed, round coarser; on
    the AMD EPYC, host and arm64 measured each as far from the eager model as from each other), and
    each row's KL to the reference moves by 0.049 / 0.051 with them (standard deviation; each
    token's log-likelihood by 0.21 / 0.28 nats). Between two programs whose kernels
    round independently, a mean over 144 rows thus carries 0.051 * 1.41 / 12 = 0.006 of noise in KL
    and 0.28 * 1.41 / 12 = 3.4% in the perplexity ratio; held to 4 of them: 0.024 and 13%. Measured
    host / arm64 on verify's 144 rows: GPTQ KL 0.0855 / 0.0722, x1.102 / x1.063 (2.2 and 1.1 of
    them; Intel Xeon, 2026-12-06); rounded to nearest 0.1433 / 0.1456, x1.172 / x1.233 (AMD EPYC).
    Until 2026-12-06 the KL was held to 5% of the host's, which measured ~1.2 of them for the program
    rounded to nearest and 0.7 for GPTQ's, whose KL is lower: it failed by chance. (The decode
    check's 16 rows alone are noise: measured 2026-12-02, decode x1.820 on the host, x1.935 on
    arm64, from a KL 0.012 apart.)"""
    host = verified(real[0], "pte", "int4", tmp_path)
    arm = verified(real[0], "pte", "int4", tmp_path, target="arm64")
    assert (host["target"], arm["target"], arm["cpu"]) == ("host", "arm64", "cortex-a76")
    for h, a in zip(host["checks"], arm["checks"]):
        print(f"{a['name']}: KL host {h['kl']:.3f} arm64 {a['kl']:.3f}, ppl x{h['ppl_ratio']:.3f} / x{a['ppl_ratio']:.3f}")
        assert (h["name"], h["rows"]) == (a["name"], a["rows"]) and abs(h["kl"] - a["kl"]) < 0.05
    kl = {t: sum(c["kl"] * c["rows"] for c in r["checks"]) / sum(c["rows"] for c in r["checks"]) for t, r in (("host", host), ("arm64", arm))}
    print(f"all {sum(c['rows'] for c in arm['checks'])} rows: KL {kl['host']:.4f} / {kl['arm64']:.4f}, "
          f"ppl x{host['ppl_ratio']:.3f} / x{arm['ppl_ratio']:.3f}")
    assert abs(kl["host"] - kl["arm64"]) < 0.024
    assert abs(host["ppl_ratio"] - arm["ppl_ratio"]) / host["ppl_ratio"] < 0.13
