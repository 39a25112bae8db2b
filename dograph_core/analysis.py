"""The paper's analysis on the user's own run, as PNG files (matplotlib, Agg backend).

* ``pca_by_source.png``: PCA of projected per-example gradients (centred, unit-normalised),
  coloured by human source, one panel per saved probe checkpoint (the paper's Figure 1);
* ``contingency.png``: the cluster x source table at each re-clustering (model-perceived domains);
* ``weights.png``: the weights a(t) over the graph's nodes, and the source weights the loop used;
* ``graph.png``: the last gradient graph W as a heatmap.

Inputs are what the DoGraph mixer leaves in its output directory (``probes/step_*.npz``,
``dograph_log.jsonl``) and its weights document. :func:`render` writes whatever the inputs allow.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dograph_core.io import atomic_path
from dograph_core.mixers.dograph_parts import read_log

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of centred, unit-normalised rows; returns (coords, explained ratio)."""
    x = z - z.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2 / max(float((s**2).sum()), 1e-30)
    return u[:, :2] * s[:2], var[:2]


def load_probes(probe_dir: Path, max_panels: int = 6) -> list[dict[str, Any]]:
    files = sorted(Path(probe_dir).glob("step_*.npz"))
    if len(files) > max_panels:  # keep first, last and evenly spaced ones
        idx = np.unique(np.linspace(0, len(files) - 1, max_panels).round().astype(int))
        files = [files[i] for i in idx]
    out = []
    for f in files:
        with np.load(f, allow_pickle=False) as d:
            out.append({k: d[k] for k in d.files})
    return out


def plot_pca(probes: list[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    n = len(probes)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.3), squeeze=False)
    for ax, pr in zip(axes[0], probes):
        xy, var = pca_2d(pr["z"].astype(np.float64))
        doms = [str(x) for x in pr["domains"]]
        for i, d in enumerate(doms):
            m = pr["sources"] == i
            ax.scatter(xy[m, 0], xy[m, 1], s=7, alpha=0.7, label=d)
        ax.set_title(f"step {int(pr['step'])}", fontsize=10)
        ax.set_xlabel(f"PC1 ({var[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({var[1]:.0%})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, markerscale=2)
    fig.suptitle("Projected per-example gradients by source (PCA)", fontsize=11)
    return _save(fig, path)


def plot_contingency(events: list[dict[str, Any]], path: Path, max_panels: int = 6) -> Optional[Path]:
    tables = [e for e in events if e.get("event") == "cluster" and e.get("contingency")]
    if not tables:
        return None
    tables = tables[:: max(1, len(tables) // max_panels)][:max_panels]
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables), 3.2), squeeze=False)
    for ax, e in zip(axes[0], tables):
        t = np.asarray(e["contingency"], dtype=float)
        frac = t / np.maximum(t.sum(0, keepdims=True), 1)  # share of each source per cluster
        ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(t):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="w" if frac[i, j] < 0.5 else "k")
        ax.set_xticks(range(t.shape[1]), [d[:8] for d in e.get("domains", range(t.shape[1]))], rotation=45, fontsize=7)
        ax.set_yticks(range(t.shape[0]), [f"c{i}" for i in range(t.shape[0])], fontsize=7)
        ax.set_title(f"step {e['step']} (ARI {e.get('ari', float('nan')):.2f})", fontsize=9)
    fig.suptitle("Clusters x sources (share of each source)", fontsize=11)
    return _save(fig, path)


def plot_weights(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    meta = doc.get("meta", {})
    panels = [("sources", doc["domains"], doc.get("schedule", []))]
    if meta.get("nodes") == "model" and meta.get("node_schedule"):
        k = len(meta["node_schedule"][0]["weights"])
        panels.insert(0, ("clusters a(t)", [f"c{i}" for i in range(k)], meta["node_schedule"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, names, sched) in zip(axes[0], panels):
        if not sched:
            continue
        steps = [s["step"] for s in sched]
        w = np.asarray([s["weights"] for s in sched])
        for i, n in enumerate(names):
            ax.step(steps, w[:, i], where="post", label=n)
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_graph(W: np.ndarray, names: list[str], path: Path, title: str = "gradient graph W") -> Path:
    plt = _plt()
    W = np.asarray(W, dtype=float)
    lim = max(float(np.abs(W - np.diag(np.diag(W))).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 0.8 + 0.5 * len(names)))
    im = ax.imshow(W, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 12:
        for (i, j), v in np.ndenumerate(W):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def render(out_dir: str | Path, doc: dict[str, Any]) -> list[Path]:
    """Write every plot the mixer's outputs in ``out_dir`` allow; returns the PNG paths."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    written: list[Path] = []
    probes = load_probes(out_dir / "probes")
    if probes:
        written.append(plot_pca(probes, plots / "pca_by_source.png"))
    events = read_log(out_dir / "dograph_log.jsonl")
    p = plot_contingency(events, plots / "contingency.png")
    if p:
        written.append(p)
    written.append(plot_weights(doc, plots / "weights.png"))
    updates = [e for e in events if e.get("event") == "update" and e.get("W")]
    if updates:
        W = np.asarray(updates[-1]["W"])
        names = doc["domains"] if doc.get("meta", {}).get("nodes") != "model" else [f"c{i}" for i in range(len(W))]
        written.append(plot_graph(W, names, plots / "graph.png", f"gradient graph W at step {updates[-1]['step']}"))
    return written
