"""The PyTorch reference: transformers' own Gemma, run with eager attention.

Eager, because transformers' SDPA path ignores Gemma 2's attention soft-capping: comparing
against it would bless a wrong export.
"""

from __future__ import annotations

from typing import Any

import torch

from gemma_edge.checkpoints import Checkpoint, load_model, resolve, weight_names
from gemma_edge.config import GemmaConfig
from gemma_edge.model import Gemma

_HF_CLASSES = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}


def hf_config_for(config: GemmaConfig) -> Any:
    """The transformers config describing the same architecture."""
    import transformers

    cls = getattr(transformers, _HF_CLASSES[config.model_type])
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor}
    kw: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=list(config.eos_token_id) if len(config.eos_token_id) > 1 else config.eos_token_id[0],
    )
    if config.model_type == "gemma":
        kw.update(hidden_act=config.hidden_activation, rope_parameters=full)
    else:
        kw.update(hidden_activation=config.hidden_activation, layer_types=list(config.layer_types),
                  sliding_window=config.sliding_window, query_pre_attn_scalar=config.query_pre_attn_scalar,
                  attn_logit_softcapping=config.attn_logit_softcapping,
                  final_logit_softcapping=config.final_logit_softcapping)
        if config.model_type == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
            kw["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        else:
            kw["rope_parameters"] = full
    return cls(**kw)


def carries_our_weights(ckpt: Checkpoint) -> bool:
    """Whether ckpt's reference is transformers' model carrying the weights iter_weights yields (random
    ones, or with adapters merged: as PEFT's merge_and_unload() does, tests/test_adapters.py) rather
    than the one transformers loads from the folder itself."""
    return ckpt.hf_dir is None or bool(ckpt.adapters)


def load_reference(source: str | Checkpoint, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' CausalLM for a source, in eval mode, eager attention: loaded by transformers from
    a Hugging Face folder or GGUF source, else carrying our weights (carries_our_weights)."""
    from transformers import AutoModelForCausalLM

    ckpt = source if isinstance(source, Checkpoint) else resolve(source)
    if carries_our_weights(ckpt):
        return reference_from_model(load_model(ckpt, 1, dtype))  # a one-position cache: only the weights are used
    model = AutoModelForCausalLM.from_pretrained(ckpt.hf_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def reference_from_model(model: Gemma) -> torch.nn.Module:
    """transformers' CausalLM carrying exactly our model's weights, the same tensors (for
    random:<variant> sources): its parameters are made on the meta device and then given ours, so a
    full-size reference costs no second copy and no random initialization."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = hf_config_for(model.config)
    config._attn_implementation = "eager"
    with init_empty_weights():  # parameters on meta; buffers (RoPE's inv_freq) real
        ref = AutoModelForCausalLM.from_config(config, dtype=model.embed_tokens.weight.dtype)
    ours = dict(model.named_parameters())
    state = {hf: ours[name] for hf, name in weight_names(model.config).items()}
    missing, unexpected = ref.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight table out of step with transformers: missing {missing}, unexpected {unexpected}")
    ref.tie_weights()
    return ref.eval()


__all__ = ["hf_config_for", "carries_our_weights", "load_reference", "reference_from_model"]
