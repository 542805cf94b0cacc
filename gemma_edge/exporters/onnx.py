"""Export to ONNX for ONNX Runtime (CPU), with a static KV cache passed in and out as tensors.

    OUTDIR/model.onnx       input_ids [1, T], position_ids [1, T] (consecutive), and per layer N
                            past_key_values.N.key / .value [1, kv_heads, max_seq_len, head_dim],
                            optionally logits_to_keep [1] (N > 0: only the last N rows of logits)
                            -> logits [1, T (or N), vocab], present.N.key / .value (as past)
    OUTDIR/model.onnx.data  the weights, when they are over 1 GiB (see SINGLE_FILE_LIMIT)

The model is built on the meta device, rewritten (ONNX Runtime's fused operators, block-quantized
layers), allocated at its quantized size and filled layer by layer from the checkpoint
(streaming.py), then traced; the weights go to disk tensor by tensor. A full-precision copy of
the model is never held, which is what lets Gemma 7B export on a laptop.
    OUTDIR/tokenizer.json   (and tokenizer.model where the source has one)
    OUTDIR/gemma_edge.json  the manifest

The cache is static: present is past with this call's positions written (ScatterND), never a
concatenation, so no shape depends on how many tokens were generated. Give present the same
buffer as past (IO binding) and ONNX Runtime writes in place.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gemma_edge.checkpoints import Checkpoint, iter_weights, weight_shapes
from gemma_edge.errors import ConfigError
from gemma_edge.exporters.calibration import (Calibration, calibrated_stream, head_weight, hot_tokens, linear_weights,
                                              load_stage, recipe_calibration, recipe_record)
from gemma_edge.exporters.gptq import cat_grids, take_grid
from gemma_edge.exporters.manifest import cache_section, copy_tokenizer, special_tokens, versions, write_manifest
from gemma_edge.exporters.onnx_contrib import (FUSED, BatchedGemma, fuse_residual_norms, resolve_ops, share_rope_halves,
                                              unsupported, use_batched_stream, use_ops)
from gemma_edge.exporters.onnx_quant import (BITS, CLIPS, BlockGrid, HotRowsTable, QuantizedMatrix, block_grid,
                                             replace_weights_with_block_quantized)
from gemma_edge.exporters.rewrites import TensorKVCache, pass_caches_as_tensors
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.stages import ExportResult, Stage, no_stage
from gemma_edge.exporters.streaming import Target, fill_layers
from gemma_edge.files import staged_folder
from gemma_edge.model import Gemma
from gemma_edge.progress import Progress

ONNX_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
DATA_FILE = "model.onnx.data"
OPSET = 23  # RMSNormalization (ONNX Runtime 1.22 refuses opset 23; 1.23 runs it)
# Measured with tiny exports against transformers: the standard fp32 graph runs from 1.23; the
# contrib graph's GroupQueryAttention gives wrong numbers in 1.23 and right ones from 1.24; 4-bit
# GatherBlockQuantized with zero points (the int4 embedding) is right from 1.27 (1.24-1.26 decode
# it differently). tests/test_onnx.py runs the exports on this version.
MIN_ORT = "1.27"
# Weights over this many bytes stay in model.onnx.data beside the graph: under protobuf's 2 GB limit
# they could be folded into model.onnx, but that holds them twice more while exporting (the proto
# and its serialization: 2B int4 peaked at 6.5 GiB instead of 5).
SINGLE_FILE_LIMIT = 1 << 30


def cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class CacheInOut(nn.Module):
    """The ecosystem's I/O contract around the model: past caches in, logits and present caches out."""

    def __init__(self, model: Gemma):
        super().__init__()
        self.model = pass_caches_as_tensors(model, model.max_seq_len)
        self.caches: list[TensorKVCache] = [layer.attn.cache for layer in model.layers]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                past: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        for cache, (k, v) in zip(self.caches, past):  # [1, kv_heads, max_seq_len, head_dim]
            cache.k4, cache.v4 = k, v
        logits = self.model.logits(self.model.hidden_states(input_ids, position_ids[0]))  # [1, T, vocab]
        return logits, [[cache.k4, cache.v4] for cache in self.caches]


