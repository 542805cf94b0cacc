"""Export to an ExecuTorch program (.pte) for the XNNPACK CPU backend.

    OUTDIR/model.pte        forward(tokens [1, T], input_pos [T]) -> logits [1, vocab] of the last position,
                            T from 1 to max_tokens_per_call (a longer prompt is prefilled in chunks); the
                            KV cache, max_seq_len positions, lives in the program's mutable buffers;
                            with settings.prefill_method also prefill(tokens, input_pos), the same
                            contract for calls at position 0 (attention over the call's own keys, the
                            cache and weights shared with forward)
    OUTDIR/model.ptd        the weights (ExecuTorch's data file: the program's and XNNPACK's, identical
                            bytes stored once, so a tied table and the output projection reading it
                            are one copy); loaded beside the program (Module(pte, ptd), LlmModule's
                            data path)
    OUTDIR/tokenizer.json   (and tokenizer.model where the source has one)
    OUTDIR/gemma_edge.json  the manifest

The program also carries the constant methods ExecuTorch's own LLM runner reads (get_max_seq_len,
get_eos_ids, ...), so the same folder runs in the stock runner and Android's LlmModule.

Only the last position's logits are returned: a method with a dynamic length up to max_seq_len that
returned every row would make ExecuTorch plan max_seq_len x vocab floats (1 GB for Gemma 3 at 1024
tokens), and the output projection for every prompt token would double the cost of a prefill.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gemma_edge.checkpoints import Checkpoint, iter_weights, weight_shapes
from gemma_edge.exporters.calibration import (Calibration, calibrated_stream, calibration, hot_tokens, load_stage,
                                              recipe_calibration, recipe_record)
from gemma_edge.exporters.head_correction import CorrectedHead, correct_head
from gemma_edge.exporters.lowering_shortcuts import idle_steps_skipped
from gemma_edge.exporters.manifest import cache_section, copy_tokenizer, special_tokens, versions, write_manifest
from gemma_edge.exporters.pte_hot_rows import HotRowsHead, keep_hot_rows
from gemma_edge.exporters.rewrites import (attend_new_keys_only, join_value_blocks, replace_gelu_with_explicit_tanh_form,
                                           replace_rmsnorm_mean_with_linear)
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.exporters.smoothing import TOKENS as SMOOTHING_TOKENS
from gemma_edge.exporters.smoothing import smoothed_weights
from gemma_edge.exporters.stages import ExportResult, Stage, no_stage
from gemma_edge.exporters.streaming import fill_layers
from gemma_edge.exporters.torchao_quant import (HEAD_OF_TABLE, INT4, TABLE_INT4, int4_layer_grid, quantization_plan,
                                                quantization_targets, replace_with_quantized_layers,
                                                untie_output_projection)
from gemma_edge.exporters.tracing import export_model
from gemma_edge.exporters.xnnpack_partitions import storages, weights_by_placeholder, xnnpack_partitioner
from gemma_edge.files import staged_folder
from gemma_edge.model import Gemma
from gemma_edge.progress import Progress

PTE_FILE = "model.pte"
DATA_TAG = "model"  # the weights' file: model.ptd
DATA_FILE = DATA_TAG + ".ptd"
PREFILL_METHOD = "prefill"  # calls at position 0 only: attention over the call's own keys
RELEASE_BYTES = 1 << 20  # weights this large are freed as soon as XNNPACK has packed them


class LastTokenLogits(nn.Module):
    """The runner's contract around the model: logits of the last position only, [1, vocab]."""

    def __init__(self, model: Gemma):
        super().__init__()
        self.model = model
        self.max_seq_len = model.max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(tokens, input_pos)  # [1, T, hidden]
        return self.model.logits(hidden[:, -1, :])  # [1, vocab]


