"""The runtime on the real Gemma 3 270M: Generator on every backend against transformers."""

from __future__ import annotations

import pytest

from conftest import REAL_MAX_SEQ_LEN as MAX_SEQ_LEN
from export_cache import cached_export
from gemma_edge.exporters.settings import ExportSettings
from gemma_edge.runtime.generation import greedy

pytestmark = pytest.mark.slow


def test_generator_on_the_real_model_matches_transformers(real):
    """Greedy through Generator, 32 tokens: the fp32 ONNX export and the eager model give exactly
    transformers' generate(do_sample=False); an int4 export through Generator is its own backend's
    greedy. (A .pte through Generator: the real int4 against ExecuTorch's stock runner in
    test_real_executorch.py, fp32 .pte exports of every family against transformers in
    test_runtime.py; a real fp32 .pte took 4 of a cold CI run's minutes for this one check.)"""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime import Generator
    from gemma_edge.runtime.eager import EagerBackend

    ckpt = real[0]
    fp32 = Generator.load(cached_export(ckpt, ExportSettings(format="onnx", quant="fp32", max_seq_len=MAX_SEQ_LEN)))
    ids = fp32.tokenizer.encode("The capital of France is", bos=True)
    reference = AutoModelForCausalLM.from_pretrained(ckpt.hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    eager = Generator(EagerBackend(load_model(ckpt, MAX_SEQ_LEN)), fp32.tokenizer)
    for gen in (fp32, eager):
        gen.generate(ids, 32, ignore_eos=True)
        assert gen.last.token_ids == expected, type(gen.backend).__name__
    int4 = Generator.load(cached_export(ckpt, ExportSettings(format="onnx", quant="int4", max_seq_len=MAX_SEQ_LEN, recipe="rtn")))
    text = int4.generate("The capital of France is", 32, ignore_eos=True)
    assert int4.last.token_ids == greedy(int4.backend, ids, 32).token_ids and text == int4.tokenizer.decode(int4.last.token_ids)
    print("fp32:", repr(fp32.tokenizer.decode(expected)), "int4:", repr(text))
