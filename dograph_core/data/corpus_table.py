"""The corpus table (``corpus.json``'s ``table``) as a rich table for the terminal."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from dograph_core.data.corpus import SPLITS


def _num(n: int) -> str:
    """Compact counts that keep the table within 80 columns: 9,999 / 12.3k / 3.46M / 1.20B."""
    n = int(n)
    if n < 10_000:
        return f"{n:,}"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 1000 else f"{v:,.0f}{unit}"
    return str(n)  # unreachable


def format_corpus_table(meta: dict[str, Any]) -> Table:
    """One row per domain: held-out flag, documents and tokens per split, share of training tokens."""
    table = Table(
        title=f"corpus: {len(meta['train_domains'])} training + {len(meta.get('heldout_domains', []))} held-out "
        f"domains, vocabulary {meta['vocab_size']}, tokenizer {str(meta['tokenizer_hash'])[:12]}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("domain", no_wrap=True)
    table.add_column("held\nout", justify="center", no_wrap=True)
    for split in SPLITS:
        table.add_column(f"docs\n{split}", justify="right", no_wrap=True)
    for split in SPLITS:
        table.add_column(f"tokens\n{split}", justify="right", no_wrap=True)
    table.add_column("train\nshare", justify="right", no_wrap=True)
    totals = {("docs", s): 0 for s in SPLITS} | {("tokens", s): 0 for s in SPLITS}
    for row in meta["table"]:
        for kind in ("docs", "tokens"):
            for s in SPLITS:
                totals[(kind, s)] += int(row[kind][s])
        table.add_row(
            row["domain"],
            "yes" if row["heldout"] else "",
            *(_num(row['docs'][s]) for s in SPLITS),
            *(_num(row['tokens'][s]) for s in SPLITS),
            "-" if row["heldout"] else f"{100 * row['share']:.1f}%",
            style="dim" if row["heldout"] else None,
        )
    table.add_section()
    table.add_row(
        "total",
        "",
        *(_num(totals[('docs', s)]) for s in SPLITS),
        *(_num(totals[('tokens', s)]) for s in SPLITS),
        "100%",
        style="bold",
    )
    return table


def print_corpus_table(meta: dict[str, Any], console: Console | None = None) -> None:
    """Print the corpus table to the terminal (or to ``console``)."""
    (console or Console()).print(format_corpus_table(meta))
