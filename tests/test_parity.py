"""Our static-cache model against transformers' eager Gemma, for every tiny family."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from gemma_edge.checkpoints import load_model
from gemma_edge.config import VARIANTS
from gemma_edge.exporters.tracing import export_model
from gemma_edge.parity import check_against_reference, reference_greedy
from gemma_edge.reference import load_reference
from gemma_edge.runtime.eager import EagerBackend
from gemma_edge.runtime.generation import greedy

MAX_SEQ_LEN = 64
WINDOW = 8  # the tiny Gemma 2/3 sliding window
PREFILL = 2 * WINDOW + 4  # at least twice the window: the ring wraps inside the prefill
DECODE = 16
TOL = dict(atol=1e-4, rtol=1e-4)


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def _prefill_then_decode(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ids[:prefill] in one call, then one call per remaining token: logits [1, len, vocab].

    A prefill at position 0 sees nothing already in the cache, so no reset is needed before it.
    """
    with torch.no_grad():
        rows = [model(ids[:, :prefill], torch.arange(prefill))]
        rows += [model(ids[:, i:i + 1], torch.arange(i, i + 1)) for i in range(prefill, ids.shape[1])]
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("name", TINY)
def test_prefill_and_decode_logits_match_transformers(name, tiny_checkpoints):
    ckpt = tiny_checkpoints[name]
    reference, model = load_reference(str(ckpt)), load_model(ckpt, MAX_SEQ_LEN)
    ids = _ids(PREFILL + DECODE, VARIANTS[name].vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits  # one pass over the whole sequence, no cache
    ours = _prefill_then_decode(model, ids, PREFILL)
    assert expected.abs().max() > 1.0  # the weights move the logits: a test that can fail
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("name", TINY)
def test_greedy_32_tokens_identical_to_transformers_generate(name, tiny_checkpoints):
    ckpt = tiny_checkpoints[name]
    reference, model = load_reference(str(ckpt)), load_model(ckpt, MAX_SEQ_LEN)
    prompt = _ids(PREFILL, VARIANTS[name].vocab_size, seed=1)[0].tolist()
    expected = reference_greedy(reference, prompt, 32)
    assert len(set(expected)) >= 3  # not a degenerate repeat of one token
    assert greedy(EagerBackend(model), prompt, 32).token_ids == expected


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_chunked_prefill_equals_one_shot(name, tiny_checkpoints):
    """Chunks of 3, 9 (> window) and 1 give the same rows as one call: the ring keeps what it must."""
    model = load_model(tiny_checkpoints[name], MAX_SEQ_LEN)
    ids = _ids(30, VARIANTS[name].vocab_size, seed=2)
    one_shot = _prefill_then_decode(model, ids, 30)
    model.reset_cache()
    rows, start = [], 0
    with torch.no_grad():
        for size in (3, 9, 1, 10, 7):
            rows.append(model(ids[:, start:start + size], torch.arange(start, start + size)))
            start += size
    torch.testing.assert_close(torch.cat(rows, dim=1), one_shot, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma-mha"])
def test_rewinding_the_cache_forgets_what_followed(name, tiny_checkpoints):
    """Re-prefilling from position 12 (a chat turn edited) equals a fresh run of the new sequence.

    Only without a ring: a ring has already overwritten the window before position 12.
    """
    model = load_model(tiny_checkpoints[name], MAX_SEQ_LEN)
    assert model.can_rewind
    vocab = VARIANTS[name].vocab_size
    first, second = _ids(24, vocab, seed=3), _ids(24, vocab, seed=4)
    mixed = torch.cat((first[:, :12], second[:, 12:]), dim=1)
    expected = _prefill_then_decode(model, mixed, 24)[:, 12:]
    _prefill_then_decode(model, first, 24)  # the cache now holds positions 0..23 of `first`
    with torch.no_grad():
        rewound = model(second[:, 12:], torch.arange(12, 24))
    torch.testing.assert_close(rewound, expected, atol=1e-5, rtol=1e-5)


def test_models_with_a_ring_say_they_cannot_rewind(tiny_checkpoints):
    assert not load_model(tiny_checkpoints["tiny-gemma3"], MAX_SEQ_LEN).can_rewind
    assert load_model(tiny_checkpoints["tiny-gemma3"], WINDOW).can_rewind  # cache no longer than the window


def test_cache_shorter_than_the_window(tiny_checkpoints):
    """max_seq_len below the sliding window: no ring is needed and results still match."""
    ckpt = tiny_checkpoints["tiny-gemma3"]
    model = load_model(ckpt, 6)
    assert all(not layer.attn.cache.ring for layer in model.layers)
    ids = _ids(6, VARIANTS["tiny-gemma3"].vocab_size, seed=5)
    with torch.no_grad():
        expected = load_reference(str(ckpt))(ids).logits
    torch.testing.assert_close(_prefill_then_decode(model, ids, 3), expected, **TOL)


def test_cache_shapes_are_static_and_sliding_layers_use_a_ring():
    from gemma_edge.checkpoints import empty_model
    from gemma_edge.config import SLIDING

    config = VARIANTS["tiny-gemma3"]
    model = empty_model(config, MAX_SEQ_LEN, torch.float32)
    shapes = {}
    for layer, kind in zip(model.layers, config.layer_types):
        cache = layer.attn.cache
        slots = WINDOW + 1 if kind == SLIDING else MAX_SEQ_LEN  # a ring has one spare slot
        assert tuple(cache.k.shape) == (config.num_key_value_heads, slots, config.head_dim)
        shapes[id(cache)] = tuple(cache.k.shape)
    ids = _ids(40, config.vocab_size)
    _prefill_then_decode(model, ids, 30)
    assert all(tuple(layer.attn.cache.k.shape) == shapes[id(layer.attn.cache)] for layer in model.layers)


def test_ring_cuts_gemma3_cache_memory_at_32k_context():
    """Gemma 3 270M at its full 32k context: 15 of 18 layers keep 513 slots instead of 32768."""
    from gemma_edge.model import Gemma

    config = VARIANTS["gemma-3-270m"]
    with torch.device("meta"):
        model = Gemma(config, config.max_position_embeddings)
    ring_slots = sum(layer.attn.cache.k.shape[1] for layer in model.layers)
    full_slots = config.num_hidden_layers * config.max_position_embeddings
    assert full_slots / ring_slots > 5.0  # measured: 5.8x


def test_exported_program_prefills_and_decodes_like_eager(tiny_checkpoints):
    """torch.export with a dynamic token count: one program prefills 20 tokens and decodes 1 at a time."""
    model = load_model(tiny_checkpoints["tiny-gemma3"], MAX_SEQ_LEN)
    program = export_model(model).module()  # its cache buffers start as the model's were: empty
    ids = _ids(PREFILL + DECODE, VARIANTS["tiny-gemma3"].vocab_size, seed=6)
    expected = _prefill_then_decode(model, ids, PREFILL)
    torch.testing.assert_close(_prefill_then_decode(program, ids, PREFILL), expected, atol=1e-6, rtol=1e-6)


def test_parity_report_on_the_eager_backend(tiny_checkpoints):
    ckpt = tiny_checkpoints["tiny-gemma2"]
    report = check_against_reference(EagerBackend(load_model(ckpt, MAX_SEQ_LEN)), load_reference(str(ckpt)),
                                      _ids(PREFILL, 1003)[0].tolist(), 16)
    assert report.passed and report.first_divergence is None
    assert report.ours.shape == (PREFILL + 15, 1003)
    assert report.prefill_max_abs < 1e-4 and report.decode_max_abs < 1e-4
    assert report.top1_agreement == 1.0


def test_parity_report_fails_on_a_wrong_model(tiny_checkpoints):
    """The check can fail: a perturbed RoPE base is caught by the logits and the greedy tokens."""
    ckpt = tiny_checkpoints["tiny-gemma3"]
    model = load_model(ckpt, MAX_SEQ_LEN)
    wrong = model.config.replace(rope_local_base_freq=20_000.0)
    model.config = wrong
    model.init_buffers()
    report = check_against_reference(EagerBackend(model), load_reference(str(ckpt)),
                                     _ids(PREFILL, 1005, seed=7)[0].tolist(), 16)
    assert not report.logits_close and not report.passed
    assert report.prefill_max_abs > 1e-3