def build_model(ckpt: Checkpoint, settings: ExportSettings, ops: str,
                report: Callable[[Progress], None] | None = None,
                calib: Calibration | None = None) -> tuple[Gemma, dict[str, str]]:
    """The model as the graph computes it (ops, block-quantized layers), filled layer by layer from
    the checkpoint, its 4-bit layers rounded by settings.recipe (calibrated on calib, else the
    settings' text); returns it and {layer: quantization scheme}."""
    settings = settings.for_model(ckpt.config)
    weights = iter_weights(ckpt)  # the checkpoint's headers are checked before anything is allocated
    grids: dict[str, BlockGrid] = {}
    hot = hot_tokens(ckpt, settings.calibration, settings.hot_rows()) if settings.hot_rows() else None
    weights = calibrated_stream(ckpt, settings, weights, calibrated_onnx_weights(ckpt.config, settings),
                                lambda name, w: block_grid(w, BITS["int4"], settings.group_size, CLIPS), grids, calib,
                                keep=None if hot is None else hot[0])
    with torch.device("meta"):
        model = use_ops(Gemma(ckpt.config, settings.max_seq_len, cache_dtype=getattr(torch, settings.kv_dtype)), ops,
                        settings.layer_quant)
        plan = replace_weights_with_block_quantized(model, settings.quant, settings.embedding_quant, settings.group_size,
                                                    0 if hot is None else len(hot[0]), layer_quant(settings))
        use_batched_stream(model)
    model.to_empty(device="cpu")  # the quantized sizes only
    model.init_buffers()
    share_rope_halves(model)
    table = getattr(model.embed_tokens, "table", None)
    if isinstance(table, HotRowsTable):
        table.set_rows(hot[0])
        table.record = hot[1]  # the manifest's
    shapes = weight_shapes(ckpt.config)
    fill_layers(model, weights, layer_targets(model, shapes, grids), sum(math.prod(s) for s in shapes.values()), report)
    return model.eval().requires_grad_(False), plan


def layer_quant(settings: ExportSettings) -> Callable[[str], str]:
    """A linear layer's path in the rewritten model -> its quantization (a fused layer's: its parts')."""
    def quant(path: str) -> str:
        leaf = path.rpartition(".")[2]
        return settings.layer_quant(FUSED.get(leaf, (leaf,))[0])
    return quant


def calibrated_onnx_weights(config, settings: ExportSettings) -> set[str]:
    """The 4-bit weights --recipe calibrates: the decoder's 4-bit linear layers (--quant int4, but
    the kinds kept 8-bit), the output projection where it is 4-bit (an untied head at --quant int4;
    the tied table, which the head reads, at --embedding-quant int4)."""
    names = {n for n in linear_weights(config) if settings.layer_quant(n) == "int4"}
    if (settings.embedding_quant if config.tie_word_embeddings else settings.quant) == "int4":
        names.add(head_weight(config))
    return names


def layer_targets(model: Gemma, checkpoint_names, grids: dict[str, BlockGrid] | None = None) -> list[Target]:
    """The layers of the rewritten model that are made from checkpoint weights of other names: fused
    linear layers (rows of q, k and v; of gate and up), quantized matrices (on the grids of
    calibrated weights, which `grids` holds by the time their weights arrive), and an output
    projection made from a tied embedding."""
    grids = {} if grids is None else grids

    def quantize(matrix: QuantizedMatrix, names: tuple[str, ...]):
        def fill(w: torch.Tensor) -> None:
            taken = [take_grid(grids, n) for n in names]
            matrix.set(w, cat_grids(taken) if taken[0] is not None else None)
        return fill

    def sources(layer: str) -> tuple[str, ...]:
        prefix, _, leaf = layer.rpartition(".")
        if leaf in FUSED:
            return tuple(f"{prefix}.{part}.weight" for part in FUSED[leaf])
        if layer == "lm_head" and model.config.tie_word_embeddings:
            return ("embed_tokens.weight",)
        return (f"{layer}.weight",)

    targets = []
    hot_tables = [m for m in model.modules() if isinstance(m, HotRowsTable)]
    filled_with_their_table = {id(matrix) for t in hot_tables for matrix in (t.table, t.hot)}
    for path, module in model.named_modules():  # a matrix shared by two layers is listed once
        if isinstance(module, HotRowsTable):  # its two matrices filled together, from the table
            targets.append(Target(("embed_tokens.weight",),
                                  lambda w, table=module: table.set(w, take_grid(grids, "embed_tokens.weight"))))
        elif isinstance(module, QuantizedMatrix) and id(module) not in filled_with_their_table:
            names = sources(path.rpartition(".")[0])
            targets.append(Target(names, quantize(module, names)))
        elif isinstance(module, nn.Linear) and f"{path}.weight" not in checkpoint_names:
            targets.append(Target(sources(path), module.weight.copy_))
    return targets


