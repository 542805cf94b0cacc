"""Smoothed inputs for a .pte's quantized layers (SmoothQuant): the checkpoint's weight stream with each
decoder layer's linear inputs rescaled per channel, exactly in float32, where they are made.

XNNPACK quantizes a linear layer's input to 8 bits per token at run time (int8 dynamic activations),
one scale for the whole row, and a few channels of Gemma's activations are tens of times larger than
the rest: they set the row's scale, and the other channels keep a few levels each. For each input
channel j, with s_j = max|x_j| ^ alpha / max_i |W_ij| ^ (1 - alpha) measured on a calibration text:

    W[:, j] * s_j, the input's channel j / s_j      (x / s) @ (W s)^T = x @ W^T

and the division is folded into what makes the input:

    q, k, v     attn_norm(x): its scale 1 + w becomes (1 + w) / s     (Gemma's norm scales by 1 + w)
    gate, up    ffn_norm(x): likewise
    down        gelu(gate) * up: up's rows / s
    o           attention's output, each head a mix of v's rows: v's rows / s, one s for the query
                heads that read a kv head

Per-channel int8 weights (XNNPACK's) take the larger columns with little loss: a row's scale grows
by what its largest column grew. Measured on the real Gemma 3 270M, int8 layers with the hot-rows
int4 table (eager, the Python manual / transformers' modeling_gemma.py, 512 tokens each, KL against
fp32): 0.038 / 0.111 without, 0.024 / 0.081 with alpha 0.5 (0.7: 0.023 / 0.081; 0.85: 0.024 /
0.113); the int8 layers alone 0.021 / 0.048 -> 0.009 / 0.030. XNNPACK's int4 layers (8da4w) take
8-bit per-token inputs too: all-int4 rounded to nearest x1.347 / x2.000 (KL 0.254 / 0.681) -> x1.174
/ x1.605 (0.170 / 0.508) at alpha 0.5, though each column's scale also moves its 4-bit group's
rounding; under GPTQ x1.067 / x1.329 -> x1.031 / x1.454 (better on prose, worse on code: not by
default, settings.smoothing). ONNX Runtime's layers quantize their input per block of 32
(MatMulNBits, accuracy level 4), which no outlier rules: not smoothed.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch

from gemma_edge.config import GemmaConfig

TOKENS = 2048  # calibration tokens: the channels' maxima settle well before (4096: the same choices)


def smoothed_weights(weights: Iterable[tuple[str, torch.Tensor]], config: GemmaConfig, ids: torch.Tensor,
                     alpha: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream (checkpoints.iter_weights' order: the embedding first, then layer by layer)
    with each decoder layer smoothed (smooth_layer) on the calibration chunks ids [chunks, tokens],
    run through the float32 layers one at a time; the changed tensors in float32."""
    from gemma_edge.exporters.calibration import embed_chunks, layer_index

    stream = iter(weights)
    name, table = next(stream)
    if name != "embed_tokens.weight":
        raise RuntimeError(f"smoothing needs the embedding first in the weight stream, got {name}")
    x = embed_chunks(ids, table, config)
    yield name, table
    del table
    for index, group in itertools.groupby(stream, key=lambda item: layer_index(item[0])):
        tensors = dict(group)
        if index is not None:
            tensors, x = smooth_layer(index, tensors, x, config, alpha)
        yield from tensors.items()


@torch.no_grad()
def smooth_layer(index: int, tensors: dict[str, torch.Tensor], x: torch.Tensor, config: GemmaConfig,
                 alpha: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Decoder layer `index`'s tensors (full names) smoothed, and its output on x [chunks, tokens,
    hidden] (the layer's function is unchanged: computed before smoothing)."""
    from gemma_edge.exporters.calibration import build_layer, run_layer

    p = f"layers.{index}."
    layer = build_layer(index, tensors, config, x.shape[1])
    inputs = {"q_proj": layer.attn.q_proj, "o_proj": layer.attn.o_proj, "gate_proj": layer.mlp.gate_proj,
              "down_proj": layer.mlp.down_proj}
    peak = {}

    def record(name: str):
        def hook(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            peak[name] = torch.maximum(peak[name], a) if name in peak else a
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in inputs.items()]
    out = run_layer(layer, x, config)
    for h in handles:
        h.remove()
    w = {n: tensors[p + n + ".weight"].float() for n in
         ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    smoothed = dict(tensors)

    def scales(x_peak: torch.Tensor, *read_by: torch.Tensor) -> torch.Tensor:
        return smoothing_scales(x_peak, torch.stack([m.abs().amax(0) for m in read_by]).amax(0), alpha)

    def norm_over(name: str, s: torch.Tensor) -> None:
        smoothed[p + name + ".weight"] = (1 + tensors[p + name + ".weight"].float()) / s - 1

    s = scales(peak["q_proj"], w["attn.q_proj"], w["attn.k_proj"], w["attn.v_proj"])
    norm_over("attn_norm", s)
    for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        w[n] = w[n] * s
    s = scales(peak["gate_proj"], w["mlp.gate_proj"], w["mlp.up_proj"])
    norm_over("ffn_norm", s)
    for n in ("mlp.gate_proj", "mlp.up_proj"):
        w[n] = w[n] * s
    s = scales(peak["down_proj"], w["mlp.down_proj"])
    w["mlp.up_proj"] = w["mlp.up_proj"] / s[:, None]
    w["mlp.down_proj"] = w["mlp.down_proj"] * s
    # o's input: [heads * head_dim], head h a mix of kv head h // groups's v rows
    kv, d = config.num_key_value_heads, config.head_dim
    groups = config.num_attention_heads // kv
    s = smoothing_scales(peak["o_proj"].view(kv, groups, d).amax(1),  # [kv, d]: over the heads reading each
                         w["attn.o_proj"].abs().amax(0).view(kv, groups, d).amax(1), alpha).flatten()
    w["attn.v_proj"] = w["attn.v_proj"] / s[:, None]
    w["attn.o_proj"] = w["attn.o_proj"] * s.view(kv, 1, d).expand(kv, groups, d).flatten()
    smoothed.update({p + n + ".weight": t for n, t in w.items()})
    return smoothed, out


def smoothing_scales(x_peak: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x| ^ alpha / max|W| ^ (1 - alpha) per input channel (SmoothQuant's), kept off zero."""
    return (x_peak.clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
