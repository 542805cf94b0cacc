"""Weight quantization of an exported ONNX graph, with onnxruntime's own tools.

- Linear layers (every decoder projection and the output projection) become MatMulNBits: 4-bit
  (int4) or 8-bit (int8) blocks of --group-size along the input dimension, through onnxruntime's
  MatMulNBitsQuantizer, asymmetric (a zero point per block). A width that is not a multiple of
  the block is padded with zeros inside the op, which is exact.
- The embedding becomes GatherBlockQuantized, 4-bit or 8-bit asymmetric blocks along the hidden
  axis, written here: onnxruntime's quantizer does 4-bit Gathers only, while the op (1.32) takes
  uint8 data of 4 or 8 bits, so one writer serves both.
- Gemma ties the output projection to the embedding: quantized alike (same bits and block), the
  projection's MatMulNBits weight is the table too, read through a Reshape: one quantized copy,
  no fp32 copy. Quantized differently, each gets its own.
"""

from __future__ import annotations

import numpy as np

from gemma_edge.exporters.settings import ExportSettings

# MatMulNBits' compute precision. 4: activations quantized to int8 per block, int8 dot products.
# Measured on the real Gemma 3 270M int4 (512 tokens, perplexity vs fp32): level 4 x1.931, level 0
# (float32 arithmetic) x1.940, level 1 the same: no loss.
ACCURACY_LEVEL = 4
# Measured likewise, int4 block 32 with an int4 embedding: symmetric x1.93, asymmetric x1.56 (its
# zero points cost 4 bits per block, 1.6% of the weights). Asymmetric blocks fit weights whose
# range is not centred on zero, which the symmetric grid wastes half of.
SYMMETRIC = False
# int8 is 8-bit MatMulNBits, not onnxruntime's per-channel dynamic quantization (quantize_dynamic:
# int8 weights per channel, activations quantized per tensor at run time, MatMulInteger), which
# measured on the real Gemma 3 270M: x6.72 perplexity (top-1 40%) at 445 MiB, against x1.007
# (top-1 97%) at 298 MiB here. Per-tensor activation scales cannot hold Gemma's activation
# outliers; it was faster (prefill 2.2x, decode 1.2x) but that quality is no int8.
EMBEDDING = "model.embed_tokens.weight"


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def linear_weights_to_matmul(proto) -> list[str]:
    """Rewrite every linear layer as MatMul(x, W^T) with W^T a [in, out] initializer, the form
    onnxruntime's quantizer takes; returns the MatMul node names.

    The exporter writes a linear layer as Gemm(x, W, transB=1) when x is 2-D and as
    MatMul(x, Transpose(W)) when it is 3-D (the output projection). Only weights of the model's
    linear layers and the tied embedding count: RoPE's rotation matrix is a MatMul on a constant
    too and stays as it is.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = _initializers(graph)
    producers = {out: n for n in graph.node for out in n.output}
    is_weight = lambda name: name in inits and (name.endswith("_proj.weight") or name in (EMBEDDING, "model.lm_head.weight"))
    transposed: dict[str, str] = {}
    names, dead = [], set()

    def weight_t(name: str) -> str:
        if name not in transposed:
            w = numpy_helper.to_array(inits[name])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.T"))
            transposed[name] = f"{name}.T"
        return transposed[name]

    for i, node in enumerate(graph.node):
        weight = None
        if node.op_type == "Gemm" and len(node.input) == 2 and is_weight(node.input[1]):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0:
                weight = node.input[1]
        elif node.op_type == "MatMul" and node.input[1] in producers:
            t = producers[node.input[1]]
            if t.op_type == "Transpose" and is_weight(t.input[0]):
                weight, dead = t.input[0], dead | {t.name}
        if weight is not None:
            name = node.name or f"linear_{i}"
            graph.node[i].CopyFrom(helper.make_node("MatMul", [node.input[0], weight_t(weight)], list(node.output), name=name))
            names.append(name)
    _remove_unused(graph, dead)
    return names


def _remove_unused(graph, dead_nodes: set[str]) -> None:
    keep = [n for n in graph.node if n.name not in dead_nodes]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)


def quantize_linears(proto, nodes: list[str], bits: int, block: int):
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    root.handlers[:] = handlers  # its import sets the root logger to print INFO
    root.setLevel(level)

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=SYMMETRIC, accuracy_level=ACCURACY_LEVEL,
                                          bits=bits, op_types_to_quantize=("MatMul",))
    # The quantizer takes every MatMul on a constant (RoPE's rotation too) unless excluded.
    others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
    quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _tied_head(graph, bits: int, block: int):
    """The MatMulNBits of the output projection quantized from the embedding table itself (tied
    weights), when its blocks can serve as the table's: same bits and block, hidden a whole number
    of blocks. Its B [vocab, blocks, bytes], scales [vocab, blocks] and zero points [vocab, blocks
    (4-bit: packed)] are then byte for byte what GatherBlockQuantized reads as [vocab, bytes]."""
    from onnx import helper

    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] == f"{EMBEDDING}.T_Q{bits}":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs["bits"] == bits and attrs["block_size"] == block and attrs["K"] % block == 0:
                return node
    return None


def quantize_embedding(proto, bits: int, block: int):
    """Gather on the embedding table -> GatherBlockQuantized, blocks of `block` along hidden.

    With tied weights quantized alike, the table is the output projection's quantized weight,
    reshaped (stored once: a third of the 270M model's file)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    vocab, hidden = _initializers(graph)[EMBEDDING].dims
    head = _tied_head(graph, bits, block)
    if head is not None:
        shape = numpy_helper.from_array(np.array([vocab, hidden * bits // 8], np.int64), f"{EMBEDDING}.shape")
        graph.initializer.append(shape)
        graph.node.insert(0, helper.make_node("Reshape", [head.input[1], shape.name], [f"{EMBEDDING}.q{bits}"],
                                              name="embed_tokens_shared_with_head"))
        _gather_block_quantized(graph, [f"{EMBEDDING}.q{bits}", None, *head.input[2:4]], bits, block)
        return proto
    table = numpy_helper.to_array(_initializers(graph)[EMBEDDING])  # [vocab, hidden]
    q, scales, zero = quantize_blocks(table, bits, block)
    data = numpy_helper.from_array(_pack(q, bits), f"{EMBEDDING}.q{bits}")
    scale = numpy_helper.from_array(scales.astype(np.float32), f"{EMBEDDING}.scales")
    inputs = [data.name, None, scale.name]
    if not SYMMETRIC:
        zero_points = numpy_helper.from_array(_pack(zero.astype(np.uint8), bits), f"{EMBEDDING}.zero_points")
        graph.initializer.append(zero_points)
        inputs.append(zero_points.name)
    graph.initializer.extend([data, scale])
    _gather_block_quantized(graph, inputs, bits, block)
    return proto


# The clipping of each block's range tried by quantize_blocks: the one with the least squared error
# wins. Measured on the real Gemma 3 270M's tied table (int8 linears, 512 tokens): perplexity x1.108
# with the full range (round to nearest), x1.080 with the search (benchmarks/int4_quality.py).
CLIPS = tuple(1.0 - 0.01 * i for i in range(21))


def quantize_blocks(w: np.ndarray, bits: int, block: int, rows_at_once: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [rows, cols] -> (q uint8 [rows, cols], scales float32 [rows, blocks], zero points uint8
    [rows, blocks]) in blocks of `block` along cols, each block on its best clipped range (CLIPS).
    A width that is not a multiple of the block ends in a partial block (zero-padded, exact).
    Rows go in chunks: the search's temporaries for a whole 256k-row table would take gigabytes."""
    parts = [_quantize_rows(w[i:i + rows_at_once], bits, block) for i in range(0, w.shape[0], rows_at_once)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _quantize_rows(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = w.shape
    padded = np.zeros((rows, -(-cols // block) * block), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, -1, block)
    best = None
    for clip in CLIPS if not SYMMETRIC else (1.0,):
        if SYMMETRIC:  # the zero point is the op's default, 2^(bits-1)
            qmax = (1 << (bits - 1)) - 1
            scales = np.abs(blocks).max(-1) / qmax  # [rows, blocks]
            zero = np.full(scales.shape, 1 << (bits - 1), np.int16)
            low, high = -qmax + zero[..., None], qmax + zero[..., None]
        else:  # the block's range [min, max] (widened to hold 0, then clipped) on 0 .. 2^bits - 1
            low, high = 0, (1 << bits) - 1
            lo, hi = np.minimum(blocks.min(-1), 0) * clip, np.maximum(blocks.max(-1), 0) * clip
            scales = ((hi - lo) / high).astype(np.float32)
            zero = np.clip(np.rint(-lo / np.where(scales == 0, 1, scales)), low, high).astype(np.int16)
        q = np.clip(np.rint(blocks / np.where(scales == 0, 1, scales)[..., None]) + zero[..., None], low, high)
        err = (((q - zero[..., None]) * scales[..., None] - blocks) ** 2).sum(-1)  # [rows, blocks]
        if best is None:
            best = [q, scales, zero, err]
        else:
            better = err < best[3]
            best = [np.where(better[..., None], q, best[0]), np.where(better, scales, best[1]),
                    np.where(better, zero, best[2]), np.minimum(err, best[3])]
    q, scales, zero, _ = best
    return q.astype(np.uint8).reshape(rows, -1)[:, :cols], scales.astype(np.float32), zero.astype(np.uint8)


def quantize_tied_head(proto, nodes: list[str], bits: int, block: int):
    """The output projection MatMul(x, table^T) -> MatMulNBits on the table quantized by
    quantize_blocks, in the layout onnxruntime's quantizer writes (B [N, blocks, bytes], scales
    [N, blocks], zero points [N, blocks] packed), which quantize_embedding then shares with the
    Gather. Written here rather than by onnxruntime's quantizer for the clipping search."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    table = numpy_helper.to_array(_initializers(graph)[EMBEDDING])  # [vocab, hidden]
    vocab, hidden = table.shape
    q, scales, zero = quantize_blocks(table, bits, block)
    blocks = scales.shape[1]
    padded = np.zeros((vocab, blocks * block), np.uint8)
    padded[:, :hidden] = q
    name = f"{EMBEDDING}.T"
    graph.initializer.extend([
        numpy_helper.from_array(_pack(padded, bits).reshape(vocab, blocks, -1), f"{name}_Q{bits}"),
        numpy_helper.from_array(scales, f"{name}_scales"),
        numpy_helper.from_array(_pack(zero, bits), f"{name}_zero_points")])
    for i, node in enumerate(graph.node):
        if node.name in nodes:
            graph.node[i].CopyFrom(helper.make_node(
                "MatMulNBits", [node.input[0], f"{name}_Q{bits}", f"{name}_scales", f"{name}_zero_points"],
                list(node.output), name=f"{node.name}_Q{bits}", domain="com.microsoft",
                K=hidden, N=vocab, bits=bits, block_size=block, accuracy_level=ACCURACY_LEVEL))
    _remove_unused(graph, set())
    return proto


def _gather_block_quantized(graph, inputs: list, bits: int, block: int) -> None:
    """Every Gather on the table -> GatherBlockQuantized(data, its indices, scales[, zero points])."""
    from onnx import helper

    for i, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input[0] == EMBEDDING:
            inputs[1] = node.input[1]
            graph.node[i].CopyFrom(helper.make_node(
                "GatherBlockQuantized", list(inputs), list(node.output), name=node.name,
                domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    _remove_unused(graph, set())


def quantize_onnx(proto, settings: ExportSettings):
    """Quantize per settings; returns (model, {layer: scheme}). The output projection of a tied
    model is the embedding table: it takes the table's quantization (--embedding-quant), so the
    table is stored once; the decoder's linear layers take --quant."""
    plan: dict[str, str] = {}
    kind = "symmetric" if SYMMETRIC else "asymmetric"
    bits_of = {"int4": 4, "int8": 8}
    if settings.quant != "fp32":
        bits = bits_of[settings.quant]
        nodes = linear_weights_to_matmul(proto)
        weights = {n.name: n.input[1] for n in proto.graph.node if n.name in set(nodes)}
        tied = [n for n in nodes if weights[n] == f"{EMBEDDING}.T"]
        decoder = [n for n in nodes if n not in tied]
        proto = quantize_linears(proto, decoder, bits, settings.group_size)
        plan.update({n: f"MatMulNBits {bits}-bit, block {settings.group_size}, {kind}, accuracy level {ACCURACY_LEVEL}"
                     for n in decoder})
        if tied:
            head_bits = bits_of.get(settings.embedding_quant, bits)
            proto = quantize_tied_head(proto, tied, head_bits, settings.group_size)
            plan.update({n: f"MatMulNBits {head_bits}-bit, block {settings.group_size}, {kind}, clipped blocks, "
                            f"accuracy level {ACCURACY_LEVEL} (the tied embedding table)" for n in tied})
    if settings.embedding_quant != "none":
        bits = bits_of[settings.embedding_quant]
        proto = quantize_embedding(proto, bits, settings.group_size)
        plan["embed_tokens"] = f"GatherBlockQuantized {bits}-bit, block {settings.group_size}, {kind}, clipped blocks"
    return proto, plan


def dequantized_weights(proto) -> dict[str, np.ndarray]:
    """The weights the quantized graph computes with, as float32 in the model's layout: every
    MatMulNBits weight [out, in] under its linear layer's name (the output projection as
    "model.lm_head.weight"), the embedding table [vocab, hidden]. For checking an export against
    an eager model that carries exactly these weights."""
    from onnx import helper, numpy_helper

    inits = _initializers(proto.graph)
    reshaped = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Reshape" and n.input[0] in inits}
    found = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block = attrs["bits"], attrs["block_size"]
        zero_point = 1 << (bits - 1)  # the op's default
        data_name = node.input[1 if node.op_type == "MatMulNBits" else 0]
        data_name = reshaped.get(data_name, data_name)  # a table shared with the output projection
        data = numpy_helper.to_array(inits[data_name])
        scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        if node.op_type == "MatMulNBits":
            n, k = attrs["N"], attrs["K"]
            q = _unpack(data.reshape(n, -1), bits)  # [N, K padded to whole blocks]; B is [N, k_blocks, bytes]
            blocks = q.shape[1] // block
            if len(node.input) > 3 and node.input[3]:  # uint8 zero points [N, blocks] (4-bit: packed)
                zero_point = _unpack(numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1), bits)[:, :blocks, None]
            w = (q.reshape(n, blocks, block) - zero_point) * scales.reshape(n, blocks, 1)
            name = node.input[1].removesuffix(f"_Q{bits}").removesuffix(".T")
            name = "model.lm_head.weight" if name == EMBEDDING else name
            found[name] = w.reshape(n, -1)[:, :k]
        else:
            q = _unpack(data.reshape(data.shape[0], -1), bits)
            vocab, hidden = q.shape
            blocks = scales.shape[1]
            if len(node.input) > 3 and node.input[3]:  # uint8 [vocab, blocks] (4-bit: packed)
                zero_point = _unpack(numpy_helper.to_array(inits[node.input[3]]), bits)[:, :blocks, None]
            padded = np.zeros((vocab, blocks * block), np.int16)
            padded[:, :hidden] = q
            w = (padded.reshape(vocab, blocks, block) - zero_point) * scales[..., None]
            found[EMBEDDING] = w.reshape(vocab, -1)[:, :hidden]
    return found


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, values] -> uint8 [rows, bytes]: 4-bit values two per byte, low nibble first."""
    if bits == 8:
        return q
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, bytes] -> int16 [rows, values]; 4-bit values packed low nibble first."""
    if bits == 8:
        return data.astype(np.int16)
    out = np.empty((data.shape[0], data.shape[1] * 2), np.int16)
    out[:, 0::2], out[:, 1::2] = data & 0x0F, data >> 4
    return out
