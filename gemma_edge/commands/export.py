"""gemma-edge export: a checkpoint to an ExecuTorch or ONNX folder."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path


class StageProgress:
    """One live display for an export: a line per running stage (elapsed time), with a bar and the
    time left while the checkpoint is read and quantized (report), and a ✓ line per finished stage."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[left]}"), console=console, transient=True,
                            disable=not console.is_terminal)  # a log or a pipe gets the ✓ lines only
        self.task = None

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.task = self.bar.add_task(f"{name} ...", total=None, left="")
        self.bar.start()
        try:
            yield
        finally:
            self.bar.remove_task(self.task)
            self.bar.stop()
            self.task = None
        self.console.print(f"[green]✓[/green] {name} ({time.perf_counter() - start:.1f} s)")

    def report(self, p) -> None:
        """progress.Progress: the tensor being read, the share of the weights done, the time left."""
        if self.task is not None:
            left = f"{p.eta:.0f} s left" if p.eta is not None else ""
            self.bar.update(self.task, total=p.total, completed=p.done, left=f"{p.name}  {left}")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gemma_edge.checkpoints import resolve
    from gemma_edge.commands.ui import progress, results
    from gemma_edge.config import check_max_seq_len
    from gemma_edge.exporters.memory import GIB, check_memory
    from gemma_edge.exporters.settings import ExportSettings, best_recipe
    from gemma_edge.files import check_output_folder

    settings = ExportSettings(format=args.format, quant=args.quant, group_size=args.group_size,
                              embedding_quant=args.embedding_quant, max_seq_len=args.max_seq_len, ops=args.ops,
                              kv_dtype=args.kv_dtype, max_tokens_per_call=args.max_tokens_per_call,
                              recipe=args.recipe, calibration=args.calibration,
                              calibration_tokens=args.calibration_tokens, template=args.template,
                              hot_tokens=args.hot_tokens, smooth=args.smooth,
                              int8_layers=args.int8_layers, prefill_method=args.prefill_method)
    console = progress()
    out = Path(args.output)
    check_output_folder(out, args.overwrite)  # before minutes of work, not after them
    if args.calibration is not None and not Path(args.calibration).is_file():
        from gemma_edge.errors import ConfigError

        raise ConfigError(f"--calibration {args.calibration}: no such file; give a text or JSON lines file")

    display = StageProgress(console)
    stage = display.stage
    with stage(f"resolve {args.model}" + "".join(f" + {Path(a).name}" for a in args.adapter)):
        ckpt = resolve(args.model, args.adapter, report=display.report)
    check_max_seq_len(ckpt.config, settings.max_seq_len)
    if settings.recipe == "auto" and "int4" in (settings.quant, settings.embedding_quant):
        console.print(f"--recipe auto: {best_recipe(settings, ckpt.config)[1]}", highlight=False, soft_wrap=True)
    settings = settings.for_model(ckpt.config)
    need, have = check_memory(ckpt.config, settings, args.force)
    console.print(f"expected peak memory {need / GIB:.1f} GiB ({have / GIB:.1f} GiB available)")
    if settings.format == "pte":
        from gemma_edge.exporters.executorch import export_pte as export
    else:
        from gemma_edge.exporters.onnx import export_onnx as export
    result = export(ckpt, settings, out, overwrite=args.overwrite, stage=stage, report=display.report)

    table = Table(title=f"Exported {args.model} -> {out}")
    for col in ("file", "size", "sha256"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for name, info in result.manifest["files"].items():
        table.add_row(name, f"{info['bytes'] / 2**20:,.1f} MiB", info["sha256"][:16])
    table.add_row("quantization", f"{settings.quant} / emb {settings.embedding_quant}",
                  f"group {settings.group_size}, {settings.recipe}" + (f" on {args.calibration}" if args.calibration else ""))
    for adapter in result.manifest.get("adapters", []):
        table.add_row("adapter", adapter["name"], f"rank {adapter['rank']}, alpha {adapter['alpha']:g}, "
                      f"{adapter['merged_weights']} weights merged, sha256 {adapter['sha256'][:16]}")
    if not ckpt.config.tie_word_embeddings and ckpt.base is not None and ckpt.base.tie_word_embeddings:
        table.add_row("output projection", "untied", "the adapter trained a copy of the embedding (modules_to_save): "
                      "the export stores both tables, as PEFT's merged model has them")
    if "ops" in result.manifest["io"]:
        table.add_row("operators", result.manifest["io"]["ops"], "")
    table.add_row("time", f"{sum(result.seconds.values()):.1f} s", ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
    out_console = results()
    out_console.print(table)
    app = "pte" if settings.format == "pte" else "onnx"
    prompt = "The capital of France is" if settings.template in (None, "plain") else "Summarize what a KV cache is."
    out_console.print(f"next:\n  gemma-edge verify {out}                      # prove it computes what the reference does\n"
                      f"  gemma-edge generate {out} \"{prompt}\"\n"
                      f"  adb push {out} /sdcard/Android/data/dev.gemmaedge.demo/files/   # the Android demo ({app}; android_demo/README.md)",
                      soft_wrap=True, highlight=False)
    return 0
