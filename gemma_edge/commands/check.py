"""gemma-edge check: the export-ready model against transformers' reference, on one prompt."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from gemma_edge.errors import ConfigError, GemmaEdgeError


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gemma_edge.checkpoints import load_model, resolve
    from gemma_edge.parity import check_against_reference
    from gemma_edge.reference import carries_our_weights, load_reference, reference_from_model
    from gemma_edge.commands.ui import progress, results, write_json
    from gemma_edge.runtime.eager import EagerBackend

    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    console = progress()
    with console.status(f"Resolving {args.model} (a GGUF is dequantized once, then cached)"):
        ckpt = resolve(args.model, args.adapter)
    with console.status("Loading gemma-edge's model"):
        model = load_model(ckpt, args.max_seq_len)
    with console.status("Loading transformers' reference"):
        reference = reference_from_model(model) if carries_our_weights(ckpt) else load_reference(ckpt)
    tokenizer = _tokenizer(ckpt.tokenizer_files)
    if tokenizer is not None:
        prompt = tokenizer.encode(args.prompt).ids
    else:  # random weights come without a tokenizer: random ids after <bos>
        rng = random.Random(0)
        prompt = [ckpt.config.bos_token_id] + [rng.randrange(ckpt.config.vocab_size) for _ in range(15)]
    if len(prompt) + args.new_tokens > args.max_seq_len:
        raise ConfigError(f"{len(prompt)} prompt tokens + {args.new_tokens} new tokens exceed --max-seq-len "
                          f"{args.max_seq_len}; raise it or shorten the prompt")
    with console.status(f"Prefilling {len(prompt)} tokens and decoding {args.new_tokens} in both models"):
        report = check_against_reference(EagerBackend(model), reference, prompt, args.new_tokens)

    out = results()
    table = Table(title=f"gemma-edge vs transformers: {args.model} ({ckpt.config.family}, float32)")
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("result")
    ok = "[green]pass[/green]"
    bad = "[red]FAIL[/red]"
    limit = f"{report.atol:g} + {report.rtol:g}*|ref|"
    table.add_row(f"prefill logits ({len(prompt)} tokens), max |diff|", f"{report.prefill_max_abs:.2e}", limit,
                  ok if report.logits_close else bad)
    table.add_row(f"decode logits ({args.new_tokens - 1} steps), max |diff|", f"{report.decode_max_abs:.2e}", limit,
                  ok if report.logits_close else bad)
    table.add_row("top-1 agreement", f"{report.top1_agreement:.1%}", "", "")
    div = report.first_divergence
    table.add_row(f"greedy tokens ({args.new_tokens})", "identical" if div is None else f"differ at {div}", "identical",
                  ok if div is None else bad)
    out.print(table)
    if tokenizer is not None:
        out.print(f"[bold]{args.prompt}[/bold]{tokenizer.decode(report.greedy_ours)}")
    if args.json:
        write_json(args.json, {
            "model": args.model, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "prefill_max_abs": report.prefill_max_abs, "decode_max_abs": report.decode_max_abs,
            "top1_agreement": report.top1_agreement, "first_divergence": div,
            "greedy_ours": report.greedy_ours, "greedy_reference": report.greedy_reference,
            "atol": report.atol, "rtol": report.rtol, "passed": report.passed})
    return 0 if report.passed else 1


def _tokenizer(files: list[Path]):
    from tokenizers import Tokenizer

    for f in files:
        if f.name == "tokenizer.json":
            try:
                return Tokenizer.from_file(str(f))
            except Exception as e:
                raise GemmaEdgeError(f"{f}: not a readable tokenizer.json ({e})") from None
    return None

