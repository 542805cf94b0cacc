"""The real Gemma 3 270M exported to .pte as the phone recipe (int8 layers, an int4 table the
output projection reads) and all-int4 (rounded by GPTQ, as --recipe auto does): quality on real
English, size, and the stock ExecuTorch runner. (int8 throughout: the tiny models' tests.) Exports
are cached by content (tests/export_cache.py): minutes each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.executorch import DATA_FILE, PTE_FILE
from gemma_edge.exporters.head_correction import COLUMNS
from gemma_edge.exporters.torchao_quant import HEAD_OF_TABLE, INT4, INT8, TABLE_INT4, untie_output_projection
from gemma_edge.model import Gemma, RMSNorm
from gemma_edge.runtime.executorch_backend import ExecuTorchBackend
from gemma_edge.runtime.generation import greedy
from test_executorch import mean_kl

pytestmark = pytest.mark.slow

from conftest import REAL_MAX_SEQ_LEN as MAX_SEQ_LEN, REAL_TOKENS as TOKENS  # the `real` fixture's text
MIB = 1 << 20


@pytest.fixture(scope="module")
def exports(real):
    ckpt = real[0]
    return {"phone": cached_export(ckpt, ExportSettings(format="pte", quant="int8", embedding_quant="int4", max_seq_len=MAX_SEQ_LEN,
                                                        recipe="rtn")),
            "int4": cached_export(ckpt, ALL_INT4)}


# All-int4 as --recipe auto makes it for the 270M: rounded by GPTQ (test_real_calibration.py compares it
# with rounding to nearest on the eager model; until 2026-12-06 the tests here read a program rounded to
# nearest, a real export of its own: ~3-5 minutes of a cold CI run)
ALL_INT4 = ExportSettings(format="pte", quant="int4", max_seq_len=MAX_SEQ_LEN, recipe="gptq")


def file_bytes(folder) -> int:
    """The program and its weights' data file."""
    return sum((folder / name).stat().st_size for name in (PTE_FILE, DATA_FILE))


def quality(logits: np.ndarray, fp32: np.ndarray, ids: list[int]) -> dict[str, float]:
    """Perplexity ratio (of the next tokens of the text), top-1 agreement and mean KL against fp32."""
    lp = torch.log_softmax(torch.tensor(logits[:-1]), -1)
    ref = torch.log_softmax(torch.tensor(fp32[:-1]), -1)
    target = torch.tensor(ids[1:])[:, None]
    nll, nll_fp32 = -lp.gather(-1, target).mean().item(), -ref.gather(-1, target).mean().item()
    return {"ppl": float(np.exp(nll)), "ppl_fp32": float(np.exp(nll_fp32)), "ppl_ratio": float(np.exp(nll - nll_fp32)),
            "top1": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "kl": mean_kl(fp32[:-1], logits[:-1])}


# Measured on this text (fp32 perplexity 21.61), group 32. The bounds sit a little outside the
# measurements; a broken export lands far outside them. int4 is far from the product's target
# (ratio <= 1.10): measured in eager PyTorch, int4 weights alone cost x1.55 on the decoder's linears
# (v_proj x1.09, up_proj x1.10, down_proj x1.07 each alone), x1.075 on the output projection,
# x1.046 on the embedding.
BOUNDS = {
    # int8 layers, their inputs smoothed (smoothing.py), int4 table read by the head, the calibration
    # text's rows 8-bit (pte_hot_rows.py), the others' 32 worst columns corrected (head_correction.py):
    # measured x0.998, top-1 92.6%, KL 0.024 (x1.060, 91.8%, 0.085 on transformers' modeling_gemma.py);
    # without smoothing x1.003, 92.4%, 0.035; without hot rows either x1.032, 87.1%, 0.062 (before,
    # 2026-12-03: x1.048, 87.5%, 0.060); uncorrected x1.118, 82.2%, 0.100; the head at int8 of its own
    # x1.033 in 366 MiB; int8 throughout x1.006, 92.4%, 0.026 in 262 MiB (its table stored once; 423 MiB
    # before). ppl_ratio and top1: issue 17's phone target (issue 16's ratio: 1.10).
    "phone": {"ppl_ratio": 1.05, "top1": 0.88, "kl": 0.05},
    # All-int4 rounded by GPTQ (ALL_INT4), k and v 8-bit: measured x1.037, top-1 87.7%, KL 0.065 (Intel
    # Xeon, 2026-12-06; x1.052, 87.1% on an AMD EPYC the same day: GPTQ's bytes follow the CPU's LAPACK;
    # on modeling_gemma.py x1.300 and x1.243, test_real_calibration.py); 164.3 MiB.
    # Rounded to nearest, as this test read it until 2026-12-06 (smoothed, the head corrected):
    # measured x1.136, top-1 81.6%, KL 0.132 with k and v 8-bit (--int8-layers' default, 2026-12-06;
    # x1.476, 78.1%, 0.406 on modeling_gemma.py; 173.4 MiB); every layer 4-bit (--int8-layers none)
    # x1.172, top-1 80.2%, KL 0.167 with its inputs smoothed (smoothing.py, 2026-12-05; x1.353,
    # 77.3%, 0.259 without, with hot rows; x1.357, 74.4%, 0.280 without those either); 2026-12-03: x1.380, top-1 75.1%, KL 0.284 with the head reading the table, corrected (x1.462,
    # 70.8%, 0.323 uncorrected); x1.435, 71.2%, 0.314 with a head of its own; x1.866, 63.2%, 0.651
    # with symmetric groups, the table's and the head's clipped; x1.932, 59.5%, 0.701 with none clipped
    "int4": {"ppl_ratio": 1.08, "top1": 0.84, "kl": 0.09},
}


