"""The gemma-edge command line. Each verb imports what it needs when it runs, so --help is instant.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gemma_edge import __version__
from gemma_edge.errors import GemmaEdgeError

DEFAULT_MODEL = "gemma-3-270m"
MODEL_HELP = ("a local Hugging Face folder, a .gguf file, 'gemma-3-270m' (the real model, built in) "
              "or random:<variant> (see 'gemma-edge variants')")


def _check(args: argparse.Namespace) -> int:
    from gemma_edge.commands.check import run

    return run(args)


def _export(args: argparse.Namespace) -> int:
    from gemma_edge.commands.export import run

    return run(args)


def _variants(args: argparse.Namespace) -> int:
    from gemma_edge.commands.variants import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-edge",
        description="Export Gemma models for phones and edge boards, and prove they still compute what the reference computes.")
    parser.add_argument("--version", action="version", version=f"gemma-edge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    check = verbs.add_parser(
        "check", help="compare the export-ready model with transformers on a prompt",
        description="Load MODEL into gemma-edge's export-ready model (static KV cache) and into transformers' "
                    "reference, prefill a prompt, decode through the cache, and compare logits and greedy tokens.")
    check.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                       help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    check.add_argument("--prompt", default="The capital of France is",
                       help="text to prefill (default: %(default)r); random:<variant> models use random token ids")
    check.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate and compare (default: %(default)s)")
    check.add_argument("--max-seq-len", type=int, default=256, help="KV cache length in tokens (default: %(default)s)")
    check.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    check.set_defaults(func=_check)

    export = verbs.add_parser(
        "export", help="export MODEL to an ExecuTorch (.pte) or ONNX folder with a static KV cache",
        description="Export MODEL with int8/int4 weights and a static KV cache to OUTDIR: the program, "
                    "the tokenizer and gemma_edge.json (settings, I/O contract, SHA-256 of every file).")
    export.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    export.add_argument("--format", default="pte", help="pte (ExecuTorch, XNNPACK) or onnx (ONNX Runtime) (default: %(default)s)")
    export.add_argument("--quant", default="int4", help="linear layers: fp32, int8 or int4 (default: %(default)s)")
    export.add_argument("--group-size", type=int, default=32, help="weights per int4 scale (ONNX: per int8 scale too) (default: %(default)s)")
    export.add_argument("--embedding-quant", default=None,
                        help="none, int8 or int4 (default: int8 for --quant int8, int4 for int4, none for fp32)")
    export.add_argument("--ops", default=None, choices=("auto", "contrib", "standard"),
                        help="ONNX only: ONNX Runtime's fused contrib operators (GroupQueryAttention: faster on its CPU "
                             "provider), standard ONNX operators only (other runtimes), or auto: contrib where the "
                             "model allows (default: auto)")
    export.add_argument("--max-seq-len", type=int, default=1024, help="KV cache length in tokens (default: %(default)s)")
    export.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists (only once the new export is complete)")
    export.set_defaults(func=_export)

    variants = verbs.add_parser("variants", help="list the named architectures (for random:<variant>)",
                                description="List the named Gemma architectures with their shapes and parameter counts.")
    variants.set_defaults(func=_variants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except GemmaEdgeError as e:
        print(f"gemma-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
