"""Weight quantization for ExecuTorch's XNNPACK kernels, with torchao.

- int4: 4-bit groupwise weights with dynamic 8-bit activations (8da4w), scales in bf16 as
  XNNPACK's blockwise kernels store them (so the eager model computes what the device computes).
- int8: 8-bit per-channel weights with dynamic 8-bit activations (8da8w). Weight-only linears
  would lower to torchao::dequantize_affine, which XNNPACK does not take: fp32-sized files.
- Embeddings: weight-only int8 per row or int4 groupwise; ExecuTorch's quant-fusion pass turns
  them into its quantized embedding kernels.
- The int4 table and an int4 output projection take each group's scale from the clipping of its
  range with the least squared error (searched), as the ONNX table does; the decoder's layers keep
  the full range. Measured on the real Gemma 3 270M, eager with the program's weights (perplexity
  ratio on 3 x 256 tokens of two texts, the Python manual and transformers' README), all-int4: full
  ranges x1.890 / x3.003; table and head searched x1.828 / x2.640 (this); the table asymmetric as
  well (zero points, which ExecuTorch's embedding kernels take) x1.742 / x2.485, but the file grew
  from 249 to 269 MiB, more than its int8 zero points' 5 MiB (not yet found why), so not yet; with
  the decoder's layers searched too x1.694 / x2.726 (no clear gain). int8 layers with an int4 table
  (the head int8): x1.062 / x1.186 (x1.059 / x1.117 with the table asymmetric).

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
INT4_CLIPPED = INT4 + ", clipped groups"
TABLE_INT4 = "int4 groupwise, clipped groups (weight only)"
NEAREST = (1.0,)  # each group on its full range (torchao's own choice of scale)


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
    """Which scheme each linear layer gets: --quant's. A tied output projection does not follow an
    int4 table under int8 layers (as it does in ONNX exports): XNNPACK's 4-bit kernels are
    symmetric, and on the real 270M the head at symmetric int4 (clipped) measured x1.166 / x1.176
    against x1.059 / x1.117 at int8 (module docstring's texts), x1.303 on verify's, for 311 against
    about 380 MiB."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and settings.quant != "fp32":
            fits = module.in_features % settings.group_size == 0
            plan[name] = (INT4_CLIPPED if name == "lm_head" else INT4) if settings.quant == "int4" and fits else INT8
    return plan


def quantization_targets(model: Gemma, settings: ExportSettings, tied: bool) -> tuple[list[Target], dict[str, str]]:
    """On the allocated, not yet filled model (untied, see untie_output_projection): one streaming
    Target per layer to quantize, which quantizes the layer in place as soon as its weight has been
    read (fill_layers copies it in first), so that only one layer is ever in float32. A tied output
    projection is quantized from the embedding's weight. A quantized layer's float32 weight is never
    written (its pages are never touched) and is freed when the quantized one replaces it. Returns the
    targets and {layer: scheme}."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup

    from gemma_edge.exporters.onnx_quant import CLIPS

    plan = linear_plan(model, settings)
    configs = {
        INT4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(settings.group_size),
                                                    weight_scale_dtype=torch.bfloat16),
        INT8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
    }
    configs[INT4_CLIPPED] = configs[INT4]

    def quantize(module: nn.Module, config, clips: tuple[float, ...] = NEAREST):
        return lambda weight: quantize_rows(module, weight, config, clips=clips)

    targets = []
    if tied and "lm_head" not in plan:  # a float head beside a quantized table
        targets.append(Target(("embed_tokens.weight",), model.lm_head.weight.copy_))
    for name, scheme in plan.items():
        source = "embed_tokens.weight" if name == "lm_head" and tied else f"{name}.weight"
        clips = CLIPS if scheme == INT4_CLIPPED else NEAREST
        targets.append(Target((source,), quantize(model.get_submodule(name), configs[scheme], clips)))
    if settings.embedding_quant != "none":
        hidden = model.config.hidden_size
        int4 = settings.embedding_quant == "int4" and hidden % settings.group_size == 0
        config = (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(settings.group_size))
                  if int4 else IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
        targets.append(Target(("embed_tokens.weight",), quantize(model.embed_tokens, config, CLIPS if int4 else NEAREST)))
        plan["embed_tokens"] = TABLE_INT4 if int4 else "int8 per row (weight only)"
    return targets, plan


def quantize_rows(module: nn.Module, weight: torch.Tensor, config, elements: int = 1 << 24,
                  clips: tuple[float, ...] = NEAREST) -> None:
    """Set module.weight to weight quantized with config (torchao's quantize_), a block of rows (of
    about `elements` weights) at a time: every scheme here is per row or per group of a row, so blocks quantize exactly as the
    whole matrix would, and the float32 working copies torchao makes are of one block (quantizing a
    262k-row embedding at once takes several copies of it: 12 GiB at Gemma 2B's size). The blocks'
    tensors (torchao's quantized tensor subclass) are joined into one of the same kind. clips: each
    group on the clipping of its range with the least squared error (searched), else the full range."""
    from torchao.quantization import quantize_

    parts = []
    for block in weight.split(max(1, elements // weight.shape[1])):
        block = block.float()  # a checkpoint's bf16 rows, in float32 one block at a time
        if len(clips) > 1:
            parts.append(searched(block, config, clips))
            continue
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


def searched(weight: torch.Tensor, config, clips: tuple[float, ...]):
    """weight [rows, cols] float32 quantized as config does (torchao's IntxUnpackedToInt8Tensor: the
    same symmetric grid, -8..7 for 4 bits, scale dtype and activation quantization), but with each
    group's scale chosen among the clippings of its range (scale = clip * max|w| / 7.5) for the least
    squared error, where torchao takes the full range; the error is measured with the scale rounded
    to its dtype (bfloat16 for 8da4w), since that is the scale the device uses."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    dynamic = isinstance(config, Int8DynamicActivationIntxWeightConfig)
    group = (config.weight_granularity if dynamic else config.granularity).group_size
    scale_dtype = (config.weight_scale_dtype if dynamic else config.scale_dtype) or torch.float32
    half = 1 << ((4 if config.weight_dtype == torch.int4 else 8) - 1)
    rows, cols = weight.shape
    blocks = weight.view(rows, cols // group, group)
    amax = blocks.abs().amax(-1)
    best = torch.full_like(amax, float("inf"))
    scale = torch.empty_like(amax)
    for c in clips:
        s = (amax * c / (half - 0.5)).clamp(min=torch.finfo(torch.float32).eps).to(scale_dtype)
        inverse = (1.0 / s).float()[..., None]  # torchao rounds by input * (1 / scale), the reciprocal in the scale's dtype
        s = s.float()
        x = (blocks * inverse).round_().clamp_(-half, half - 1).mul_(s[..., None]).sub_(blocks).square_()
        err = x.sum(-1)
        better = err < best
        best, scale = torch.where(better, err, best), torch.where(better, s, scale)
    # The values are rounded with the scales in their own dtype, as torchao does when it converts a
    # scale to bfloat16 (_adjust_scale_dtype_in_intx_unpacked_tensor): the same values for the same scale.
    return IntxUnpackedToInt8Tensor.from_hp(
        weight, (1, group), config.weight_dtype, intx_choose_qparams_algorithm=None,
        activation_quantization="int8_asym_per_token" if dynamic else None,
        custom_scale=scale.to(scale_dtype), custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))