def runner_metadata(model: Gemma, settings: ExportSettings, stop_ids: list[int]) -> dict[str, object]:
    """Constant methods read by ExecuTorch's LLM runner (extension/llm/runner, Android LlmModule)."""
    c = model.config
    return {
        "get_max_seq_len": settings.max_tokens_per_call,  # longest single call: prefill chunks up to this
        "get_max_context_len": settings.max_seq_len,  # positions the cache holds
        "get_vocab_size": c.vocab_size,
        "get_bos_id": c.bos_token_id,
        "get_eos_ids": stop_ids,  # eos and <end_of_turn>: a chat turn ends generation
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,  # one call per prompt chunk, not per token
        "get_n_layers": c.num_hidden_layers,
        "get_n_kv_heads": c.num_key_value_heads,
        "get_head_dim": c.head_dim,  # stated, not hidden/heads: 256 on Gemma 7B, not 192
        "get_dim": c.hidden_size,
    }


def build_model(ckpt: Checkpoint, settings: ExportSettings, report: Callable[[Progress], None] | None = None,
                calib: Calibration | None = None) -> tuple[Gemma, dict[str, str]]:
    """The model quantized as the program computes (torchao), built on the meta device and filled
    layer by layer from the checkpoint, each layer quantized as soon as it is read: only one layer
    is ever in float32; the 4-bit layers rounded by settings.recipe (calibrated on calib, else the
    settings' text). Returns it and {layer: quantization scheme}."""
    settings = settings.for_model(ckpt.config)
    weights = iter_weights(ckpt)  # the checkpoint's headers are checked before anything is allocated
    quantized = settings.quant != "fp32" or settings.embedding_quant != "none"
    with torch.device("meta"):
        model = Gemma(ckpt.config, settings.max_seq_len, cache_dtype=getattr(torch, settings.kv_dtype))
        if quantized:
            untie_output_projection(model)
    plan = quantization_plan(model, settings, ckpt.config.tie_word_embeddings) if quantized else {}
    replace_with_quantized_layers(model, plan, settings)
    # Allocated but untouched: the float32 pages of a layer exist only between its read and its
    # quantization, which frees them.
    model.to_empty(device="cpu")
    model.init_buffers()
    alpha = settings.smoothing()
    if alpha:  # the quantized layers' inputs rescaled (smoothing.py), on the calibration text
        text = calibration(ckpt, settings.calibration, settings.max_seq_len, SMOOTHING_TOKENS)
        weights = smoothed_weights(weights, ckpt.config, text.ids, alpha)
        model.smoothing = {"alpha": alpha, **text.manifest()}  # the manifest's
    grids = {}
    reads_int4_table = plan.get("lm_head") == HEAD_OF_TABLE and plan["embed_tokens"] == TABLE_INT4
    hot = hot_tokens(ckpt, settings.calibration, settings.hot_rows()) if reads_int4_table and settings.hot_rows() else None
    # the 4-bit layers (an untied head among them) and the tied 4-bit table the head reads, its hot rows
    # left as they are (8-bit copies replace them)
    calibrated = {f"{name}.weight" for name, scheme in plan.items() if scheme in (INT4, TABLE_INT4)}
    weights = calibrated_stream(ckpt, settings, weights, calibrated, int4_layer_grid(settings.group_size), grids, calib,
                                keep=None if hot is None else hot[0])
    targets = quantization_targets(model, plan, settings, ckpt.config.tie_word_embeddings, grids) if quantized else []
    shapes = weight_shapes(ckpt.config)
    fill_layers(model, weights, targets, sum(math.prod(s) for s in shapes.values()), report)
    # The head reading an int4 table gets its worst columns corrected, unless GPTQ rounded the table:
    # GPTQ already spreads each column's error over the others, which a correction of some columns
    # back to the checkpoint's values undoes. Measured on the real 270M (eager, all-int4, the manual /
    # modeling_gemma.py): GPTQ with the correction x1.112 / x1.543, without x1.103 / x1.442. With hot
    # rows too (int8 layers, eager): x1.010 / x1.111 against x1.027 / x1.109 without the correction.
    correct = reads_int4_table and settings.recipe == "rtn"
    if correct or hot is not None:
        name, table = next(iter(iter_weights(ckpt)))  # the first weight: read again, alone
        assert name == "embed_tokens.weight", name
        if correct:
            tokenizer = next((f for f in ckpt.tokenizer_files if f.name == "tokenizer.json"), None)
            correct_head(model.eval(), table, tokenizer)
        if hot is not None:
            keep_hot_rows(model, table, *hot)
        del table
    return model.eval().requires_grad_(False), plan


