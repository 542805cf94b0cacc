"""The gemma-edge command line. Each verb imports what it needs when it runs, so --help is instant.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input (one line on stderr; the traceback
with --debug), 130 Ctrl-C, 143 SIGTERM (an export removes its temporary folder either way).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

from gemma_edge import __version__
from gemma_edge.errors import GemmaEdgeError, Terminated
from gemma_edge.exporters.settings import RECIPES
from gemma_edge.files import signals_received

DEFAULT_MODEL = "gemma-3-270m"
MODEL_HELP = ("a local Hugging Face folder, a .gguf file, 'gemma-3-270m' (the real model, built in) "
              "or random:<variant> (see 'gemma-edge variants')")


def _check(args: argparse.Namespace) -> int:
    from gemma_edge.commands.check import run

    return run(args)


def _export(args: argparse.Namespace) -> int:
    from gemma_edge.commands.export import run

    return run(args)


def _generate(args: argparse.Namespace) -> int:
    from gemma_edge.commands.generate import run

    return run(args)


def _chat(args: argparse.Namespace) -> int:
    from gemma_edge.commands.chat import run

    return run(args)


def _inspect(args: argparse.Namespace) -> int:
    from gemma_edge.commands.inspect import run

    return run(args)


TEMPLATES = ("plain", "gemma", "instruction")  # gemma_edge.runtime.templates, listed here so --help needs no import


def _sampling_flags(verb: argparse.ArgumentParser, max_new_tokens: int) -> None:
    verb.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens, help="stop after this many tokens (default: %(default)s)")
    verb.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher is more random (default: %(default)s)")
    verb.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: all (default: %(default)s)")
    verb.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching this probability (default: %(default)s)")
    verb.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating context tokens (default: %(default)s)")
    verb.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    verb.add_argument("--stop", action="append", metavar="TEXT", help="stop when the text contains TEXT (repeatable); eos and <end_of_turn> always stop")
    verb.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's choice)")
    _runtime_flag(verb)


RUNTIMES = ("auto", "native", "python")  # runtime/backend.RUNTIMES, listed here so --help needs no import


def _runtime_flag(verb: argparse.ArgumentParser, many: bool = False) -> None:
    how = ("how a .pte runs: gemma-edge's native runner (built on first use with a C++ compiler; no torch, half the "
           "memory or less), ExecuTorch's Python bindings, or auto: native where it can be built")
    if many:
        verb.add_argument("--runtime", choices=RUNTIMES, nargs="+", default=["auto"],
                          help=how + "; several: a row for each .pte in each (default: auto)")
    else:
        verb.add_argument("--runtime", choices=RUNTIMES, default="auto", help=how + " (default: %(default)s)")


def _verify(args: argparse.Namespace) -> int:
    from gemma_edge.commands.verify import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from gemma_edge.commands.bench import run

    return run(args)


def _variants(args: argparse.Namespace) -> int:
    from gemma_edge.commands.variants import run

    return run(args)


class _Version(argparse.Action):
    """--version: ours and the versions of the libraries that export and run (read from package
    metadata: nothing is imported)."""

    LIBRARIES = ("torch", "executorch", "onnxruntime", "transformers")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        found = []
        for name in self.LIBRARIES:
            try:
                found.append(f"{name} {metadata.version(name)}")
            except metadata.PackageNotFoundError:
                found.append(f"{name} (not installed)")
        print(f"gemma-edge {__version__} ({', '.join(found)})")
        parser.exit()


def _kinds(value: str) -> tuple[str, ...]:
    """--int8-layers: "k_proj,v_proj" -> ("k_proj", "v_proj"); "none" -> () (ExportSettings checks the names)."""
    return () if value.strip().lower() == "none" else tuple(k.strip() for k in value.split(",") if k.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-edge",
        description="Export Gemma models for phones and edge boards, and prove they still compute what the reference computes.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show gemma-edge's version and its libraries', then exit")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (and what --verbose shows)")
    parser.add_argument("--verbose", dest="third_party_output", action="store_true",
                        help="also show the warnings and log lines of the libraries gemma-edge uses (torch, ExecuTorch, "
                             "ONNX, transformers), which are hidden by default")
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
    check.add_argument("--adapter", action="append", default=[], metavar="DIR",
                       help="a PEFT LoRA adapter folder to merge into MODEL first (repeat to stack them in order)")
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
                        help="the embedding table and the tied output projection, which reads it (stored once): "
                             "none, int8 or int4 (default: int8 for --quant int8, int4 for int4, none for fp32). "
                             "--quant int8 --embedding-quant int4 is the export for phones: x1.09 perplexity on "
                             "Gemma 3 270M (ONNX) at int4's decode speed")
    export.add_argument("--ops", default=None, choices=("auto", "contrib", "standard"),
                        help="ONNX only: ONNX Runtime's fused contrib operators (GroupQueryAttention: faster on its CPU "
                             "provider), standard ONNX operators only (other runtimes), or auto: contrib where the "
                             "model allows (default: auto)")
    export.add_argument("--max-seq-len", type=int, default=1024, help="KV cache length in tokens (default: %(default)s)")
    export.add_argument("--kv-dtype", default="float32",
                        help="the KV cache's element type: float32, or float16 (half the cache's memory; attention "
                             "multiplies in float16). bfloat16 has no kernel in either runtime (default: %(default)s)")
    export.add_argument("--max-tokens-per-call", type=int, default=None,
                        help=".pte only: the longest call, in tokens; longer prompts are prefilled in chunks. The "
                             "program's memory plan holds the activations of this many tokens (default: 256, or "
                             "--max-seq-len if shorter)")
    export.add_argument("--recipe", default="auto", choices=RECIPES,
                        help="how 4-bit weights are rounded: rtn (to nearest, each group on its best clipping), gptq "
                             "(GPTQ on the same grids, calibrated on a text layer by layer: Gemma 3 270M all-int4 "
                             "x1.01-1.07 perplexity instead of x1.14-1.29; about 1 min more there, 13 min more at Gemma 2B with "
                             "--calibration-tokens 2048), or auto: "
                             "the best measured for the weights and format, gptq except for a .pte whose only 4-bit "
                             "weights are the table and for models of 1B and more (default: %(default)s)")
    export.add_argument("--calibration", metavar="FILE", default=None,
                        help="the text the export learns from: GPTQ's rounding (--recipe gptq/auto), the 4-bit table's "
                             "8-bit rows (--hot-tokens) and a .pte's int8 input scales (--smooth); plain text or JSON "
                             "lines (\"text\", or dolly's \"instruction\"/\"context\"/\"response\") (default: Python's "
                             "own module documentation)")
    export.add_argument("--calibration-tokens", type=int, default=16384, metavar="N",
                        help="--recipe gptq/auto: tokens of the calibration text to calibrate on, in chunks of up to 512 "
                             "(default: %(default)s)")
    export.add_argument("--hot-tokens", type=int, default=None, metavar="N",
                        help="a 4-bit table: also keep its rows of the calibration text's N most frequent tokens (and "
                             "of the special tokens) at 8 bits, read in place of the 4-bit ones: where most of the "
                             "table's error reaches the logits (Gemma 3 270M, int8 layers, ONNX: x1.087 -> x1.012 on "
                             "prose, x1.070 -> x1.024 on code, for 3.7 MiB); 0: every row 4-bit (default: 16384, at most "
                             "a sixteenth of the vocabulary)")
    export.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                        help="a .pte's quantized layers: rescale each input channel by max|x|^ALPHA / max|W|^(1-ALPHA), "
                             "measured on the calibration text and folded into the weights exactly (SmoothQuant), so "
                             "that XNNPACK's per-token 8-bit inputs lose less to Gemma's outlier channels; 0: none "
                             "(default: 0.5 for int8 layers and int4 layers rounded to nearest, 0 under GPTQ)")
    export.add_argument("--int8-layers", type=_kinds, default=None, metavar="KINDS",
                        help="--quant int4: the kinds of linear layer kept at 8 bits, comma-separated (q_proj, k_proj, "
                             "v_proj, o_proj, gate_proj, up_proj, down_proj), or none: every layer 4-bit. The keys' "
                             "and values' projections are 6%% of Gemma 3 270M's layer weights and much of what 4 bits "
                             "cost it (ONNX, GPTQ: x1.393 -> x1.322 perplexity on 512 tokens of code; rounded to nearest "
                             "x2.132 -> x1.729; for 3 MiB) (default: k_proj,v_proj)")
    export.add_argument("--prefill-method", action="store_true",
                        help=".pte only: add a second method for prompts at position 0, attention over the prompt's "
                             "own keys rather than every slot of the cache, sharing forward's weights and cache: "
                             "Gemma 3 270M prefills 1.3-1.75x faster, for a second lowering (1-2 minutes more there) "
                             "and, in ExecuTorch's Python runtime only, the weights packed twice in memory (+330 MiB "
                             "there). gemma-edge's runtimes call it; ExecuTorch's stock runner and Android's "
                             "LlmModule call forward alone")
    export.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to merge into "
                             "MODEL before quantization; repeat to stack adapters in order")
    export.add_argument("--template", default=None, choices=TEMPLATES,
                        help="the prompt format the model was fine-tuned on (instruction: dolly's Instruction / Context / "
                             "Response): recorded in the manifest as the default of generate, chat and the Android app")
    export.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists (only once the new export is complete)")
    export.add_argument("--force", action="store_true",
                        help="export even when the memory it expects to need is more than the machine has available")
    export.set_defaults(func=_export)

    generate = verbs.add_parser(
        "generate", help="generate a completion from an export folder (ONNX or .pte)",
        description="Generate text from OUTDIR (written by 'gemma-edge export'), streamed to stdout; statistics to "
                    "stderr. The ONNX path needs no torch.")
    generate.add_argument("outdir", metavar="OUTDIR", help="an export folder")
    generate.add_argument("prompt", metavar="PROMPT", help="the text to continue (<bos> is added)")
    _sampling_flags(generate, 128)
    generate.add_argument("--template", default=None, choices=TEMPLATES,
                          help="plain: continue PROMPT as it is; gemma: PROMPT as a user turn of Gemma's chat format; "
                               "instruction: as the Instruction of the dolly-style format (default: the export's "
                               "--template, else plain)")
    generate.add_argument("--truncate", choices=("left",), default=None,
                          help="cut a prompt longer than the cache from the left instead of failing")
    generate.add_argument("--verify-checksums", action="store_true",
                          help="check every file's SHA-256 against the manifest before loading (sizes are always checked)")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object: text, token_ids (generated), finish_reason, stats")
    generate.set_defaults(func=_generate)

    chat = verbs.add_parser("chat", help="chat with an export folder interactively",
                            description="An interactive, streamed conversation with OUTDIR. /reset forgets it, /quit leaves.")
    chat.add_argument("outdir", metavar="OUTDIR", help="an export folder")
    _sampling_flags(chat, 512)
    chat.add_argument("--template", default=None, choices=TEMPLATES,
                      help="prompt format (default: the export's --template, else gemma)")
    chat.add_argument("--system", default=None, help="a system instruction (Gemma: prepended to the first user turn)")
    chat.add_argument("--verify-checksums", action="store_true",
                      help="check every file's SHA-256 against the manifest before loading (sizes are always checked)")
    chat.add_argument("--verbose", "-v", action="store_true", help="print statistics after each reply")
    chat.set_defaults(func=_chat)

    inspect = verbs.add_parser("inspect", help="show an export's manifest and verify its files",
                               description="Show OUTDIR's manifest (format, source, quantization, I/O, versions) and "
                                           "check every file against its SHA-256; exit 1 if one does not match.")
    inspect.add_argument("outdir", metavar="OUTDIR", help="an export folder")
    inspect.add_argument("--no-verify", action="store_true", help="do not hash the files (faster for large exports)")
    inspect.set_defaults(func=_inspect)

    verify = verbs.add_parser(
        "verify", help="prove an export computes what the PyTorch reference computes",
        description="Run the same real text through OUTDIR and its reference (the source recorded in the manifest, or "
                    "--reference): a long prefill, single-token decode steps through the static cache, a greedy "
                    "continuation. Reports max/mean |diff|, top-1 agreement, KL, perplexity and the first greedy "
                    "divergence; limits depend on the quantization. Exit 0 on pass, 1 on fail.")
    verify.add_argument("outdir", metavar="OUTDIR", help="an export folder")
    verify.add_argument("--reference", metavar="MODEL", help="the checkpoint to compare with (default: the manifest's source)")
    verify.add_argument("--adapter", action="append", default=None, metavar="DIR",
                        help="the LoRA adapter folder(s) merged into the reference (default: those the manifest records, "
                             "at the paths they had at export)")
    verify.add_argument("--prompts", metavar="FILE",
                        help="a text file to run, or JSON lines in the dolly layout (instruction, context, response): "
                             "the text is the examples in the instruction format, and the report adds the perplexity "
                             "of the responses under the export and the reference (default: Python's reference manual)")
    verify.add_argument("--prefill", type=int, default=128, help="tokens of the one-call prefill (default: %(default)s)")
    verify.add_argument("--decode", type=int, default=16, help="single-token decode steps after it (default: %(default)s)")
    verify.add_argument("--greedy", type=int, default=16, help="greedy tokens to compare (default: %(default)s)")
    verify.add_argument("--save-golden", metavar="FILE", help="also save the reference's logits and tokens (.npz) for --golden")
    verify.add_argument("--golden", metavar="FILE", help="compare with a saved golden file instead of running the reference (no torch needed)")
    verify.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    verify.add_argument("--no-verify-checksums", action="store_true", help="skip the files' SHA-256 check")
    verify.add_argument("--target", choices=("host", "arm64"), default="host",
                        help="host: this CPU; arm64: the phones' kernels on an emulated arm64 CPU (QEMU user mode, set up on "
                             "first use): ONNX Runtime's arm64 build, or for a .pte our native runner on ExecuTorch's "
                             "arm64 runtime and XNNPACK; keep --prefill/--decode short (default: %(default)s)")
    _runtime_flag(verify)  # --target host's
    verify.add_argument("--cpu", choices=("cortex-a76", "neoverse-n2"), default="cortex-a76",
                        help="the emulated CPU: cortex-a76 (NEON, dot product, fp16: most phones) or neoverse-n2 "
                             "(adds i8mm) (default: %(default)s)")
    verify.set_defaults(func=_verify)

    bench = verbs.add_parser(
        "bench", help="measure exports side by side: load, first token, prefill and decode speed, memory",
        description="Run each OUTDIR in a process of its own, taking turns run by run so that a slow moment of the "
                    "machine hits all alike: load time, time to first token, prefill and decode tokens/s (median and "
                    "spread after a warm-up), peak resident memory, files and KV cache; the machine's memory read "
                    "bandwidth, and decode as a fraction of the ceiling it sets.")
    bench.add_argument("outdir", nargs="+", metavar="OUTDIR", help="export folders (the first is the base of the ratios)")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: %(default)s)")
    bench.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per run (default: %(default)s)")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads per export (default: the runtime's choice)")
    _runtime_flag(bench, many=True)
    bench.add_argument("--runs", type=int, default=5, help="measured runs per export, after one warm-up (default: %(default)s)")
    bench.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw speed and memory per export (matplotlib)")
    bench.add_argument("--profile", action="store_true",
                       help="then profile --new-tokens - 1 decode steps of each export with its runtime's profiler and "
                            "show where a step goes: quantized and float products, attention, norms, other operators, "
                            "the runtime between them, the generation loop")
    bench.set_defaults(func=_bench)

    variants = verbs.add_parser("variants", help="list the named architectures (for random:<variant>)",
                                description="List the named Gemma architectures with their shapes and parameter counts.")
    variants.set_defaults(func=_variants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    in_main = threading.current_thread() is threading.main_thread()  # only it may handle signals
    previous = {}
    unraisablehook = sys.unraisablehook
    if in_main:
        signals_received.clear()
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _terminate)  # unwinds like Ctrl-C: every `finally` runs
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored (a background job)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
        if not args.debug:
            sys.unraisablehook = functools.partial(_signal_lost_quietly, unraisablehook)
    signals = signals_received if in_main else []  # another thread's main() has no signals of its own
    try:
        with _third_parties_quiet(not (args.third_party_output or args.debug)):
            code = func(args)
        # A signal whose exception Python lost (raised inside a finalizer) and the verb ended anyway:
        # what it wrote was not committed (files.staged_folder), and the command says it was cut.
        return _interrupted(signals[0]) if signals else code
    except BaseException as e:
        if args.debug:
            raise
        if signals or isinstance(e, KeyboardInterrupt):  # whatever a library made of the signal's exception
            return _interrupted(signals[0] if signals else signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        if isinstance(e, GemmaEdgeError):
            print(f"gemma-edge: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        sys.unraisablehook = unraisablehook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if in_main:
            signals_received.clear()  # this command's: what the process does next commits its own work


def _interrupt(signum, frame) -> None:
    signals_received.append(signum)
    raise KeyboardInterrupt()


def _terminate(signum, frame) -> None:
    signals_received.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: cleaning up is not interrupted again
    raise Terminated()


def _signal_lost_quietly(report: Callable, unraisable) -> None:
    """Python prints a KeyboardInterrupt raised inside a finalizer as "Exception ignored in ..." and
    goes on; ours are recorded (signals_received) and end the command as interrupted, so the report
    is not shown (with --debug it is). Everything else goes to the hook that was there (report)."""
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and signals_received):
        report(unraisable)


def _interrupted(signum: int) -> int:
    """Ctrl-C or SIGTERM, once every `finally` has cleaned up: one line and 130 or 143. Recorded by
    our handlers because a library may turn their exception into its own on the way out (torch's
    ONNX exporter, cut in its dispatch mode: RuntimeError "Attempted to unset ProxyTorchDispatchMode",
    wrapped in a ConversionError)."""
    terminated = signum == signal.SIGTERM
    print(f"gemma-edge: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    # CPython marks the interpreter as stopped by Ctrl-C when a KeyboardInterrupt leaves any exec()
    # or eval() of a string (a dataclass being defined, torch.fx's generated code), caught later or
    # not; under `python -m` it then ends the process by SIGINT whatever the exit code (-2, not 130).
    # The next string exec clears that mark as it starts.
    exec("pass", {})
    return 143 if terminated else 130


@contextlib.contextmanager
def _third_parties_quiet(quiet: bool) -> Iterator[None]:
    """Hide the libraries' Python warnings, log lines (torch's, torchao's, onnxscript's all go through
    `logging`) and progress bars while a verb runs: they are not ours, and a user reads them as
    breakage. Their errors too: what fails reaches us as an exception (torch logged "fake tensor
    raised TypeError" with a traceback for a Ctrl-C in its trace, which then ended as it should).
    Restored afterwards (main() is also called from Python)."""
    if not quiet:
        yield
        return
    import logging
    import os
    import warnings

    previous = logging.root.manager.disable
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


if __name__ == "__main__":
    sys.exit(main())
