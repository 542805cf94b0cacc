"""The linear layers an int4 export keeps at 8 bits (--int8-layers; an ONNX export's default: the
keys' and values' projections): which layers, in both formats' plans, and an ONNX graph that fuses
only layers of one precision. That the programs compute what the eager model with the same weights
computes: the int4 parity tests of test_onnx.py (ONNX int4 exports keep k and v 8-bit by default)
and, for a .pte plan of both kinds, test_executorch.py's tiny-gemma2 int4 (its down_proj, 200
inputs, no multiple of XNNPACK's 4-bit groups, is int8). What it buys on the real model:
test_real_calibration.py and test_real_onnx.py."""

from __future__ import annotations

import pytest
import torch

from gemma_edge.cli import build_parser
from gemma_edge.config import variant
from gemma_edge.errors import ConfigError
from gemma_edge.exporters.memory import PER_WEIGHT, weight_bytes
from gemma_edge.exporters.onnx import layer_quant
from gemma_edge.exporters.onnx_contrib import use_ops
from gemma_edge.exporters.onnx_quant import replace_weights_with_block_quantized
from gemma_edge.exporters.settings import INT8_LAYERS, ExportSettings
from gemma_edge.exporters.torchao_quant import INT4, INT8, quantization_plan, untie_output_projection
from gemma_edge.model import Gemma


def test_int4_exports_keep_the_keys_and_values_8_bit_unless_told():
    for fmt in ("onnx", "pte"):
        assert ExportSettings(format=fmt).eight_bit_layers() == frozenset(INT8_LAYERS) == {"k_proj", "v_proj"}
    assert ExportSettings(format="pte", int8_layers=()).eight_bit_layers() == frozenset()
    assert ExportSettings(format="pte", int8_layers=["down_proj"]).int8_layers == ("down_proj",)  # from a manifest's JSON
    for quant in ("int8", "fp32"):
        assert ExportSettings(format="onnx", quant=quant).eight_bit_layers() == frozenset()
        assert ExportSettings(format="onnx", quant=quant).layer_quant("layers.0.attn.k_proj.weight") == quant
    settings = ExportSettings(format="onnx")
    assert [settings.layer_quant(n) for n in ("layers.3.attn.v_proj.weight", "layers.3.attn.q_proj", "v_proj", "lm_head")] \
        == ["int8", "int4", "int8", "int4"]
    assert ExportSettings(format="pte").layer_quant("layers.0.attn.k_proj.weight") == "int8"
    assert ExportSettings(format="pte", int8_layers=("down_proj",)).layer_quant("layers.0.attn.k_proj.weight") == "int4"
    with pytest.raises(ConfigError, match="unknown --int8-layers kind 'kv'; valid: q_proj, k_proj, v_proj"):
        ExportSettings(format="onnx", int8_layers=("kv",))
    with pytest.raises(ConfigError, match="--quant int8 has all of them at 8 bits: leave it out"):
        ExportSettings(format="pte", quant="int8", int8_layers=("k_proj",))
    assert ExportSettings(format="pte", quant="int8", int8_layers=()).eight_bit_layers() == frozenset()
    parse = build_parser().parse_args
    assert parse(["export", "m", "-o", "x", "--int8-layers", "none"]).int8_layers == ()
    assert parse(["export", "m", "-o", "x", "--int8-layers", "v_proj, down_proj"]).int8_layers == ("v_proj", "down_proj")
    assert parse(["export", "m", "-o", "x"]).int8_layers is None


@pytest.mark.parametrize("name", ["tiny-gemma2", "gemma-3-270m", "tiny-gemma"])
def test_both_formats_plan_the_8_bit_kinds_and_onnx_fuses_only_layers_of_one_precision(name):
    config = variant(name)
    for kinds, q, kv in ((INT8_LAYERS, "4-bit", "8-bit"), ((), "4-bit", "4-bit"), (("q_proj", "k_proj", "v_proj"), "8-bit", "8-bit")):
        for fmt in ("pte", "onnx"):
            settings = ExportSettings(format=fmt, quant="int4", int8_layers=kinds)
            with torch.device("meta"):
                model = Gemma(config, 64)
                if fmt == "pte":
                    plan = quantization_plan(untie_output_projection(model), settings, tied=True)
                    scheme = {"4-bit": INT4, "8-bit": INT8}
                    assert plan["layers.0.attn.q_proj"] == scheme[q] and plan["layers.1.attn.k_proj"] == scheme[kv]
                    assert plan["layers.1.attn.v_proj"] == scheme[kv] and plan["layers.0.attn.o_proj"] == INT4
                    continue
                ops = "contrib" if config.head_dim % 16 == 0 else "standard"
                model = use_ops(model, ops, layer_quant(settings))
                plan = replace_weights_with_block_quantized(model, "int4", "int4", 32 if config.hidden_size % 32 == 0 else 16,
                                                            layer_quant=layer_quant(settings))
            attn = "layers.1.attn."
            if ops == "standard":  # nothing fused
                assert plan[attn + "q_proj"].startswith(f"MatMulNBits {q}") and plan[attn + "v_proj"].startswith(f"MatMulNBits {kv}")
            elif q == kv:  # one product for the three
                assert plan[attn + "qkv_proj"].startswith(f"MatMulNBits {q}") and attn + "kv_proj" not in plan
            else:  # q's own, and one for k and v
                assert plan[attn + "q_proj"].startswith(f"MatMulNBits {q}") and plan[attn + "kv_proj"].startswith(f"MatMulNBits {kv}")
                assert attn + "qkv_proj" not in plan
            assert plan["layers.1.mlp.down_proj"].startswith("MatMulNBits 4-bit")


def test_the_memory_estimate_counts_the_8_bit_layers():
    config = variant("gemma-7b")  # multi-head: k and v as large as q
    kv = 2 * config.num_key_value_heads * config.head_dim * config.hidden_size * config.num_hidden_layers
    for fmt in ("pte", "onnx"):
        every = weight_bytes(config, ExportSettings(format=fmt, int8_layers=()))
        kept = weight_bytes(config, ExportSettings(format=fmt, int8_layers=INT8_LAYERS))
        more = PER_WEIGHT[(fmt, "int8")](32) - PER_WEIGHT[(fmt, "int4")](32)
        assert kept - every == pytest.approx(kv * more, rel=1e-6)
