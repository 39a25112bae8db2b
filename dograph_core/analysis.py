"""The paper's analysis on the user's own run, as PNG files (matplotlib, Agg backend).

* ``pca_by_source.png``: PCA of projected per-example gradients (centred, unit-normalised),
  coloured by human source, one panel per saved probe checkpoint (the paper's Figure 1);
* ``contingency.png``: the cluster x source table at each re-clustering (model-perceived domains);
* ``weights.png``: the weights a(t) over the graph's nodes, and the source weights the loop used;
* ``graph.png``: the last gradient graph W as a heatmap;
* ``alignment.csv`` / ``alignment.md`` / ``alignment.png``: the Figure 1 question in numbers, per saved
  probe (a true step-0 one included): agreement (ARI, NMI) between k-means clusters of the gradient
  features and the human sources, the within/between-source separation, and whether the features hold
  any cluster structure at all, at any K (k-means' agreement with itself against a structureless null,
  :func:`cluster_structure`) (:func:`alignment_table`).

Inputs are what the DoGraph mixer leaves in its output directory (``probes/step_*.npz``,
``dograph_log.jsonl``) and its weights document. :func:`render` writes whatever the inputs allow.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
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


def centred_unit(z: np.ndarray) -> np.ndarray:
    """Rows of ``z`` minus their mean, each scaled to unit norm (a row equal to the mean stays 0)."""
    x = np.asarray(z, dtype=np.float64)
    x = x - x.mean(0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of centred, unit-normalised rows; returns (coords, explained ratio)."""
    x = centred_unit(z)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2 / max(float((s**2).sum()), 1e-30)
    return u[:, :2] * s[:2], var[:2]


PROBE_KINDS = {"analysis": "step_*.npz", "cluster": "cluster_*.npz"}


def _probe_pattern(kind: str) -> str:
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind {kind!r}: expected one of {sorted(PROBE_KINDS)}")
    return PROBE_KINDS[kind]


def load_probes(probe_dir: Path, max_panels: Optional[int] = 6, kind: str = "analysis") -> list[dict[str, Any]]:
    """The probe files in ``probe_dir`` in step order; at most ``max_panels`` of them (``None``: all).

    ``kind``: ``analysis`` (``step_*.npz``, the same windows at each checkpoint) or ``cluster`` (``cluster_*.npz``,
    the rows each re-clustering of model nodes was computed from, first projection)."""
    files = sorted(Path(probe_dir).glob(_probe_pattern(kind)))
    if max_panels is not None and len(files) > max_panels:  # keep first, last and evenly spaced ones
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


def plot_graph(W: np.ndarray, names: list[str], path: Path, title: str = "transfer matrix T") -> Path:
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

# -- Figure 1 in numbers: are gradient domains and human sources aligned? ----------------------
ALIGNMENT_COLUMNS = ("step", "n", "k", "n_sources", "kmeans_ari", "kmeans_nmi", "labels_ari", "labels_nmi",
                     "cos_within", "cos_between", "separation", "silhouette", "self_ari", "null_self_ari",
                     "best_k", "best_excess")

ALIGNMENT_HEADER = (
    "Are the model's gradient domains the human sources? One row per saved probe (a fixed sample of "
    "training sequences, stratified over the sources), in step order; step 0 is the model at initialisation. "
    "Each sequence's projected gradient feature is centred (the probe mean removed) and scaled to unit length. "
    "`n` is the number of sequences, `k` the number of k-means clusters, `n_sources` the number of human sources. "
    "`kmeans_ari` and `kmeans_nmi` compare k-means clusters of the features with the sources: adjusted Rand "
    "index, ARI (1 = the same partition, about 0 = no better than chance) and normalised mutual information, "
    "NMI (1 = the same partition, 0 = independent; small samples sit a little above 0 by chance). "
    "`labels_ari` and `labels_nmi` do the same for the clustering the run itself used at that step, where the "
    "probe carries one (blank otherwise). `cos_within` is the mean cosine similarity of two different sequences "
    "from the same source, `cos_between` that of two sequences from different sources, and `separation` their "
    "difference (above 0: a source's gradients point more alike than those of different sources). "
    "`silhouette` is the silhouette score with the sources as labels under the cosine distance "
    "(-1 to 1; above 0 means sequences sit closer to their own source than to the nearest other one). "
    "The last four columns ask whether the features hold clusters at all, sources aside: `self_ari` is the "
    "agreement (mean ARI over pairs) of k-means with itself from 8 different starting points at `k`, "
    "`null_self_ari` the same on Gaussian clouds without clusters but with the features' own spread (the "
    "same principal-component variances), and `best_k` the number of clusters (2, 3, 4, 6, 8, 12, ... up to `k`) where "
    "k-means agrees with itself most beyond that null, `best_excess` by how much. The best of several noisy K "
    "is taken, so a cloud without clusters reads above 0 too: `python -m dograph_core.analysis RUN_DIR "
    "--calibrate 10` prints, per probe, what `best_excess` reads on 10 clouds of that probe's spread without "
    "clusters. A value within that range means no more structure than the features' spread gives: no "
    "clusters to follow, whatever their alignment with the sources."
)


