"""What an export will need in memory, said before it starts: the exported weights' size, the
largest tensor of the checkpoint (held in float32 while its layer is quantized), the KV cache
buffers, and what the tools copy on top (measured), against what the machine has.

An export that cannot fit is refused before minutes of work (export --force tries anyway).
"""

from __future__ import annotations

import dataclasses
import math
import os

from gemma_edge.checkpoints import weight_shapes
from gemma_edge.config import GemmaConfig
from gemma_edge.errors import GemmaEdgeError
from gemma_edge.exporters.settings import ExportSettings

GIB = 2**30
# Bytes per weight as each format stores it (group size g): int4 packs two per byte with one
# scale per group (ONNX: float32 scale and a 4-bit zero point; .pte: bf16 scale and an int8
# offset, int4_offsets.py); int8 one byte with one float32 scale per row.
PER_WEIGHT = {
    ("onnx", "int4"): lambda g: 0.5 + 4 / g + 0.5 / g,
    ("pte", "int4"): lambda g: 0.5 + 2 / g + 1 / g,
    ("onnx", "int8"): lambda g: 1 + 4 / g + 1 / g,  # ONNX's int8 layers are blocked too
    ("pte", "int8"): lambda g: 1.0,
}
# What the exporters hold in memory where it differs from the file: torchao keeps 4-bit values
# unpacked, one per int8 (XNNPACK packs them only when lowering).
HELD_PER_WEIGHT = {("pte", "int4"): lambda g: 1 + 2 / g}
# The process itself (Python, torch, the exporters' libraries) before any weight.
BASE = 0.7 * GIB
# The largest tensor of the checkpoint (Gemma's embedding table) is held in float32 while its
# quantized form is made, with the quantizer's working copies of a block of it: 1.5 times it in all
# (measured with benchmarks/full_size.py).
LARGEST = 1.5


def weight_bytes(config: GemmaConfig, settings: ExportSettings, held: bool = False) -> int:
    """The exported weights' bytes (held: as the exporter holds them in memory): linear layers at
    --quant, the embedding at --embedding-quant (a tied head reads the quantized table in both
    formats; a .pte's head beside a float table is its own linear layer, and a head reading an int4
    table holds its own copy of the 4-bit values in memory, their column pairs swapped)."""
    shapes = weight_shapes(config)
    table = math.prod(shapes["embed_tokens.weight"])
    linears = {name: math.prod(s) for name, s in shapes.items() if len(s) == 2 and name != "embed_tokens.weight"}
    tied_pte = settings.format == "pte" and config.tie_word_embeddings
    if tied_pte and settings.embedding_quant == "none" and settings.quant != "fp32":
        linears["lm_head.weight"] = table  # the output projection, untied to be quantized as a linear layer
    head_copy = table if tied_pte and held and settings.embedding_quant == "int4" else 0

    def size(quant: str) -> float:
        if quant in ("fp32", "none"):
            return 4.0
        per = HELD_PER_WEIGHT if held and (settings.format, quant) in HELD_PER_WEIGHT else PER_WEIGHT
        return per[(settings.format, quant)](settings.group_size)

    layers = sum(n * size(settings.layer_quant(name)) for name, n in linears.items())
    return int(layers + (table + head_copy) * size(settings.embedding_quant))


KV_ITEMSIZE = {"float32": 4, "float16": 2}


