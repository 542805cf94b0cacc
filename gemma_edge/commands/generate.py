"""gemma-edge generate: a completion from an export folder, streamed, or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags, checked (SamplingConfig's rules) before anything is loaded."""
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.runtime.sampling import SamplingConfig

    SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    if args.threads is not None and args.threads < 1:
        raise GemmaEdgeError(f"--threads must be at least 1, got {args.threads}")
    if args.max_new_tokens < 1:
        raise GemmaEdgeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed, "stop": args.stop or ()}


def stats_line(result) -> str:
    s = result.stats
    return (f"{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), {s.generated_tokens} generated, "
            f"first token {s.ttft_s * 1000:.0f} ms, prefill {s.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {s.decode_tokens_per_s:.1f} tok/s, finish: {result.finish_reason}")


def run(args: argparse.Namespace) -> int:
    from gemma_edge.commands.ui import progress
    from gemma_edge.manifest import prompt_template
    from gemma_edge.runtime.backend import open_backend
    from gemma_edge.runtime.generator import Generator, check_request, open_export, prompt_ids

    # Everything that can be wrong with the request is said before the program loads (seconds, and
    # the runtimes' own log lines): the flags, the folder's files, the prompt's length.
    options = sampling_options(args)
    manifest, tokenizer = open_export(args.outdir, verify_checksums=args.verify_checksums)
    template = args.template or prompt_template(manifest, "plain")
    ids = prompt_ids(tokenizer, args.prompt if template == "plain" else [{"role": "user", "content": args.prompt}],
                     None if template == "plain" else template)
    check_request(ids, int(manifest["max_seq_len"]), args.max_new_tokens, args.truncate)
    console = progress()
    with console.status(f"loading {args.outdir}"):
        gen = Generator(open_backend(args.outdir, threads=args.threads, runtime=args.runtime,
                                     progress=lambda message: console.print(f"[dim]{message}[/dim]")), tokenizer)
    pieces = gen.stream(ids, args.max_new_tokens, **options, truncate=args.truncate)
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
