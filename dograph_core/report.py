"""The comparison report: a markdown table method x scale and plots, from one results document.

Pure: reads a results dict, writes ``report.md`` and ``plots/*.png`` (matplotlib, Agg backend).
The pipeline's last stage builds the results document from every run's outputs; anything can
build one by hand (tests do). Schema (``results.json``)::

    {"run_id": str,
     "domains": [str, ...],                     # training domains, in weight order
     "heldout": [str, ...],                     # held-out domains
     "runs": [{"method": str, "scale": str, "seed": int,
               "val_loss": {domain: float},     # final per-domain validation loss (training domains)
               "heldout_loss": {domain: float}, # final loss on each held-out domain
               "wall_time_s": float,            # training time
               "steps": int,                    # optional: the run's length (weights plot)
               "search_time_s": float,          # optional: the proxy search this run's mixture came from
               "weights": [float, ...],         # the (final / static) mixture over "domains"
               "weights_history": [[step, [float, ...]], ...],
               "curves": [{"step": int, "val_mean": float, "val_worst": float,
                           "val_loss": {domain: float}, "heldout_loss": {domain: float}}, ...],
               "role": "main" | "yardstick" | "reorder",  # optional (default main)
               "plots": [path, ...]}]}           # optional: the method's own figures (linked)

Numbers over several seeds are averaged, with their standard deviation over seeds; the table says
how many seeds each row has. The study's evidence follows (:mod:`dograph_core.study`): per scale,
paired differences by seed against uniform, the best baseline, the first scale's best baseline and,
for ablations (``params.pipeline.parents``), the method each one changes, with their spread, 95%
confidence interval and paired t-test p-value; the gain as a fraction of the compute yardstick's
(runs with ``"role": "yardstick"``: uniform at twice the tokens, kept out of the main table); steps to
reach uniform's final loss; DoGraph's own evidence. ``write_report`` adds them to ``results.json`` as
``"study"``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from dograph_core.io import atomic_path, write_json
from dograph_core.stats import mean_std

COLUMNS = ("method", "scale", "seeds", "val_mean", "val_worst", "worst_domain", "heldout", "train_s", "search_s")


class ReportError(ValueError):
    """A results document that cannot be reported."""


def _num(x: Any) -> float:
    """A number, or NaN for a missing value."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _mean(xs: Iterable[Any]) -> float:
    vals = [v for v in map(_num, xs) if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def run_scores(run: dict[str, Any]) -> dict[str, Any]:
    """Mean and worst per-domain validation loss, mean held-out loss of one run."""
    val = run.get("val_loss") or {}
    if not val:
        raise ReportError(f"run {run.get('method')}@{run.get('scale')}: no per-domain validation loss ('val_loss')")
    worst_domain = max(val, key=lambda d: val[d])
    return {
        "val_mean": _mean(val.values()),
        "val_worst": float(val[worst_domain]),
        "worst_domain": worst_domain,
        "heldout": _mean((run.get("heldout_loss") or {}).values()),
    }


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, scale), averaged over seeds, in the order the runs appear."""
    runs = results.get("runs")
    if not runs:
        raise ReportError("results has no runs to report")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("role", "main") == "main":
            groups[(str(r["method"]), str(r["scale"]))].append(r)
    rows = []
    for (method, scale), rs in groups.items():
        scores = [run_scores(r) for r in rs]
        worst = max(scores, key=lambda s: s["val_worst"])
        row = {"method": method, "scale": scale, "seeds": len(rs), "worst_domain": worst["worst_domain"],
               "train_s": _mean(r.get("wall_time_s") for r in rs),
               "search_s": _mean(r.get("search_time_s") for r in rs)}
        for col in SCORES:
            ms = mean_std(s[col] for s in scores)
            row[col], row[f"{col}_sd"] = ms["mean"], ms["std"]
        rows.append(row)
    return rows


SCORES = ("val_mean", "val_worst", "heldout")


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table, best value per scale in bold (lower is better for every loss)."""
    best: dict[tuple[str, str], float] = {}
    for col in ("val_mean", "val_worst", "heldout"):
        for r in rows:
            v = r[col]
            if math.isfinite(v) and v < best.get((r["scale"], col), math.inf):
                best[(r["scale"], col)] = v

    def cell(r: dict[str, Any], col: str) -> str:
        s = _fmt(r[col])
        s = f"**{s}**" if math.isfinite(r[col]) and r[col] == best.get((r["scale"], col)) else s
        sd = r.get(f"{col}_sd", math.nan)
        return f"{s} ± {_fmt(sd)}" if sd is not None and math.isfinite(sd) else s

    lines = [
        "| method | scale | seeds | mean val loss | worst val loss (domain) | held-out loss | train time (s) | search time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['scale']} | {r['seeds']} | {cell(r, 'val_mean')} | "
            f"{cell(r, 'val_worst')} ({r['worst_domain']}) | {cell(r, 'heldout')} | "
            f"{_fmt(r['train_s'], 1)} | {_fmt(r['search_s'], 1)} |"
        )
    return "\n".join(lines)


