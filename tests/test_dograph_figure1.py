"""The paper's Figure 1 in numbers (dograph_core.analysis): agreement between k-means clusters of the
probe gradients and the human sources, and the within/between-source separation, per probe file."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from dograph_core.analysis import (ALIGNMENT_COLUMNS, alignment_from_dir, alignment_row, alignment_table,
                                   best_excess, centred_unit, cluster_structure, render, source_cosines,
                                   structure_noise, write_alignment)

DOMAINS = np.asarray(["web", "code", "books", "news"])


def probe(step: int, spread: float, n_per: int = 40, d: int = 32, seed: int = 0, labels=None) -> dict:
    """Features around one centre per source; ``spread`` scales the centres (0: no source structure)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(DOMAINS), d)) * spread
    src = np.repeat(np.arange(len(DOMAINS)), n_per)
    z = centres[src] + rng.normal(size=(len(src), d))
    return {"z": z.astype(np.float32), "sources": src, "domains": DOMAINS, "step": np.asarray(step),
            "labels": np.full(len(src), -1) if labels is None else labels}


def save(dirpath, p: dict) -> None:
    dirpath.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dirpath / f"step_{int(p['step']):07d}.npz", **p)


def test_well_separated_sources_are_recovered():
    r = alignment_row(probe(0, spread=4.0), k=4)
    assert set(ALIGNMENT_COLUMNS) <= set(r)
    assert (r["step"], r["n"], r["k"], r["n_sources"]) == (0, 160, 4, 4)
    assert r["kmeans_ari"] > 0.95 and r["kmeans_nmi"] > 0.95
    assert r["separation"] > 0.3 and r["cos_within"] > r["cos_between"]
    assert r["silhouette"] > 0.3
    assert np.isnan(r["labels_ari"]) and np.isnan(r["labels_nmi"])  # the probe carries no labels


def test_no_source_structure_gives_chance_agreement():
    r = alignment_row(probe(5, spread=0.0, n_per=60, seed=1), k=4)
    assert abs(r["kmeans_ari"]) < 0.05
    assert abs(r["separation"]) < 0.02
    assert abs(r["silhouette"]) < 0.05


def test_planted_clusters_are_structure_near_their_own_count():
    r = alignment_row(probe(0, spread=4.0), k=8)  # four sources, four clusters; the run asks for up to 8
    assert r["best_excess"] > 0.35  # beyond any cloud without clusters below (< 0.25)
    # four groups span three wide axes, and a cloud of that spread is itself cut alike at K = 3 or 4, so
    # the largest excess falls at 3 or 4, never at 2 or above 4
    assert r["best_k"] in (3, 4)
    s = cluster_structure(centred_unit(probe(0, spread=4.0)["z"]), k=8)
    assert sorted(s) == [2, 3, 4, 6, 8]
    assert s[4][0] > 0.95  # k-means finds the same four groups from every start


