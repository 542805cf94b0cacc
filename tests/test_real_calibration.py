"""The real Gemma 3 270M all-int4 with its 4-bit weights rounded by GPTQ (--recipe gptq, calibrated
on the default text: Python's module documentation), both formats, each against the same weights
rounded to nearest (ONNX: that export; .pte: the eager model that export would compute): quality on
two real texts the calibration never saw (verify's, the CPython reference manual; and transformers'
modeling_gemma.py, code, the whole file), held to the calibration issue's targets on both; and the
phone recipe (ONNX): its hot rows, and GPTQ on its table (--recipe auto's choice since 2026-12-07).
Exports are cached by content. (The .pte phone recipe calibrated by GPTQ, not --recipe auto's choice,
was measured here until 2026-12-06, below; its table's calibration is tested on the tiny models,
tests/test_calibration.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.runtime.backend import open_backend
from test_real_executorch import MAX_SEQ_LEN, MIB, quality

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from quality import CODE, measure, texts  # noqa: E402  benchmarks/quality.py: the README's and QUALITY.md's measure

pytestmark = pytest.mark.slow

# The targets on verify's text and another (perplexity ratio, top-1 agreement): all-int4 ONNX <= 1.20
# with >= 0.80, .pte <= 1.35; the phone recipe calibrated <= 1.05 with >= 0.88. Measured 2026-12-03
# (ratio / top-1 on the manual, then on modeling_gemma.py):
#   .pte int4   rtn x1.380 / 0.751, x1.908 / 0.765   gptq x1.106 / 0.826, x1.497 / 0.793
#   .pte phone  rtn x1.048 / 0.875, x1.121 / 0.881   gptq x1.033 / 0.896, x1.154 / 0.873
# and 2026-12-05, ONNX with the calibration text's rows of the table 8-bit (HotRowsTable, the default):
#   ONNX int4   rtn x1.396 / 0.742, x2.132 / 0.730   gptq x1.035 / 0.867, x1.393 / 0.840
#   ONNX phone  rtn x1.015 / 0.937, x1.028 / 0.930   gptq x1.002 / 0.937, x1.049 / 0.933
# and 2026-12-05, the .pte with the same 8-bit rows (pte_hot_rows.py) and, in the phone recipe, its
# int8 layers' inputs smoothed (smoothing.py):
#   .pte int4   rtn x1.353 / 0.773, x2.080 / 0.755   gptq x1.077 / 0.861, x1.322 / 0.820
#   .pte phone  rtn x0.998 / 0.926, x1.060 / 0.918   gptq x1.003 / 0.930, x1.122 / 0.902
# and 2026-12-05 evening, the .pte's int4 layers rounded to nearest smoothed too (not GPTQ's):
#   .pte int4   rtn x1.172 / 0.802, x1.564 / 0.757
# and 2026-12-05 night, ONNX int4 with k and v 8-bit (--int8-layers' default for ONNX), 173.4 MiB:
#   ONNX int4   rtn x1.287 / 0.767, x1.729 / 0.771   gptq x1.023 / 0.890, x1.322 / 0.840
# (.pte rtn with the head's correction of its worst columns, gptq without: head_correction.py; so
# the .pte gptq files are smaller, 162.1 and 200.8 MiB against 171.2 and 209.9)
# and the .pte's int4 with k and v 8-bit too (the default since 2026-12-06; measured 2026-12-05 with
# --int8-layers k_proj,v_proj), 173.4 and 164.3 MiB:
#   .pte int4   rtn x1.136 / 0.816, x1.476 / 0.781   gptq x1.052 / 0.871, x1.243 / 0.838
# and 2026-12-06 on an Intel Xeon (AVX-512; the rows above on an AMD EPYC), the .pte's rtn as its eager
# model (the program is no longer made here):
#   ONNX int4   rtn x1.288 / 0.777, x1.728 / 0.767   gptq x1.048 / 0.908, x1.396 / 0.826
#   .pte int4   rtn x1.137 / 0.818, x1.464 / 0.779   gptq x1.037 / 0.877, x1.300 / 0.836
# and 2026-12-07 (Intel Xeon), GPTQ true-sequential (calibration.calibrate_layer), KL in brackets:
#   ONNX int4   gptq x1.008 / 0.888 (0.049), x1.282 / 0.853 (0.322)   (was KL 0.047, 0.359)
#   .pte int4   gptq x1.073 / 0.867 (0.069), x1.318 / 0.849 (0.329)   (was KL 0.065, 0.378)
# Every figure above on code is modeling_gemma.py's first 512 tokens, two thirds of them a banner and
# the Apache License's header the model recites from memory. Since 2026-12-07 the whole file (12
# windows, code_text), the same exports (Intel Xeon, 1 thread a test process):
#   ONNX int4   rtn x1.308 / 0.794 (0.285)   gptq x1.099 / 0.887 (0.101)
#   .pte int4   rtn x1.227 / 0.820 (0.187)   gptq x1.107 / 0.873 (0.109)
#   ONNX phone  rtn x1.024 / 0.927 (0.035); every row 4-bit x1.070 / 0.878 (0.081)
TARGETS = {"onnx": (1.20, 0.80), "pte": (1.35, 0.0)}  # all-int4


@pytest.fixture(scope="module")
def code_text(real):
    """Python code written by others, transformers' Gemma model: the whole file in windows of 512 ids
    (benchmarks/quality.py's), and the fp32 model's forward over a window. Its first window alone was
    measured until 2026-12-07: 351 of its 512 tokens are a generated-file banner and the Apache
    License's header, which the model recites from memory (benchmarks/QUALITY.md, "The code text")."""
    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime.eager import EagerBackend

    ckpt, tokenizer = real[0], real[1]
    reference = EagerBackend(load_model(ckpt, MAX_SEQ_LEN))
    return {CODE: texts(tokenizer)[CODE]}, lambda window: reference.forward(window, 0)


def code_quality(backends: dict, code_text) -> dict[str, dict[str, float]]:
    """{name: {ppl_ratio, top1, kl}} of each backend on the code text, against the fp32 model."""
    measured = measure({name: lambda w, b=b: b.forward(w, 0) for name, b in backends.items()}, *code_text)
    return {name: dict(zip(("ppl_ratio", "top1", "kl"), q[CODE])) for name, q in measured.items()}


@pytest.mark.parametrize("fmt", list(TARGETS))
def test_gptq_keeps_the_real_model_where_rounding_to_nearest_loses_it(fmt, real, code_text):
    ckpt, _, ids, fp32 = real
    backends, got = {}, {}
    for rounding in ("rtn", "gptq"):
        settings = ExportSettings(format=fmt, quant="int4", max_seq_len=MAX_SEQ_LEN, recipe=rounding)
        if fmt == "pte" and rounding == "rtn":
            # The eager model the program rounded to nearest would compute (built as the exporter
            # builds it, not lowered; tests/test_executorch.py holds programs to their eager models):
            # that program, a real export of its own, is read by no other test.
            from gemma_edge.exporters.executorch import build_model
            from gemma_edge.runtime.eager import EagerBackend

            backends[rounding], size = EagerBackend(build_model(ckpt, settings)[0]), None
        else:
            folder = cached_export(ckpt, settings)
            backends[rounding] = open_backend(folder)
            manifest = json.loads((folder / "gemma_edge.json").read_text())
            size = sum(f["bytes"] for n, f in manifest["files"].items() if n.startswith("model.")) / MIB
        got[rounding] = {"manual": quality(backends[rounding].forward(ids, 0), fp32, ids), "MiB": size}
    for rounding, q in code_quality(backends, code_text).items():
        got[rounding]["code"] = q
        size = got[rounding]["MiB"]
        print(f"gemma-3-270m {fmt} int4 {rounding} ({'eager' if size is None else f'{size:.1f} MiB'}): " + ", ".join(
            f"{text} x{got[rounding][text]['ppl_ratio']:.3f} top-1 {got[rounding][text]['top1']:.3f} "
            f"KL {got[rounding][text]['kl']:.3f}" for text in ("manual", "code")))
    gptq, rtn = got["gptq"], got["rtn"]
    ratio, top1 = TARGETS[fmt]
    for text in ("manual", "code"):  # the targets, on verify's text and on code
        assert gptq[text]["ppl_ratio"] <= ratio and gptq[text]["top1"] >= top1, (text, gptq[text])
    if fmt == "onnx":  # the same layers, other values (the .pte's sizes: test_real_executorch.py's ideal size)
        assert gptq["MiB"] == rtn["MiB"]
    # GPTQ takes off at least a third of what rounding to nearest lost, on both texts in both formats
    # (the .pte's layers rounded to nearest are smoothed, smoothing.py, GPTQ's are not: on the code
    # file's first window alone GPTQ gained less than a third there, x1.464 -> x1.300, within GPTQ's
    # noise on that window; on the whole file x1.227 -> x1.107).
    for text in ("manual", "code"):
        assert gptq[text]["ppl_ratio"] - 1 <= (2 / 3) * (rtn[text]["ppl_ratio"] - 1), (text, gptq[text], rtn[text])


def test_the_phone_recipe_on_both_texts_hot_rows_and_gptq(real, code_text):
    """ONNX, int8 layers and an int4 table: rounded to nearest with the calibration text's rows of the
    table 8-bit (HotRowsTable, the default) and without (every row 4-bit), and as --recipe auto
    exports it (GPTQ on the 4-bit rows, since 2026-12-07; rounded to nearest before: benchmarks/
    QUALITY.md). The issue's phone target, <= x1.05 and top-1 >= 0.88, on both texts, where every row
    at 4 bits misses it on both; GPTQ closer to the fp32 model than rounding on both. Measured
    2026-12-05 (ratio / top-1 / KL, manual then code's first 512 tokens): without hot rows x1.091 /
    0.810 / 0.103, x1.118 / 0.873 / 0.129; with x1.015 / 0.937 / 0.024, x1.028 / 0.930 / 0.063, for
    3.76 MiB (8-bit copies of 4,557 rows, and each token's row among them); 2026-12-07, code the
    whole file: without x1.070 / 0.878 / 0.081, with x1.024 / 0.927 / 0.035, GPTQ x0.999 / 0.945 /
    0.013, x1.024 / 0.946 / 0.025 (benchmarks/quality.py, 2 threads)."""
    ckpt, _, ids, fp32 = real
    backends, got = {}, {}
    for name, hot, recipe in (("hot", None, "rtn"), ("every", 0, "rtn"), ("auto", None, "auto")):
        settings = ExportSettings(format="onnx", quant="int8", embedding_quant="int4", max_seq_len=MAX_SEQ_LEN,
                                  hot_tokens=hot, recipe=recipe)
        folder = cached_export(ckpt, settings)
        manifest = json.loads((folder / "gemma_edge.json").read_text())
        backends[name] = open_backend(folder)
        got[name] = {"manual": quality(backends[name].forward(ids, 0), fp32, ids),
                     "MiB": sum(f["bytes"] for n, f in manifest["files"].items() if n.startswith("model.")) / MIB,
                     "rows": manifest["quantization"].get("hot_tokens", {}).get("rows", 0),
                     "recipe": manifest["quantization"]["recipe"]["name"]}
    for name, q in code_quality(backends, code_text).items():
        got[name]["code"] = q
        print(f"gemma-3-270m onnx phone {got[name]['recipe']}, {got[name]['rows']} rows 8-bit ({got[name]['MiB']:.2f} MiB): "
              + ", ".join(f"{text} x{got[name][text]['ppl_ratio']:.3f} top-1 {got[name][text]['top1']:.3f} "
                          f"KL {got[name][text]['kl']:.3f}" for text in ("manual", "code")))
    hot, every, auto = got["hot"], got["every"], got["auto"]
    assert 4000 < hot["rows"] < 5000 and every["rows"] == 0  # the default text's tokens and the special ones
    assert auto["recipe"] == "gptq" and auto["rows"] == hot["rows"] and auto["MiB"] == hot["MiB"]
    for text in ("manual", "code"):
        for q in (hot, auto):
            assert q[text]["ppl_ratio"] <= 1.05 and q[text]["top1"] >= 0.88, (text, q)
        assert every[text]["ppl_ratio"] > 1.05, (text, every[text])  # misses the target (on code by top-1 too, 0.878)
        assert hot[text]["kl"] <= 0.6 * every[text]["kl"], (text, hot[text], every[text])
        assert auto[text]["kl"] < hot[text]["kl"], (text, auto[text], hot[text])
    assert 3.5 < hot["MiB"] - every["MiB"] < 4