def lower_to_executorch(model: Gemma, metadata: dict[str, object], max_tokens: int | None = None,
                        report: Callable[[Progress], None] | None = None, prefill: bool = False):
    """The export-only rewrites, the runner's last-row contract, torch.export (calls of up to
    max_tokens, default max_seq_len), then lowering; returns executorch's program manager (write it
    with write_to_file). prefill: a second method, PREFILL_METHOD, for calls at position 0 (attention
    over the call's keys alone), sharing the weights and the KV cache with forward. Consumes the
    model: the weights XNNPACK has packed are freed (see release_delegated_weights), and the model
    cannot run after."""
    model = join_value_blocks(replace_gelu_with_explicit_tanh_form(replace_rmsnorm_mean_with_linear(model)))
    drop_cache_contents(model)
    programs = {"forward": export_model(LastTokenLogits(model), max_tokens)}
    if prefill:  # traced second: the rewrite changes the model's attention in place
        programs[PREFILL_METHOD] = export_model(LastTokenLogits(attend_new_keys_only(model)), max_tokens)
    return lower(programs, metadata, release=True, report=report, data_file=True)


def drop_cache_contents(model: Gemma) -> None:
    """Give each KV cache buffer fresh, untouched memory in place of its zeros: a program keeps only
    the shape and dtype of a buffer it writes (ExecuTorch's emitter), and the zeros were resident
    for nothing through the lowering (0.875 GiB for Gemma 7B at 1024 positions, 7 GiB at 8192)."""
    for layer in model.layers:
        cache = layer.attn.cache
        cache.k, cache.v = torch.empty_like(cache.k), torch.empty_like(cache.v)


def lower(program: torch.export.ExportedProgram | dict[str, torch.export.ExportedProgram], metadata: dict[str, object],
          release: bool = False, report: Callable[[Progress], None] | None = None, data_file: bool = False):
    """An exported program (or {method: program}, methods sharing their weights and, by name, their
    mutable buffers: the KV cache) -> edge dialect with XNNPACK delegation -> an ExecuTorch program manager,
    its serialized form a list of pieces (the delegates' packed weights among them) not yet joined.
    release: free the weights the delegates have packed once they have (the program's module and
    whatever shares its weights cannot run after). report: called as each XNNPACK partition is packed.
    data_file: every weight, the program's and XNNPACK's, in one data file (DATA_FILE, written with
    the manager's write_tensor_data_to_file), whose store keeps identical bytes once; else in the
    program."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    programs = program if isinstance(program, dict) else {"forward": program}
    shared = len(programs) > 1
    with idle_steps_skipped():  # (lowering_shortcuts: the steps of both stages that change nothing, left out)
        # IR validity checks re-trace the whole graph; export_llama skips them too.
        releasable = set.intersection(*map(single_use_storages, programs.values())) if release else set()
        with xnnpack_without_copies(releasable, report):
            partitioner = xnnpack_partitioner(DATA_TAG if data_file else None)
            edge = to_edge_transform_and_lower(programs, partitioner=[partitioner], constant_methods=metadata,
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
        if release:
            for method in programs:
                release_delegated_weights(edge.exported_program(method))
        with constants_named_by_content():
            # Quant fusion turns torchao's dequantize + embedding into ExecuTorch's quantized embedding kernels.
            # The reinplace pass writes the KV cache in place: without it index_copy_ on a buffer is a
            # functional index_put copying the whole buffer, then a copy back, for every layer and call
            # (measured on Gemma 3 270M int4: 4.8 of 25.5 ms per decode step). ExecuTorch's own cache op
            # (llama::update_cache_with_indices) needs 4-D buffers, and the view back to the 3-D ones our
            # attention multiplies by became a copy of its own (3 ms per step): this is the faster way.
            config = ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True, extract_delegate_segments=True,
                                             run_reinplace_pass=True, memory_planning_pass=plan_returned_outputs_only(shared),
                                             # methods share a mutable buffer by its name
                                             emit_mutable_buffer_names=shared,
                                             external_constants=(lambda node: DATA_TAG) if data_file else False)
            return edge.to_executorch(config)


def plan_returned_outputs_only(share_mutable_buffers: bool = False):
    """ExecuTorch's memory planning, with the KV cache's updates planned where the cache is.

    The reinplace pass makes each cache update an in-place index_put_ on its buffer, and the
    planner gives an in-place op's result its input's memory; but the graph's output node, which
    returns the updates until the emitter drops them, keeps its own copy of each result's spec,
    made before, and the planner gave those their own memory, never written or read: a second KV
    cache in the memory plan, which ExecuTorch allocates whole (zero-filled) when the program loads
    (Gemma 7B at 1024 positions: 0.875 GiB of its 1.75 GiB plan). Here the output node gets the
    buffers' own specs for them first. (Made here, not at import: build_model needs no executorch.)"""
    from executorch.exir.passes import MemoryPlanningPass

    class PlanReturnedOutputsOnly(MemoryPlanningPass):
        def run(self, graph_module, graph_signature=None):
            for node in graph_module.graph.nodes:
                if node.op != "output" or not isinstance(node.meta.get("spec"), (list, tuple)):
                    continue
                returned = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
                specs = list(node.meta["spec"])
                for i, value in enumerate(returned):
                    if isinstance(value, torch.fx.Node) and _writes_its_first_argument(value):
                        specs[i] = value.meta["spec"] = value.args[0].meta["spec"]
                node.meta["spec"] = type(node.meta["spec"])(specs)
            return super().run(graph_module, graph_signature)

    return PlanReturnedOutputsOnly(alloc_graph_input=False, share_mutable_buffers=share_mutable_buffers)


