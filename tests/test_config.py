"""The architecture config: transformers' configs in and out, and the published shapes."""

from __future__ import annotations

import pytest

from gemma_edge.config import FULL, SLIDING, VARIANTS, GemmaConfig, check_max_seq_len, variant
from gemma_edge.errors import ConfigError, UnsupportedModelError
from gemma_edge.reference import hf_config_for


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_config_round_trip(name):
    """Ours -> transformers -> ours is the identity, for every family's field layout."""
    assert GemmaConfig.from_hf(hf_config_for(VARIANTS[name])) == VARIANTS[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dict_round_trip(name):
    assert GemmaConfig.from_dict(VARIANTS[name].to_dict()) == VARIANTS[name]


@pytest.mark.parametrize("name, params", [("gemma-2b", 2_506_172_416), ("gemma-7b", 8_537_680_896),
                                          ("gemma-2-2b", 2_614_341_888), ("gemma-3-270m", 268_098_176),
                                          ("gemma-3-1b", 999_885_952)])
def test_published_parameter_counts(name, params):
    """2.51B and 8.54B for Gemma 2B/7B with embeddings; 2.61B, 268M and 1.0B for the others."""
    assert VARIANTS[name].num_parameters() == params


def test_head_dim_is_stated_not_divided():
    c = variant("gemma-7b")
    assert c.hidden_size // c.num_attention_heads == 192
    assert c.head_dim == 256
    assert c.num_key_value_heads == c.num_attention_heads == 16  # multi-head
    assert variant("gemma-2b").num_key_value_heads == 1  # multi-query


def test_gemma3_reads_nested_rope_parameters_of_transformers_5():
    from transformers import Gemma3TextConfig

    hf = Gemma3TextConfig(num_hidden_layers=12, rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    c = GemmaConfig.from_hf(hf)
    assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling_factor) == (1e6, 1e4, 8.0)
    assert c.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 5 + (FULL,)
    assert c.use_qk_norm and c.use_post_norms and c.query_pre_attn_scalar == 256


def test_gemma3_multimodal_config_uses_its_text_part():
    from transformers import Gemma3Config

    hf = Gemma3Config(text_config=hf_config_for(VARIANTS["tiny-gemma3"]).to_dict())
    assert GemmaConfig.from_hf(hf) == VARIANTS["tiny-gemma3"]


def test_gemma1_legacy_gelu_means_tanh_approximation():
    from transformers import GemmaConfig as HFGemmaConfig

    assert GemmaConfig.from_hf(HFGemmaConfig(hidden_act="gelu")).hidden_activation == "gelu_pytorch_tanh"


def test_unsupported_architecture_is_named():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="'llama' is not supported.*gemma"):
        GemmaConfig.from_hf(LlamaConfig())


def test_unsupported_rope_type_is_named():
    from transformers import GemmaConfig as HFGemmaConfig

    hf = HFGemmaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        GemmaConfig.from_hf(hf)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="gemma-7b"):
        variant("gemma-9b")


@pytest.mark.parametrize("bad", [0, -3, 8193])
def test_max_seq_len_out_of_range(bad):
    with pytest.raises(ConfigError, match="max_seq_len"):
        check_max_seq_len(variant("gemma-2b"), bad)


def test_inconsistent_heads_are_rejected():
    with pytest.raises(ConfigError, match="multiple"):
        VARIANTS["tiny-gemma"].replace(num_attention_heads=4, num_key_value_heads=3)
