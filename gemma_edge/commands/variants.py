"""gemma-edge variants: the named architectures."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gemma_edge.commands.ui import results

    from gemma_edge.config import VARIANTS

    table = Table(title="Named Gemma architectures (use as random:<name>)")
    for col in ("name", "family", "layers", "hidden", "heads / kv", "head_dim", "vocab", "sliding", "params"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for name, c in VARIANTS.items():
        table.add_row(name, c.family, str(c.num_hidden_layers), str(c.hidden_size),
                      f"{c.num_attention_heads} / {c.num_key_value_heads}", str(c.head_dim), str(c.vocab_size),
                      str(c.sliding_window or "-"), f"{c.num_parameters() / 1e6:,.1f}M")
    results().print(table)
    return 0
