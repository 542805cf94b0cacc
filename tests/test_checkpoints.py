"""Loading: Hugging Face folders (single, sharded, bf16), GGUF, random variants, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint
from gemma_edge.checkpoints import load_model, resolve, weight_names, weight_shapes
from gemma_edge.config import VARIANTS
from gemma_edge.errors import CheckpointError, ConfigError, UnsupportedModelError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint at src whose tensors went through edit(dict) before saving."""
    folder = _copy(src, dst)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_every_tensor_lands_where_the_table_says(tiny_checkpoints):
    folder = tiny_checkpoints["tiny-gemma2"]
    tensors = load_file(str(folder / "model.safetensors"))
    model = load_model(folder, 16)
    params = dict(model.named_parameters())
    table = weight_names(model.config)
    assert set(table) == set(tensors)  # tied head: no lm_head.weight in the file or the table
    for hf_name, ours in table.items():
        assert torch.equal(params[ours], tensors[hf_name]), hf_name


def test_sharded_checkpoint_loads_the_same_weights(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoints["tiny-gemma3"]
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    one, sharded = load_model(src, 16), load_model(tmp_path, 16)
    for (name, a), b in zip(one.named_parameters(), sharded.parameters()):
        assert torch.equal(a, b), name


def test_bf16_checkpoint_loads_into_either_dtype(tmp_path):
    folder = make_checkpoint("tiny-gemma", tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(str(folder / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert stored.dtype == torch.bfloat16
    fp32 = load_model(folder, 16, torch.float32).layers[0].mlp.up_proj.weight
    bf16 = load_model(folder, 16, torch.bfloat16).layers[0].mlp.up_proj.weight
    assert fp32.dtype == torch.float32 and torch.equal(fp32, stored.float())
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, stored)


def test_tied_checkpoint_with_identical_lm_head_is_accepted(tiny_checkpoints, tmp_path):
    def same_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()

    def other_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0

    load_model(_edited(tiny_checkpoints["tiny-gemma"], tmp_path / "same", same_head), 16)
    folder = _edited(tiny_checkpoints["tiny-gemma"], tmp_path / "other", other_head)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        load_model(folder, 16)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem, never a traceback from inside torch.

def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve("/no/such/model")


def test_llama_folder_is_rejected_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported"):
        resolve(tmp_path)


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        resolve(tmp_path)


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    folder = _edited(tiny_checkpoints["tiny-gemma3"], tmp_path / "ckpt",
                     lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.self_attn\.k_norm\.weight"):
        load_model(folder, 16)


def test_extra_tensor_is_named(tiny_checkpoints, tmp_path):
    folder = _edited(tiny_checkpoints["tiny-gemma"], tmp_path / "ckpt",
                     lambda t: t.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary\.weight"):
        load_model(folder, 16)


def test_misshapen_tensor_is_named(tiny_checkpoints, tmp_path):
    folder = _edited(tiny_checkpoints["tiny-gemma-mha"], tmp_path / "ckpt",
                     lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(99, 48)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[99, 48\], but config.json asks for \[100, 48\]"):
        load_model(folder, 16)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny_checkpoints, tmp_path, damage):
    folder = _copy(tiny_checkpoints["tiny-gemma"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder, 16)


def test_pickled_weights_are_never_loaded(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["tiny-gemma"], tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"would run code if unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(folder, 16)


@pytest.mark.parametrize("bad", [0, 257])
def test_max_seq_len_out_of_range_is_a_config_error(tiny_checkpoints, bad):
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_model(tiny_checkpoints["tiny-gemma"], bad)


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch, message", [("llama", "GGUF architecture 'llama' is not supported"),
                                           ("gemma", "Gemma 1 GGUF files cannot be read")])
def test_gguf_of_another_architecture(tmp_path, monkeypatch, arch, message):
    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UnsupportedModelError, match=message):
        resolve(_write_gguf(tmp_path / f"{arch}.gguf", arch))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        resolve(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------------------------
# random:<variant>: full-size shapes without a checkpoint.

def test_random_variant_is_reproducible():
    a, b = load_model("random:tiny-gemma2", 16), load_model("random:tiny-gemma2", 16)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.layers[0].mlp.up_proj.weight.std() == pytest.approx(0.02, rel=0.05)


def test_unknown_random_variant():
    with pytest.raises(ConfigError, match="unknown variant 'gemma-13b'; valid: gemma-2b"):
        resolve("random:gemma-13b")


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.parametrize("name, params", [("gemma-2b", 2_506_172_416), ("gemma-7b", 8_537_680_896)])
def test_the_published_shapes(name, params):
    """The published parameter counts and attention shapes, on the meta device (no weight is made)."""
    config = VARIANTS[name]
    shapes = weight_shapes(config)
    assert sum(math.prod(s) for s in shapes.values()) == params
    assert shapes["layers.0.attn.q_proj.weight"] == (config.num_attention_heads * 256, config.hidden_size)
    assert shapes["layers.0.attn.k_proj.weight"] == (config.num_key_value_heads * 256, config.hidden_size)


@pytest.mark.slow
def test_full_size_gemma_2b_runs_in_bf16():
    """Gemma 2B materialized in bf16 (5 GB) and runnable. Gemma 7B at full size (17 GB in bf16) is
    a benchmark, not a CI test: benchmarks/full_size.py exports it and `gemma-edge bench` runs it."""
    model = load_model("random:gemma-2b", 64, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 2_506_172_416
    with torch.no_grad():
        logits = model(torch.tensor([[2, 651, 6037, 576]]), 0)
        step = model(torch.tensor([[235265]]), 4)
    assert logits.shape == (1, 4, 256_000) and step.shape == (1, 1, 256_000)
    assert torch.isfinite(logits).all() and torch.isfinite(step).all()
    assert _peak_rss_gib() < 22


def test_gguf_conversion_reports_each_tensor():
    """The first use of a GGUF dequantizes it (minutes): export's progress bar follows it tensor by
    tensor through transformers' own loop, which must still be the one our wrapper reports."""
    import inspect

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from gemma_edge.checkpoints import gguf_tensors_reported

    bar, seen = gguf_utils.tqdm, []
    with gguf_tensors_reported(seen.append):
        assert list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting")) == ["a", "b", "c"]
    assert [(p.done, p.total) for p in seen] == [(1, 3), (2, 3), (3, 3)] and seen[-1].eta == 0
    assert gguf_utils.tqdm is bar  # restored
    assert "tqdm(reader.tensors" in inspect.getsource(gguf_utils.load_gguf_checkpoint)
