"""An export's settings: one frozen dataclass, shared by the ExecuTorch and ONNX exporters and
written into the artifact's manifest, so an export always describes how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gemma_edge.errors import ConfigError

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


@dataclass(frozen=True)
class ExportSettings:
    format: str  # "pte" (ExecuTorch) or "onnx"
    quant: str = "int4"  # linear layers: fp32, int8 (per channel) or int4 (groupwise)
    group_size: int = 32  # columns sharing one int4 scale
    embedding_quant: str | None = None  # none / int8 / int4; None: as DEFAULT_EMBEDDING_QUANT
    max_seq_len: int = 1024  # positions the static KV cache holds
    ops: str | None = None  # ONNX only: auto (default), contrib or standard operators

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
        g = self.group_size
        if self.format == "onnx" and (g < 16 or g & (g - 1)):  # MatMulNBits and GatherBlockQuantized blocks
            raise ConfigError(f"--format onnx needs a --group-size that is a power of 2 of at least 16 (16, 32, 64, ...), got {g}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_of(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
