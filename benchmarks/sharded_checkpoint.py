"""Write a Hugging Face folder the way Google ships Gemma: bf16 safetensors shards
(model-0000K-of-0000N.safetensors), model.safetensors.index.json and config.json, with random
weights of a named variant's exact shapes (no model hub here). One shard is held at a time, so a
7B folder (17 GB) is written in the memory of one shard.

    .venv/bin/python benchmarks/sharded_checkpoint.py gemma-2b OUTDIR [--layers N] [--vocab N] [--shard-gb 2] [--tokenizer FILE]

--layers keeps the full width with fewer layers, --vocab a shorter table (a full-width stack small
enough for a test: tests/test_full_width.py).
Weights are Normal(0, 0.02) and norms 0 (scale 1), as transformers initializes Gemma.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from gemma_edge.checkpoints import weight_names
from gemma_edge.config import variant
from gemma_edge.files import staged_folder
from gemma_edge.model import Gemma
from gemma_edge.reference import hf_config_for


def plan(config, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors (Hugging Face name, shape) of each shard, in checkpoint order."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Gemma(config, 1, torch.bfloat16).named_parameters()}
    shards, size = [[]], 0
    for hf, ours in weight_names(config).items():
        nbytes = 2 * torch.Size(shapes[ours]).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, shapes[ours]))
        size += nbytes
    return shards


def write(name: str, out: Path, layers: int | None, shard_gb: float, tokenizer: Path | None, seed: int,
          vocab: int | None = None) -> None:
    from safetensors.torch import save_file

    config = variant(name)
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers,
                                     layer_types=tuple(config.layer_types[:layers]) if config.layer_types else config.layer_types)
    if vocab is not None:
        config = dataclasses.replace(config, vocab_size=vocab)
    shards = plan(config, int(shard_gb * 2**30))
    gen = torch.Generator().manual_seed(seed)
    index, total = {}, 0
    with staged_folder(out) as tmp:
        hf_config_for(config).save_pretrained(tmp)
        for k, tensors in enumerate(shards, 1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            state = {}
            for hf, shape in tensors:
                weight = torch.empty(shape, dtype=torch.bfloat16)
                weight.zero_() if hf.endswith("norm.weight") else weight.normal_(0.0, 0.02, generator=gen)
                state[hf] = weight
                index[hf] = filename
                total += 2 * weight.numel()
            save_file(state, str(tmp / filename), metadata={"format": "pt"})
            print(f"{filename}: {len(tensors)} tensors, {sum(2 * t.numel() for t in state.values()) / 2**30:.2f} GiB", flush=True)
            del state
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", help="a named architecture (gemma-edge variants)")
    parser.add_argument("out", type=Path, help="the folder to create")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the variant's)")
    parser.add_argument("--vocab", type=int, default=None, help="rows of the embedding table (default: the variant's)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard in GiB (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json to put beside the weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    write(args.variant, args.out, args.layers, args.shard_gb, args.tokenizer, args.seed, args.vocab)
    print(f"{args.out}: written in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
