"""Smoothed inputs for a .pte's quantized layers (exporters/smoothing.py): exact in float32, and closer to
the float model once XNNPACK's per-token 8-bit inputs are quantized. That the program computes what
the eager model with the smoothed weights computes: test_executorch.py's parity tests (their int8
layers, and int4 layers rounded to nearest, are smoothed by default)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, make_checkpoint
from gemma_edge.checkpoints import iter_weights, load_model, resolve
from gemma_edge.errors import ConfigError
from gemma_edge.exporters.calibration import calibration
from gemma_edge.exporters.executorch import build_model
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.smoothing import smoothed_weights

MAX_SEQ_LEN = 64


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.reset_cache()
    with torch.no_grad():
        return model(ids, 0)[0]


@pytest.mark.parametrize("name", TINY)
def test_smoothing_leaves_the_float_model_as_it_was(name, tiny_checkpoints):
    """Every linear weight and the two pre-norms of each layer change, the float model's logits do
    not (to float32 rounding: measured <= 7.7e-6 on logits of a few units)."""
    ckpt = resolve(tiny_checkpoints[name])
    plain = dict(iter_weights(ckpt))
    smoothed = dict(smoothed_weights(iter_weights(ckpt), ckpt.config, calibration(ckpt, None, MAX_SEQ_LEN, 256).ids, 0.5))
    assert smoothed.keys() == plain.keys()
    changed = {n for n in plain if not torch.equal(smoothed[n].float(), plain[n].float())}
    per_layer = {f"{p}.weight" for p in ("attn_norm", "ffn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                                         "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert changed == {f"layers.{i}.{n}" for i in range(ckpt.config.num_hidden_layers) for n in per_layer}
    reference, model = load_model(ckpt, MAX_SEQ_LEN), load_model(ckpt, MAX_SEQ_LEN)
    state = model.state_dict()
    for n, t in smoothed.items():
        state[n].copy_(t)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_smoothing_takes_an_outlier_channel_off_the_8_bit_inputs(quant, tmp_path):
    """A tiny Gemma whose pre-norms scale one channel by 30 (as Gemma's residual outliers do): its
    int8 layers and its int4 layers rounded to nearest (both with 8-bit per-token inputs) are closer
    to the float model smoothed than not, in logits and in KL; the manifest's record names the
    alpha and the text."""
    folder = make_checkpoint("tiny-gemma", tmp_path / "outlier")
    weights = load_file(folder / "model.safetensors")
    for n, t in weights.items():
        if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t[7] = 30.0  # Gemma's norm scales by 1 + w
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt = resolve(folder)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    reference = _logits(load_model(ckpt, MAX_SEQ_LEN), ids)
    errors = {}
    for alpha in (0.0, 0.5):
        model, _ = build_model(ckpt, ExportSettings(format="pte", quant=quant, embedding_quant="none", recipe="rtn",
                                                    max_seq_len=MAX_SEQ_LEN, smooth=alpha))
        got = _logits(model, ids)
        kl = (reference.log_softmax(-1).exp() * (reference.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean()
        errors[alpha] = ((got - reference).abs().mean().item(), kl.item())
        assert getattr(model, "smoothing", None) == ({"alpha": 0.5, **calibration(ckpt, None, MAX_SEQ_LEN, 2048).manifest()}
                                                     if alpha else None)
    print(f"{quant} layers against fp32, mean |logit diff| and KL: {errors[0.0]} unsmoothed, {errors[0.5]} smoothed")
    # measured: int8 mean |diff| 0.075 -> 0.044, KL 0.018 -> 0.0035; int4 (whose 4-bit weights keep
    # most of their own error) 0.335 -> 0.282, KL 0.144 -> 0.100
    bound = {"int8": (0.7, 0.7), "int4": (0.9, 0.8)}[quant]
    assert errors[0.5][0] < bound[0] * errors[0.0][0] and errors[0.5][1] < bound[1] * errors[0.0][1]


def test_smoothing_is_a_pte_setting_for_8_bit_inputs_by_default_where_it_measured_better():
    """By default: a .pte's int8 layers and its int4 layers rounded to nearest; not GPTQ's int4 layers
    (worse on code, measured), not an unresolved auto (for_model resolves it first), not ONNX."""
    from gemma_edge.config import variant

    assert ExportSettings(format="pte", quant="int8").smoothing() == 0.5
    assert ExportSettings(format="pte", quant="int4", recipe="rtn").smoothing() == 0.5
    assert ExportSettings(format="pte", quant="int4", recipe="gptq").smoothing() == 0 == ExportSettings(format="pte").smoothing()
    assert ExportSettings(format="pte").for_model(variant("gemma-2b")).smoothing() == 0.5  # auto rounds to nearest there
    assert ExportSettings(format="pte").for_model(variant("gemma-3-270m")).smoothing() == 0  # auto: GPTQ
    assert ExportSettings(format="pte", quant="int4", recipe="gptq", smooth=0.5).smoothing() == 0.5  # asked for
    assert ExportSettings(format="onnx", quant="int8").smoothing() == 0 == ExportSettings(format="pte", quant="fp32").smoothing()
    assert ExportSettings(format="pte", quant="int8", smooth=0).smoothing() == 0
    with pytest.raises(ConfigError, match="--smooth rescales the inputs of a .pte's quantized layers"):
        ExportSettings(format="onnx", quant="int8", smooth=0.5)
    with pytest.raises(ConfigError, match="--format pte --quant fp32 has none"):
        ExportSettings(format="pte", quant="fp32", smooth=0.5)
    with pytest.raises(ConfigError, match="--smooth is an exponent between 0 and 1"):
        ExportSettings(format="pte", quant="int8", smooth=1.5)