def _label(run: dict[str, Any]) -> str:
    seed = f" s{run['seed']}" if run.get("seed") not in (None, 0) else ""
    return f"{run['method']}@{run['scale']}{seed}"


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_weights(results: dict[str, Any], path: Path) -> Path | None:
    """Weights over training steps, one panel per run (a stack of domain shares; a run over a partition's
    nodes stacks its nodes and names them in its own panel)."""
    from dograph_core.study import pyplot

    plt = pyplot()

    domains = results.get("domains") or []
    runs = [r for r in results["runs"] if r.get("weights_history") or r.get("weights")]
    if not runs or not domains:
        return None
    rows, cols = _grid(len(runs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, runs):
        hist = run.get("weights_history") or [[0, run["weights"]]]
        steps = [int(s) for s, _ in hist]
        ws = [list(w) for _, w in hist]
        end = int(run.get("steps") or 0) or max(steps[-1], 1)
        if steps[-1] < end:  # hold the last mixture to the end of the run
            steps, ws = steps + [end], ws + [ws[-1]]
        names = run.get("domains") or domains
        series = [[w[i] for w in ws] for i in range(len(names))]
        ax.stackplot(steps, series, labels=names, step="post")
        if names != domains:
            ax.legend(fontsize=6, ncol=2, loc="upper right", framealpha=0.6)
        ax.set_title(_label(run), fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, end)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("domain weight")
    fig.legend(domains, loc="lower center", ncol=min(len(domains), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path)


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean and worst validation loss per method, grouped by scale."""
    from dograph_core.study import pyplot

    plt = pyplot()

    labels = [f"{r['method']}\n{r['scale']}" for r in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 3.4))
    ax.bar([i - 0.2 for i in x], [r["val_mean"] for r in rows], width=0.4, label="mean val loss")
    ax.bar([i + 0.2 for i in x], [r["val_worst"] for r in rows], width=0.4, label="worst val loss")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("loss")
    lo = min(r["val_mean"] for r in rows if math.isfinite(r["val_mean"])) if rows else 0
    ax.set_ylim(max(0.0, lo * 0.9), None)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    from dograph_core.study import save_figure

    return save_figure(fig, path, dpi=110)


def study_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs as :mod:`dograph_core.study` records: what a hand-made results document leaves out is filled in."""
    types = {m: (spec or {}).get("type") for m, spec in ((results.get("params") or {}).get("methods") or {}).items()}
    held = set(results.get("heldout") or [])

    def curve(c: dict[str, Any]) -> dict[str, Any]:  # a point with only per-domain losses: its mean and worst
        val = {d: v for d, v in (c.get("val_loss") or {}).items() if d not in held}
        return {"val_mean": _mean(val.values()), "val_worst": max(val.values(), default=math.nan),
                "heldout_loss": {d: v for d, v in (c.get("val_loss") or {}).items() if d in held}, **c, "val_loss": val}

    out = []
    for r in results["runs"]:
        sc = run_scores(r)
        r = {**r, "curves": [curve(c) for c in r.get("curves") or []]}
        out.append({"role": "main", "seed": 0, "last_word": r.get("last_word_accuracy", math.nan),
                    "mixer": types.get(str(r["method"])),
                    "train_time_s": r.get("wall_time_s", math.nan), "search_time_s": math.nan, "curves": [],
                    "val_mean": sc["val_mean"], "val_worst": sc["val_worst"], "heldout": sc["heldout"],
                    **{k: v for k, v in r.items() if v is not None}})
    return out


def write_report(results: dict[str, Any], out_dir: str | Path, title: str = "dograph comparison") -> Path:
    """Write ``report.md``, ``results.json`` and ``plots/*.png`` under ``out_dir``; return the report path."""
    from dograph_core import study

    out = Path(out_dir)
    rows = comparison_rows(results)
    records = study_records(results)
    pipe = (results.get("params") or {}).get("pipeline") or {}
    agg = study.aggregate(records, pipe.get("parents") or {}, pipe.get("target_scales"))
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = [
        ("Mean and worst validation loss", plot_comparison(rows, plots / "comparison.png")),
        ("Validation loss over training (seed means)", study.plot_curves(records, plots / "loss_curves.png")),
        ("Per-domain loss against uniform", study.plot_domain_deltas(records, plots / "domain_deltas.png")),
        ("Domain weights over training (first seed)", plot_weights(
            {**results, "runs": study.first_seeds(records)}, plots / "weights.png")),
    ]
    figure1 = study.write_figure1(records, plots)
    held = ", ".join(results.get("heldout") or []) or "none"
    parts = [
        f"# {title}",
        "",
        f"Run `{results.get('run_id', '?')}`. Training domains: {', '.join(results.get('domains') or [])}. "
        f"Held-out (never trained on): {held}.",
        "",
        "Losses are per-token cross-entropy on each domain's validation split (lower is better; best per "
        "scale in bold). *Mean* averages the training domains with equal weight, *worst* is the largest.",
        "",
        markdown_table(rows),
        "",
        "## The evidence, per scale",
        "",
        "Paired differences are method minus reference over the seeds both ran (negative = lower loss = "
        "better): mean ± sd of the differences and the paired t-test's p-value. The best baseline is the "
        "non-DoGraph method with the lowest worst-domain loss at that scale.",
        "",
        study.markdown(agg),
    ]
    if results.get("partitions"):
        parts += ["## What is a domain? Partitions x mixers", "",
                  "Each method mixes over a partition of the corpus (a method without one: the human sources); "
                  "every cell is evaluated on the same per-source validation sets. Balance and agreement with the "
                  "sources (ARI, NMI) are over the training documents.", "",
                  study.partition_markdown(agg, (results.get("params") or {}).get("methods") or {},
                                           results["partitions"]), ""]
    for caption, p in made:
        if p is not None:
            parts += [f"## {caption}", "", f"![{caption}](plots/{p.name})", ""]
    if figure1 is not None:
        parts += ["## Are gradient domains the human sources?", "",
                  "Per analysis probe, the agreement of gradient clusters with the sources: "
                  "[plots/figure1.md](plots/figure1.md).", "", "![Figure 1 in numbers](plots/figure1.png)", ""]
    extra = [(run, Path(f)) for run in results["runs"] for f in run.get("plots") or []]
    if extra:
        parts += ["## Method diagnostics", ""]
        for run, f in extra:
            rel = os.path.relpath(f, out) if f.is_absolute() else str(f)
            parts.append(f"- {_label(run)}: [{f.stem}]({rel})")
        parts.append("")
    write_json(out / "results.json", {**results, "study": agg})
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(parts))
    return report


def rich_table(rows: list[dict[str, Any]]) -> Any:
    """The same table for the terminal (rich)."""
    from rich.table import Table

    t = Table(title="method x scale (validation loss per token, lower is better)")
    for c in ("method", "scale", "seeds", "mean val", "worst val (domain)", "held-out", "train s", "search s"):
        t.add_column(c, justify="left" if c in ("method", "scale") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["method"], r["scale"], str(r["seeds"]), _fmt(r["val_mean"]),
            f"{_fmt(r['val_worst'])} ({r['worst_domain']})", _fmt(r["heldout"]),
            _fmt(r["train_s"], 1), _fmt(r["search_s"], 1),
        )
    return t
