"""Which parts of a program XNNPACK runs: its own partitioner, with the weights tagged for the data
file and the decoder's graph cut between layers into pieces of about PARTITION_BYTES of weights.

XNNPACK takes the whole decoder of a Gemma as one graph (rewrites.JoinedValuesAttention); one call a
step instead of two a layer is faster (Gemma 3 270M, the phone recipe: a decode step 19.5 -> 18.3 ms,
2026-12-06). But a partition's weights are packed together, and the unpacked ones are freed only once
their partition is packed (executorch.xnnpack_without_copies): as one piece, Gemma 7B would hold all
its weights twice. Cut into pieces, a lowering holds at most one piece's weights twice.
"""

from __future__ import annotations

import re

import torch

# A piece of an XNNPACK partition ends at the first layer boundary past this many bytes of weights (as
# the exporter holds them): the real Gemma 3 270M's 18 layers (0.1 GiB at int8) are one piece, Gemma
# 2B's (0.11 GiB a layer at int4, torchao's one byte a value) five layers a piece, 7B's (0.27 GiB) two.
PARTITION_BYTES = 512 << 20
_LAYER = re.compile(r"\blayers\.(\d+)\b")


def xnnpack_partitioner(data_tag: str | None, limit: int | None = None):
    """XNNPACK's partitioner, its partitions cut between decoder layers at `limit` bytes of weights
    (cut_between_layers; default PARTITION_BYTES). data_tag: each weight it delegates is tagged for
    that data file (XNNPACK writes a weight whose node carries a delegate_constant_tag to that file of
    the store), tagged on the program the partitioner is given, as no earlier graph has the nodes of
    torchao's quantized tensors' parts. (Made here, not at import: building a model needs no
    executorch.)"""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_quant

    class GemmaPartitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            if data_tag is not None:
                weights = weights_by_placeholder(exported_program)
                for node in exported_program.graph.nodes:
                    if node.op == "placeholder" and node.name in weights:
                        node.meta.setdefault("custom", {})["delegate_constant_tag"] = data_tag
                    # What XNNPACK's PropagateCustomMetaPass does to each partition, done once here: a
                    # quantize/dequantize node carries its input's tag. The pass then has nothing to do
                    # and is left out (lowering_shortcuts: each run of it re-traced its partition).
                    elif (is_quant(node) or is_dequant(node)) and node.args and isinstance(node.args[0], torch.fx.Node) \
                            and "custom" in node.args[0].meta:
                        node.meta["custom"] = node.args[0].meta["custom"]
            return super().partition(exported_program)

        def generate_partitions(self, ep):
            return cut_between_layers(super().generate_partitions(ep), ep, limit or PARTITION_BYTES)

    return GemmaPartitioner()


def weights_by_placeholder(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """{placeholder name: the weight it stands for}: parameters, constants and buffers but the KV cache."""
    signature = program.graph_signature
    mutated = set(signature.buffers_to_mutate.values())
    tensors = {**program.state_dict, **program.constants}
    held = {**signature.inputs_to_parameters, **signature.inputs_to_buffers, **signature.inputs_to_lifted_tensor_constants}
    return {node: tensors[name] for node, name in held.items() if name not in mutated and name in tensors}


def layer_of(node: torch.fx.Node) -> int | None:
    """The index of the decoder layer a node was traced in (its innermost module's path), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        found = _LAYER.search(path)
        if found:
            return int(found.group(1))
    return None


def cut_between_layers(partitions: list, program: torch.export.ExportedProgram, limit: int) -> list:
    """Each partition as pieces of consecutive nodes (in the graph's order), a new piece begun where
    a decoder layer begins once the current one holds `limit` bytes of weights. A weight goes with
    the piece of its first reader (ExecuTorch copies a weight a second piece reads into it too, as
    for any two partitions). Consecutive pieces of a partition cannot form a cycle: every edge
    between them runs forward in the graph's order, and none leaves the partition and comes back
    (the partitioner's own guarantee)."""
    from torch.fx.passes.infra.partitioner import Partition

    order = {node: i for i, node in enumerate(program.graph.nodes)}
    weights = weights_by_placeholder(program)
    pieces = []
    for partition in partitions:
        members = set(partition.nodes)
        ops = sorted((n for n in members if n.op != "placeholder"), key=order.__getitem__)
        home = {}  # op -> the placeholders that go with it
        for node in members - set(ops):
            readers = [user for user in node.users if user in members]
            home.setdefault(min(readers, key=order.__getitem__) if readers else ops[0], []).append(node)
        piece, held, layer = [], 0, None
        for op in ops:
            now = layer_of(op)
            if piece and held >= limit and now is not None and now != layer:
                pieces.append(piece)
                piece, held = [], 0
            layer = now if now is not None else layer
            held += sum(part.nbytes() for node in home.get(op, []) if node.name in weights
                        for part in storages([weights[node.name]]))
            piece += [*home.get(op, []), op]
        pieces.append(piece)
    return [Partition(id=i, nodes=piece) for i, piece in enumerate(pieces)]


def storages(tensors):
    """The storages of tensors, a quantized tensor's parts (torchao's) each."""
    for t in tensors:
        names = getattr(type(t), "tensor_data_names", None)
        yield from (storages(getattr(t, n) for n in names) if names else [t.untyped_storage()])
