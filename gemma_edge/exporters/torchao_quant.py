"""Weight quantization for ExecuTorch's XNNPACK kernels, with torchao.

- int4: 4-bit groupwise weights with dynamic 8-bit activations (8da4w), scales in bf16 as
  XNNPACK's blockwise kernels store them (so the eager model computes what the device computes).
- int8: 8-bit per-channel weights with dynamic 8-bit activations (8da8w). Weight-only linears
  would lower to torchao::dequantize_affine, which XNNPACK does not take: fp32-sized files.
- Embeddings: weight-only int8 per row or int4 groupwise; ExecuTorch's quant-fusion pass turns
  them into its quantized embedding kernels.

A linear whose input width is not a multiple of the group size keeps 8-bit per-channel weights
(never a silently truncated group); every layer's scheme is returned for the manifest.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.model import Gemma

INT4 = "int4 groupwise, int8 dynamic activations"
INT8 = "int8 per channel, int8 dynamic activations"


def untie_output_projection(model: Gemma) -> Gemma:
    """Give the output projection its own weight (a copy of the embedding), so the embedding can be
    quantized as a table and the projection as a linear layer."""
    if model.lm_head is None:
        weight = model.embed_tokens.weight
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        model.lm_head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return model


def linear_plan(model: nn.Module, settings: ExportSettings) -> dict[str, str]:
    """Which scheme each linear layer gets."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and settings.quant != "fp32":
            fits = module.in_features % settings.group_size == 0
            plan[name] = INT4 if settings.quant == "int4" and fits else INT8
    return plan


def quantize_for_xnnpack(model: Gemma, settings: ExportSettings) -> dict[str, str]:
    """Quantize in place; returns {layer: scheme} for every quantized layer."""
    from torchao.quantization import (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis,
                                      PerGroup, quantize_)

    if settings.quant == "fp32" and settings.embedding_quant == "none":
        return {}
    untie_output_projection(model)
    plan = linear_plan(model, settings)
    configs = {
        INT4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(settings.group_size),
                                                    weight_scale_dtype=torch.bfloat16),
        INT8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
    }
    for scheme, config in configs.items():
        quantize_(model, config, filter_fn=lambda m, fqn, s=scheme: plan.get(fqn) == s)
    if settings.embedding_quant != "none":
        hidden = model.config.hidden_size
        int4 = settings.embedding_quant == "int4" and hidden % settings.group_size == 0
        config = (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(settings.group_size))
                  if int4 else IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        plan["embed_tokens"] = "int4 groupwise (weight only)" if int4 else "int8 per row (weight only)"
    return plan