@pytest.mark.parametrize("quant", ["phone", "int4"])
def test_real_pte_quality_on_real_english(quant, real, exports):
    ckpt, tokenizer, ids, fp32 = real
    pte = ExecuTorchBackend(exports[quant])
    got = quality(pte.forward(ids, 0), fp32, ids)  # one program call per token: every cache position used
    print(f"gemma-3-270m {quant} .pte on {TOKENS} tokens: perplexity {got['ppl']:.2f} vs fp32 {got['ppl_fp32']:.2f} "
          f"(x{got['ppl_ratio']:.3f}), top-1 agreement {got['top1']:.1%}, KL {got['kl']:.3f}")
    bounds = BOUNDS[quant]
    assert got["ppl_ratio"] <= bounds["ppl_ratio"] and got["top1"] >= bounds["top1"] and got["kl"] <= bounds["kl"], got


def ideal_bytes(ckpt, plan: dict[str, str], group: int, hot: int = 0, corrected: bool = False) -> int:
    """Weights at their nominal width plus their scales (bf16 per group for int4, fp32 per row for
    int8), each int4 layer's offsets (int8 per group, an fp32 scale per row), plus the float norm
    weights; a head reading the table adds only its correction if it has one (head_correction.py:
    int8 per row on COLUMNS columns, an fp32 scale per row; an int4 table rounded to nearest), and
    `hot` 8-bit copies of its rows (pte_hot_rows.py: an fp32 scale and an int64 id each, an int32
    slot per id). Shapes come from the model itself, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = untie_output_projection(Gemma(ckpt.config, 8))
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            total += module.weight.numel() * 4
        elif name in plan:
            rows, cols = module.weight.shape  # linear [out, in]; embedding [vocab, hidden]
            if plan[name] == HEAD_OF_TABLE:
                total += rows * (COLUMNS + 4) if corrected else 0
                total += hot * (cols + 4 + 8) + (rows * 4 if hot else 0)
            elif plan[name] in (INT4, TABLE_INT4):
                total += rows * cols // 2 + rows * cols // group * 2 + rows * cols // group + rows * 4
            else:
                total += rows * cols + rows * 4
    return total


@pytest.mark.parametrize("recipe", ["phone", "int4"])
def test_real_pte_is_within_10_percent_of_its_ideal_size(recipe, real, exports):
    """The program and its data file, the tied table stored once, against the weights' own bytes;
    the phone recipe within issue 16's 230 MiB."""
    import json

    manifest = json.loads((exports[recipe] / "gemma_edge.json").read_text())
    assert set(manifest["quantization"]["layers"].values()) <= {INT4, INT8, TABLE_INT4, HEAD_OF_TABLE}
    assert manifest["quantization"]["head_reads_table"]
    size = file_bytes(exports[recipe])
    ideal = ideal_bytes(real[0], manifest["quantization"]["layers"], manifest["export"]["group_size"],
                        manifest["quantization"].get("hot_tokens", {}).get("rows", 0),
                        corrected="head_correction" in manifest["quantization"])
    # the phone recipe's table rounded to nearest, its head corrected; GPTQ's table needs no correction
    assert ("head_correction" in manifest["quantization"]) == (recipe == "phone")
    print(f"gemma-3-270m {recipe} .pte: {size / MIB:.1f} MiB, ideal {ideal / MIB:.1f} MiB (+{size / ideal - 1:.1%})")
    assert ideal < size <= 1.10 * ideal  # measured: phone 209.9 MiB, ideal 205.1; int4 (GPTQ) 164.3, ideal 159.6
    if recipe == "phone":
        assert size <= 230 * MIB  # the head at int8 beside the table: 366 MiB; int8 throughout 423


def test_stock_runner_on_the_real_int4_pte_generates_what_our_runtime_generates(real, exports):
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tokenizer = real[1]
    folder = exports["int4"]
    prompt = "The capital of France is"
    pieces: list[str] = []
    runner = TextLLMRunner(str(folder / PTE_FILE), str(folder / "tokenizer.json"), str(folder / DATA_FILE))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0, num_bos=1),
                    token_callback=pieces.append)
    ours = greedy(ExecuTorchBackend(folder), tokenizer.encode(prompt).ids, 24, stop_ids=[1, 106]).token_ids
    assert "".join(pieces) == tokenizer.decode(ours) and len(ours) == 24
