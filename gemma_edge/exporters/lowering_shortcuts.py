"""Steps of ExecuTorch's lowering that change nothing in a Gemma's program, left out.

Each step re-traces the program (or an XNNPACK partition of it) node by node with fake tensors, so
a step with nothing to do costs as much as one that rewrites. On a 6-layer Gemma 3 int4 at 64
positions the lowering took 150 s; 28 s of it went to XNNPACK passes with nothing to match and 19 s
to a decomposition with nothing left to decompose. On the real Gemma 3 270M int4 (2026-12-03, trace
and lower 207 s -> 129 s): 18 s went to four XNNPACK passes and two edge-dialect passes with nothing
to change, 60 s to a functionalization that the decomposition after it does again. Since
2026-12-04 also (the whole export 229 s -> 168 s on a slower machine): two pairs of edge-dialect
passes run as one re-trace each, the dim-order legalization and XNNPACK's constant folding left out
where they find nothing. Some steps are merged rather than left out: two passes that each rewrite an
op as it is traced again, one after the other, become one pass that rewrites it twice. The
shortcuts are exact: the program is the one every step makes, byte for byte (tests/test_executorch.py;
the real 270M's int4 files, compared by hand).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch


@contextlib.contextmanager
def idle_steps_skipped():
    """While lowering: XNNPACK passes a partition holds no ops for, decompositions a program holds
    no ops for, the functionalization before a decomposition, edge-dialect passes with no ops to act
    on, and the dim-order legalization with no input to copy, are left out; two pairs of edge-dialect
    passes are one re-trace each (see below); restored on exit."""
    with xnnpack_passes_that_apply(), decompositions_that_apply(), one_decomposition(), edge_passes_that_apply(), \
            edge_passes_merged(), dim_order_legalized_where_needed():
        yield


@contextlib.contextmanager
def xnnpack_passes_that_apply():
    """XNNPACK preprocesses each partition with its 17 passes, each a re-trace of the partition even
    where it has nothing to change (3-7 s per pass over a 6-layer model's 14 partitions). Here a
    pass is left out of a partition that holds none of the ops it acts on (xnnpack_pass_applies)."""
    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess

    applies = xnnpack_pass_applies()
    all_passes = preprocess.XNNPACKPassManager

    class PassesThatApply(all_passes):
        def __init__(self, program, passes=None):
            super().__init__(program, passes)
            held = op_names(program.graph)
            self.passes = [p for p in self.passes if p not in applies or applies[p](held, program.graph)]

    preprocess.XNNPACKPassManager = PassesThatApply
    try:
        yield
    finally:
        preprocess.XNNPACKPassManager = all_passes


def xnnpack_pass_applies() -> dict[type, Callable[[set[str], torch.fx.Graph], bool]]:
    """XNNPACK pass -> whether it can change a partition holding these ops (their names) in this
    graph: each of these passes rewrites only nodes of the ops named here (read from the pass where
    it lists them), or subgraphs matching its patterns (a pattern matches only where every op it has
    is held), or nodes of the kind its predicate below looks for, as the pass's own loop does. The
    other passes always run."""
    from executorch.backends.xnnpack import _passes as xnn
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_quant
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.passes.const_prop_pass import ConstPropPass
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsMap
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions

    def any_of(*ops) -> Callable[[set[str], torch.fx.Graph], bool]:
        names = {op if isinstance(op, str) else _op_name(op) for op in ops}
        return lambda held, graph: not names.isdisjoint(held)

    def a_pattern_of(patterns) -> Callable[[set[str], torch.fx.Graph], bool]:
        needs = [op_names(pattern.graph) for pattern in patterns]
        return lambda held, graph: any(ops <= held for ops in needs)

    edge = exir_ops.edge.aten
    batch_norm = any_of(*xnn.DecomposeBatchNorm.BATCH_NORM_OPS)
    return {xnn.ConvertToUpsampleBilinear2d: a_pattern_of(bilinear_2d.get_graphs_dict()),
            xnn.ConvertToSDPAPass: a_pattern_of(sdpa.get_graphs()),
            xnn.FuseBatchNormPass: batch_norm, xnn.DecomposeBatchNorm: batch_norm,
            xnn.FuseActivationPass: any_of(*xnn.FuseActivationPass.FUSEABLE_ACTIVATIONS),
            xnn.DimOrderOpsRevertPass: any_of(*MemoryFormatOpsMap),
            xnn.RemoveGetItemPass: any_of("aten.max_pool2d_with_indices.default", "aten.max.dim"),  # by name there
            xnn.Conv1dUnsqueezePass: any_of("aten.convolution.default"),  # by name there
            xnn.PReLUReshapePass: any_of(edge._prelu_kernel.default),
            xnn.InsertPadQDQPass: any_of(edge.constant_pad_nd.default),
            xnn.RemoveRedundantCopyPass: any_of(edge._to_copy.default),
            ConstPropPass: constant_folding_applies(),
            # cats of more than 5 tensors (XNNPACK concatenates at most 5)
            xnn.DecomposeConcatenate: lambda held, graph: any(
                _op_name(n.target) == "aten.cat.default" and len(n.args[0]) > 5 for n in _calls(graph)),
            # mm/addmm/bmm traced from a linear layer, rebuilt as linear (XNNPACK's own source partitions)
            xnn.ConvertToLinearPass: lambda held, graph: any(
                n.target in xnn.ConvertToLinearPass.targets
                for found in get_source_partitions(graph, xnn.ConvertToLinearPass.linear_modules).values()
                for partition in found for n in partition.nodes),
            # memory formats: only ops that need NHWC, or 4-D values (channels-last ones among them), start any
            xnn.ChannelsLastTaggedReshapePass: lambda held, graph: any_of(
                *xnn.ChannelsLastTaggedReshapePass.memory_sensitive_ops_nhwc)(held, graph) or any(
                _is_4d(n.meta.get("val")) for n in graph.nodes),
            # a quantize/dequantize node whose input carries custom metadata it lacks (copied, then a re-trace)
            xnn.PropagateCustomMetaPass: lambda held, graph: any(
                "custom" in n.args[0].meta and n.meta.get("custom") != n.args[0].meta["custom"]
                for n in _calls(graph) if (is_quant(n) or is_dequant(n)) and n.args and isinstance(n.args[0], torch.fx.Node))}


@contextlib.contextmanager
def decompositions_that_apply():
    """Before partitioning, ExecuTorch decomposes the program three times (to_edge_transform_and_lower
    with a partitioner that checks ops: functionalize; all but the ops the partitioner may take; then
    the ops it declined), each a re-trace of the whole program. A Gemma's third finds nothing to do
    (19 s of the 150). Here a program that an earlier call has already decomposed, and that holds
    none of the table's ops, is returned as it is. ExecuTorch skips its second call the same way
    where its partitioner checks no ops (_gen_edge_manager_for_partitioners); sym_size is not counted,
    as its entry rebuilds the node it replaces."""
    import torch
    from torch.export import ExportedProgram

    decompose = ExportedProgram.run_decompositions
    decomposed: weakref.WeakSet = weakref.WeakSet()
    rebuilt_as_is = {torch.ops.aten.sym_size.int}

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        if self in decomposed and decomp_table is not None and not any(
                node.op == "call_function" and node.target in decomp_table and node.target not in rebuilt_as_is
                for node in self.graph.nodes):
            return self
        result = decompose(self, decomp_table, *args, **kwargs)
        decomposed.add(result)
        return result

    ExportedProgram.run_decompositions = run_decompositions
    try:
        yield
    finally:
        ExportedProgram.run_decompositions = decompose


@contextlib.contextmanager
def one_decomposition():
    """ExecuTorch functionalizes the whole program (run_decompositions({})) and then decomposes it
    with its partitioner's table (_gen_edge_manager_for_partitioners): two re-traces of the whole
    program (about 30 s each at Gemma 3 270M), where a decomposition functionalizes as it goes. Here
    the program is decomposed with that table once, right before (the partitioners' pre-decomposition
    hook, _apply_pre_decomposition_transforms), and decompositions_that_apply returns it as it is to
    both calls. The table is made as ExecuTorch makes it, for a single partitioner; with several, or
    outside decompositions_that_apply, nothing changes."""
    import executorch.exir.program._program as edge_program
    from executorch.exir.tracer import _default_decomposition_table

    transforms = edge_program._apply_pre_decomposition_transforms

    def transformed_and_decomposed(program, partitioners):
        program = transforms(program, partitioners)
        if len(partitioners) != 1:
            return program
        ops, _ = partitioners[0].ops_to_not_decompose(program)
        if not edge_program._can_skip_using_EDGE_DO_NOT_DECOMP(partitioners[0], program):
            ops = edge_program._remove_invalid_ops_for_not_decompose(ops)
        table = _default_decomposition_table()
        for op in ops:
            table.pop(op, None)
        return program.run_decompositions(table)

    edge_program._apply_pre_decomposition_transforms = transformed_and_decomposed
    try:
        yield
    finally:
        edge_program._apply_pre_decomposition_transforms = transforms


@contextlib.contextmanager
def edge_passes_that_apply():
    """Converting the program to ExecuTorch's edge dialect runs a list of passes over the whole
    program (_generate_edge_program), most of them a re-trace (8-10 s each at Gemma 3 270M). Two act
    on ops a Gemma's program no longer holds by then: aten.t (NormalizeTransposePass) and view ops
    (ReplaceBrokenOpsWithFunctionalOpsPass; ReplaceViewOpsWithViewCopyOpsPass, which runs before it,
    has made them copies). Each is left out where the graph it would get holds none; restored on exit."""
    import executorch.exir.program._program as edge_program
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import ReplaceBrokenOpsWithFunctionalOpsPass
    from torch.fx.passes.infra.pass_base import PassResult

    applies = {NormalizeTransposePass: lambda graph: any(n.target == torch.ops.aten.t.default for n in _calls(graph)),
               ReplaceBrokenOpsWithFunctionalOpsPass: lambda graph: any(getattr(n.target, "is_view", False) for n in _calls(graph))}
    passes_for = edge_program._get_aten_to_edge_passes

    def if_it_applies(step):
        check = applies.get(type(getattr(step, "__wrapped__", step)))  # the pass, inside its result wrapper
        return step if check is None else lambda gm: step(gm) if check(gm.graph) else PassResult(gm, False)

    def passes_that_apply(config):
        before, after = passes_for(config)
        return [if_it_applies(step) for step in before], after

    edge_program._get_aten_to_edge_passes = passes_that_apply
    try:
        yield
    finally:
        edge_program._get_aten_to_edge_passes = passes_for


@contextlib.contextmanager
def edge_passes_merged():
    """Of the edge dialect's passes (_generate_edge_program), two pairs run one after the other, each
    pass a re-trace of the whole program that rewrites an op as it is traced again (ExportPass's
    call_operator) and hands it on: ScalarToTensorPass then SymToTensorPass, and
    RemoveMixedTypeOperators then OpReplacePass (aten ops to edge ops). Each pair is one pass here,
    a class with both as bases: every op goes through the first's call_operator, then the second's,
    then is traced, as the second pass would have traced the first's output (an op the first adds
    goes through both, as it would have). Two re-traces of the program less (about 10 s each at
    Gemma 3 270M); restored on exit."""
    import executorch.exir.program._program as edge_program
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
    from executorch.exir.passes.scalar_to_tensor_pass import ScalarToTensorPass
    from executorch.exir.passes.sym_to_tensor_pass import SymToTensorPass
    from torch.fx.passes.infra.pass_base import PassResult

    replace_ops = edge_program.OpReplacePass
    passes_for = edge_program._get_aten_to_edge_passes

    class ScalarsAndSymbolsToTensors(ScalarToTensorPass, SymToTensorPass):
        pass

    class MixedTypesRemovedAndOpsReplaced(RemoveMixedTypeOperators, replace_ops):
        pass

    replaced = []  # set where the passes below end with OpReplacePass's work, taken by the next OpReplacePass

    class OpsReplacedAlready(replace_ops):
        def __call__(self, graph_module):
            return PassResult(graph_module, False) if replaced and replaced.pop() else super().__call__(graph_module)

    def merged(config):
        before, after = passes_for(config)
        kinds = [type(getattr(step, "__wrapped__", step)) for step in before]
        at = kinds.index(ScalarToTensorPass) if ScalarToTensorPass in kinds else -1
        if at < 0 or kinds[at + 1:at + 2] != [SymToTensorPass] or kinds[-1] is not RemoveMixedTypeOperators:
            return before, after  # not the list these pairs were read from (another ExecuTorch): every pass
        replaced[:] = [True]
        return [*before[:at], ScalarsAndSymbolsToTensors(), *before[at + 2:-1], MixedTypesRemovedAndOpsReplaced()], after

    edge_program._get_aten_to_edge_passes = merged
    edge_program.OpReplacePass = OpsReplacedAlready  # done by the last of the passes above
    try:
        yield
    finally:
        edge_program._get_aten_to_edge_passes = passes_for
        edge_program.OpReplacePass = replace_ops


@contextlib.contextmanager
def dim_order_legalized_where_needed():
    """ExecuTorch's last steps (edge_to_executorch_passes) re-trace the program with
    LegalizePortableDimOrderPass, which copies to the default dim order the input of a few ops (its
    _target_ops: mean, sum, expand, pooling) left outside any delegate, where that input has
    another. A program with no such input (a Gemma's expands and sums read contiguous tensors) is
    left as it is (12 s at Gemma 3 270M); the inputs' dim orders are those of the last trace, which
    the pass's own trace would compute again. Restored on exit."""
    import executorch.exir.program._program as edge_program
    from torch.fx.passes.infra.pass_base import PassResult

    legalize = edge_program.LegalizePortableDimOrderPass

    def needs_a_copy(node: torch.fx.Node) -> bool:
        value = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], torch.fx.Node) else None
        return not isinstance(value, torch.Tensor) or tuple(value.dim_order()) != tuple(range(value.dim()))

    class WhereNeeded(legalize):
        def __call__(self, graph_module):
            if not any(n.target in self._target_ops and needs_a_copy(n) for m in graph_module.modules()
                       if isinstance(m, torch.fx.GraphModule) for n in _calls(m.graph)):
                return PassResult(graph_module, False)
            return super().__call__(graph_module)

    edge_program.LegalizePortableDimOrderPass = WhereNeeded
    try:
        yield
    finally:
        edge_program.LegalizePortableDimOrderPass = legalize


def constant_folding_applies() -> Callable[[set[str], torch.fx.Graph], bool]:
    """Whether ExecuTorch's ConstPropPass (as XNNPACK runs it: per-tensor and per-channel quantize and
    dequantize ops kept) may compute a node of the graph at lowering: any other op whose inputs are
    all module attributes (get_attr), or that has none. The first node the pass folds is one of
    these (its constants are literals and attributes; a placeholder's value is a fake tensor), so a
    graph with none is one it leaves as it is."""
    from executorch.exir.dialects._ops import ops as exir_ops

    kept = {getattr(ops.quantized_decomposed, name).default for ops in (torch.ops, exir_ops.edge)
            for name in ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")}
    return lambda held, graph: any(n.target not in kept and all(i.op == "get_attr" for i in n.all_input_nodes)
                                   for n in _calls(graph))


def _calls(graph):
    return (node for node in graph.nodes if node.op == "call_function")


def _is_4d(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(getattr(v, "ndim", None) == 4 for v in values)


def op_names(graph) -> set[str]:
    """The names of the ops a graph calls (aten.linear.default, getitem)."""
    return {_op_name(node.target) for node in graph.nodes if node.op == "call_function"}


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target))
