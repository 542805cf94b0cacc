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
from gemma_edge.exporters.streaming import Target
from gemma_edge.model import Gemma

INT4 = "int4 groupwise, int8 dynamic activations"
INT8 = "int8 per channel, int8 dynamic activations"


def untie_output_projection(model: Gemma) -> Gemma:
    """Give the output projection its own weight (a copy of the embedding), so the embedding can be
    quantized as a table and the projection as a linear layer. On the meta device: its own
    (empty) weight, for fill_layers to fill."""
    if model.lm_head is None:
        weight = model.embed_tokens.weight
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
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


def quantization_targets(model: Gemma, settings: ExportSettings, tied: bool) -> tuple[list[Target], dict[str, str]]:
    """On the allocated, not yet filled model (untied, see untie_output_projection): one streaming
    Target per layer to quantize, which quantizes the layer in place as soon as its weight has been
    read (fill_layers copies it in first), so that only one layer is ever in float32. A tied output
    projection is quantized from the embedding's weight. A quantized layer's float32 weight is never
    written (its pages are never touched) and is freed when the quantized one replaces it. Returns the
    targets and {layer: scheme}."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup

    plan = linear_plan(model, settings)
    configs = {
        INT4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(settings.group_size),
                                                    weight_scale_dtype=torch.bfloat16),
        INT8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
    }

    def quantize(module: nn.Module, config):
        return lambda weight: quantize_rows(module, weight, config)

    targets = []
    if tied and "lm_head" not in plan:  # a float head beside a quantized table
        targets.append(Target(("embed_tokens.weight",), model.lm_head.weight.copy_))
    for name, scheme in plan.items():
        source = "embed_tokens.weight" if name == "lm_head" and tied else f"{name}.weight"
        targets.append(Target((source,), quantize(model.get_submodule(name), configs[scheme])))
    if settings.embedding_quant != "none":
        hidden = model.config.hidden_size
        int4 = settings.embedding_quant == "int4" and hidden % settings.group_size == 0
        config = (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(settings.group_size))
                  if int4 else IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
        targets.append(Target(("embed_tokens.weight",), quantize(model.embed_tokens, config)))
        plan["embed_tokens"] = "int4 groupwise (weight only)" if int4 else "int8 per row (weight only)"
    return targets, plan


def quantize_rows(module: nn.Module, weight: torch.Tensor, config, elements: int = 1 << 24) -> None:
    """Set module.weight to weight quantized with config (torchao's quantize_), a block of rows (of
    about `elements` weights) at a time: every scheme here is per row or per group of a row, so blocks quantize exactly as the
    whole matrix would, and the float32 working copies torchao makes are of one block (quantizing a
    262k-row embedding at once takes several copies of it: 12 GiB at Gemma 2B's size). The blocks'
    tensors (torchao's quantized tensor subclass) are joined into one of the same kind."""
    from torchao.quantization import quantize_

    parts = []
    for block in weight.split(max(1, elements // weight.shape[1])):
        block = block.float()  # a checkpoint's bf16 rows, in float32 one block at a time
        holder = (nn.Embedding(*block.shape, device="meta") if isinstance(module, nn.Embedding)
                  else nn.Linear(block.shape[1], block.shape[0], bias=False, device="meta"))
        holder.weight = nn.Parameter(block, requires_grad=False)
        quantize_(holder, config, filter_fn=lambda m, fqn: m is holder)
        parts.append(holder.weight.detach())
        # quantize_ leaves the holder in a reference cycle (it binds extra_repr to it), which only
        # the garbage collector frees, whenever it next runs: without this, the holders' blocks
        # outlived the join (about half the quantized model again, measured at Gemma 2B's width).
        holder.weight = None
    first = parts[0]
    if len(parts) > 1:
        kind = type(first)
        data = [torch.cat([getattr(p, name) for p in parts]) for name in kind.tensor_data_names]
        first = kind(*data, *[getattr(first, name) for name in kind.tensor_attribute_names])
    module.weight = nn.Parameter(first, requires_grad=False)
