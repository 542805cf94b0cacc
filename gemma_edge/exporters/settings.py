"""An export's settings: one frozen dataclass, shared by the ExecuTorch and ONNX exporters and
written into the artifact's manifest, so an export always describes how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gemma_edge.errors import ConfigError

if TYPE_CHECKING:
    from gemma_edge.config import GemmaConfig

FORMATS = ("pte", "onnx")
QUANTS = ("fp32", "int8", "int4")
EMBEDDING_QUANTS = ("none", "int8", "int4")
# Embeddings follow the linear layers unless told otherwise: Gemma's 256k-row embedding is a
# third of the 2B model, so leaving it in fp32 would undo most of the saving.
DEFAULT_EMBEDDING_QUANT = {"fp32": "none", "int8": "int8", "int4": "int4"}
# ONNX graphs: ONNX Runtime's fused contrib operators (faster on its CPU provider), only the ONNX
# standard's (for other runtimes), or auto: contrib where the model's shapes allow it.
# ExecuTorch programs have no such choice (None).
ONNX_OPS = ("auto", "contrib", "standard")
# The KV cache's element type. float16 halves the cache (Gemma 7B at its 8192-token context: 7 GiB
# in float32); attention then multiplies in float16 (XNNPACK's f16 matmuls, ONNX Runtime's float16
# GroupQueryAttention) with the softmax in float32. bfloat16 has no such kernel in either runtime
# (BFLOAT16_WHY), so it is refused by name rather than run slowly.
KV_DTYPES = ("float32", "float16")
# How 4-bit layers are rounded: to nearest on each group's best clipping (rtn), or by GPTQ on the
# same grids, calibrated on a text (gptq, exporters/calibration.py); auto: best_recipe's choice for
# the model, its weights and the format, made when the export starts (for_model).
RECIPES = ("auto", "rtn", "gptq")
# --recipe auto calibrates a model whose decoder layers hold at most this many weights. GPTQ's time
# grows with the layers' sizes (each layer run on the calibration text, a Hessian over its inputs,
# factored): on 2 cores, Gemma 3 270M (0.10 B in its layers) calibrates in ~50 s; the ONNX int4
# export of Gemma 3 1B (0.70 B) took 22 minutes and Gemma 2B's (1.98 B) 38 (random weights,
# 2026-12-04), where rounding to nearest exports them in about one. Past the full-size exports' time
# limits (benchmarks/full_size.py: 10 minutes for ONNX), auto rounds to nearest and says how to
# calibrate.
AUTO_GPTQ_MAX_LAYER_WEIGHTS = 500_000_000
# A .pte's memory plan holds every activation for the longest call it allows (ExecuTorch allocates
# the plan whole, zero-filled, when it loads: Gemma 7B at 1024 tokens per call 0.88 GiB beside its
# KV cache, at 256 0.22), so a .pte takes prompts in chunks of at most this many tokens (its stock
# runner reads the limit from get_max_seq_len), unless the cache is shorter. ONNX Runtime allocates
# for each call's own length: an ONNX graph takes any length up to the cache.
PTE_TOKENS_PER_CALL = 256
# A 4-bit tied table keeps the rows of this many tokens at 8 bits: the calibration text's most
# frequent (onnx_quant.HotRowsTable, pte_hot_rows.py; the default text has 4,555 distinct tokens),
# at most a sixteenth of the vocabulary. 0: every row 4-bit.
HOT_TOKENS = 16384
# A .pte's quantized layers take their inputs rescaled per channel (exporters/smoothing.py,
# SmoothQuant): s = max|x| ^ alpha / max|W| ^ (1 - alpha). 0: not rescaled. By default the int8
# layers and the int4 layers rounded to nearest (XNNPACK quantizes both kinds' inputs to 8 bits per
# token); GPTQ's int4 layers are not (measured: better on prose, worse on code, smoothing()).
SMOOTH_ALPHA = 0.5
# The kinds of linear layer a model's decoder layers have, and those an all-int4 export keeps at
# 8 bits (--int8-layers; eight_bit_layers()): the keys' and values' projections. Measured on the real
# Gemma 3 270M (eager .pte, rounded to nearest, not smoothed, perplexity ratio on the manual / code):
# all-int4 x1.347 / x2.000; with k and v at 8 bits x1.168 / x1.593, for 6% of the layers' weights
# (+3 MiB): the most quality per byte of any kind or layer (each of the 18 layers alone x1.29-1.37 /
# x1.64-1.99; down_proj x1.226 / x1.725 for 23%; gate and up x1.221 / x1.438 for 47%; benchmarks/
# QUALITY.md). The programs, GPTQ: ONNX x1.035 / x1.393 -> x1.023 / x1.322, .pte x1.077 / x1.322 ->
# x1.052 / x1.243. llama.cpp's Q4_K_M keeps attn_v at 6 bits for the same reason.
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INT8_LAYERS = ("k_proj", "v_proj")
# --prefill-method: a .pte's second method, "prefill", for calls at position 0 (a new prompt): attention
# over the call's own keys, where forward multiplies by every slot of the cache and masks them all.
# It shares forward's weights (stored once) and KV cache. Measured on the real Gemma 3 270M (the
# phone recipe, a 128-token prompt, 2 threads, 2026-12-06): prefill 1.38-1.75x (ExecuTorch's Python
# runtime 103 -> 70 ms, the native runner 100 -> 67-72 ms; all-int4 GPTQ 1.32x), decode unchanged.
# Its costs, why it is asked for rather than made by default: a second lowering (the same hour: the
# phone recipe's export 75 -> 124-129 s, all-int4 GPTQ's 200 -> 267-320 s, past issue 16's 3
# minutes), and in ExecuTorch's Python runtime, which packs each method's weights
# for XNNPACK apart, a second copy of them in memory (+330 MiB at the 270M; the native runner shares
# one through XNNPACK's weight cache; ExecuTorch's stock runner and Android's LlmModule call forward
# alone).
BFLOAT16_WHY = {
    "pte": "XNNPACK has no bfloat16 matmul, so attention would fall back to ExecuTorch's portable kernels "
           "(measured 25x slower than float16)",
    "onnx": "ONNX Runtime's CPU GroupQueryAttention is implemented for float32 and float16 only",
}


@dataclass(frozen=True)
class ExportSettings:
    format: str  # "pte" (ExecuTorch) or "onnx"
    quant: str = "int4"  # linear layers: fp32, int8 (per channel) or int4 (groupwise)
    group_size: int = 32  # columns sharing one int4 scale
    embedding_quant: str | None = None  # none / int8 / int4; None: as DEFAULT_EMBEDDING_QUANT
    max_seq_len: int = 1024  # positions the static KV cache holds
    ops: str | None = None  # ONNX only: auto (default), contrib or standard operators
    kv_dtype: str = "float32"  # the KV cache's element type: float32 or float16
    max_tokens_per_call: int | None = None  # .pte only: longest call (a prefill chunk); None: PTE_TOKENS_PER_CALL
    recipe: str = "auto"  # how int4 layers are rounded: RECIPES (auto: best_recipe's, once the model is known)
    calibration: str | None = None  # the calibration text (--recipe gptq); None: calibration.default_text()
    calibration_tokens: int = 16384  # --recipe gptq: tokens of the text calibrated on (in chunks of up to 512)
    template: str | None = None  # the prompt format the model expects (runtime/templates.py): generate's, chat's and the app's default
    hot_tokens: int | None = None  # a 4-bit table: rows kept 8-bit for the calibration text's tokens (None: hot_rows()'s default; 0: none)
    smooth: float | None = None  # .pte quantized layers: SmoothQuant's alpha (None: smoothing()'s default; 0: none)
    int8_layers: tuple[str, ...] | None = None  # --quant int4: kinds of linear layer kept 8-bit (None: eight_bit_layers()'s default)
    prefill_method: bool = False  # .pte only: a second method for prompts at position 0 (--prefill-method, above)

    def __post_init__(self) -> None:
        _one_of("format", self.format, FORMATS)
        _one_of("quant", self.quant, QUANTS)
        if self.embedding_quant is None:
            object.__setattr__(self, "embedding_quant", DEFAULT_EMBEDDING_QUANT[self.quant])
        _one_of("embedding quantization", self.embedding_quant, EMBEDDING_QUANTS)
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"--group-size must be an even number of at least 2, got {self.group_size}")
        if self.format == "onnx":
            if self.ops is None:
                object.__setattr__(self, "ops", ONNX_OPS[0])
            _one_of("ops", self.ops, ONNX_OPS)
        elif self.ops is not None:
            raise ConfigError(f"--ops chooses ONNX operators; it does not apply to --format {self.format}")
        if self.format == "pte":
            if self.max_tokens_per_call is None:
                object.__setattr__(self, "max_tokens_per_call", min(self.max_seq_len, PTE_TOKENS_PER_CALL))
            if not 1 <= self.max_tokens_per_call <= self.max_seq_len:
                raise ConfigError(f"--max-tokens-per-call must be from 1 to --max-seq-len ({self.max_seq_len}), "
                                  f"got {self.max_tokens_per_call}")
        elif self.max_tokens_per_call is not None:
            raise ConfigError("--max-tokens-per-call limits a .pte's calls (its memory plan); an ONNX graph takes any "
                              "length up to the cache: leave it out for --format onnx")
        if self.kv_dtype == "bfloat16":
            raise ConfigError(f"--kv-dtype bfloat16 is not supported for --format {self.format}: {BFLOAT16_WHY[self.format]}; "
                              "use --kv-dtype float16")
        _one_of("kv-dtype", self.kv_dtype, KV_DTYPES)
        _one_of("recipe", self.recipe, RECIPES)
        if self.recipe == "gptq" and "int4" not in (self.quant, self.embedding_quant):
            raise ConfigError(f"--recipe {self.recipe} calibrates 4-bit weights (--quant int4, --embedding-quant int4); "
                              f"with --quant {self.quant} --embedding-quant {self.embedding_quant} use --recipe rtn")
        if self.template is not None:
            from gemma_edge.runtime.templates import TEMPLATES

            _one_of("template", self.template, tuple(TEMPLATES))
        if self.hot_tokens is not None and self.hot_tokens < 0:
            raise ConfigError(f"--hot-tokens must be 0 or more, got {self.hot_tokens}")
        if self.hot_tokens and self.embedding_quant != "int4":
            raise ConfigError(f"--hot-tokens keeps rows of a 4-bit table at 8 bits; --embedding-quant "
                              f"{self.embedding_quant} has none: leave it out (or give 0)")
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            raise ConfigError(f"--smooth is an exponent between 0 and 1 (0: no smoothing), got {self.smooth}")
        if self.smooth and (self.format != "pte" or self.quant == "fp32"):
            raise ConfigError(f"--smooth rescales the inputs of a .pte's quantized layers (XNNPACK quantizes them to 8 "
                              f"bits per token); --format {self.format} --quant {self.quant} has none: leave it out (or give 0)")
        if self.int8_layers is not None:
            object.__setattr__(self, "int8_layers", tuple(self.int8_layers))
            for kind in self.int8_layers:
                _one_of("--int8-layers kind", kind, LINEAR_KINDS)
            if self.int8_layers and self.quant != "int4":
                raise ConfigError(f"--int8-layers keeps some of an int4 export's linear layers at 8 bits; --quant "
                                  f"{self.quant} has {'all of them at 8 bits' if self.quant == 'int8' else 'none quantized'}: "
                                  "leave it out")
        if self.prefill_method and self.format != "pte":
            raise ConfigError(f"--prefill-method adds a method to a .pte; --format {self.format} has one graph for every "
                              "call: leave it out")
        if self.calibration_tokens < 2:
            raise ConfigError(f"--calibration-tokens must be at least 2, got {self.calibration_tokens}")
        if self.calibration is not None and not self.reads_calibration():
            if "int4" not in (self.quant, self.embedding_quant):
                raise ConfigError(f"--calibration: --format {self.format} --quant {self.quant} --embedding-quant "
                                  f"{self.embedding_quant} reads no text (it chooses the rounding of 4-bit weights, the "
                                  "8-bit rows of a 4-bit table and the scales of a .pte's int8 inputs); leave "
                                  "--calibration out, or choose int4 weights")
            unsmoothed = " and --smooth 0" if self.format == "pte" else ""
            raise ConfigError(f"--calibration: with --recipe rtn, --hot-tokens 0{unsmoothed} nothing reads the text; use "
                              "--recipe gptq (or auto), keep the hot rows, or leave --calibration out")
        if self.format == "onnx" and self.kv_dtype != "float32" and self.ops == "standard":
            raise ConfigError("--kv-dtype float16 needs ONNX Runtime's GroupQueryAttention (--ops auto or contrib): "
                              "the standard graph's float16 matmuls have no CPU kernel of their own")
        g = self.group_size
        if self.format == "onnx" and (g < 16 or g & (g - 1)):  # MatMulNBits and GatherBlockQuantized blocks
            raise ConfigError(f"--format onnx needs a --group-size that is a power of 2 of at least 16 (16, 32, 64, ...), got {g}")
        # XNNPACK's 4-bit blockwise kernels (the int4 layers, and a tied head reading an int4 table)
        if self.format == "pte" and "int4" in (self.quant, self.embedding_quant) and g % 32:
            raise ConfigError(f"--format pte with int4 weights needs a --group-size that is a multiple of 32 "
                              f"(XNNPACK's 4-bit kernels: 32, 64, 128, ...), got {g}")

    def hot_rows(self) -> int:
        """--hot-tokens as it applies: given, or HOT_TOKENS for a 4-bit table, else 0."""
        if self.hot_tokens is not None:
            return self.hot_tokens
        return HOT_TOKENS if self.embedding_quant == "int4" else 0

    def eight_bit_layers(self) -> frozenset[str]:
        """The kinds of linear layer (LINEAR_KINDS) kept at 8 bits in an int4 export: --int8-layers,
        else INT8_LAYERS, in both formats; none for --quant int8 or fp32 (every layer is int8 or float
        there). The real 270M's .pte, gptq: x1.077 / x1.322 -> x1.052 / x1.243 (manual / code)."""
        if self.quant != "int4":
            return frozenset()
        return frozenset(INT8_LAYERS if self.int8_layers is None else self.int8_layers)

    def layer_quant(self, name: str) -> str:
        """The quantization of the linear layer `name` (a module path, a weight's name or a kind):
        int8 for the kinds eight_bit_layers() keeps, else --quant."""
        kind = name.removesuffix(".weight").rpartition(".")[2]
        return "int8" if kind in self.eight_bit_layers() else self.quant

    def reads_calibration(self) -> bool:
        """Whether anything this export does reads the calibration text: GPTQ (4-bit weights, recipe
        gptq or auto), the 4-bit table's hot rows, the .pte's smoothed layer inputs."""
        calibrates = self.recipe != "rtn" and "int4" in (self.quant, self.embedding_quant)
        return calibrates or self.hot_rows() > 0 or self.smoothing() > 0

    def smoothing(self) -> float:
        """--smooth as it applies: given, or SMOOTH_ALPHA for a .pte's int8 layers and its int4 layers
        rounded to nearest, else 0. Measured on the real Gemma 3 270M (eager, the manual / code, ratio
        and KL against fp32): int8 layers with the hot-rows table KL 0.038 / 0.111 -> 0.024 / 0.081;
        int4 rtn x1.347 / x2.000 (KL 0.254 / 0.681) -> x1.174 / x1.605 (0.170 / 0.508); int4 GPTQ
        x1.067 / x1.329 (0.095 / 0.337) -> x1.031 / x1.454 (0.065 / 0.417): not by default. The recipe
        as resolved (for_model): an unresolved auto counts as calibrated."""
        if self.smooth is not None:
            return self.smooth
        if self.format != "pte":
            return 0.0
        return SMOOTH_ALPHA if self.quant == "int8" or (self.quant == "int4" and self.recipe == "rtn") else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_model(self, config: GemmaConfig) -> ExportSettings:
        """These settings with --recipe auto replaced by best_recipe's choice for config."""
        if self.recipe != "auto":
            return self
        return dataclasses.replace(self, recipe=best_recipe(self, config)[0])


