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
               "curves": [{"step": int, "val_loss": {domain: float}}, ...],
               "plots": [path, ...]}]}           # optional: the method's own figures (linked)

Numbers over several seeds are averaged, with their standard deviation over seeds; the table says
how many seeds each row has. Methods that ran with several seeds are also compared *paired by seed*
(:func:`paired_rows`): against uniform and against the best baseline at their scale (the non-DoGraph
method with the lowest worst-domain loss; a method's type comes from ``results["params"]["methods"]``
when present, else from its name), the mean difference, its spread, the paired t-test's p-value and
the 95% confidence interval, for the mean, worst and held-out loss. ``write_report`` adds them to
``results.json`` as ``"paired"``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from dograph_core.io import atomic_path, write_json
from dograph_core.stats import fmt_p, mean_std, paired

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


def is_dograph(results: dict[str, Any], method: str) -> bool:
    spec = ((results.get("params") or {}).get("methods") or {}).get(method) or {}
    return str(spec.get("type") or method).startswith("dograph")


def paired_rows(results: dict[str, Any], rows: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Per scale, every method minus uniform and minus the best baseline, paired by seed.

    One row per (scale, method, reference) with ``{score: stats.paired(...)}`` for the mean, worst
    and held-out loss; only where the two share at least two seeds. ``rows``: the results'
    :func:`comparison_rows`, when the caller has them.
    """
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in results.get("runs") or []:
        key, seed = (str(r["scale"]), str(r["method"])), int(r.get("seed") or 0)
        if seed in by[key]:
            raise ReportError(f"run {key[1]}@{key[0]}: seed {seed} appears twice; pairing by seed needs one run per seed")
        by[key][seed] = run_scores(r)
    rows = rows if rows is not None else comparison_rows(results)
    out = []
    for scale in dict.fromkeys(r["scale"] for r in rows):
        here = [r for r in rows if r["scale"] == scale]
        base = [r for r in here if not is_dograph(results, r["method"]) and math.isfinite(r["val_worst"])]
        refs = [("uniform", "uniform")] if any(r["method"] == "uniform" for r in here) else []
        if base:
            best = min(base, key=lambda r: r["val_worst"])["method"]
            if best != "uniform":  # else the rows against uniform say it already
                refs.append((best, f"best ({best})"))
        for r in here:
            for ref, label in refs:
                a, b = by[(scale, r["method"])], by[(scale, ref)]
                if r["method"] == ref or len(set(a) & set(b)) < 2:
                    continue
                out.append({"scale": scale, "method": r["method"], "vs": label, "reference": ref,
                            **{col: paired({s: v[col] for s, v in a.items()}, {s: v[col] for s, v in b.items()})
                               for col in SCORES}})
    return out


def _delta(d: dict[str, Any]) -> str:
    if not math.isfinite(d["mean"]):
        return "–"
    lo, hi = d["ci"]
    return f"{d['mean']:+.3f} ± {d['std']:.3f} [{lo:+.3f}, {hi:+.3f}] (p {fmt_p(d['p'])})"


def paired_table(prs: list[dict[str, Any]]) -> str:
    lines = ["| scale | method | vs | seeds | Δ mean | Δ worst | Δ held-out |", "|---|---|---|---:|---:|---:|---:|"]
    for r in prs:
        lines.append(f"| {r['scale']} | {r['method']} | {r['vs']} | {r['val_mean']['n']} | {_delta(r['val_mean'])} | "
                     f"{_delta(r['val_worst'])} | {_delta(r['heldout'])} |")
    return "\n".join(lines)


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
    """Weights over training steps, one panel per run (a stack of domain shares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        series = [[w[i] for w in ws] for i in range(len(domains))]
        ax.stackplot(steps, series, labels=domains, step="post")
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


def plot_loss_curves(results: dict[str, Any], path: Path) -> Path | None:
    """Per-domain validation loss over steps, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("curves")]
    if not runs:
        return None
    rows, cols = _grid(len(runs))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    domains: list[str] = []
    for ax, run in zip(axes.flat, runs):
        names = sorted({d for p in run["curves"] for d in p.get("val_loss", {})})
        for d in names:
            pts = [(p["step"], p["val_loss"][d]) for p in run["curves"] if d in p.get("val_loss", {})]
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=d, linestyle="--" if d in results.get("heldout", []) else "-")
        domains = domains or names
        ax.set_title(_label(run), fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("validation loss")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path)


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean and worst validation loss per method, grouped by scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path, title: str = "dograph comparison") -> Path:
    """Write ``report.md``, ``results.json`` and ``plots/*.png`` under ``out_dir``; return the report path."""
    out = Path(out_dir)
    rows = comparison_rows(results)
    plots = out / "plots"
    made = [
        ("Mean and worst validation loss", plot_comparison(rows, plots / "comparison.png")),
        ("Domain weights over training", plot_weights(results, plots / "weights.png")),
        ("Per-domain validation loss", plot_loss_curves(results, plots / "loss_curves.png")),
    ]
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
    ]
    prs = paired_rows(results, rows)
    if prs:
        parts += ["## Paired differences by seed", "",
                  "Method minus reference over the seeds both ran (negative = lower loss = better): mean ± sd "
                  "of the differences, [95% confidence interval], (paired t-test p-value). The best baseline "
                  "is the non-DoGraph method with the lowest worst-domain loss at that scale.", "",
                  paired_table(prs), ""]
    for caption, p in made:
        if p is not None:
            parts += [f"## {caption}", "", f"![{caption}](plots/{p.name})", ""]
    extra = [(run, Path(f)) for run in results["runs"] for f in run.get("plots") or []]
    if extra:
        parts += ["## Method diagnostics", ""]
        for run, f in extra:
            rel = os.path.relpath(f, out) if f.is_absolute() else str(f)
            parts.append(f"- {_label(run)}: [{f.stem}]({rel})")
        parts.append("")
    write_json(out / "results.json", {**results, "paired": prs})
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
