"""From fine-tune to export on the real Gemma 3 270M: a LoRA trained with PEFT on instruction
examples, exported with gemma-edge (base + adapter), and verified on held-out examples. Prints how
much the fine-tune moved the model on examples it never saw (the responses' perplexity under the
base and under base + adapter) and how much of that each export keeps.

    .venv/bin/python benchmarks/fine_tune.py [--out /tmp/fine-tune] [--recipes onnx:int8 onnx:int8:int4 ...]
        [--epochs 2] [--rank 16] [--lr 1e-4]

A recipe is FORMAT:QUANT[:EMBEDDING_QUANT][:gptq] (gptq: --recipe gptq on its default calibration text;
without it, --recipe rtn).

The examples are written from Python's own standard library (nothing downloaded): "Describe the
Python function M.F." -> the first sentence of its docstring, in the dolly layout
(instruction / context / response). Training and evaluation use different modules. Needs peft
(pip install peft, or make setup, which installs the test extras).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

TRAIN_MODULES = ["shutil", "textwrap", "string", "os.path", "json", "base64", "random", "statistics"]
EVAL_MODULES = ["glob", "fnmatch", "heapq", "bisect", "difflib"]


def examples(modules: list[str], per_module: int = 6) -> list[dict]:
    """Dolly records: a public function's name -> the first sentence of its docstring."""
    out = []
    for name in modules:
        module = importlib.import_module(name)
        found = 0
        for attr in sorted(dir(module)):
            value = getattr(module, attr)
            doc = inspect.getdoc(value) if inspect.isfunction(value) and not attr.startswith("_") else None
            if not doc or value.__module__ != module.__name__:
                continue
            sentence = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".") + "."
            if 20 <= len(sentence) <= 200:
                out.append({"instruction": f"Describe the Python function {name}.{attr}.", "context": "",
                            "response": sentence})
                found += 1
            if found == per_module:
                break
    return out


def train(base: Path, records: list[dict], out: Path, epochs: int, rank: int, lr: float) -> Path:
    """A LoRA on every projection, trained on the responses (the prompt is not scored)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trained = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    for epoch in range(epochs):
        total = 0.0
        for prompt, response in encoded(tokenizer, records):
            ids = torch.tensor([prompt + response])
            loss = peft(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + response])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        print(f"  epoch {epoch + 1}: mean loss {total / len(records):.3f}", flush=True)
    peft.save_pretrained(out)
    return out


def encoded(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(<bos> + the instruction prompt, the response + <eos>): as gemma-edge generate lays them out."""
    from gemma_edge.runtime.templates import dolly_prompt, instruction_response

    return [([tokenizer.bos_token_id] + tokenizer.encode("".join(instruction_response(dolly_prompt(r))), add_special_tokens=False),
             tokenizer.encode(r["response"], add_special_tokens=False) + [tokenizer.eos_token_id]) for r in records]


def response_perplexity(model, tokenizer, records: list[dict]) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in encoded(tokenizer, records):
            logits = model(torch.tensor([prompt + response[:-1]])).logits[0, len(prompt) - 1:].float()
            nll -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()
            count += len(response)
    return math.exp(nll / count)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gemma_edge.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fine-tune"))
    parser.add_argument("--recipes", nargs="*", default=["onnx:int8", "onnx:int8:int4", "onnx:int4", "onnx:int4:int4:gptq",
                                                         "pte:int8"],
                        help="FORMAT:QUANT[:EMBEDDING_QUANT][:gptq] (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    from peft import PeftModel
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_edge.checkpoints import resolve
    from gemma_edge.commands import ui
    from gemma_edge.manifest import program_files, read_manifest

    base = resolve("gemma-3-270m").hf_dir
    train_records, eval_records = examples(TRAIN_MODULES), examples(EVAL_MODULES)
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = args.out / "eval.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in eval_records))
    print(f"training a rank-{args.rank} LoRA on {len(train_records)} examples ({', '.join(TRAIN_MODULES)}), "
          f"{args.epochs} epochs; held out: {len(eval_records)} ({', '.join(EVAL_MODULES)})", flush=True)
    start = time.perf_counter()
    adapter = train(base, train_records, args.out / "lora", args.epochs, args.rank, args.lr)
    train_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    before = response_perplexity(plain, tokenizer, eval_records)
    tuned = PeftModel.from_pretrained(plain, adapter).merge_and_unload().eval()
    after = response_perplexity(tuned, tokenizer, eval_records)

    table = Table(title=f"Gemma 3 270M + LoRA r{args.rank} (trained {train_s / 60:.1f} min): held-out responses' "
                        f"perplexity {before:.2f} (base) -> {after:.2f} (fine-tuned, PEFT)")
    for col in ("export", "model MiB", "export time", "verify", "text ppl ratio", "responses ppl (reference)", "ratio"):
        table.add_column(col)
    for recipe in args.recipes:
        fmt, quant, *rest = recipe.split(":")
        flags = (["--embedding-quant", rest[0]] if rest and rest[0] != "gptq" else []) + (
            ["--recipe", "gptq" if "gptq" in rest else "rtn"])
        folder = args.out / recipe.replace(":", "-")
        start = time.perf_counter()
        cli("export", "gemma-3-270m", "--adapter", str(adapter), "--template", "instruction", "--format", fmt,
            "--quant", quant, *flags, "-o", str(folder), "--overwrite")
        seconds = time.perf_counter() - start
        report = folder.with_suffix(".json")
        subprocess.run([sys.executable, "-m", "gemma_edge.cli", "verify", str(folder), "--prompts", str(held_out),
                        "--json", str(report)], stdout=subprocess.DEVNULL)
        data = json.loads(report.read_text())
        r = data["responses"]
        manifest = read_manifest(folder)
        size = sum(manifest["files"][f]["bytes"] for f in program_files(manifest)) / 2**20  # the model's files
        table.add_row(" ".join([fmt, quant, *rest]), f"{size:,.0f}", f"{seconds / 60:.1f} min", "pass" if data["passed"] else "FAIL",
                      f"x{data['ppl_ratio']:.3f}", f"{r['ppl']:.2f} ({r['ppl_reference']:.2f})", f"x{r['ppl_ratio']:.3f}")
    ui.results().print(table)


if __name__ == "__main__":
    main()
