"""gemma-edge verify: an export against the PyTorch reference (or a golden file of its logits)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from gemma_edge.errors import ConfigError, GemmaEdgeError


SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")


def run(args: argparse.Namespace) -> int:
    from gemma_edge.commands.ui import progress, write_json
    from gemma_edge.manifest import file_problems, read_manifest
    from gemma_edge.verify import THRESHOLDS, Golden, limits_key, response_perplexity, verify

    folder = Path(args.outdir)
    manifest = read_manifest(folder)
    if manifest["export"]["quant"] not in THRESHOLDS:
        raise GemmaEdgeError(f"{folder}: unknown quantization {manifest['export']['quant']!r} in its manifest")
    quant = limits_key(manifest["export"])
    console = progress()
    problems = {} if args.no_verify_checksums else file_problems(folder, manifest)
    checksums = None if args.no_verify_checksums else list(problems)
    for name, problem in problems.items():
        console.print(f"[red]{folder / name}: {problem}[/red]", soft_wrap=True)
    if any(not p.startswith("changed") for p in problems.values()):  # missing or truncated: nothing to run
        console.print("[red]verify: FAIL: the export is incomplete; copy the folder again or export it anew[/red]", soft_wrap=True)
        if args.json:
            write_json(args.json, {"export": str(folder), "format": manifest["format"], "passed": False, "files": problems})
        return 1
    if args.target == "arm64" and manifest["format"] == "onnx":
        return _arm64_python(args, folder, manifest, checksums, console)
    backend = _backend(args, folder, console)
    if args.golden and not args.reference:
        golden = Golden.load(args.golden)
        if golden.logits.shape[1] != manifest["config"]["vocab_size"]:
            raise GemmaEdgeError(f"{args.golden} holds logits over {golden.logits.shape[1]} tokens, the export's vocabulary "
                                 f"has {manifest['config']['vocab_size']}: it was saved for another model")
        reference = None
    else:
        golden, reference = _golden(args, folder, manifest, backend.max_seq_len, console)
        if args.save_golden:
            golden.save(args.save_golden)
    with console.status(f"running {len(golden.ids) - 1} tokens through the export, then {len(golden.greedy)} greedy"):
        report = verify(backend, golden, quant, checksums_ok=None if checksums is None else not checksums)
    if _is_jsonl(args.prompts) and manifest.get("tokenizer", {}).get("files"):
        if reference is None:
            console.print("[yellow]the responses' perplexity needs the reference itself: not measured with --golden[/yellow]")
        else:
            examples = _examples(args.prompts, folder, manifest)
            with console.status(f"scoring the responses of {len(examples)} examples in the export and the reference"):
                report.responses = response_perplexity(backend, reference, examples)
    _print(report, folder, manifest)
    if args.json:
        target = {"target": "arm64", "cpu": args.cpu} if args.target == "arm64" else {"target": "host"}
        write_json(args.json, {"export": str(folder), "format": manifest["format"], **target, **report.to_dict()})
    return 0 if report.passed else 1


def _backend(args, folder: Path, console):
    """The export's backend on the host, or (a .pte on arm64) our native runner under QEMU."""
    from gemma_edge.runtime.backend import open_backend

    if args.target == "host":
        with console.status(f"loading {folder}"):
            return open_backend(folder, runtime=args.runtime, progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    from gemma_edge.emulation import arm64_command, ensure_pte_runner
    from gemma_edge.runtime.native_backend import NativeBackend

    runner = ensure_pte_runner(progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    console.print(f"[bold]emulated arm64 ({args.cpu}, QEMU user mode, native ExecuTorch runner): "
                  "slower than native by 30-400x[/bold]")
    prefix, env = arm64_command(args.cpu)
    with console.status(f"loading {folder} in the arm64 runner"):
        return NativeBackend(folder, runner, prefix, env)


def _arm64_python(args, folder: Path, manifest: dict, checksums: list[str] | None, console) -> int:
    """An ONNX export on an emulated arm64 CPU: the reference runs here (its logits saved to a
    golden file), the export runs in the arm64 Python under QEMU against it."""
    import tempfile

    from gemma_edge.commands.ui import write_json
    from gemma_edge.emulation import ensure_arm64, run_arm64

    ensure_arm64(progress=lambda message: console.print(f"[dim]{message}[/dim]"))
    with tempfile.TemporaryDirectory() as tmp:
        golden = args.golden
        if not golden or args.reference:
            golden = args.save_golden or str(Path(tmp) / "golden.npz")
            _golden(args, folder, manifest, int(manifest["max_seq_len"]), console)[0].save(golden)
        report = args.json or str(Path(tmp) / "report.json")
        console.print(f"[bold]emulated arm64 ({args.cpu}, QEMU user mode): slower than native by 30-400x[/bold]")
        code = run_arm64(["verify", str(folder), "--golden", golden, "--no-verify-checksums", "--json", report],
                         cpu=args.cpu).returncode
        if code not in (0, 1) or not Path(report).is_file():
            raise GemmaEdgeError(f"the emulated arm64 run failed (exit {code}); see its output above")
        data = json.loads(Path(report).read_text())
    data.update(target="arm64", cpu=args.cpu, checksums_ok=None if checksums is None else not checksums)
    data["passed"] = data["passed"] and not checksums
    if args.json:
        write_json(args.json, data)
    return 0 if data["passed"] else 1


def _golden(args, folder: Path, manifest: dict, max_seq_len: int, console):
    """The reference's side of the checks, and the reference (with the export's adapters merged)."""
    from gemma_edge.checkpoints import resolve
    from gemma_edge.reference import load_reference
    from gemma_edge.verify import golden_from_reference

    source = args.reference or manifest["source"]
    recorded = manifest.get("adapters") or []
    adapters = args.adapter if args.adapter is not None else [_recorded_adapter(a) for a in recorded]
    ckpt = resolve(source, adapters)
    if args.adapter is None:
        for adapter, entry in zip(ckpt.adapters, recorded):
            if adapter.sha256 != entry["sha256"]:
                raise ConfigError(f"the adapter {adapter.folder} has changed since the export (its weights' SHA-256 "
                                  "differs from the manifest's): export again, or pass the adapter exported with --adapter")
    ours, theirs = ckpt.config.to_dict(), manifest["config"]
    shape = [k for k in SHAPE_FIELDS if ours.get(k) != theirs.get(k)]
    if shape:  # other fields (RoPE bases, soft-caps, ...) may differ: that is for the numbers to show
        raise ConfigError(f"the reference {source} has another shape than this export ({', '.join(shape)}); "
                          "pass the checkpoint it was exported from with --reference")
    dtype = reference_dtype(ckpt.config, console)
    merged = "".join(f" + {a.folder.name}" for a in ckpt.adapters)
    with console.status(f"loading the reference {source}{merged} ({str(dtype).removeprefix('torch.')})"):
        reference = load_reference(ckpt, dtype)
    prefill = min(args.prefill, max_seq_len // 2)
    decode = max(0, min(args.decode, max_seq_len - prefill - 1))
    steps = max(1, min(args.greedy, max_seq_len - prefill))
    ids = _text_ids(args, folder, manifest, prefill + decode + 1)
    with console.status(f"running the reference on {len(ids)} tokens"):
        return golden_from_reference(reference, ids, prefill, steps), reference


def _recorded_adapter(entry: dict) -> str:
    """The folder of an adapter the manifest records, where it was at export."""
    path = Path(entry["path"])
    if not path.is_dir():
        raise ConfigError(f"the export merged the adapter {entry['name']} from {path}, which is not there now: "
                          "pass its folder with --adapter")
    return str(path)


def _is_jsonl(path: str | None) -> bool:
    return path is not None and Path(path).suffix in (".jsonl", ".json")


def _examples(path: str, folder: Path, manifest: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + <eos>) of each dolly record with a response: the prompt in the
    instruction format, as generate --template instruction lays it out."""
    from gemma_edge.runtime.generator import prompt_ids
    from gemma_edge.runtime.templates import dolly_prompt, dolly_records
    from gemma_edge.runtime.tokenizer import Tokenizer

    special = manifest["special_tokens"]
    tokenizer = Tokenizer(folder, special)
    records = [r for r in dolly_records(path, "--prompts") if "instruction" in r and r.get("response")]
    if not records:
        raise ConfigError(f"--prompts {path}: no record has both an instruction and a response to score")
    eos = special["eos_token_ids"][0]
    return [(prompt_ids(tokenizer, dolly_prompt(r), "instruction"), tokenizer.encode(str(r["response"])) + [eos])
            for r in records]


def reference_dtype(config, console):
    """float32 for the reference when it fits in the memory available beside the export (Gemma 2B:
    10 GiB), else bfloat16 (Gemma 7B: 17 GiB instead of 34), said on the console: the comparison then
    holds the reference's own rounding too."""
    import torch

    from gemma_edge.exporters.memory import GIB, available_memory

    need, have = 4 * config.num_parameters() + GIB, available_memory()
    if need <= have:
        return torch.float32
    console.print(f"[yellow]the float32 reference needs about {need / GIB:.1f} GiB and {have / GIB:.1f} GiB is available: "
                  "comparing with the reference in bfloat16[/yellow]", soft_wrap=True)
    return torch.bfloat16


def _text_ids(args, folder: Path, manifest: dict, n: int) -> list[int]:
    """n ids of real text (--prompts FILE, else the Python reference manual); random ids after
    <bos> when the export has no tokenizer (random weights)."""
    special = manifest["special_tokens"]
    if not manifest.get("tokenizer", {}).get("files"):
        rng = random.Random(0)
        return [special["bos_token_id"]] + [rng.randrange(manifest["config"]["vocab_size"]) for _ in range(n - 1)]
    from gemma_edge.runtime.tokenizer import Tokenizer

    if _is_jsonl(args.prompts):
        from gemma_edge.runtime.templates import dolly_records, dolly_text

        text = "\n\n".join(dolly_text(r) for r in dolly_records(args.prompts, "--prompts"))
    elif args.prompts:
        text = Path(args.prompts).read_text()
    else:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = Tokenizer(folder, special).encode(text, bos=True)
    if len(ids) < n:
        raise ConfigError(f"the text has {len(ids)} tokens; verify needs {n} (--prefill + --decode + 1): give a longer --prompts file")
    return ids[:n]


def _print(report, folder: Path, manifest: dict) -> None:
    from rich.table import Table

    from gemma_edge.commands.ui import results

    ok, bad = "[green]pass[/green]", "[red]FAIL[/red]"
    export = manifest["export"]
    table_quant = export.get("embedding_quant") or "none"
    recipe = export["quant"] + ("" if table_quant in ("none", export["quant"]) else f", embedding {table_quant}")
    adapters = "".join(f" + {a['name']}" for a in manifest.get("adapters") or [])
    table = Table(title=f"{folder}: {manifest['format']} {recipe} vs the reference{adapters and ' (base' + adapters + ')'}")
    for col in ("check", "rows", "max |diff|", "mean |diff|", "top-1", "KL", "ppl (ref)", "result"):
        table.add_column(col, justify="left" if col in ("check", "result") else "right")
    for c in report.checks:
        table.add_row(c.name, str(c.rows), f"{c.max_abs:.2e}", f"{c.mean_abs:.2e}", f"{c.top1:.1%}", f"{c.kl:.4f}",
                      f"{c.ppl:.2f} ({c.ppl_reference:.2f})", ok if c.passed else bad)
    div = report.first_divergence
    table.add_row(f"greedy ({len(report.greedy_reference)} tokens)", "", "", "", "", "",
                  "identical" if div is None else f"first differs at {div}", ok if report.greedy_passed else bad)
    if "ppl_ratio" in report.limits:
        table.add_row(f"perplexity, all {sum(c.rows for c in report.checks)} rows", "", "", "", "", "",
                      f"x{report.ppl_ratio:.3f}", ok if report.ppl_passed else bad)
    if report.responses is not None:
        r = report.responses
        skipped = f", {r.skipped} too long" if r.skipped else ""
        table.add_row(f"responses ({r.examples} examples{skipped})", str(r.tokens), "", "", "", "",
                      f"{r.ppl:.2f} ({r.ppl_reference:.2f}) x{r.ppl_ratio:.3f}", "")
    if report.checksums_ok is not None:
        table.add_row("file checksums", "", "", "", "", "", "", ok if report.checksums_ok else bad)
    out = results()
    out.print(table)
    limits = ", ".join(f"{k} {v}" for k, v in report.limits.items())
    out.print(f"limits for {report.quant}: {limits}.  " + ("[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"))