def trace_to_onnx(model: Gemma):
    """torch.onnx.export (dynamo) of the rewritten model (build_model) with a dynamic token count T up
    to max_seq_len -> torch.onnx.ONNXProgram."""
    from torch.fx.experimental import _config as fx_config

    wrapper = CacheInOut(model).eval()
    layers, n = len(wrapper.caches), model.max_seq_len
    # The symbolic range starts at 2 because torch.export specializes sizes 0 and 1; the graph has
    # no branch on T, so T = 1 (a decode step) runs the same graph, which the tests check.
    t = torch.export.Dim("sequence_length", min=2, max=max(n, 2))
    past = [[c.k4.clone(), c.v4.clone()] for c in wrapper.caches]
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], past)
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            wrapper, example, dynamo=True, opset_version=OPSET, verbose=False,
            dynamic_shapes=({1: t}, {1: t}, [[None, None] for _ in past]),
            input_names=["input_ids", "position_ids"] + cache_names(layers, "past_key_values"),
            output_names=["logits"] + cache_names(layers, "present"))


def save_onnx(program, folder: Path) -> None:
    """model.onnx + model.onnx.data: the weights written tensor by tensor, no protobuf copy of them."""
    program.save(folder / ONNX_FILE, external_data=True)


def finish_onnx(folder: Path, fuse_norms: bool) -> list[str]:
    """The saved graph edited on its own (keep_last_logits; with fuse_norms, a BatchedGemma's residual
    norms fused), and for weights under SINGLE_FILE_LIMIT folded into model.onnx; returns the files."""
    import onnx

    path = folder / ONNX_FILE
    proto = onnx.load(str(path), load_external_data=False)
    for value in list(proto.graph.input) + list(proto.graph.output):  # one readable name for T
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "sequence_length"
    keep_last_logits(proto)
    unfold_table_views(proto)
    if fuse_norms:
        fuse_residual_norms(proto)
    if (folder / DATA_FILE).stat().st_size < SINGLE_FILE_LIMIT:
        onnx.load_external_data_for_model(proto, str(folder))
        for tensor in proto.graph.initializer:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        onnx.save_model(proto, str(path))
        (folder / DATA_FILE).unlink()
        return [ONNX_FILE]
    gather_tables_without_reshape(proto)
    onnx.save_model(proto, str(path))
    return [ONNX_FILE, DATA_FILE]


