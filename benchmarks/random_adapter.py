"""A PEFT LoRA adapter of random weights with a named variant's full shapes, written in PEFT's layout
(adapter_config.json + adapter_model.safetensors) without PEFT: for measuring what merging an
adapter costs a full-size export (benchmarks/full_size.py --adapter DIR).

    .venv/bin/python benchmarks/random_adapter.py gemma-2b /tmp/lora-2b [--rank 16] [--alpha 32]

LoRA on every attention and MLP projection of every layer, float32 as PEFT saves a LoRA trained in
float32: Gemma 2B at rank 16 is 78 MB, 7B at rank 16 200 MB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gemma_edge.checkpoints import weight_names, weight_shapes
from gemma_edge.config import variant

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="a named architecture (gemma-edge variants)")
    parser.add_argument("out", type=Path, help="the adapter folder to write")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    args = parser.parse_args()

    config = variant(args.variant)
    shapes = weight_shapes(config)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for hf, ours in weight_names(config).items():
        module = hf.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        out, cols = shapes[ours]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(args.rank, cols, generator=gen) * cols ** -0.5
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, args.rank, generator=gen) * 0.01
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (args.out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": args.rank, "lora_alpha": args.alpha, "target_modules": list(PROJECTIONS),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "modules_to_save": None, "fan_in_fan_out": False,
        "base_model_name_or_path": f"random:{args.variant}", "task_type": "CAUSAL_LM"}, indent=2) + "\n")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.out}: rank {args.rank} on {len(tensors) // 2} projections of {args.variant}, {size / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
