"""ONNX Runtime's fused CPU operators (domain com.microsoft), as export-only rewrites.

`--ops contrib` (the ONNX default) traces the model with these in place of plain ONNX:

- GroupQueryAttention for each layer's attention. It reads only the filled part of the static
  cache (the plain graph multiplies by all max_seq_len slots and masks the rest), rotates q and k
  itself from cos/sin tables (do_rotary), applies the sliding window (local_window_size, the
  same count of visible keys as Gemma's sliding_window) and Gemma 2's soft-cap, and writes this
  call's keys and values into past in place when present is bound to the same buffer, as our
  runtime and ONNX Runtime GenAI do. The graph's inputs and outputs do not change: the cache
  length it needs (seqlens_k, total_sequence_length) is derived from position_ids.

- One matmul for q, k and v (GQA's packed input; Gemma 3 splits it for its QK-norm) and one for
  gate and up: fewer, larger MatMulNBits calls. Only layers of one precision are fused: with k and
  v kept 8-bit in a 4-bit export (--int8-layers), q is its own matmul and k, v one (kv_proj).

- The residual stream kept [1, T, hidden] (BatchedGemma) where the stack's linear layers are
  block-quantized, as GQA takes and gives it: no Unsqueeze and Reshape around each layer's attention.

- Each residual Add and the RMSNorm that reads its sum as one SkipSimplifiedLayerNormalization
  (fuse_residual_norms, on the saved graph), as ONNX Runtime GenAI's builder writes Gemma.

The two together: 462 -> 388 nodes on Gemma 3 270M int4, the same logits (the first bit for bit;
the fused norm sums in another order), ~0.6 ms of a ~13 ms decode step in ONNX Runtime's profile
(2026-12-06: the 18 Unsqueezes 0.19 ms and 18 Reshapes ~0.15 ms removed; norms and Adds 1.16-1.52 ->
0.97-1.13 ms). Measured on 2026-11-28 by wall clock alone, the fused norm had decoded no faster.

`--ops standard` keeps every operator in the ONNX standard, for runtimes without contrib ops.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gemma_edge.errors import ConfigError
from gemma_edge.model import Attention, FeedForward, Gemma

GQA = "com.microsoft::GroupQueryAttention"


class FusedFeedForward(FeedForward):
    """GeGLU with gate and up as one matmul (one weight [2 * intermediate, hidden]), split after."""

    gate_up_proj: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate=self.approximate) * up)


class GroupQueryAttention(Attention):
    """Attention as one com.microsoft GroupQueryAttention node after one q/k/v matmul (weight
    [(heads + 2 kv) * head_dim, hidden]), or after q's and a k/v matmul (kv_proj) where k and v are
    of another precision than q, in either stack: BatchedGemma's [1, T, hidden], or Gemma's [T,
    hidden] where float linear layers remain (use_batched_stream). Export only: in eager mode the
    symbolic node returns no real values."""

    rope_cos_half: torch.Tensor  # [max_seq_len, head_dim / 2]: GQA takes the non-repeated half
    rope_sin_half: torch.Tensor

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
        """x [1, T, hidden] (BatchedGemma's stream) or [T, hidden] (Gemma's) -> the same shape; cos,
        sin, mask and rotate are not read (GQA rotates from its own tables and masks from the cache
        lengths)."""
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        batched = x.dim() == 3
        if "kv_proj" in self._modules:  # q and k, v of two precisions: two matmuls
            q, (k, v) = self.q_proj(x), self.kv_proj(x).split([kv * d, kv * d], dim=-1)
        elif self.q_norm is None:
            q, k, v = self.qkv_proj(x), None, None  # [(1,) T, (heads + 2 kv) * d]: GQA's packed BSNH layout
        else:
            q, k, v = self.qkv_proj(x).split([h * d, kv * d, kv * d], dim=-1)
        if k is not None and self.q_norm is not None:
            # Gemma 3 normalizes each head before RoPE, which GQA applies: unpacked, normalized, and
            # GQA's [1, T, ...] by the reshape back from the heads (not a reshape, then an Unsqueeze)
            q = self.q_norm(q.view(-1, h, d)).view(1, -1, h * d)
            k = self.k_norm(k.view(-1, kv, d)).view(1, -1, kv * d)
        elif k is not None and not batched:
            q, k = q[None], k[None]
        if not batched:  # Gemma's [T, ...] -> GQA's [1, T, ...]
            q, v = (q[None], None) if k is None else (q, v[None])
        last = input_pos[-1:]  # consecutive positions: the last is the filled length - 1
        seqlens_k = last.to(torch.int32)  # [batch]
        total = (last + 1).to(torch.int32).reshape(())
        past_k, past_v = self.cache.k4, self.cache.v4  # [1, kv, max_seq_len, d]
        inputs = [q] if k is None else [q, k, v]
        if past_k.dtype != x.dtype:  # a float16 cache: GQA computes in its inputs' type, which is the cache's
            inputs = [t.to(past_k.dtype) for t in inputs]
        inputs += [None, None] if k is None else []
        out, self.cache.k4, self.cache.v4 = torch.onnx.ops.symbolic_multi_out(
            GQA, (*inputs, past_k, past_v, seqlens_k, total, self.rope_cos_half, self.rope_sin_half),
            {"num_heads": h, "kv_num_heads": kv, "scale": float(self.scale), "softcap": float(self.softcap or 0.0),
             "local_window_size": self.window or -1, "do_rotary": 1, "rotary_interleaved": 0},
            dtypes=(past_k.dtype, past_k.dtype, past_v.dtype), shapes=((1, x.shape[-2], h * d), past_k.shape, past_v.shape),
            version=1)
        return self.o_proj((out if batched else out.view(-1, h * d)).to(x.dtype))  # a Reshape, not a Gather (a copy)


class BatchedGemma(Gemma):
    """The decoder stack with its residual stream [1, T, hidden] (batch 1) where Gemma's is [T, hidden]:
    GroupQueryAttention reads and writes [1, T, ...], so each layer needs no Unsqueeze of v before it
    and no Reshape of its output after (38 nodes fewer on Gemma 3 270M). Export only, made by
    use_batched_stream: every layer's attention is a GroupQueryAttention, which makes no use of the
    RoPE rows and masks Gemma's stack computes for it."""

    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        dtype = self.embed_scale.dtype
        x = self.embed_tokens(tokens) * self.embed_scale.to(dtype)  # [1, T, hidden]
        for layer in self.layers:
            x = layer(x, input_pos, None, None, None, None)
        return x


