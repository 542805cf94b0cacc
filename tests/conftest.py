"""Tiny random Gemma checkpoints of every family, built with transformers and save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

PARALLEL = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if PARALLEL:
    # Test processes side by side (make test: pytest -n, one per core) compute on one thread each,
    # and so do the commands they start: OpenMP threads sharing a core with another process wait
    # for each other at every barrier (a 2-thread PyTorch measured 2.5-3x slower beside a busy core).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if PARALLEL:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from gemma_edge.config import VARIANTS
from gemma_edge.reference import hf_config_for

# The modules that export the real Gemma 3 270M (minutes per export, one core each) run first, the
# longest first, so that with two test processes the other one runs the many short modules beside
# them, rather than one process lowering alone at the end (make test: --no-loadscope-reorder).
FIRST = ["test_real_executorch", "test_real_calibration", "test_android_contract", "test_real_onnx", "test_real_verify",
         "test_real_runtime", "test_real_model", "test_executorch"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(FIRST)))  # stable: the rest keep their order

# One row per supported family: Gemma 1 multi-query, Gemma 1 multi-head, Gemma 2 (soft-capping,
# alternating sliding window), Gemma 3 (QK-norm, local/global RoPE, 5:1-style sliding pattern).
TINY = ["tiny-gemma", "tiny-gemma-mha", "tiny-gemma2", "tiny-gemma3"]


def make_checkpoint(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A transformers model of the named architecture, with weights large enough to matter.

    transformers initializes norms to zero and linears at std 0.02, which leaves every layer
    close to the identity and would let a wrong norm or a dropped soft-cap pass unnoticed.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config_for(VARIANTS[name]), attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "model.norm.weight":
                p.normal_(4.0, 0.3)  # final norm scale ~5: logits of a few units, not ~1
            elif "norm" in pname:
                p.normal_(0.0, 0.1)
            elif "embed" in pname:
                p.normal_(0.0, 0.03)  # small enough that a token does not just predict itself
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_checkpoint(name, root / name) for name in TINY}



def byte_fallback_tokenizer(vocab_size: int):
    """A Gemma-style tokenizer small enough for the tiny vocabularies: <pad> <eos> <bos> <unk>, the
    turn markers, 256 byte tokens <0x00>..<0xFF> for what it lacks (so "é" is <0xC3><0xA9>, two
    ids whose halves are no text), then printable ASCII and a few merges; spaces become "▁" as in
    Gemma's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁"] + [chr(c) for c in range(33, 127)]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "r"), ("o", "n"), ("▁", "s")]
    tokens += ["".join(m) for m in merges]
    assert len(tokens) <= vocab_size
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                              unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(tokens[:6])
    return tokenizer


@pytest.fixture(scope="session")
def tiny_with_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoints with a tokenizer.json beside them, as a fine-tuned folder would have."""
    root = tmp_path_factory.mktemp("tiny-tok")
    out = {}
    for name in TINY:
        folder = make_checkpoint(name, root / name)
        byte_fallback_tokenizer(VARIANTS[name].vocab_size).save(str(folder / "tokenizer.json"))
        out[name] = folder
    return out


REAL_TOKENS = 512  # of the CPython reference manual: English written by others
REAL_MAX_SEQ_LEN = 1024


@pytest.fixture(scope="session")
def real():
    """The real Gemma 3 270M: (checkpoint, tokenizer, REAL_TOKENS ids of real English, the eager
    fp32 model's logits for them [REAL_TOKENS, vocab], one prefill). Shared by the real-model tests."""
    from tokenizers import Tokenizer

    from gemma_edge.checkpoints import load_model, resolve
    from gemma_edge.runtime.eager import EagerBackend
    from test_real_model import real_english_ids

    ckpt = resolve("gemma-3-270m")
    tokenizer = Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json"))
    ids = real_english_ids(tokenizer, REAL_TOKENS)
    fp32 = EagerBackend(load_model(ckpt, REAL_MAX_SEQ_LEN)).forward(ids, 0)
    return ckpt, tokenizer, ids, fp32


TINY_MAX_SEQ_LEN = 64


@pytest.fixture(scope="session")
def tiny_exports(tiny_with_tokenizers):
    """export(name, format, quant, **settings) -> the folder of that tiny checkpoint's export (max_seq_len 64),
    made once per exporter code and reused across runs (tests/export_cache.py). Rounded to nearest
    unless settings name a recipe: the tests of calibration (test_calibration.py) ask for it."""
    from export_cache import cached_export
    from gemma_edge.checkpoints import resolve
    from gemma_edge.exporters.settings import ExportSettings

    def export(name: str, fmt: str, quant: str = "int4", **settings) -> Path:
        settings.setdefault("recipe", "rtn")
        return cached_export(resolve(tiny_with_tokenizers[name]),
                             ExportSettings(format=fmt, quant=quant, max_seq_len=TINY_MAX_SEQ_LEN, **settings))

    return export


# What gemma-edge itself writes to stderr, line by line (results go to stdout): a stage done, the
# memory an export expects, generate's statistics, an error. Anything else there is a library's.
OUR_STDERR = [r"✓ .+ \(\d+\.\d s\)", r"expected peak memory [\d.]+ GiB \([\d.]+ GiB available\)", r"--recipe auto: .+",
              r"\d+ prompt tokens \(\d+ cached\), \d+ generated, first token \d+ ms, prefill [\d.]+ tok/s, "
              r"decode [\d.]+ tok/s, finish: \w+", r"gemma-edge: .+"]


def not_ours(stderr: str) -> list[str]:
    """The lines of a gemma-edge run's stderr that are not gemma-edge's own."""
    import re

    return [line for line in stderr.splitlines() if line.strip() and not any(re.fullmatch(p, line) for p in OUR_STDERR)]