def _cloud(seed: int, spread: float) -> np.ndarray:
    """One Gaussian cloud far wider along a few axes, with four groups ``spread`` apart (0: no groups)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 64)) * spread
    return centres[np.repeat(np.arange(4), 64)] + rng.normal(size=(256, 64)) * np.r_[6.0, 2.5, 1.5, np.ones(61)]


def test_an_elongated_cloud_without_clusters_is_no_structure():
    # k-means cuts an elongated cloud the same way from any start (high self-agreement at K = 2), but it
    # cuts a cloud of the same spread so too: the excess is 0 on average at every K (a null built from
    # the Gaussian's own scales without matching the unit rows' spread reads about 0.07 high here), and
    # four planted groups in the same cloud stand clear of it
    none = [cluster_structure(centred_unit(_cloud(s, 0.0)), k=8, seed=s) for s in range(6)]
    assert min(st[2][0] for st in none) > 0.5  # reproducible cuts ...
    excess = np.asarray([[a - b for a, b in st.values()] for st in none])
    assert abs(excess.mean()) < 0.04 and excess.max() < 0.25, excess  # ... that the null reproduces as well
    planted = [best_excess(cluster_structure(centred_unit(_cloud(s, 3.0)), k=8, seed=s))[1] for s in range(3)]
    assert min(planted) > 0.35 > excess.max()


def test_structure_noise_is_what_a_probe_without_clusters_reads():
    x = centred_unit(_cloud(1, 3.0))
    noise = structure_noise(x, k=8, draws=3, seed=1)  # clouds with the planted cloud's spread, no groups
    assert noise.shape == (3,) and noise.max() < 0.25
    assert best_excess(cluster_structure(x, k=8, seed=1))[1] > noise.max() + 0.2


def test_probe_labels_are_scored_against_the_sources():
    src = np.repeat(np.arange(4), 40)
    r = alignment_row(probe(3, spread=4.0, labels=(src + 1) % 4), k=4)  # a relabelled copy of the sources
    assert r["labels_ari"] == pytest.approx(1.0) and r["labels_nmi"] == pytest.approx(1.0)


def test_source_cosines_match_the_pairwise_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = rng.integers(0, 3, size=30)
    g = x @ x.T
    off = ~np.eye(30, dtype=bool)
    same = (s[:, None] == s[None, :]) & off
    diff = s[:, None] != s[None, :]
    w, b = source_cosines(x, s)
    assert w == pytest.approx(g[same].mean()) and b == pytest.approx(g[diff].mean())


def test_table_is_sorted_by_step_and_tracks_weakening_structure():
    spreads = {0: 3.0, 100: 0.8, 200: 0.45, 300: 0.2}
    probes = [probe(s, spread=v, seed=2) for s, v in spreads.items()]
    rows = alignment_table([probes[2], probes[0], probes[3], probes[1]], k=4)
    assert [r["step"] for r in rows] == [0, 100, 200, 300]
    ari = [r["kmeans_ari"] for r in rows]
    sep = [r["separation"] for r in rows]
    assert all(a > b for a, b in zip(ari, ari[1:])), ari
    assert all(a > b for a, b in zip(sep, sep[1:])), sep


def test_writers_produce_csv_md_and_png(tmp_path):
    rows = alignment_table([probe(s, spread=v) for s, v in [(0, 2.0), (50, 1.0), (100, 0.5)]], k=4)
    paths = write_alignment(rows, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["alignment.csv", "alignment.md", "alignment.png"]
    with open(tmp_path / "out" / "alignment.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and [int(r["step"]) for r in table] == [0, 50, 100]
    assert float(table[0]["kmeans_ari"]) == pytest.approx(rows[0]["kmeans_ari"], abs=1e-6)
    assert table[0]["labels_ari"] == ""  # undefined: blank, not a number
    md = (tmp_path / "out" / "alignment.md").read_text().splitlines()
    header = [i for i, line in enumerate(md) if line.startswith("| step |")]
    assert len(header) == 1 and md[header[0] + 1].startswith("|---")
    assert len([line for line in md[header[0] + 2:] if line.startswith("|")]) == 3
    assert "ARI" in md[0] and "separation" in md[0]  # the explanatory paragraph
    assert (tmp_path / "out" / "alignment.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_fewer_rows_than_k_is_a_clear_error():
    p = probe(7, spread=1.0, n_per=1)  # 4 rows
    with pytest.raises(ValueError, match=r"step 7 has 4 rows, fewer than k=5"):
        alignment_row(p, k=5)
    with pytest.raises(ValueError, match="fewer than k"):
        alignment_table([probe(0, 1.0), p], k=5)


def test_render_writes_alignment_files_over_every_probe(tmp_path):
    for i, s in enumerate([0, 10, 20, 30, 40, 50, 60, 70]):  # more than the 6 PCA panels
        save(tmp_path / "probes", probe(s, spread=2.0 / (1 + i), n_per=15, d=8, seed=i))
    doc = {"domains": list(DOMAINS), "weights": [0.25] * 4, "schedule": [{"step": 0, "weights": [0.25] * 4}],
           "meta": {"nodes": "model", "k": 3}}
    written = render(tmp_path, doc)
    assert tmp_path / "plots" / "alignment.png" in written
    with open(tmp_path / "plots" / "alignment.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [0, 10, 20, 30, 40, 50, 60, 70]
    assert {r["k"] for r in table} == {"3"}  # the run's cluster count for model nodes
    assert (tmp_path / "plots" / "alignment.md").is_file()
    # human nodes: k is the number of domains; the CLI-facing helper finds the probes from the run's root
    run = tmp_path / "run"
    (run / "mixer").mkdir(parents=True)
    (tmp_path / "probes").rename(run / "mixer" / "probes")
    (run / "weights.json").write_text('{"meta": {"nodes": "human", "k": 4}}')
    rows = alignment_from_dir(run)
    assert len(rows) == 8 and {r["k"] for r in rows} == {4}
    assert {r["k"] for r in alignment_from_dir(run / "mixer" / "probes", k=2)} == {2}
    # the re-clusterings' own rows are a separate series, asked for by name
    with pytest.raises(FileNotFoundError, match=r"cluster_\*\.npz"):
        alignment_from_dir(run, kind="cluster")
    p = probe(20, spread=3.0, n_per=15, d=8)
    np.savez_compressed(run / "mixer" / "probes" / "cluster_0000020.npz", **p)
    assert [r["step"] for r in alignment_from_dir(run, kind="cluster")] == [20]
    assert len(alignment_from_dir(run)) == 8  # the analysis series is unchanged
    with pytest.raises(ValueError, match="probe kind 'clusters'"):
        alignment_from_dir(run, kind="clusters")


def test_render_logs_and_keeps_other_plots_when_alignment_fails(tmp_path, caplog):
    save(tmp_path / "probes", probe(0, spread=1.0, n_per=1))  # 4 rows, k = 6 cannot be clustered
    doc = {"domains": list(DOMAINS), "weights": [0.25] * 4, "schedule": [{"step": 0, "weights": [0.25] * 4}],
           "meta": {"nodes": "model", "k": 6}}
    written = render(tmp_path, doc)
    names = {p.name for p in written}
    assert "pca_by_source.png" in names and "alignment.png" not in names
    assert "alignment table failed" in caplog.text


def test_the_cli_prints_the_table_and_each_probes_noise_range(tmp_path, capsys):
    from dograph_core.analysis import main

    save(tmp_path / "probes", probe(0, spread=3.0, n_per=10, d=8))
    save(tmp_path / "probes", probe(40, spread=0.0, n_per=10, d=8, seed=1))
    assert main([str(tmp_path), "--k", "4", "--calibrate", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(ALIGNMENT_COLUMNS) and [line.split()[0] for line in out[1:3]] == ["0", "40"]
    head = out.index("best_excess without clusters (3 clouds per probe): step median p90 max")
    noise = [line.split() for line in out[head + 1:]]
    assert [r[0] for r in noise] == ["0", "40"] and all(len(r) == 4 for r in noise)
    assert all(float(r[1]) <= float(r[2]) <= float(r[3]) for r in noise)  # median <= p90 <= max
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--calibrate", "-1"])