def _writes_its_first_argument(node: torch.fx.Node) -> bool:
    """An in-place op on its first argument (aten.index_put_ on a cache buffer), by its schema."""
    schema = getattr(node.target, "_schema", None)
    alias = schema.arguments[0].alias_info if schema is not None and schema.arguments else None
    return node.op == "call_function" and alias is not None and alias.is_write and isinstance(node.args[0], torch.fx.Node)


@contextlib.contextmanager
def constants_named_by_content():
    """While a program manager is turned into an ExecuTorch program: each constant the lowering
    computes (constant propagation, quant fusion's packed 4-bit table among them) named by its
    contents, not ExecuTorch's _prop_tensor_constantN, which counts the method's constants: the data
    file keys tensors by name, and two methods' Nth constants differ (a mask of forward's, a position
    table of prefill's: prefill read the wrong tensor). By content, each method finds its own, and one
    they share (the table) is stored once."""
    import hashlib

    from executorch.exir.program import _program
    from torch.export.graph_signature import InputKind

    original = _program.quant_fusion_and_const_prop_pass

    def named_by_content(program):
        program = original(program)
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.CONSTANT_TENSOR and spec.target.startswith("_prop_tensor_constant"):
                tensor = program.constants.pop(spec.target)
                digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
                spec.target = f"_prop_tensor_{digest.hexdigest()[:24]}"
                program.constants[spec.target] = tensor
        return program

    _program.quant_fusion_and_const_prop_pass = named_by_content
    try:
        yield
    finally:
        _program.quant_fusion_and_const_prop_pass = original


