"""Weight quantization for ExecuTorch's XNNPACK kernels, with torchao.

- int4: 4-bit groupwise weights with dynamic 8-bit activations (8da4w), scales in bf16 as
  XNNPACK's blockwise kernels store them (so the eager model computes what the device computes).
  XNNPACK's 4-bit grid is symmetric; each group also gets an offset, added back by a small second
  product (int4_offsets.py), so the blocks are asymmetric as ONNX's are.
- int8: 8-bit per-channel weights with dynamic 8-bit activations (8da8w). Weight-only linears
  would lower to torchao::dequantize_affine, which XNNPACK does not take: fp32-sized files.
- Embeddings: weight-only int8 per row, or int4 groupwise with an int8 table of offsets;
  ExecuTorch's quant-fusion pass turns them into its quantized embedding kernels.
- Every int4 group takes its scale (and offset) from the clipping of its range with the least
  squared error (searched), as the ONNX table does. Measured on the real Gemma 3 270M .pte,
  all-int4, perplexity ratio on 512 tokens of the Python manual / of transformers'
  modeling_gemma.py: symmetric groups (the table and the head clipped) x1.884 / x3.245; with
  offsets, every group clipped, x1.435 / x1.242 (eager: x1.455 / x1.255; the layers on their full
  ranges instead: x1.445 / x1.541). int8 layers with an int4 table, the head int8 (eager): x1.062
  on the manual with a symmetric table, x1.033 / x1.015 with offsets.

A tied output projection reads the quantized table's own values (int8 rows, or int4 groups with
their offsets) as a linear layer, and the program stores them once (executorch.py keeps the weights
in model.ptd, whose store keeps one copy of identical bytes). XNNPACK packs 4-bit weights with
the even column in the low half of each byte, ExecuTorch's 4-bit embedding in the high half: the
projection holds the table's columns with each pair swapped, and swaps its input's pairs to match.

A linear whose input width is not a multiple of the group size keeps 8-bit per-channel weights
(never a silently truncated group); every layer's scheme is returned for the manifest.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from gemma_edge.exporters.gptq import take_grid
from gemma_edge.exporters.int4_offsets import (OffsetEmbedding, OffsetGrid, OffsetLinear,
                                               offsets_and_scales, replace_with_offset_layers)
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.streaming import Target
from gemma_edge.model import Gemma

INT4 = "int4 groupwise with offsets, clipped groups, int8 dynamic activations"
INT8 = "int8 per channel, int8 dynamic activations"
TABLE_INT4 = "int4 groupwise with offsets, clipped groups (weight only)"
TABLE_INT8 = "int8 per row (weight only)"
HEAD_OF_TABLE = "the embedding table's own weights, int8 dynamic activations (stored once, with the table)"
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


def quantization_plan(model: Gemma, settings: ExportSettings, tied: bool) -> dict[str, str]:
    """{layer: scheme} for the (untied) model: --quant's for each linear layer (int8 for the kinds
    settings.eight_bit_layers() keeps), --embedding-quant's for the table; a tied output projection
    reads the quantized table (HEAD_OF_TABLE), as in ONNX exports. Real 270M, int8 layers, int4 table, perplexity ratio on the Python manual /
    modeling_gemma.py: the head at int8 of its own x1.033 / x1.015 (eager) in about 366 MiB; the
    head reading the table x1.118 / x1.126 (the .pte) in 197 MiB; with its worst columns corrected
    (head_correction.py, which build_model applies) x1.048 / x1.121 in 206 MiB."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and settings.quant != "fp32":
            fits = module.in_features % settings.group_size == 0
            plan[name] = INT4 if settings.layer_quant(name) == "int4" and fits else INT8
    if settings.embedding_quant != "none":
        int4 = settings.embedding_quant == "int4" and model.config.hidden_size % settings.group_size == 0
        plan["embed_tokens"] = TABLE_INT4 if int4 else TABLE_INT8
        if tied:
            plan["lm_head"] = HEAD_OF_TABLE
    return plan


def replace_with_quantized_layers(model: Gemma, plan: dict[str, str], settings: ExportSettings) -> Gemma:
    """On the meta device: the int4 layers of plan become their offset forms (int4_offsets.py), a
    head that reads an int4 table too (its column pairs swapped, see the module's docstring)."""
    offsets = [n for n, s in plan.items() if s in (INT4, TABLE_INT4)]
    swapped = ["lm_head"] if plan.get("lm_head") == HEAD_OF_TABLE and plan["embed_tokens"] == TABLE_INT4 else []
    return replace_with_offset_layers(model, offsets + swapped, settings.group_size, pairs_swapped=swapped)


