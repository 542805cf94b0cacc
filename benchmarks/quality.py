"""Quality of each 4-bit recipe in each format on the real Gemma 3 270M: exports it (all-int4, and
the phone recipe: int8 layers, the int4 table the head reads; group 32; rounded to nearest or by
GPTQ), then measures the export against the fp32 model on two real texts the calibration never saw
(the CPython reference manual, which verify uses; transformers' modeling_gemma.py, code), 512
tokens each, one prefill. Prints a Markdown table (benchmarks/QUALITY.md holds one); asserts nothing.

    .venv/bin/python benchmarks/quality.py --out /tmp/quality [--formats onnx pte] [--weights int4 phone]
        [--recipes rtn gptq]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

TOKENS = 512
WEIGHTS = {"int4": {"quant": "int4"}, "phone": {"quant": "int8", "embedding_quant": "int4"}}


def texts(tokenizer) -> dict[str, list[int]]:
    import pydoc_data.topics
    import transformers

    topics = pydoc_data.topics.topics
    manual = "\n\n".join(topics[k] for k in sorted(topics))
    code = (Path(transformers.__file__).parent / "models" / "gemma" / "modeling_gemma.py").read_text()
    return {"manual": tokenizer.encode(manual).ids[:TOKENS], "modeling_gemma.py": tokenizer.encode(code).ids[:TOKENS]}


def quality(logits, fp32, ids) -> tuple[float, float, float]:
    """(perplexity ratio, top-1 agreement, mean KL) of logits against fp32 on the text's next tokens."""
    import torch

    lp, ref = torch.log_softmax(torch.tensor(logits[:-1]), -1), torch.log_softmax(torch.tensor(fp32[:-1]), -1)
    target = torch.tensor(ids[1:])[:, None]
    ratio = math.exp(ref.gather(-1, target).mean().item() - lp.gather(-1, target).mean().item())
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    return ratio, top1, kl


def reference(ckpt, context: int = 1024) -> tuple[dict[str, list[int]], dict]:
    """The two texts' ids and the fp32 reference's logits over each (one prefill)."""
    from tokenizers import Tokenizer

    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime.eager import EagerBackend

    ids = texts(Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json")))
    model = EagerBackend(load_model(ckpt, context))
    return ids, {name: model.forward(t, 0) for name, t in ids.items()}


def export_quality(folder: Path, ids: dict[str, list[int]], fp32: dict, threads: int | None = None) -> dict:
    """{text: (perplexity ratio, top-1, KL)} of an export folder against the reference's logits."""
    from gemma_edge.runtime.backend import native_log_captured, open_backend

    with native_log_captured():  # ExecuTorch's log lines
        backend = open_backend(folder, threads=threads)
        return {name: quality(backend.forward(t, 0), fp32[name], t) for name, t in ids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the exports (one subfolder each)")
    parser.add_argument("--formats", nargs="+", default=["onnx", "pte"])
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), help="int4 (all-int4), phone (int8 layers, int4 table)")
    parser.add_argument("--recipes", nargs="+", default=["rtn", "gptq"])
    args = parser.parse_args()

    from gemma_edge.checkpoints import resolve
    from gemma_edge.exporters.settings import ExportSettings

    ckpt = resolve("gemma-3-270m")
    ids, fp32 = reference(ckpt)
    rows = []
    for fmt in args.formats:
        if fmt == "pte":
            from gemma_edge.exporters.executorch import export_pte as export
        else:
            from gemma_edge.exporters.onnx import export_onnx as export
        for weights in args.weights:
            for recipe in args.recipes:
                folder = args.out / f"{fmt}-{weights}-{recipe}"
                start = time.perf_counter()
                settings = ExportSettings(format=fmt, recipe=recipe, **WEIGHTS[weights])
                result = export(ckpt, settings, folder, overwrite=True)
                seconds = time.perf_counter() - start
                load = next(v for k, v in result.seconds.items() if k.startswith("load"))
                measured = export_quality(folder, ids, fp32)
                size = sum(f["bytes"] for n, f in json.loads((folder / "gemma_edge.json").read_text())["files"].items()
                           if n.startswith("model.")) / 2**20
                rows.append((fmt, weights, recipe, measured, size, seconds, load))
                print(fmt, weights, recipe, measured, f"{size:.1f} MiB", f"export {seconds:.0f} s (load and quantize {load:.0f} s)",
                      flush=True)
    names = list(ids)
    print("\n| format | weights | recipe | " + " | ".join(f"{n}: ppl ratio / top-1 / KL" for n in names)
          + " | model MiB | export s | of which load (+ calibrate) + quantize s |")
    print("|---|---|---|" + "---|" * (len(names) + 3))
    for fmt, weights, recipe, measured, size, seconds, load in rows:
        cells = " | ".join(f"x{r:.3f} / {t:.3f} / {k:.3f}" for r, t, k in (measured[n] for n in names))
        print(f"| {fmt} | {weights} | {recipe} | {cells} | {size:.1f} | {seconds:.0f} | {load:.0f} |")


if __name__ == "__main__":
    main()