def best_recipe(settings: ExportSettings, config: GemmaConfig) -> tuple[str, str]:
    """--recipe auto: the recipe measured best for these weights in this format (benchmarks/QUALITY.md,
    the real Gemma 3 270M on two texts, perplexity ratio on the manual / on code), where calibrating
    costs minutes. GPTQ wherever the decoder's layers are 4-bit (ONNX x1.288 / x1.308 -> x1.011 /
    x1.100, .pte x1.150 / x1.224 -> x1.073 / x1.101) and for ONNX's 4-bit table under int8 layers
    (with its hot rows: x1.012 / x1.024 -> x0.999 / x1.024, KL 0.023 / 0.035 -> 0.013 / 0.025; until
    2026-12-07 code was measured on its first 512 tokens alone, where GPTQ lost, and this rounded to
    nearest). A .pte whose only 4-bit weights are the table rounds it to nearest and corrects the
    head's worst columns (head_correction.py), its int8 layers' inputs smoothed: x0.999 / x1.032
    against GPTQ's x1.008 / x1.037, in 60% of the export time. Nothing 4-bit: nothing to calibrate.
    Those choices hold with a text of the user's (--calibration: it then also chooses the hot rows
    and the smoothing); for 4-bit weights a calibration text asks for calibration at any size; without
    one, a model with more than AUTO_GPTQ_MAX_LAYER_WEIGHTS in its layers is rounded to nearest (from
    Gemma 3 1B up: calibrating takes 21-38 minutes on 2 cores).
    Returns (recipe, why: a line for the user)."""
    if "int4" not in (settings.quant, settings.embedding_quant):
        return "rtn", "no 4-bit weights: nothing to calibrate"
    source = "--calibration" if settings.calibration is not None else "the calibration text"
    text = f"{source}'s"
    if settings.format == "pte" and settings.quant != "int4":
        rows = f"{text} rows of the table 8-bit, " if settings.hot_rows() else ""
        smoothed = f", the int8 layers' inputs smoothed on {source}" if settings.smoothing() else ""
        return "rtn", (f"rounded to nearest, {rows}the head's worst columns corrected{smoothed}: the best measured "
                       "for a .pte with int8 layers (--recipe gptq calibrates the table)")
    if settings.calibration is not None:
        return "gptq", "GPTQ, calibrated on --calibration"
    weights = layer_weights(config)
    if weights <= AUTO_GPTQ_MAX_LAYER_WEIGHTS:
        return "gptq", "GPTQ, the best measured for 4-bit weights; --recipe rtn skips the calibration"
    smoothed = dataclasses.replace(settings, recipe="rtn").smoothing()
    how = f"rounded to nearest, the layers' inputs smoothed on {source}" if smoothed else "rounded to nearest"
    return "rtn", (f"{how}: at {weights / 1e9:.1f} B weights in its layers calibration takes tens of minutes "
                   "(--recipe gptq calibrates)")


def layer_weights(config: GemmaConfig) -> int:
    """The weights of the model's decoder layers: all but the embedding table (and an untied head)."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.num_parameters() - config.vocab_size * config.hidden_size - head


def _one_of(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