def quantization_targets(model: Gemma, plan: dict[str, str], settings: ExportSettings, tied: bool,
                         grids: dict[str, OffsetGrid] | None = None) -> list[Target]:
    """On the allocated, not yet filled model (untied and rewritten, see untie_output_projection and
    replace_with_quantized_layers): one streaming Target per layer of plan, which quantizes the layer
    in place as soon as its weight has been read (fill_layers copies it in first), so that only one
    layer is ever in float32; a calibrated layer on the grid `grids` holds for its weight by then. A
    tied output projection is quantized from the embedding's weight. A quantized layer's float32
    weight is never written (its pages are never touched) and is freed when the quantized one
    replaces it."""
    from gemma_edge.exporters.onnx_quant import CLIPS

    grids = {} if grids is None else grids
    configs = torchao_configs(settings.group_size)
    # The offsets of an int4 layer: 8-bit per row, as the int8 layers of its kind.
    offsets = {INT4: configs[INT8], TABLE_INT4: configs[TABLE_INT8]}

    def quantize(name: str, scheme: str):
        module = model.get_submodule(name)
        if scheme == HEAD_OF_TABLE:  # after the table (the last targets of its source)
            return lambda weight: read_table_as_linear(module, model.embed_tokens)
        if scheme in offsets:
            return lambda weight: quantize_with_offsets(module, weight, configs[scheme], offsets[scheme], CLIPS,
                                                        grid=take_grid(grids, f"{name}.weight"))
        return lambda weight: quantize_rows(module, weight, configs[scheme])

    targets = []
    if tied and "lm_head" not in plan:  # a float head beside a quantized table
        targets.append(Target(("embed_tokens.weight",), model.lm_head.weight.copy_))
    for name, scheme in sorted(plan.items(), key=lambda item: item[1] == HEAD_OF_TABLE):
        source = "embed_tokens.weight" if name == "lm_head" and tied else f"{name}.weight"
        targets.append(Target((source,), quantize(name, scheme)))
    return targets


def torchao_configs(group: int) -> dict:
    """{scheme: torchao config} for each scheme of quantization_plan but the head reading the table."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerAxis, PerGroup

    return {
        INT4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group),
                                                    weight_scale_dtype=torch.bfloat16),
        INT8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        # bf16 scales as the head's (XNNPACK's): the table's group scales are then the head's bytes too
        TABLE_INT4: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group), scale_dtype=torch.bfloat16),
        TABLE_INT8: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
    }


def int4_layer_grid(group: int):
    """(name, float32 weight) -> the grid quantize_with_offsets puts an int4 layer's weight (or the
    int4 table's) on, for GPTQ."""
    from gemma_edge.exporters.onnx_quant import CLIPS

    configs = torchao_configs(group)

    def choose(name: str, weight: torch.Tensor) -> OffsetGrid:
        table = name == "embed_tokens.weight"
        return offset_grid(weight, group, CLIPS, configs[TABLE_INT4 if table else INT4], configs[TABLE_INT8 if table else INT8])
    return choose


def quantize_rows(module: nn.Module, weight: torch.Tensor, config, elements: int = 1 << 24) -> None:
    """Set module.weight to weight quantized with config (torchao's quantize_), a block of rows (of
    about `elements` weights) at a time: every scheme here is per row or per group of a row, so
    blocks quantize exactly as the whole matrix would, and the float32 working copies torchao makes
    are of one block (quantizing a 262k-row embedding at once takes several copies of it: 12 GiB at
    Gemma 2B's size). The blocks' tensors (torchao's quantized tensor subclass) are joined into one
    of the same kind."""
    from torchao.quantization import quantize_

    def blocks():
        for block in weight.split(block_rows(weight, elements)):
            block = block.float()  # a checkpoint's bf16 rows, in float32 one block at a time
            holder = (nn.Embedding(*block.shape, device="meta") if isinstance(module, nn.Embedding)
                      else nn.Linear(block.shape[1], block.shape[0], bias=False, device="meta"))
            holder.weight = nn.Parameter(block, requires_grad=False)
            quantize_(holder, config, filter_fn=lambda m, fqn: m is holder)
            part = holder.weight.detach()
            # quantize_ leaves the holder in a reference cycle (it binds extra_repr to it), which only
            # the garbage collector frees, whenever it next runs: without this, the holders' blocks
            # outlived the join (about half the quantized model again, measured at Gemma 2B's width).
            holder.weight = None
            yield part

    module.weight = nn.Parameter(joined(blocks(), weight.shape[0]), requires_grad=False)