def unfold_table_views(proto) -> None:
    """Where the exporter's optimizer folded a GatherBlockQuantized's reshaped view of a matrix into
    an initializer of its own (a copy: it folds inputs of up to 8192 elements, so only the 8-bit rows
    of a tiny model's HotRowsTable), read the matrix through a Reshape again, as larger ones are: the
    MatMulNBits that shares the lookup's scales holds the same bytes as [rows, blocks, bytes]."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    by_scales = {n.input[2]: n for n in graph.node if n.op_type == "MatMulNBits"}
    used = [name for n in graph.node for name in n.input]
    for node in list(graph.node):
        if node.op_type != "GatherBlockQuantized":
            continue
        folded, head = initializers.get(node.input[0]), by_scales.get(node.input[2])
        if folded is None or head is None or used.count(folded.name) != 1:
            continue
        shape = f"{folded.name}.shape"
        graph.initializer.append(numpy_helper.from_array(np.array(folded.dims, np.int64), shape))
        graph.node.insert(list(graph.node).index(node),
                          helper.make_node("Reshape", [head.input[1], shape], [f"{folded.name}.view"], name=f"{folded.name}.view"))
        node.input[0] = f"{folded.name}.view"
        graph.initializer.remove(folded)


def gather_tables_without_reshape(proto) -> None:
    """Give each GatherBlockQuantized that reads a reshaped view of a weight in model.onnx.data (the
    tied table: MatMulNBits' [vocab, blocks, bytes] seen as [vocab, bytes]) an initializer of its own
    over the same bytes of the file, in place of the Reshape. ONNX Runtime folds a Reshape of an
    initializer into a new initializer, a copy of the table in memory (Gemma 2B int4: 250 MiB, 7B
    375 MiB); an initializer of its own is memory-mapped like the others, and only the rows looked up
    are ever read. The file still holds the table once."""
    import onnx

    graph = proto.graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        reshape = producers.get(node.input[0]) if node.op_type == "GatherBlockQuantized" else None
        if reshape is None or reshape.op_type != "Reshape" or consumers[reshape.output[0]] != 1:
            continue
        source = initializers.get(reshape.input[0])
        if source is None or source.data_location != onnx.TensorProto.EXTERNAL:
            continue
        rows = source.dims[0]
        table = onnx.TensorProto(name=f"{source.name}.rows", data_type=source.data_type,
                                 dims=[rows, math.prod(source.dims) // rows], data_location=onnx.TensorProto.EXTERNAL)
        table.external_data.extend(source.external_data)  # location, offset, length: the same bytes
        graph.initializer.append(table)
        node.input[0] = table.name
        graph.node.remove(reshape)
        consumers[reshape.input[1]] -= 1
        if consumers[reshape.input[1]] == 0 and reshape.input[1] in initializers:
            graph.initializer.remove(initializers[reshape.input[1]])


LOGITS_TO_KEEP = "logits_to_keep"


def keep_last_logits(proto) -> None:
    """Add an input logits_to_keep (int64 [1], default 0): logits for only the last N positions
    (0: all, as transformers' logits_to_keep). Generation needs one row per prefill, and the
    output projection of a 262k vocabulary is most of a prefill's work. The default lives in an
    initializer of the same name, so a runtime that does not know the input (ONNX Runtime GenAI)
    gets every row."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    producers = {out: n for n in graph.node for out in n.output}
    node = producers["logits"]
    while node.op_type not in ("MatMul", "Gemm", "MatMulNBits"):  # back through Gemma 2's soft-cap (a hot-rows
        node = producers[node.input[0]]                          # table's ScatterElements) to the projection
    hidden = node.input[0]  # [1, T, hidden]
    heads = [n for n in graph.node if n.op_type == node.op_type and n.input[0] == hidden]  # a hot-rows table's two
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend([numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_TO_KEEP),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), "logits_rows_end"),
                              numpy_helper.from_array(np.ones(1, np.int64), "logits_rows_axis")])
    at = min(list(graph.node).index(head) for head in heads)
    graph.node.insert(at, helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_rows_start"], name="logits_rows_start"))
    graph.node.insert(at + 1, helper.make_node("Slice", [hidden, "logits_rows_start", "logits_rows_end", "logits_rows_axis"],
                                               ["logits_rows"], name="logits_rows"))
    for head in heads:
        head.input[0] = "logits_rows"
    # A HotRowsTable's hot logits are written over the others' by ScatterElements, whose indices
    # (the hot ids) are expanded to the rows traced, from T: expand them to the rows kept instead.
    producers = {out: n for n in graph.node for out in n.output}
    for scatter in [n for n in graph.node if n.op_type == "ScatterElements" and producers.get(n.input[2]) in heads]:
        expand = producers[scatter.input[1]]
        rows = f"{scatter.name}.rows"
        graph.node.insert(list(graph.node).index(scatter), helper.make_node("Shape", [scatter.input[2]], [rows], name=rows))
        graph.node.insert(list(graph.node).index(scatter),
                          helper.make_node("Expand", [expand.input[0], rows], [f"{rows}.ids"], name=f"{rows}.ids"))
        scatter.input[1] = f"{rows}.ids"
        if not any(expand.output[0] in n.input for n in graph.node):
            graph.node.remove(expand)
    for value in graph.output:
        if value.name == "logits":
            value.type.tensor_type.shape.dim[1].dim_param = "logits_rows"


def io_contract(model: Gemma) -> dict:
    c, n = model.config, model.max_seq_len
    cache = [1, c.num_key_value_heads, n, c.head_dim]
    layers = c.num_hidden_layers
    kv = str(model.layers[0].attn.cache.k.dtype).removeprefix("torch.")
    return {
        "program": ONNX_FILE,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "T"]},
                   {"name": "position_ids", "dtype": "int64", "shape": [1, "T"], "rows": "consecutive positions"}]
                  + [{"name": name, "dtype": kv, "shape": cache} for name in cache_names(layers, "past_key_values")]
                  + [{"name": LOGITS_TO_KEEP, "dtype": "int64", "shape": [1], "default": [0],
                      "rows": "logits for the last N positions only; 0 (the default): every position"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "R", c.vocab_size],
                     "rows": "R = logits_to_keep, or T when it is 0"}]
                   + [{"name": name, "dtype": kv, "shape": cache} for name in cache_names(layers, "present")],
        "tokens_per_call": [1, n],
        "cache": "static: present = past with this call's positions written; bind both to one buffer",
        "opset": OPSET,
        "min_onnxruntime": MIN_ORT,
    }


