"""gemma-edge chat: an interactive conversation with an export, streamed; the cache is reused
across turns."""

from __future__ import annotations

import argparse
import sys

HELP = "/reset forgets the conversation, /quit (or Ctrl-D) leaves"


def run(args: argparse.Namespace) -> int:
    from gemma_edge.commands.generate import sampling_options, stats_line
    from gemma_edge.errors import GemmaEdgeError
    from gemma_edge.commands.ui import progress
    from gemma_edge.manifest import prompt_template
    from gemma_edge.runtime.generator import Generator

    options = sampling_options(args)  # checked before anything loads
    console = progress()
    with console.status(f"loading {args.outdir}"):
        gen = Generator.load(args.outdir, threads=args.threads, verify_checksums=args.verify_checksums, runtime=args.runtime)
    args.template = args.template or prompt_template(gen.backend.manifest, "gemma")
    console.print(f"[bold]gemma-edge chat[/bold] with {args.outdir} ({args.template} template). {HELP}")
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        console.print("[bold cyan]>[/bold cyan] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            gen.reset()
            console.print("[dim]conversation forgotten[/dim]")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in gen.chat_stream(messages, args.max_new_tokens, args.template, **options):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except GemmaEdgeError as e:  # a turn too long for the cache: say so, and keep the conversation
            messages.pop()
            console.print(f"[red]{e}[/red]")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose:
            console.print(f"[dim]{stats_line(gen.last)}[/dim]")
        if gen.last.finish_reason == "length" and gen.last.stats.prompt_tokens + gen.last.stats.generated_tokens >= gen.max_seq_len:
            console.print(f"[yellow]the conversation fills the cache ({gen.max_seq_len} tokens): /reset to go on[/yellow]")
