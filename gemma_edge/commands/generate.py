"""gemma-edge generate: a completion from an export folder, streamed, or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys


def sampling_options(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": args.stop or ()}


def stats_line(result) -> str:
    s = result.stats
    return (f"{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), {s.generated_tokens} generated, "
            f"first token {s.ttft_s * 1000:.0f} ms, prefill {s.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {s.decode_tokens_per_s:.1f} tok/s, finish: {result.finish_reason}")


def run(args: argparse.Namespace) -> int:
    from gemma_edge.commands.ui import progress
    from gemma_edge.runtime.generator import Generator

    console = progress()
    with console.status(f"loading {args.outdir}"):
        gen = Generator.load(args.outdir, threads=args.threads)
    options = {**sampling_options(args), "truncate": args.truncate}
    if args.template == "plain":
        pieces = gen.stream(args.prompt, args.max_new_tokens, **options)
    else:
        pieces = gen.chat_stream([{"role": "user", "content": args.prompt}], args.max_new_tokens, args.template, **options)
    if args.json:
        text = "".join(pieces)
        result = gen.last
        print(json.dumps({"text": text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "stats": result.stats.as_dict()}))
        return 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    console.print(f"[dim]{stats_line(gen.last)}[/dim]")
    return 0