def cache_bytes(config: GemmaConfig, max_seq_len: int, itemsize: int = 4) -> int:
    """The static KV cache: keys and values, [kv_heads, max_seq_len, head_dim] per layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * max_seq_len * config.head_dim * itemsize


def expected_peak(config: GemmaConfig, settings: ExportSettings) -> int:
    """The export process's expected peak resident memory, in bytes: the model as the exporter holds
    it, the KV cache, and the larger of the largest tensor's quantization and, for a .pte, XNNPACK's
    packed weights (the file's size), made while the unpacked ones are still held (they are freed
    once packed). An upper bound since the unpacked weights are freed partition by partition and bf16
    sources are read block by block; measured at full size (README, "Full size", 2026-12-02): Gemma 2B
    int4 ONNX 3.07 GiB from a sharded bf16 folder, 3.81 from random:gemma-2b (this says 5.2), .pte 4.98
    (6.7); 7B int4 ONNX 7.94 (11.1), .pte 11.30 (15.7); Gemma 3 1B int8 ONNX 2.54 (3.5)."""
    settings = settings.for_model(config)
    largest = 4 * max(config.vocab_size * config.hidden_size, config.hidden_size * config.intermediate_size * 2)
    extra = LARGEST * largest
    if settings.format == "pte":
        extra = max(extra, weight_bytes(config, settings))
    # calibration and smoothing walk the layers in one pipeline (the smoothed stream feeds GPTQ): they add
    walk = (calibration_bytes(config, settings.calibration_tokens) if settings.recipe != "rtn" else 0) + \
        (smoothing_bytes(config) if settings.smoothing() else 0)
    extra = max(extra, walk)
    return int(BASE + weight_bytes(config, settings, held=True) + extra + cache_bytes(config, settings.max_seq_len, KV_ITEMSIZE[settings.kv_dtype]))


def calibration_bytes(config: GemmaConfig, tokens: int) -> int:
    """What --recipe gptq holds beside the model being filled (exporters/calibration.py), at the wider
    of its two moments: a decoder layer's (its weights in float32, beside a bf16 checkpoint's own;
    the widest Hessian, one at a time; GPTQ's two copies of the widest weight; the calibration
    activations, and attention's outputs for o_proj) and the output projection's (the table read
    again, float32 at worst as random weights are, GPTQ's rows written back into it; a block of rows'
    working copies; the final norm's outputs). Until 2026-12-07 every Hessian of a layer was held at
    once, and the activations out beside those in (they are computed in place now): the figures below
    were measured then. random:gemma-2b's ONNX all-int4 export at 2048 tokens peaked at 4.08 GiB, where
    expected_peak says 5.2 (2026-12-04; at the table's quantization, the rounding-to-nearest moment);
    one layer of Gemma 7B's shapes (4096-row table, ONNX, 2048 tokens) 4.93 GiB against 5.4 (2026-12-05)."""
    h, heads, inter = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    activations = tokens * h
    layer = h * (heads + 2 * kv) + heads * h + 3 * h * inter
    hessian = max(h * h, heads * heads, inter * inter)  # one at a time: q, k and v's input, o's, gate and up's, down's
    rows = 1 << 13  # calibration.calibrate_head's block: in float32, GPTQ's two copies, on_grid_in's two
    table = config.vocab_size * h + 5 * rows * h  # (an untied int4 lm_head's moment is the same)
    return 4 * (max(layer * 3 // 2 + hessian + 2 * inter * h + tokens * heads, table) + activations)


def smoothing_bytes(config: GemmaConfig) -> int:
    """What smoothing a .pte's layers holds beside the model being filled (exporters/smoothing.py):
    a decoder layer in float32 and its smoothed copy, the calibration activations in and out, and a
    chunk's widest intermediates (gate, up and their product)."""
    from gemma_edge.exporters.calibration import CHUNK
    from gemma_edge.exporters.smoothing import TOKENS

    h, heads, inter = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    layer = h * (heads + 2 * config.num_key_value_heads * config.head_dim) + heads * h + 3 * h * inter
    return 4 * (2 * layer + 2 * TOKENS * h + 3 * CHUNK * inter)


def available_memory() -> int:
    """Memory the system can give a new process now (MemAvailable; without /proc, physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _alternative(settings: ExportSettings, **changes) -> ExportSettings:
    """settings with changes and the same recipe, or rtn where nothing 4-bit is left to calibrate."""
    rtn = dataclasses.replace(settings, recipe="rtn", calibration=None, **changes)
    if settings.recipe == "rtn" or "int4" not in (rtn.quant, rtn.embedding_quant):
        return rtn
    return dataclasses.replace(rtn, recipe=settings.recipe, calibration=settings.calibration)


def check_memory(config: GemmaConfig, settings: ExportSettings, force: bool) -> tuple[int, int]:
    """(expected peak, available) in bytes; raises when the export clearly cannot fit, unless force."""
    need, have = expected_peak(config, settings), available_memory()
    if need > have and not force:
        settings = settings.for_model(config)
        options = {f"--quant {q}": _alternative(settings, quant=q, embedding_quant=None) for q in ("int4", "int8")}
        options["--format onnx"] = _alternative(settings, format="onnx", ops=None)
        if settings.recipe == "gptq":
            options["--recipe rtn"] = dataclasses.replace(settings, recipe="rtn", calibration=None)
        fits = [f"{flag} needs about {expected_peak(config, other) / GIB:.1f} GiB" for flag, other in options.items()
                if other != settings and expected_peak(config, other) <= have]
        raise GemmaEdgeError(
            f"this export needs about {need / GIB:.1f} GiB of memory and {have / GIB:.1f} GiB is available: "
            + (f"{'; '.join(fits)}; or " if fits else "close other programs, or ") + "pass --force to try anyway")
    return need, have