def quantize_with_offsets(module: OffsetLinear | OffsetEmbedding, weight: torch.Tensor, config, offsets_config,
                          clips: tuple[float, ...], elements: int = 1 << 24, grid: OffsetGrid | None = None) -> None:
    """Fill an offset layer (int4_offsets.py) from its float weight [rows, cols], on its own grid
    (offset_grid) or the one given (a calibrated layer's): the offsets quantized (offsets_config:
    int8 per row) first, then the 4-bit values of the weight less the offsets as the device adds
    them back, on the same symmetric grid and scale dtype torchao's config has (torchao's
    IntxUnpackedToInt8Tensor, a block of rows at a time, as quantize_rows)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    dynamic = isinstance(config, Int8DynamicActivationIntxWeightConfig)
    scale_dtype = scale_dtype_of(config)
    group, rows = module.group_size, block_rows(weight, elements)
    if grid is None:
        grid = offset_grid(weight, group, clips, config, offsets_config, elements)
    quantize_rows(module.offsets, grid.raw_offset, offsets_config)
    added = module.offsets.weight.dequantize().split(rows)  # the offsets the device adds, [rows, groups]
    def blocks():
        for block, scale, offset in zip(weight.split(rows), grid.scale.split(rows), added):
            rest = block.float() - offset.repeat_interleave(group, dim=1)
            # torchao rounds by rest * (1 / scale), the reciprocal in the scale's dtype, as it does when it
            # converts a scale to bfloat16 (_adjust_scale_dtype_in_intx_unpacked_tensor).
            part = IntxUnpackedToInt8Tensor.from_hp(
                rest, (1, group), config.weight_dtype, intx_choose_qparams_algorithm=None,
                activation_quantization="int8_asym_per_token" if dynamic else None,
                custom_scale=scale, custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))
            # A table's rows come out in its scales' dtype (OffsetEmbedding then adds the float32
            # offsets): the embedding kernel ExecuTorch's quant fusion picks for a float32 output
            # (embedding_4bit.out) reads its scales as float32, and bf16 ones came out as 1e30; with
            # a bf16 output it reads them as they are.
            yield with_attributes(part, dtype=scale_dtype) if isinstance(module, OffsetEmbedding) else part

    module.weight = nn.Parameter(joined(blocks(), weight.shape[0]), requires_grad=False)
    if isinstance(module, OffsetLinear):
        module.ones = torch.ones(1, group)


def offset_grid(weight: torch.Tensor, group: int, clips: tuple[float, ...], config, offsets_config,
                elements: int = 1 << 24) -> OffsetGrid:
    """The grid quantize_with_offsets rounds weight [rows, cols] onto: each group's scale and offset
    from the clipping of its range with the least squared error (offsets_and_scales), the offsets
    then rounded to int8 per row (offsets_config) as the device stores them."""
    rows = block_rows(weight, elements)
    searched = [offsets_and_scales(block.float(), group, clips, scale_dtype_of(config)) for block in weight.split(rows)]
    scale, raw = (torch.cat(parts) for parts in zip(*searched))
    holder = nn.Linear(raw.shape[1], raw.shape[0], bias=False, device="meta")
    quantize_rows(holder, raw, offsets_config)
    return OffsetGrid(scale, holder.weight.dequantize(), raw, group)


def scale_dtype_of(config) -> torch.dtype:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig

    dynamic = isinstance(config, Int8DynamicActivationIntxWeightConfig)
    return (config.weight_scale_dtype if dynamic else config.scale_dtype) or torch.float32


def read_table_as_linear(head: nn.Linear | OffsetLinear, table: nn.Embedding | OffsetEmbedding) -> None:
    """Give a tied head the quantized table's values, as a linear layer with int8 dynamic activations:
    the same 8-bit rows, or the same 4-bit groups (their column pairs swapped: head.pairs_swapped)
    with the same offsets, so that the program's two copies are byte for byte one."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import \
        IntxUnpackedToInt8TensorActivationQuantization as Activations

    def as_linear(t: torch.Tensor, qdata: torch.Tensor | None = None) -> nn.Parameter:
        # float32 products whatever dtype the table's rows come out in (an int4 table's: bf16)
        return nn.Parameter(with_attributes(t, qdata, activation_quantization=Activations.INT8_ASYM_PER_TOKEN,
                                            dtype=torch.float32), requires_grad=False)

    if isinstance(head, OffsetLinear):
        qdata = table.weight.qdata
        head.weight = as_linear(table.weight, qdata.unflatten(-1, (-1, 2)).flip(-1).flatten(-2))
        head.offsets.weight = as_linear(table.offsets.weight)
        head.ones = torch.ones(1, head.group_size)
    else:
        head.weight = as_linear(table.weight)


def with_attributes(t: torch.Tensor, qdata: torch.Tensor | None = None, **attributes) -> torch.Tensor:
    """A torchao quantized tensor with the same scales and zero points as t, its qdata (or the one
    given) and its attributes but those given."""
    attributes = {**{name: getattr(t, name) for name in type(t).tensor_attribute_names}, **attributes}
    return type(t)(t.qdata if qdata is None else qdata, t.scale, t.zero_point, **attributes)


def block_rows(weight: torch.Tensor, elements: int) -> int:
    return max(1, elements // weight.shape[1])


def joined(blocks: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
    """Blocks of rows of one torchao quantized tensor kind, as one tensor of that kind of `rows`
    rows: each block is copied into the result's storage as it comes, then dropped, so the whole is
    never held twice (Gemma 7B's int4 table: 0.75 GB of int8 values, beside its float32 source)."""
    data, done = None, 0
    for block in blocks:
        if data is None:
            kind = type(block)
            attributes = [getattr(block, name) for name in kind.tensor_attribute_names]
            data = [torch.empty((rows, *getattr(block, name).shape[1:]), dtype=getattr(block, name).dtype)
                    for name in kind.tensor_data_names]
        n = block.qdata.shape[0]
        for out, name in zip(data, kind.tensor_data_names):
            out[done:done + n] = getattr(block, name)
        done += n
    assert done == rows, f"joined {done} rows of {rows}"
    return kind(*data, *attributes)