SKIP_NORM = "SkipSimplifiedLayerNormalization"


def fuse_residual_norms(proto) -> int:
    """In a saved BatchedGemma graph (onnx ModelProto, edited in place): each Add whose sum an
    RMSNormalization over the last axis reads (the residual stream: x + h, then the next sub-block's
    norm) -> one com.microsoft SkipSimplifiedLayerNormalization computing both, the norm as its
    first output and the sum, which the next residual Add reads, as its fourth. Its inputs must be
    [1, T, hidden] (BatchedGemma's stream). Returns how many were fused (2 a layer)."""
    from onnx import helper

    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    fused: set[str] = set()  # the sums made by a fused node
    for norm in [n for n in graph.node if n.op_type == "RMSNormalization"]:
        add = producers.get(norm.input[0])
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if (add is None or add.op_type != "Add" or add.output[0] in fused or attrs.get("axis", -1) != -1
                or attrs.get("stash_type", 1) != 1 or norm.input[1] not in initializers or initializers & set(add.input)):
            continue  # not a residual sum (an Add with a constant; a sum two norms read), or a norm the kernel does not compute
        skip = helper.make_node(SKIP_NORM, [*add.input, norm.input[1]], [norm.output[0], "", "", add.output[0]],
                                name=f"{norm.name}.skip", domain="com.microsoft", epsilon=attrs.get("epsilon", 1e-5))
        graph.node.insert(list(graph.node).index(add), skip)  # where the sum was made: its readers follow
        graph.node.remove(add)
        graph.node.remove(norm)
        fused.add(add.output[0])
    return len(fused)


def unsupported(config) -> str | None:
    """Why the contrib graph cannot be built for this architecture, or None."""
    if config.head_dim % 16:  # ONNX Runtime's CPU kernel refuses other sizes at run time
        return f"ONNX Runtime's GroupQueryAttention needs a head_dim that is a multiple of 16, this model's is {config.head_dim}"
    return None


def resolve_ops(config, ops: str) -> str:
    """auto -> contrib where the architecture allows it, else standard; contrib where it cannot be built is an error."""
    reason = unsupported(config)
    if ops == "auto":
        return "standard" if reason else "contrib"
    if ops == "contrib" and reason:
        raise ConfigError(f"--ops contrib: {reason}; use --ops standard")
    return ops


