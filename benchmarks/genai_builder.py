"""ONNX Runtime GenAI's model builder, run on a Gemma 3 text checkpoint saved by transformers 5.

The builder (onnxruntime-genai 0.18) reads Gemma 3's RoPE settings the transformers 4 way:
`config.rope_theta` (global layers), `config.rope_local_base_freq` (sliding layers) and a flat
`config.rope_parameters["rope_type"]`. transformers 5 keeps both in `rope_parameters`, one dict per
layer type, so the builder stops with KeyError 'rope_type'. This wrapper gives the config the old
attributes (the same values) and then runs the builder's own command line unchanged:

    python benchmarks/genai_builder.py -i HF_FOLDER -o OUT -p int4 -e cpu -c CACHE

A benchmark's patch, kept out of the package (benchmarks/peers.py runs it).
"""

from __future__ import annotations

import runpy

import transformers


def _with_transformers4_rope(config):
    per_type = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", "") == "gemma3_text" and isinstance(per_type, dict) and "full_attention" in per_type:
        config.rope_theta = per_type["full_attention"]["rope_theta"]
        config.rope_local_base_freq = per_type["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(per_type["full_attention"])
    return config


def main() -> None:
    load = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        return _with_transformers4_rope(load(*args, **kwargs))

    transformers.AutoConfig.from_pretrained = from_pretrained
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
