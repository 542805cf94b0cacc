"""Tiny random Gemma checkpoints of every family, built with transformers and save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_edge.config import VARIANTS
from gemma_edge.reference import hf_config_for

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

