"""Quality of each 4-bit recipe in each format on the real Gemma 3 270M: exports it (all-int4, and
the phone recipe: int8 layers, the int4 table the head reads; group 32; rounded to nearest or by
GPTQ), then measures the export against the fp32 model on two real texts the calibration never saw:
the CPython reference manual's first 512 tokens (what verify reads), and transformers'
modeling_gemma.py (code), the whole file in consecutive windows of 512 tokens, each window one
prefill after <bos>. Prints a Markdown table (benchmarks/QUALITY.md holds one); asserts nothing.

    .venv/bin/python benchmarks/quality.py --out /tmp/quality [--formats onnx pte] [--weights int4 phone]
        [--recipes rtn gptq]

Why the whole file (2026-12-07): its first 512 tokens, the only ones measured until then, are 351
tokens of a generated-file banner and the Apache License's header, which the model recites from
memory; on them 25 positions carried 60% of a 4-bit export's loss (benchmarks/QUALITY.md, "The code
text"). The file's 12 windows hold 6,144 of its 6,149 tokens, that window among them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

TOKENS = 512
CODE = "modeling_gemma.py (12 windows)"
WEIGHTS = {"int4": {"quant": "int4"}, "phone": {"quant": "int8", "embedding_quant": "int4"}}


def texts(tokenizer) -> dict[str, list[list[int]]]:
    """Each text's windows of TOKENS ids: the manual's first, and all of modeling_gemma.py's (the
    first starts with the tokenizer's <bos>, each later one with a <bos> of its own)."""
    import pydoc_data.topics
    import transformers

    topics = pydoc_data.topics.topics
    manual = "\n\n".join(topics[k] for k in sorted(topics))
    code = tokenizer.encode((Path(transformers.__file__).parent / "models" / "gemma" / "modeling_gemma.py").read_text()).ids
    bos, step = code[0], TOKENS - 1
    windows = [code[:TOKENS]] + [[bos] + code[i:i + step] for i in range(TOKENS, len(code) - step + 1, step)]
    return {"manual": [tokenizer.encode(manual).ids[:TOKENS]], CODE: windows}


def quality(logits, fp32, ids) -> tuple[float, float, float]:
    """(perplexity ratio, top-1 agreement, mean KL) of logits against fp32 on the text's next tokens."""
    import torch

    lp, ref = torch.log_softmax(torch.tensor(logits[:-1]), -1), torch.log_softmax(torch.tensor(fp32[:-1]), -1)
    target = torch.tensor(ids[1:])[:, None]
    ratio = math.exp(ref.gather(-1, target).mean().item() - lp.gather(-1, target).mean().item())
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    return ratio, top1, kl


def combined(windows: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """One text's quality from its windows' (all TOKENS long, so each position weighs alike): the
    perplexity ratio over all their positions, top-1 and KL averaged over them."""
    n = len(windows)
    return (math.exp(sum(math.log(r) for r, _, _ in windows) / n), sum(t for _, t, _ in windows) / n,
            sum(k for _, _, k in windows) / n)


def measure(subjects: dict[str, Callable[[list[int]], object]], ids: dict[str, list[list[int]]],
            reference: Callable[[list[int]], object]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{subject: {text: (ratio, top-1, KL)}} of each subject's logits (forward over a window of ids)
    against the reference's, a window at a time: each window's reference logits are computed once
    for every subject and dropped (the code text's all at once would be 6.4 GB)."""
    per = {name: {text: [] for text in ids} for name in subjects}
    for text, windows in ids.items():
        for window in windows:
            fp32 = reference(window)
            for name, forward in subjects.items():
                per[name][text].append(quality(forward(window), fp32, window))
    return {name: {text: combined(q) for text, q in by_text.items()} for name, by_text in per.items()}


def reference(ckpt, context: int = 1024) -> tuple[dict[str, list[list[int]]], Callable[[list[int]], object]]:
    """The texts' windows and the fp32 reference's forward over a window (one prefill)."""
    from tokenizers import Tokenizer

    from gemma_edge.checkpoints import load_model
    from gemma_edge.runtime.eager import EagerBackend

    model = EagerBackend(load_model(ckpt, context))
    return texts(Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json"))), lambda window: model.forward(window, 0)


def exports_quality(folders: list[Path], ids: dict[str, list[list[int]]], fp32: Callable,
                    threads: int | None = None) -> dict[str, dict]:
    """{folder name: {text: (perplexity ratio, top-1, KL)}} of export folders against the reference."""
    from gemma_edge.runtime.backend import native_log_captured, open_backend

    with native_log_captured():  # ExecuTorch's log lines
        backends = {folder.name: open_backend(folder, threads=threads) for folder in folders}
        return measure({name: lambda w, b=b: b.forward(w, 0) for name, b in backends.items()}, ids, fp32)


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
    exported = []
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
                size = sum(f["bytes"] for n, f in json.loads((folder / "gemma_edge.json").read_text())["files"].items()
                           if n.startswith("model.")) / 2**20
                exported.append((fmt, weights, recipe, folder, size, seconds, load))
                print(fmt, weights, recipe, f"{size:.1f} MiB", f"export {seconds:.0f} s (load and quantize {load:.0f} s)",
                      flush=True)
    ids, fp32 = reference(ckpt)
    measured = exports_quality([row[3] for row in exported], ids, fp32)
    names = list(ids)
    print("\n| format | weights | recipe | " + " | ".join(f"{n}: ppl ratio / top-1 / KL" for n in names)
          + " | model MiB | export s | of which load (+ calibrate) + quantize s |")
    print("|---|---|---|" + "---|" * (len(names) + 3))
    for fmt, weights, recipe, folder, size, seconds, load in exported:
        cells = " | ".join(f"x{r:.3f} / {t:.3f} / {k:.3f}" for r, t, k in (measured[folder.name][n] for n in names))
        print(f"| {fmt} | {weights} | {recipe} | {cells} | {size:.1f} | {seconds:.0f} | {load:.0f} |")


if __name__ == "__main__":
    main()