GENAI_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}  # its names for the families


def genai_config(model: Gemma, special: dict, filename: str) -> dict:
    """genai_config.json: what ONNX Runtime GenAI needs to load the folder and generate.

    Its runtime allocates past/present at search.max_length and shares one buffer between them
    (past_present_share_buffer), which is exactly this graph's static cache when max_length is
    the export's max_seq_len. It feeds position_ids and, the graph having no attention_mask
    input, no mask: the graph masks by position itself.
    """
    c, n = model.config, model.max_seq_len
    return {
        "model": {
            "bos_token_id": c.bos_token_id,
            "context_length": n,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": c.num_attention_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": c.num_key_value_heads,
            },
            "eos_token_id": special["stop_token_ids"],
            "pad_token_id": c.pad_token_id,
            "type": GENAI_TYPES[c.family],
            "vocab_size": c.vocab_size,
        },
        "search": {"do_sample": False, "max_length": n, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def export_onnx(ckpt: Checkpoint, settings: ExportSettings, outdir: Path, overwrite: bool = False,
                stage: Stage = no_stage,
                report: Callable[[Progress], None] | None = None) -> ExportResult:
    result = ExportResult(Path(outdir))
    settings = settings.for_model(ckpt.config)

    def timed(name: str):
        return result.timed(name, stage)

    ops = resolve_ops(ckpt.config, settings.ops)
    if ops == "standard" and settings.kv_dtype != "float32":
        raise ConfigError(f"--kv-dtype {settings.kv_dtype} needs ONNX Runtime's GroupQueryAttention, which this model "
                          f"cannot use ({unsupported(ckpt.config)}); use --kv-dtype float32")
    with staged_folder(outdir, overwrite) as tmp:
        calib = recipe_calibration(ckpt, settings)
        with timed(load_stage(calib)):
            model, plan = build_model(ckpt, settings, ops, report, calib)
            hot = getattr(getattr(model.embed_tokens, "table", None), "record", None)
            special = special_tokens(ckpt)
            io = {**io_contract(model), "ops": ops}
            cache = cache_section(model.layers[0].attn.cache.k.dtype,
                                  [spec["shape"] for spec in io["inputs"] if spec["name"].startswith("past_key_values.")],
                                  settings.max_seq_len, "past_key_values.N.key/value inputs, one [1, kv_heads, max_seq_len, "
                                  "head_dim] buffer each, bound to present.N as well")
            genai = genai_config(model, special, ONNX_FILE)
            batched = isinstance(model, BatchedGemma)
        with timed("trace"):
            program = trace_to_onnx(model)
            del model
        with timed("write"):
            save_onnx(program, tmp)
            del program  # and with it the model's weights
            files = finish_onnx(tmp, fuse_norms=batched)
            tokenizer = copy_tokenizer(ckpt, tmp)
            (tmp / GENAI_CONFIG).write_text(json.dumps(genai, indent=2) + "\n")
            manifest = write_manifest(tmp, ckpt, settings, special,
                                      quantization={"layers": plan, "recipe": recipe_record(settings, calib),
                                                    **({"hot_tokens": hot} if hot else {})},
                                      io={**io, "files": files}, cache=cache, tokenizer={"files": tokenizer},
                                      versions=versions("torch", "onnx", "onnxscript", "onnxruntime", "transformers"))
    result.manifest = manifest
    return result