def _sources_and_labels(probe: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], int]:
    z = np.asarray(probe["z"], dtype=np.float64)
    step = int(np.asarray(probe.get("step", -1)))
    if z.ndim != 2:
        raise ValueError(f"probe at step {step}: z must be 2-D [N, d], got shape {z.shape}")
    src = np.asarray(probe["sources"]).astype(np.int64).reshape(-1)
    if len(src) != len(z):
        raise ValueError(f"probe at step {step}: {len(z)} feature rows but {len(src)} source indices")
    if not np.isfinite(z).all():
        raise ValueError(f"probe at step {step}: z holds non-finite values")
    labels = probe.get("labels")
    labels = None if labels is None else np.asarray(labels).astype(np.int64).reshape(-1)
    if labels is not None and len(labels) != len(z):
        raise ValueError(f"probe at step {step}: {len(z)} feature rows but {len(labels)} labels")
    return z, src, labels, step


def source_cosines(x: np.ndarray, sources: np.ndarray) -> tuple[float, float]:
    """Mean cosine of pairs (i != j) of rows from the same source and from different sources.

    ``x`` holds unit (or zero) rows, so a dot product is a cosine; O(N d) via per-source sums.
    """
    sq = float((x * x).sum())                       # the i == j terms
    total = x.sum(0)
    all_sum = float(total @ total) - sq
    within_sum, within_n = 0.0, 0
    for s in np.unique(sources):
        xs = x[sources == s]
        t = xs.sum(0)
        within_sum += float(t @ t) - float((xs * xs).sum())
        within_n += len(xs) * (len(xs) - 1)
    n = len(x)
    between_n = n * (n - 1) - within_n
    within = within_sum / within_n if within_n else math.nan
    between = (all_sum - within_sum) / between_n if between_n else math.nan
    return within, between