@contextlib.contextmanager
def xnnpack_without_copies(releasable: set[int] = frozenset(), report: Callable[[Progress], None] | None = None):
    """Two whole-weight copies XNNPACK's lowering makes, avoided while it lowers (restored on exit),
    and the unpacked weights freed as their partition is packed (releasable, see preprocess_and_free):
    - ExecuTorch deep-copies each partition's program before the backend preprocesses it (in case
      the backend changes its graph: BackendDetails.copy_exported_program_for_preprocess), weights
      included: a second copy of every delegated weight while the first is held (2.6 GiB at Gemma
      2B int4, 8.4 at 7B). XNNPACK's preprocess reads weights and writes its own packed copies,
      never the program's tensors, so here the copy is of the graph only: a deepcopy whose memo
      maps each weight to itself.
    - Packing 4-bit values two to a byte (NodeVisitor.convert_to_qc4w) makes two uint8 copies of
      the whole matrix first: 1.5 GiB for Gemma 7B's output projection. Here: pack_int4_by_rows."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    def copy_graph_share_weights(cls, program, compile_specs):
        memo = {id(t): t for t in (*program.state_dict.values(), *program.constants.values())}
        return copy.deepcopy(program, memo)

    def preprocess_and_free(cls, edge_programs, compile_specs):
        """BackendDetails.preprocess_multimethod (each partition preprocessed in turn), then the storage
        of each weight of releasable that only this partition reads freed: XNNPACK holds it packed now.
        Before, every unpacked weight waited for the last partition (Gemma 7B int4: 8.4 GiB beside the
        4.9 GiB packed)."""
        # the partitions still to pack that read each storage (a weight read in forward and in prefill: two)
        readers = collections.Counter(ptr for programs in edge_programs.values() for program in programs
                                      for ptr in {s.data_ptr() for s in weight_storages(program)})
        total, start, results = sum(map(len, edge_programs.values())), time.perf_counter(), {}
        for method, programs in edge_programs.items():
            results[method] = []
            for program, spec in zip(programs, compile_specs[method]):
                results[method].append(cls.preprocess(program, spec))
                for storage in {s.data_ptr(): s for s in weight_storages(program)}.values():
                    readers[storage.data_ptr()] -= 1
                    if storage.data_ptr() in releasable and readers[storage.data_ptr()] == 0 and storage.nbytes() >= RELEASE_BYTES:
                        storage.resize_(0)
                if report is not None:
                    done = sum(map(len, results.values()))
                    report(Progress(done, total, time.perf_counter() - start, f"XNNPACK partition {done}/{total}"))
        return results

    patches = [(XnnpackBackend, "copy_exported_program_for_preprocess", classmethod(copy_graph_share_weights)),
               (NodeVisitor, "convert_to_qc4w", staticmethod(pack_int4_by_rows))]
    patches.append((XnnpackBackend, "preprocess_multimethod", classmethod(preprocess_and_free)))
    own = [(cls, name, cls.__dict__.get(name)) for cls, name, _ in patches]
    for cls, name, patch in patches:
        setattr(cls, name, patch)
    try:
        yield
    finally:
        for cls, name, original in own:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def pack_int4_by_rows(values: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """XNNPACK's 4-bit packing (its NodeVisitor.convert_to_qc4w: int values in [-8, 7], plus 8, two
    to a byte, the even column in the low nibble, an odd last column padded with 0), the same bytes
    made a block of rows at a time into the packed result, so the working copies are of one block."""
    import torch.nn.functional as F

    low, high = values.min().item(), values.max().item()
    if low < -8 or high > 7:
        raise ValueError(f"4-bit packing: values in [{low}, {high}], outside [-8, 7]")
    if values.ndim != 2:
        values = values.squeeze()
    out = torch.empty(values.shape[0], (values.shape[1] + 1) // 2, dtype=torch.uint8)
    for start in range(0, values.shape[0], rows):
        block = values[start:start + rows]
        if block.shape[1] % 2:
            block = F.pad(block, (0, 1, 0, 0), value=0)
        flat = (block.to(torch.uint8) + 8).contiguous().view(-1)
        out[start:start + rows] = (flat[1::2] << 4 | flat[::2]).view(len(block), -1)
    return out


def weight_storages(program: torch.export.ExportedProgram):
    """The storages of a program's weights and constants, a quantized tensor's parts each."""
    return list(storages([*program.state_dict.values(), *program.constants.values()]))


def single_use_storages(program: torch.export.ExportedProgram) -> set[int]:
    """The storages (data pointers) of the weights exactly one node of the program reads: a tied table
    (read by the embedding, outside XNNPACK, and by the output projection, inside) is not one."""
    weights = weights_by_placeholder(program)
    readers = collections.Counter()
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            # A quantized tensor's placeholder is read through one access node per part (its qdata,
            # its scales, ...): the readers are theirs.
            parts = [user for user in node.users if "access_subclass_inner_tensor" in str(user.target)]
            n = max([len(node.users) - len(parts)] + [len(part.users) for part in parts])
            for storage in storages([weights[node.name]]):
                readers[storage.data_ptr()] += n
    return {ptr for ptr, n in readers.items() if n == 1}


def release_delegated_weights(program: torch.export.ExportedProgram) -> None:
    """Free the storage of every weight only XNNPACK's delegates use, once they hold it packed:
    each lowered module keeps the program it was made from (ExecuTorch's emitter reads its graph, not
    its weights), so until the manager is dropped the unpacked weights (torchao's int4 as one int8
    per value: 2.6 GiB at Gemma 2B) stayed beside the packed ones through serialization. Weights the
    top-level program still uses (a table shared with a delegated output projection) are kept."""
    from executorch.exir.lowered_backend_module import get_lowered_backend_modules

    kept = {s.data_ptr() for s in weight_storages(program)}
    for lowered in get_lowered_backend_modules(program.graph_module):
        for storage in weight_storages(lowered.original_module):
            if storage.data_ptr() not in kept:
                storage.resize_(0)


def program_bytes(program: torch.export.ExportedProgram, metadata: dict[str, object]) -> bytes:
    """The lowered program as one bytes object, its weights in it (to load it in memory; a file is
    written in pieces, its weights in a data file)."""
    return lower(program, metadata).buffer


def export_pte(ckpt: Checkpoint, settings: ExportSettings, outdir: Path, overwrite: bool = False,
               stage: Stage = no_stage,
               report: Callable[[Progress], None] | None = None) -> ExportResult:
    result = ExportResult(Path(outdir))
    settings = settings.for_model(ckpt.config)

    def timed(name: str):
        return result.timed(name, stage)

    with staged_folder(outdir, overwrite) as tmp:
        calib = recipe_calibration(ckpt, settings)
        with timed(load_stage(calib)):
            model, plan = build_model(ckpt, settings, report, calib)
        special = special_tokens(ckpt)
        cache = cache_section(getattr(torch, settings.kv_dtype),
                              [t.shape for layer in model.layers for t in (layer.attn.cache.k, layer.attn.cache.v)],
                              settings.max_seq_len, "a buffer of the program per layer: [kv_heads, slots, head_dim] for keys "
                              "and for values; a sliding layer keeps a ring of sliding_window + 1 slots")
        with timed("trace and lower"):
            program = lower_to_executorch(model, runner_metadata(model, settings, special["stop_token_ids"]),
                                          settings.max_tokens_per_call, report, prefill=settings.prefill_method)
        with timed("write"):
            # Piece by piece: joining the program into one bytes object first (the manager's
            # .buffer) would hold a second copy of every weight, the file's size.
            with open(tmp / PTE_FILE, "wb") as f:
                program.write_to_file(f)
            program.write_tensor_data_to_file(tmp)  # DATA_FILE
            del program
            tokenizer = copy_tokenizer(ckpt, tmp)
            head = model.lm_head.head if isinstance(model.lm_head, HotRowsHead) else model.lm_head
            manifest = write_manifest(
                tmp, ckpt, settings, special,
                quantization={"layers": plan, "recipe": recipe_record(settings, calib),
                              "head_reads_table": plan.get("lm_head") == HEAD_OF_TABLE,
                              **({"head_correction": head.calibration} if isinstance(head, CorrectedHead) else {}),
                              **({"hot_tokens": model.hot_rows} if hasattr(model, "hot_rows") else {}),
                              **({"smoothing": model.smoothing} if hasattr(model, "smoothing") else {})},
                io={"program": PTE_FILE, "files": [PTE_FILE, DATA_FILE], "method": "forward",
                    "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"]},
                               {"name": "input_pos", "dtype": "int64", "shape": ["T"]}],
                    "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, model.config.vocab_size],
                                 "rows": "last position only"}],
                    "tokens_per_call": [1, settings.max_tokens_per_call],  # a longer prompt goes in chunks
                    # the same inputs and outputs, for calls whose input_pos starts at 0 (forward's cache)
                    **({"prefill_method": PREFILL_METHOD} if settings.prefill_method else {}),
                    # Python modules whose import registers the kernels the program calls.
                    "kernels": ["executorch.kernels.quantized"] if settings.embedding_quant != "none" else []},
                cache=cache, tokenizer={"files": tokenizer},
                versions=versions("torch", "executorch", "torchao", "transformers"))
    result.manifest = manifest
    return result
