"""Where int4 loses the real Gemma 3 270M's quality, and what wins it back: perplexity ratios of
weight-quantization recipes simulated on the eager model (weights rounded as the exporters round
them, computed in float32), on 512 tokens of English. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/int4_quality.py [--tokens 512]

Simulated, not exported: the numbers to choose a recipe by, before paying for an export.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn


def quantize_blocks(w: torch.Tensor, bits: int, block: int, symmetric: bool, search: bool) -> torch.Tensor:
    """w [out, in] rounded to `bits` per block of `block` input columns, as MatMulNBits (asymmetric:
    scale and zero point) or XNNPACK (symmetric) store it. search: per block, the clipping of the
    range (1.0 down to 0.80) that minimizes the block's squared error, instead of the full range."""
    out, cols = w.shape
    x = w.reshape(out, cols // block, block).float()
    qmax = 2 ** bits - 1
    best, best_err = None, None
    for shrink in ([1.0 - 0.01 * i for i in range(21)] if search else [1.0]):
        if symmetric:
            half = 2 ** (bits - 1)
            amax = x.abs().amax(-1, keepdim=True) * shrink
            scale = (amax / (half - 0.5)).clamp(min=1e-12)  # XNNPACK-style: [-half, half - 1]
            q = torch.clamp(torch.round(x / scale), -half, half - 1) * scale
        else:
            lo, hi = x.amin(-1, keepdim=True) * shrink, x.amax(-1, keepdim=True) * shrink
            lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
            scale = ((hi - lo) / qmax).clamp(min=1e-12)
            zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
            q = (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale
        err = ((q - x) ** 2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.minimum(err, best_err)
    return best.reshape(out, cols).to(w.dtype)


def perplexity(model, ids: torch.Tensor) -> float:
    model.reset_cache()
    with torch.no_grad():
        logits = model(ids[None], 0)[0].float()
    return math.exp(nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


def apply(model, recipe: dict) -> None:
    """recipe: bits for "linear", "embedding", "head" (None: float32), per-name overrides in
    "override" ({substring: bits}), "symmetric", "search"."""
    from gemma_edge.exporters.torchao_quant import untie_output_projection

    untie_output_projection(model)
    opts = dict(block=32, symmetric=recipe.get("symmetric", False), search=recipe.get("search", False))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                bits = recipe["head"] if name == "lm_head" else recipe["linear"]
                for key, b in recipe.get("override", {}).items():
                    if key in name:
                        bits = b
                if bits:
                    module.weight.copy_(quantize_blocks(module.weight, bits, **opts))
        if recipe["embedding"]:
            model.embed_tokens.weight.copy_(quantize_blocks(model.embed_tokens.weight, recipe["embedding"], **opts))


RECIPES = {
    "int4 all, asym (ONNX, .pte with offsets)": dict(linear=4, embedding=4, head=4),
    "int4 all, sym (XNNPACK grid, no offsets)": dict(linear=4, embedding=4, head=4, symmetric=True),
    "int4 all, asym + clip search": dict(linear=4, embedding=4, head=4, search=True),
    "int4 all, sym + clip search": dict(linear=4, embedding=4, head=4, symmetric=True, search=True),
    "int4, head int8": dict(linear=4, embedding=4, head=8),
    "int4, head+emb int8": dict(linear=4, embedding=8, head=8),
    "int4, head int8 + search": dict(linear=4, embedding=4, head=8, search=True),
    "int4, down int8, head int8": dict(linear=4, embedding=4, head=8, override={"down_proj": 8}),
    "int4, v+down int8, head int8": dict(linear=4, embedding=4, head=8, override={"down_proj": 8, "v_proj": 8}),
    "int4 linears only (head, emb fp32)": dict(linear=4, embedding=None, head=None),
    "int4 head only": dict(linear=None, embedding=None, head=4),
    "int4 embedding only": dict(linear=None, embedding=4, head=None),
    "int8 all": dict(linear=8, embedding=8, head=8),
    "int8 linears, int4 table (asym)": dict(linear=8, embedding=4, head=4),
    "int8 linears, int4 table (asym) + search": dict(linear=8, embedding=4, head=4, search=True),
    "int8 linears, int4 table (sym)": dict(linear=8, embedding=4, head=4, symmetric=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="recipe names (substrings) to run")
    args = parser.parse_args()
    import pydoc_data.topics

    from gemma_edge.commands import ui
    from rich.table import Table
    from tokenizers import Tokenizer

    from gemma_edge.checkpoints import load_model, resolve

    torch.set_num_threads(2)
    ckpt = resolve("gemma-3-270m")
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = torch.tensor(Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json")).encode(text).ids[:args.tokens])
    base = load_model(ckpt, args.tokens)
    reference = perplexity(base, ids)
    table = Table(title=f"Gemma 3 270M, {args.tokens} tokens, perplexity {reference:.2f} in float32")
    for col in ("recipe", "ppl", "ratio"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for name, recipe in RECIPES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        model = copy.deepcopy(base)
        apply(model, recipe)
        ppl = perplexity(model, ids)
        table.add_row(name, f"{ppl:.2f}", f"x{ppl / reference:.3f}")
        print(f"{name}: x{ppl / reference:.3f}", flush=True)
    ui.results().print(table)


if __name__ == "__main__":
    main()