def _k_grid(k: int, n: int) -> list[int]:
    """The cluster counts :func:`cluster_structure` tries: 2, 3, 4, 6, 8, 12, ... up to ``k``, and ``k``."""
    grid, g = {2, 3}, 4
    while g <= k:
        grid.update((g, g * 3 // 2))
        g *= 2
    return sorted(x for x in grid | {k} if 2 <= x <= min(k, n - 1))


def _unit_cloud(g: np.ndarray, var: np.ndarray, rounds: int = 30) -> np.ndarray:
    """Rows of the Gaussian draw ``g`` [N, r], each axis scaled and every row then scaled to unit length, so
    that the axes' shares of the rows' variance are ``var``'s shares: a cloud without clusters with the
    spread of unit rows whose principal-component variances are ``var``. Normalising rows shrinks the
    widest axes' shares, so the scales are found by a fixed point (multiplicative steps, each clipped
    to a factor 2), not taken as ``sqrt(var)``."""
    target = np.asarray(var, dtype=np.float64) / max(float(np.sum(var)), 1e-300)
    live = target > 1e-12 * target.max()
    a = np.where(live, np.sqrt(target), 0.0)
    for _ in range(rounds):
        y = g * a
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        got = y.var(0)
        got /= max(float(got.sum()), 1e-300)
        a[live] *= np.clip(np.sqrt(target[live] / np.maximum(got[live], 1e-300)), 0.5, 2.0)
    y = g * a
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def cluster_structure(x: np.ndarray, k: int, seed: int = 0, starts: int = 8,
                      null_draws: int = 2) -> dict[int, tuple[float, float]]:
    """Whether rows ``x`` hold clusters: per K on a grid from 2 to ``k``, ``(self, null)``.

    ``self`` is the mean ARI over pairs of ``starts`` k-means runs (one k-means++ start each, seeds
    ``seed .. seed + starts - 1``): how far k-means agrees with itself. Partitions that reproduce from
    any start are structure; on a featureless cloud each start cuts it differently. But an elongated
    cloud is cut the same way from any start too, so ``null`` is the same agreement on clouds without
    clusters of the same size and the same principal-component variances, unit rows as ``x``'s are
    (:func:`_unit_cloud`; the mean over ``null_draws`` clouds): what the spread of the features alone
    gives. Self-agreement near the null at every K means there are no clusters to find. k-means runs on the rows'
    principal-component scores, which keep every distance between rows (the rows span at most ``N``
    dimensions), so a wide sketch costs no more.
    """
    from sklearn import config_context
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    scores = u * s  # k-means is blind to the shift and to the rotation onto the rows' span
    rng = np.random.default_rng(seed)
    nulls = [_unit_cloud(rng.standard_normal(scores.shape), s**2) for _ in range(null_draws)]

    def agreement(rows: np.ndarray, kk: int) -> float:
        # hundreds of small fits and scores: sklearn's argument checks and thread start-ups would cost
        # more than the work
        with warnings.catch_warnings(), config_context(skip_parameter_validation=True, assume_finite=True), \
                threadpool_limits(1):
            warnings.simplefilter("ignore")
            labs = [KMeans(n_clusters=kk, n_init=1, random_state=seed + i).fit_predict(rows) for i in range(starts)]
            return float(np.mean([adjusted_rand_score(labs[i], labs[j])
                                  for i in range(starts) for j in range(i + 1, starts)]))

    return {kk: (agreement(scores, kk), float(np.mean([agreement(c, kk) for c in nulls])))
            for kk in _k_grid(int(k), len(x))}


def best_excess(structure: dict[int, tuple[float, float]]) -> tuple[int, float]:
    """The K of a :func:`cluster_structure` result with the largest ``self - null``, and that excess."""
    best = max(structure, key=lambda kk: structure[kk][0] - structure[kk][1])
    return best, structure[best][0] - structure[best][1]


def structure_noise(x: np.ndarray, k: int, draws: int = 10, seed: int = 0) -> np.ndarray:
    """What ``best_excess`` reads on rows without clusters: :func:`cluster_structure` (and
    :func:`best_excess`) of ``draws`` clouds with the spread of ``x`` (:func:`_unit_cloud`), each
    treated as the data. The largest of several noisy K is taken, so it sits above 0; a probe's own
    ``best_excess`` is structure only where it stands clear of these."""
    x = np.asarray(x, dtype=np.float64)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    rng = np.random.default_rng(seed + 7919)
    return np.asarray([best_excess(cluster_structure(_unit_cloud(rng.standard_normal(u.shape), s**2), k, seed + i))[1]
                       for i in range(draws)])


def alignment_row(probe: dict[str, Any], k: int, seed: int = 0) -> dict[str, Any]:
    """Agreement between the gradient geometry of one probe and its human sources.

    ``probe`` holds ``z`` [N, d], ``sources`` [N], optionally ``labels`` [N] (-1: none) and ``step``.
    Rows are centred and unit-normalised (as :func:`pca_2d` does), then clustered by k-means (``k``
    clusters, ``n_init=4``, ``random_state=seed``). Returns one row with the keys ``ALIGNMENT_COLUMNS``
    (NaN where a value is undefined, e.g. the silhouette of a probe with one source); ``self_ari``,
    ``null_self_ari``, ``best_k`` and ``best_excess`` come from :func:`cluster_structure` on the same rows.
    Raises ``ValueError`` for a probe that cannot be clustered into ``k`` clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    z, src, labels, step = _sources_and_labels(probe)
    n = len(z)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n < k:
        raise ValueError(f"probe at step {step} has {n} rows, fewer than k={k} clusters: "
                         f"save larger probes or ask for fewer clusters")
    x = centred_unit(z)
    with warnings.catch_warnings():  # identical rows (e.g. a tiny probe) only warn about fewer distinct points
        warnings.simplefilter("ignore")
        pred = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
    n_sources = len(np.unique(src))
    row: dict[str, Any] = {
        "step": step, "n": n, "k": k, "n_sources": n_sources,
        "kmeans_ari": float(adjusted_rand_score(src, pred)),
        "kmeans_nmi": float(normalized_mutual_info_score(src, pred)),
        "labels_ari": math.nan, "labels_nmi": math.nan,
    }
    if labels is not None:
        m = labels >= 0
        if m.sum() >= 2:
            row["labels_ari"] = float(adjusted_rand_score(src[m], labels[m]))
            row["labels_nmi"] = float(normalized_mutual_info_score(src[m], labels[m]))
    within, between = source_cosines(x, src)
    row["cos_within"], row["cos_between"] = within, between
    row["separation"] = within - between
    row["silhouette"] = math.nan
    if 2 <= n_sources <= n - 1:
        try:
            row["silhouette"] = float(silhouette_score(x, src, metric="cosine"))
        except ValueError:  # e.g. all-zero rows under the cosine metric
            pass
    row.update(self_ari=math.nan, null_self_ari=math.nan, best_k=math.nan, best_excess=math.nan)
    structure = cluster_structure(x, k, seed)
    if structure:
        row["self_ari"], row["null_self_ari"] = structure.get(k, (math.nan, math.nan))
        row["best_k"], row["best_excess"] = best_excess(structure)
    return row


def alignment_table(probes: list[dict[str, Any]], k: int, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`alignment_row` for every probe, sorted by step."""
    rows = [alignment_row(p, k, seed) for p in probes]
    return sorted(rows, key=lambda r: r["step"])


def _cell(v: Any, digits: int = 4) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)


def write_alignment(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``alignment.csv``, ``alignment.md`` and ``alignment.png`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    cols = list(ALIGNMENT_COLUMNS) + [c for r in rows for c in r if c not in ALIGNMENT_COLUMNS]
    cols = list(dict.fromkeys(cols))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c, ""), 6) for c in cols])
    csv_path = out_dir / "alignment.csv"
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue())
    md = [ALIGNMENT_HEADER, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    md += ["| " + " | ".join(_cell(r.get(c, ""), 3) or "–" for c in cols) + " |" for r in rows]
    md_path = out_dir / "alignment.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return [csv_path, md_path, plot_alignment(rows, out_dir / "alignment.png")]


def plot_alignment(rows: list[dict[str, Any]], path: Path) -> Path:
    """Line plot over steps: k-means ARI and NMI vs sources, the separation, and the run's own labels' ARI."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    steps = np.asarray([r["step"] for r in rows], dtype=float)
    series = [("kmeans_ari", "ARI (k-means vs sources)", "-o"),
              ("kmeans_nmi", "NMI (k-means vs sources)", "-s"),
              ("separation", "cos within - between source", "-^"),
              ("labels_ari", "ARI (run's clusters vs sources)", ":x"),
              ("best_excess", "cluster structure beyond null (best K)", "--d")]
    for key, label, style in series:
        y = np.asarray([r.get(key, math.nan) for r in rows], dtype=float)
        if np.isfinite(y).any():
            m = np.isfinite(y)
            ax.plot(steps[m], y[m], style, label=label, markersize=4)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("agreement / separation")
    if len(rows):
        k = sorted({int(r["k"]) for r in rows})
        ax.set_title(f"Gradient clusters vs human sources (k={','.join(map(str, k))})", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _probe_dir(run_dir: Path, kind: str = "analysis") -> Path:
    pattern = _probe_pattern(kind)
    for p in (run_dir / "probes", run_dir / "mixer" / "probes", run_dir):
        if any(p.glob(pattern)):
            return p
    raise FileNotFoundError(f"no probe files (probes/{pattern}) under {run_dir}")


def _default_k(run_dir: Path, probes: list[dict[str, Any]]) -> int:
    """The run's k for model nodes (from its weights.json), else the number of human domains."""
    for f in (run_dir / "weights.json", run_dir.parent / "weights.json"):
        if f.is_file():
            try:
                meta = json.loads(f.read_text()).get("meta") or {}
            except (OSError, ValueError):
                continue
            if meta.get("nodes") == "model" and meta.get("k"):
                return int(meta["k"])
            break
    return len(probes[-1]["domains"])


def probes_from_dir(run_dir: str | Path, k: Optional[int] = None,
                    kind: str = "analysis") -> tuple[list[dict[str, Any]], int]:
    """Every probe of ``kind`` (:func:`load_probes`) in a finished run directory (the run's root, its
    ``mixer/`` or ``probes/`` folder), in step order, and ``k``: as given, else the run's cluster count
    for model nodes (its ``weights.json``), else the number of domains."""
    run_dir = Path(run_dir)
    pdir = _probe_dir(run_dir, kind)
    probes = load_probes(pdir, max_panels=None, kind=kind)
    return probes, k if k is not None else _default_k(run_dir if pdir != run_dir else run_dir.parent, probes)


def alignment_from_dir(run_dir: str | Path, k: Optional[int] = None, seed: int = 0,
                       out_dir: str | Path | None = None, kind: str = "analysis") -> list[dict[str, Any]]:
    """The alignment table of a finished run directory's probes (:func:`probes_from_dir`). With
    ``out_dir`` the three ``alignment.*`` files are written there as well."""
    probes, k = probes_from_dir(run_dir, k, kind)
    rows = alignment_table(probes, k, seed)
    if out_dir is not None:
        write_alignment(rows, out_dir)
    return rows


def _render_k(doc: dict[str, Any], probes: list[dict[str, Any]]) -> int:
    meta = doc.get("meta") or {}
    if meta.get("nodes") == "model" and meta.get("k"):
        return int(meta["k"])
    return len(doc.get("domains") or probes[-1]["domains"])


def render(out_dir: str | Path, doc: dict[str, Any]) -> list[Path]:
    """Write every plot the mixer's outputs in ``out_dir`` allow; returns the PNG paths.

    The alignment table (``plots/alignment.{csv,md,png}``) covers every probe file; its k is the run's
    cluster count for model nodes, else the number of domains.
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    written: list[Path] = []
    probes = load_probes(out_dir / "probes")
    if probes:
        written.append(plot_pca(probes, plots / "pca_by_source.png"))
        try:  # every probe, not only the panels; a failure here must not cost the other plots
            every = load_probes(out_dir / "probes", max_panels=None)
            written.append(write_alignment(alignment_table(every, _render_k(doc, every)), plots)[-1])
        except Exception as e:
            log.warning("dograph: alignment table failed: %s: %s", type(e).__name__, e)
    events = read_log(out_dir / "dograph_log.jsonl")
    p = plot_contingency(events, plots / "contingency.png")
    if p:
        written.append(p)
    written.append(plot_weights(doc, plots / "weights.png"))
    # the last transfer matrix T of the nodes in force (model clusters if they ever were, else the sources)
    for tag in ("model", "human"):
        updates = [e for e in events if e.get("event") == "update" and (e.get(tag) or {}).get("T")]
        if updates:
            T = np.asarray(updates[-1][tag]["T"])
            names = doc["domains"] if tag == "human" else [f"c{i}" for i in range(len(T))]
            written.append(plot_graph(T, names, plots / "graph.png",
                                      f"transfer matrix T ({tag} nodes) at step {updates[-1]['step']}"))
            break
    return written


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dograph_core.analysis RUN_DIR [--k K] [--probes analysis|cluster] [--out DIR] [--calibrate N]``:
    print (and write) the alignment table; with ``--calibrate`` also, per probe, what ``best_excess`` reads
    on N clouds of that probe's spread without clusters (:func:`structure_noise`)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", choices=sorted(PROBE_KINDS), default="analysis",
                    help="analysis: the same windows at each checkpoint (step_*.npz); cluster: the rows of each "
                         "re-clustering of model nodes (cluster_*.npz)")
    ap.add_argument("--out", default=None, help="write alignment.{csv,md,png} here")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="per probe, best_excess on N clouds of its spread without clusters (median, 90th "
                         "percentile, max): the noise a probe's own best_excess is read against")
    a = ap.parse_args(argv)
    if a.calibrate < 0:
        ap.error(f"--calibrate must be 0 or more, got {a.calibrate}")
    probes, k = probes_from_dir(a.run_dir, a.k, a.probes)
    rows = alignment_table(probes, k, a.seed)
    if a.out is not None:
        write_alignment(rows, a.out)
    print(" ".join(ALIGNMENT_COLUMNS))
    for r in rows:
        print(" ".join(_cell(r[c], 3) or "nan" for c in ALIGNMENT_COLUMNS))
    if a.calibrate:
        print(f"best_excess without clusters ({a.calibrate} clouds per probe): step median p90 max")
        for r, pr in zip(rows, probes):  # both in step order
            e = structure_noise(centred_unit(pr["z"]), k, a.calibrate, a.seed)
            print(f"{r['step']} {np.median(e):.3f} {np.percentile(e, 90):.3f} {e.max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
