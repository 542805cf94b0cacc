"""The architecture of a Gemma text decoder (Gemma 1, 2 and 3), with Hugging Face field names.

This describes the network only. Export settings (quantization, max_seq_len) and runtime state
(the KV cache contents, sampling) live elsewhere, so a config can be written into a manifest and
read back without carrying anything but the architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gemma_edge.errors import ConfigError, UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# transformers model_type -> the Gemma generation it belongs to.
SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma" | "gemma2" | "gemma3_text": which generation's block layout to use
    vocab_size: int  # rows of the (tied) embedding; 256000 for Gemma 1/2, 262144 for Gemma 3
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the GeGLU feed-forward
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # 1 = multi-query (Gemma 2B), == heads = multi-head (Gemma 7B)
    head_dim: int  # stated by the checkpoint, never hidden/heads (Gemma 7B: 3072/16 = 192, but 256)
    max_position_embeddings: int  # longest context the model was trained for
    rms_norm_eps: float = 1e-6  # added to the mean square inside every RMSNorm
    rope_theta: float = 10_000.0  # RoPE base of full-attention layers (Gemma 3: 1e6)
    rope_local_base_freq: float = 10_000.0  # RoPE base of sliding layers (Gemma 3: 1e4)
    rope_scaling_factor: float = 1.0  # linear position scaling of full layers (Gemma 3 4B+: 8)
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    sliding_window: int | None = None  # keys a sliding layer sees, the query's own included
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power (None: head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    use_qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys before RoPE
    use_post_norms: bool = False  # Gemma 2/3: extra RMSNorm after attention and around the FFN
    hidden_activation: str = "gelu_pytorch_tanh"  # GeGLU gate: GELU with the tanh approximation
    tie_word_embeddings: bool = True  # the output projection is the embedding matrix
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}; valid: {list(LAYER_TYPES)}")
        if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ConfigError("sliding-attention layers need a positive sliding_window")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise UnsupportedModelError(
                f"hidden_activation {self.hidden_activation!r} is not a Gemma activation; "
                "valid: 'gelu_pytorch_tanh', 'gelu'")

    @property
    def family(self) -> str:
        """'gemma', 'gemma2' or 'gemma3': the generation, named as in model ids."""
        return "gemma3" if self.model_type.startswith("gemma3") else self.model_type

    @property
    def num_key_value_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        """Factor on q.k: Gemma 2/3 use query_pre_attn_scalar**-0.5 (224 for Gemma 2 27B), not head_dim."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float:
        """Gemma multiplies embeddings by sqrt(hidden_size), rounded to the model's dtype."""
        return math.sqrt(self.hidden_size)

    def num_parameters(self) -> int:
        """Weights in the checkpoint, the embedding counted once when tied."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * h * self.intermediate_size
        norms = h * (4 if self.use_post_norms else 2) + (2 * d if self.use_qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * (attn + mlp + norms) + h + head

    def replace(self, **changes: Any) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Any) -> "GemmaConfig":
        """From a transformers GemmaConfig, Gemma2Config, Gemma3TextConfig or Gemma3Config."""
        model_type = getattr(hf, "model_type", None)
        if model_type == "gemma3":  # multimodal wrapper: the decoder is its text part
            hf, model_type = hf.text_config, "gemma3_text"
        check_model_type(model_type)
        full_rope, local_rope = _rope_parameters(hf)
        eos = hf.eos_token_id if hf.eos_token_id is not None else 1
        gen2plus = model_type != "gemma"
        # Gemma 1 names it hidden_act (transformers already maps the legacy "gelu" to the tanh form).
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "gelu_pytorch_tanh")
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads,
            head_dim=hf.head_dim,
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(full_rope["rope_theta"]),
            rope_local_base_freq=float(local_rope["rope_theta"]),
            rope_scaling_factor=float(full_rope.get("factor", 1.0)),
            layer_types=tuple(getattr(hf, "layer_types", None) or (FULL,) * hf.num_hidden_layers),
            sliding_window=getattr(hf, "sliding_window", None) if gen2plus else None,
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None) if gen2plus else None,
            attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
            use_qk_norm=model_type == "gemma3_text",
            use_post_norms=gen2plus,
            hidden_activation=act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else 2,
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        )


def check_model_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; gemma-edge exports Gemma text models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})")


def _rope_parameters(hf: Any) -> tuple[dict, dict]:
    """(full-attention, sliding) RoPE settings. transformers 5 nests them per layer type for Gemma 3."""
    params = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 10_000.0)}
    if FULL in params or SLIDING in params:
        full = params.get(FULL) or {}
        local = params.get(SLIDING) or full
    else:
        full = local = params
    for p in (full, local):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported; valid: 'default', 'linear'")
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError("scaled RoPE on sliding-window layers is not supported")
    return full, local


def _pattern(sliding_per_full: int, layers: int) -> tuple[str, ...]:
    """Gemma 2 (1:1) and Gemma 3 (5:1): every (n+1)-th layer is global, the others slide."""
    return tuple(FULL if (i + 1) % (sliding_per_full + 1) == 0 else SLIDING for i in range(layers))


def _gemma1(**kw: Any) -> GemmaConfig:
    return GemmaConfig(model_type="gemma", head_dim=256, max_position_embeddings=8192, **kw)


def _gemma2(**kw: Any) -> GemmaConfig:
    layers = kw["num_hidden_layers"]
    return GemmaConfig(model_type="gemma2", head_dim=256, max_position_embeddings=8192,
                       layer_types=_pattern(1, layers), sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       use_post_norms=True, **kw)


def _gemma3(**kw: Any) -> GemmaConfig:
    layers = kw["num_hidden_layers"]
    return GemmaConfig(model_type="gemma3_text", head_dim=256, max_position_embeddings=32_768,
                       rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       layer_types=_pattern(5, layers), sliding_window=512, query_pre_attn_scalar=256,
                       use_qk_norm=True, use_post_norms=True, vocab_size=262_144, **kw)


# Published shapes (Hugging Face config.json of each google/ model) and tiny test shapes. The tiny
# ones use sizes that are not round (vocab not a multiple of 32, head_dim != hidden/heads, 2 kv
# heads, short sliding windows, soft-caps small enough to bend the numbers) so nothing depends on
# round numbers.
VARIANTS: dict[str, GemmaConfig] = {
    "gemma-2b": _gemma1(vocab_size=256_000, hidden_size=2048, intermediate_size=16_384,
                        num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1),
    "gemma-7b": _gemma1(vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16),
    "gemma-2-2b": _gemma2(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                          num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                          query_pre_attn_scalar=256),
    "gemma-3-270m": _gemma3(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1),
    "gemma-3-1b": _gemma3(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                          num_attention_heads=4, num_key_value_heads=1),
    "tiny-gemma": GemmaConfig(
        model_type="gemma", vocab_size=1001, hidden_size=64, intermediate_size=136,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        max_position_embeddings=256),
    "tiny-gemma-mha": GemmaConfig(
        model_type="gemma", vocab_size=1001, hidden_size=48, intermediate_size=100,
        num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, head_dim=20,
        max_position_embeddings=256),
    "tiny-gemma2": GemmaConfig(
        model_type="gemma2", vocab_size=1003, hidden_size=96, intermediate_size=200,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, layer_types=_pattern(1, 4), sliding_window=8,
        query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        use_post_norms=True),
    "tiny-gemma3": GemmaConfig(
        model_type="gemma3_text", vocab_size=1005, hidden_size=96, intermediate_size=200,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        layer_types=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), sliding_window=8,
        query_pre_attn_scalar=48, use_qk_norm=True, use_post_norms=True),
}


def variant(name: str) -> GemmaConfig:
    """A named architecture; an unknown name fails with the list of valid ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}") from None


def check_max_seq_len(config: GemmaConfig, max_seq_len: int) -> int:
    """The KV cache length must be positive and within the model's trained context."""
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if max_seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"max_seq_len {max_seq_len} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; pass --max-seq-len {config.max_position_embeddings} or less")
    return max_seq_len


__all__ = ["GemmaConfig", "VARIANTS", "variant", "check_max_seq_len", "FULL", "SLIDING"]