def use_group_query_attention(model: nn.Module, same: Callable[[tuple[str, ...]], bool]) -> nn.Module:
    """Every layer's Attention -> GroupQueryAttention, with its layer type's RoPE tables; q, k and v
    fused where same((q_proj, k_proj, v_proj)) (they are quantized alike), else k and v."""
    for layer in model.layers:
        attn = layer.attn
        if type(attn) is not Attention:
            continue
        attn.__class__ = GroupQueryAttention
        fused = "qkv_proj" if same(FUSED["qkv_proj"]) else "kv_proj"
        setattr(attn, fused, _fused(attn, FUSED[fused]))
    return share_rope_halves(model)


def use_batched_stream(model: nn.Module) -> bool:
    """model -> BatchedGemma where every layer's attention is a GroupQueryAttention and no float
    linear layer is left in the stack (block-quantized layers, MatMulNBits, take [1, T, hidden] as
    they are; a float one traces to a MatMul on a transposed copy of its weight there, where on
    [T, hidden] it is a Gemm reading the weight itself). Returns whether it did."""
    layers = model.layers
    if not all(isinstance(layer.attn, GroupQueryAttention) for layer in layers) or any(
            isinstance(m, nn.Linear) for m in layers.modules()):
        return False
    model.__class__ = BatchedGemma
    return True


def share_rope_halves(model: nn.Module) -> nn.Module:
    """Give each GroupQueryAttention the first half of its layer type's RoPE tables (the tables
    repeat it: rotate-half layout), one tensor per type and table shared by its layers, so the graph
    stores it once. Run again after a model rewritten on the meta device gets its buffers."""
    half = model.config.head_dim // 2
    tables = {}
    for layer in model.layers:
        if not isinstance(layer.attn, GroupQueryAttention):
            continue
        for table in ("cos", "sin"):
            key = f"rope_{table}_{layer.layer_type}"  # [max_seq_len, head_dim]
            if key not in tables:  # in the cache's type: GQA's cos/sin are of its queries' type
                tables[key] = getattr(model, key)[:, :half].to(layer.attn.cache.k.dtype).contiguous()
            layer.attn.register_buffer(f"rope_{table}_half", tables[key], persistent=False)
    return model


def fuse_gate_up(model: nn.Module, same: Callable[[tuple[str, ...]], bool]) -> nn.Module:
    if not same(FUSED["gate_up_proj"]):
        return model
    for module in model.modules():
        if type(module) is FeedForward:
            module.__class__ = FusedFeedForward
            module.gate_up_proj = _fused(module, FUSED["gate_up_proj"])
    return model


def use_ops(model: nn.Module, ops: str, layer_quant: Callable[[str], str] = lambda kind: "") -> nn.Module:
    """The model rewritten for `ops` (contrib or standard, as resolve_ops gives), fusing the linear
    layers that layer_quant (kind -> quantization, ExportSettings.layer_quant) quantizes alike."""
    if ops == "contrib":
        def same(kinds: tuple[str, ...]) -> bool:
            return len({layer_quant(kind) for kind in kinds}) == 1

        return fuse_gate_up(use_group_query_attention(model, same), same)
    return model


# Fused linear layer -> the layers it concatenates (rows in this order).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "kv_proj": ("k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused(module: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    """One bias-free linear layer whose rows are the named layers' rows; the originals are removed."""
    parts = [getattr(module, name) for name in names]
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    for name in names:
        delattr(module, name)
    return fused


def unfuse_weights(weights: dict, config) -> dict:
    """{name: [out, in] array} with fused layers' weights split back into the model's layers."""
    sizes = {"q_proj": config.num_attention_heads * config.head_dim, "k_proj": config.num_key_value_heads * config.head_dim,
             "v_proj": config.num_key_value_heads * config.head_dim,
             "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
    out = {}
    for name, w in weights.items():
        prefix, _, layer = name.removesuffix(".weight").rpartition(".")
        if layer not in FUSED:
            out[name] = w
            continue
        start = 0
        for part in FUSED[layer]:
            out[f"{prefix}.{part}.weight"] = w[start:start + sizes[part]]
            start += sizes[part]
    return out


__all__ = ["resolve_ops", "use_ops", "use_batched_stream", "share_rope_halves", "unfuse_weights", "fuse_residual_norms",
           "FUSED"]
