"""The study's evidence: from finished training runs to mean ± sd over seeds, paired differences and plots.

:func:`run_record` reads one finished run's directory (``summary.json``, ``eval.json``,
``metrics.jsonl``, DoGraph's ``mixer/`` log) into one flat record; :func:`aggregate` computes, per
scale and method, the mean ± sd over seeds and the paired differences by seed (``stats.paired``:
the mean, spread, 95% confidence interval and paired t-test p-value of the differences) against
uniform, the best baseline at that scale, the first scale's best baseline and, for an ablation, the
method it changes (its parent); the gain as a fraction of the compute yardstick's (uniform at twice
the tokens) and the steps each method needs to reach uniform's final mean loss. :func:`markdown`
renders the tables; :func:`plot_curves`, :func:`plot_domain_deltas` and :func:`write_figure1` draw.
All losses are nats per token on the validation split (lower is better). Pure: reads files, writes
only where it is told.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dograph_core.io import atomic_path
from dograph_core.stats import fmt_p, fmt_pm, gain_fraction, mean_std, paired, steps_to_reach

METRICS = ("val_mean", "val_worst", "heldout", "last_word")
DOGRAPH_FIELDS = ("in_force", "end_ari", "graph_effect", "ess", "realised_gap", "realised_tolerance")  # see dograph_record
METHOD_ORDER = ["uniform", "natural", "doremi", "doge", "odm", "dograph_human", "dograph_model", "uniform_2x"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


def run_record(run_dir: Path, method: str, scale: str, seed: int, role: str = "main",
               search_time_s: Optional[float] = math.nan, every: int = 10) -> dict[str, Any]:
    """One finished run as a flat record (``role``: ``main``, ``yardstick`` or ``reorder``); weights every ``every`` steps."""
    run_dir = Path(run_dir)
    s = _read_json(run_dir / "summary.json")
    ev = _read_json(run_dir / "eval.json")
    val = {d: v["loss"] for d, v in ev["val"]["domains"].items()}
    held = {d: v["loss"] for d, v in ev["val"]["heldout"].items()}
    if not val:
        raise ValueError(f"{run_dir / 'eval.json'}: no per-domain validation loss")
    wfile = _read_json(run_dir / "weights.json")
    final = s.get("final_weights") or dict(zip(wfile.get("domains") or [], wfile.get("weights") or []))
    domains = list(final)
    curves, hist = [], []
    for rec in _read_jsonl(run_dir / "metrics.jsonl"):
        if "eval" in rec:
            e = rec["eval"]
            curves.append({"step": rec["step"], "val_mean": e.get("val_loss_mean"), "val_worst": e.get("val_loss_worst"),
                           "val_loss": {k.split("/", 1)[1]: v for k, v in e.items() if k.startswith("val_loss/")},
                           "heldout_loss": {k.split("/", 1)[1]: v for k, v in e.items() if k.startswith("heldout_loss/")}})
        elif domains and f"weight/{domains[0]}" in rec and (rec["step"] % every == 0 or not hist):
            hist.append([rec["step"], [rec[f"weight/{d}"] for d in domains]])
    if hist and hist[0][0] > 0:  # the mixture in force from the first step
        hist.insert(0, [0, hist[0][1]])
    worst = max(val, key=lambda d: val[d])
    mean = sum(val.values()) / len(val)
    if s.get("steps") is not None:
        curves.append({"step": s["steps"], "val_mean": mean, "val_worst": val[worst], "val_loss": val,
                       "heldout_loss": held})
    wall = s.get("wall_time_s", math.nan)
    return {
        "method": method, "scale": scale, "seed": seed, "role": role, "mixer": s.get("mixer"),
        "steps": s.get("steps"), "tokens": s.get("tokens"),
        "params": s.get("params"), "dtype": s.get("dtype"), "device": s.get("device"),
        "val_loss": val, "heldout_loss": held, "val_mean": mean, "val_worst": val[worst], "worst_domain": worst,
        "heldout": sum(held.values()) / len(held) if held else math.nan,
        "last_word": s.get("last_word_acc_mean", math.nan),
        "wall_time_s": wall, "train_time_s": s.get("train_time_s", wall), "tokens_per_s": s.get("tokens_per_s"),
        "search_time_s": math.nan if search_time_s is None else float(search_time_s), "domains": domains,
        "weights": [final[d] for d in domains], "weights_history": hist, "curves": curves,
        **dograph_record(run_dir),
    }


def first_seeds(runs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The main runs that are the lowest seed of their method and scale (one per arm, for per-run figures)."""
    main = [r for r in runs if r.get("role", "main") == "main"]
    low: dict[tuple[str, str], int] = {}
    for r in main:
        key = (r["method"], r["scale"])
        low[key] = min(low.get(key, r["seed"]), r["seed"])
    return [r for r in main if r["seed"] == low[(r["method"], r["scale"])]]


def _read_json(path: Path) -> dict[str, Any]:
    """A run's JSON file ({} when absent); an unreadable one is a ValueError that names it."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({e})") from None


def dograph_record(run_dir: Path) -> dict[str, Any]:
    """DoGraph's own evidence of a run (empty for other methods): the share of updates in which model nodes
    were in force, the mean graph effect ||a - a_graph-off||_1 of the nodes in force, the mean effective
    sample size of the loss weights, how far the windows' cluster mixture was from the weights in the windows
    the model nodes drew (``realised_gap``, logged for those windows only; ``realised_tolerance`` the part
    sampling sources cannot express plus a window's sampling noise: a realised gap within it is what
    sampling through sources allows), and the cluster-source agreement of the last analysis probe."""
    meta = _read_json(run_dir / "weights.json").get("meta", {})
    if "nodes" not in meta:
        return {}
    effects, ess, gaps, tolerance = [], [], [], []
    for rec in _read_jsonl(run_dir / "mixer" / "dograph_log.jsonl"):
        if rec.get("event") != "update":
            continue
        who = "model" if rec.get("nodes_in_force") == "model" else "human"
        e = (rec.get(who) or {}).get("graph_effect_l1")
        if e is not None:
            effects.append(e)
        if rec.get("ess_mean") is not None and who == "model":
            ess.append(rec["ess_mean"])
        if rec.get("realised_gap_l1") is not None:   # a window drawn by the model nodes' weights
            gaps.append(rec["realised_gap_l1"])
            if rec.get("expected_gap_l1") is not None:
                tolerance.append(rec["expected_gap_l1"] + rec["noise_l1"])
    ari = math.nan  # the run's own clusters against the sources (model nodes); k-means of the features otherwise
    align = run_dir / "mixer" / "plots" / "alignment.csv"
    if align.is_file():
        rows = list(csv.DictReader(align.read_text().splitlines()))
        col = "labels_ari" if meta.get("nodes") == "model" else "kmeans_ari"
        if rows and rows[-1].get(col):
            ari = float(rows[-1][col])
    share = meta.get("model_nodes_in_force_share")
    return {"in_force": math.nan if share is None else float(share), "end_ari": ari,
            "graph_effect": sum(effects) / len(effects) if effects else math.nan,
            "ess": sum(ess) / len(ess) if ess else math.nan,
            "realised_gap": sum(gaps) / len(gaps) if gaps else math.nan,
            "realised_tolerance": sum(tolerance) / len(tolerance) if tolerance else math.nan}


def _by_seed(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in runs if r.get(key) is not None}


NOT_CARRIED = ("uniform", "natural")  # mixer types trained at every scale anyway: never the carried baseline


def is_baseline(method: str, mixer: Optional[str], parents: Mapping[str, str]) -> bool:
    """A method that competes for "best baseline": not DoGraph (by its mixer type) and not an ablation."""
    return method not in parents and not str(mixer or method).startswith("dograph")


def is_carried(method: str, mixer: Optional[str], parents: Mapping[str, str]) -> bool:
    """A baseline that the first scale may carry to later scales (``@best``): not uniform or natural either."""
    return is_baseline(method, mixer, parents) and str(mixer or method) not in NOT_CARRIED


def carried_baseline(worst: Mapping[str, float]) -> Optional[str]:
    """The carried baseline: the lowest worst-domain loss among ``{method: seed-mean worst loss}`` (ties by name)."""
    return min(worst, key=lambda m: (worst[m], m)) if worst else None


def aggregate(records: list[dict[str, Any]], parents: Optional[Mapping[str, str]] = None,
              scales: Optional[list[str]] = None) -> dict[str, Any]:
    """Per scale: rows per method (mean ± sd), the best baseline, paired differences, yardstick.

    ``parents``: ablation -> the method it changes; each ablation is also compared with its parent.
    ``scales``: their order, the first being the one whose carried baseline later scales compare with
    (default: the order of the records).
    """
    parents = dict(parents or {})
    out: dict[str, Any] = {}
    present = list(dict.fromkeys(r["scale"] for r in records))
    scales = [s for s in scales or [] if s in present] + [s for s in present if s not in (scales or [])]
    first_best: Optional[str] = None  # the first scale's carried baseline (what @best trained at later scales)
    for scale in scales:
        rs = [r for r in records if r["scale"] == scale]
        methods = list(dict.fromkeys(r["method"] for r in rs if r["role"] == "main"))
        arm = {m: [r for r in rs if r["method"] == m and r["role"] == "main"] for m in methods}
        yard = [r for r in rs if r["role"] == "yardstick"]
        reorder = [r for r in rs if r["role"] == "reorder"]
        rows = {}
        for m, runs in arm.items():
            rows[m] = {k: mean_std(r[k] for r in runs) for k in (*METRICS, "wall_time_s", "train_time_s")}
            rows[m]["seeds"] = sorted(r["seed"] for r in runs)
            rows[m].update({k: mean_std(r.get(k, math.nan) for r in runs) for k in DOGRAPH_FIELDS})
            rows[m]["search_time_s"] = next((r["search_time_s"] for r in runs if _ok(r.get("search_time_s"))), math.nan)
        base = rows.get("uniform")
        for m in rows:  # paired by seed, the median ratio: robust to a run that shared the machine with more work
            rows[m]["overhead"] = _median_ratio(_by_seed(arm[m], "train_time_s"), _by_seed(arm["uniform"], "train_time_s")) \
                if base else math.nan
        baselines = [m for m in rows if is_baseline(m, arm[m][0].get("mixer"), parents)]
        best = min(baselines, key=lambda m: rows[m]["val_worst"]["mean"]) if baselines else None
        if scale == scales[0] and len(scales) > 1:  # one scale alone carries nothing to a later one
            first_best = carried_baseline({m: rows[m]["val_worst"]["mean"] for m in baselines
                                           if is_carried(m, arm[m][0].get("mixer"), parents)})
        refs = [("uniform", "uniform"), ("best", best)]
        if first_best not in (None, best, "uniform"):
            refs.append(("first_best", first_best))
        y = {k: mean_std(r[k] for r in yard) for k in METRICS} if yard else None
        ystick = {k: (y[k]["mean"] - base[k]["mean"]) if (y and base) else math.nan for k in METRICS}
        noise = {k: data_order_noise(_by_seed(reorder, k), _by_seed(arm["uniform"], k)) for k in METRICS} \
            if (reorder and base) else None
        target = base["val_mean"]["mean"] if base else math.nan
        diffs: dict[str, Any] = {}
        for m in rows:
            d: dict[str, Any] = {}
            for ref_name, ref in [*refs, ("parent", parents.get(m))]:
                if ref is None or ref not in arm or ref == m or (ref_name == "best" and ref == "uniform"):
                    continue
                d[ref_name] = {k: paired(_by_seed(arm[m], k), _by_seed(arm[ref], k)) for k in METRICS}
            d["gain_fraction"] = {k: gain_fraction(d["uniform"][k]["mean"], ystick[k]) if "uniform" in d else math.nan
                                  for k in ("val_mean", "val_worst", "heldout")}
            reach = [steps_to_reach([(c["step"], c["val_mean"]) for c in r["curves"]], target) for r in arm[m]]
            d["steps_to_uniform"] = {"mean": mean_std(x for x in reach if x is not None)["mean"],
                                     "reached": sum(x is not None for x in reach), "n": len(reach)}
            diffs[m] = d
        adjust_for_multiplicity(diffs)
        out[scale] = {"rows": rows, "best_baseline": best, "parents": {m: parents[m] for m in rows if m in parents}, "first_scale_best": first_best, "yardstick": {"delta": ystick, "seeds": [r["seed"] for r in yard]},
                      "data_order": noise,
                      "uniform_final_mean": target, "diffs": diffs}
    return out


# what a method's paired differences are taken against, in the order the report lists them
REFERENCES = ("uniform", "best", "first_best", "parent")


def adjust_for_multiplicity(diffs: Mapping[str, Mapping[str, Any]]) -> None:
    """Add ``q`` to every paired comparison in ``diffs`` (method -> reference -> metric -> :func:`paired`):
    its p-value adjusted by Benjamini-Hochberg (``scipy.stats.false_discovery_control``) over the family
    of comparisons with the same reference on the same metric, one per method (for ``parent``: every
    ablation against its own parent, one family). A table of many methods
    gives some p below 0.05 by chance; ``q`` bounds the expected share of such false findings among
    those called significant at that level. NaN where ``p`` is."""
    from scipy.stats import false_discovery_control

    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in diffs.values():
        for ref, per_metric in d.items():
            if ref in REFERENCES:
                for k, pr in per_metric.items():
                    families.setdefault((ref, k), []).append(pr)
    for members in families.values():
        ok = [pr for pr in members if _ok(pr.get("p"))]
        q = false_discovery_control([float(pr["p"]) for pr in ok]) if ok else []
        for pr, v in zip(ok, q):
            pr["q"] = float(v)
        for pr in members:
            pr.setdefault("q", math.nan)


def data_order_noise(reordered: Mapping[int, float], uniform: Mapping[int, float]) -> dict[str, Any]:
    """Uniform with another data order minus uniform, paired by seed, and the root mean square of those
    differences: how far two runs that differ only in the data order land apart (a mean near 0 is
    expected; the rms is the scale against which a paired difference between methods is read)."""
    d = paired(reordered, uniform)
    d["rms"] = math.sqrt(sum(x * x for x in d["diffs"]) / len(d["diffs"])) if d["diffs"] else math.nan
    return d


def _data_order_line(noise: Optional[Mapping[str, Any]]) -> list[str]:
    if not noise:
        return []
    seeds = noise["val_mean"]["seeds"]
    per = "; ".join(f"{name} {_num(noise[k]['rms'])} ({', '.join(_num(x, sign=True) for x in noise[k]['diffs'])})"
                    for k, name in (("val_mean", "mean"), ("val_worst", "worst"), ("heldout", "held-out")))
    return ["", f"**Data-order noise** (uniform again with another data order, seeds {seeds}, minus uniform; rms, "
                f"then per seed): {per}. Two runs that differ only in the order of their data land this far apart; "
                f"pairing by seed does not remove it once two methods' weights differ, so a paired difference of "
                f"this size is not evidence on its own."]


def _median_ratio(num: dict[int, float], den: dict[int, float]) -> float:
    r = [num[s] / den[s] for s in num if s in den and den[s] > 0]
    return float(statistics.median(r)) if r else math.nan


def _ok(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _num(x: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if not _ok(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _diff(p: dict[str, Any]) -> str:
    """``mean ± sd [95% CI] (p value)`` of paired differences."""
    if not p or not p.get("n"):
        return "–"
    sd = f" ± {p['std']:.3f}" if _ok(p["std"]) else ""
    lo, hi = p.get("ci") or (math.nan, math.nan)
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if _ok(lo) and _ok(hi) else ""
    q = f", q {fmt_p(p['q'])}" if _ok(p.get("q")) else ""
    return f"{p['mean']:+.3f}{sd}{ci} (p {fmt_p(p['p'])}{q})"


def markdown(agg: dict[str, Any]) -> str:
    """The tables: per scale, the summary (mean ± sd over seeds) and the paired differences."""
    parts = []
    for scale, a in agg.items():
        rows, diffs = a["rows"], a["diffs"]
        n_seeds = max((len(r["seeds"]) for r in rows.values()), default=0)
        parts += [f"### {scale}: per method (mean ± sd over {n_seeds} seeds)", "",
                  "| method | seeds | mean val loss | worst val loss | held-out loss | last-word acc | wall s | "
                  "overhead vs uniform (median of per-seed ratios) | search s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, r in rows.items():
            parts.append(f"| {m} | {len(r['seeds'])} | {fmt_pm(r['val_mean'])} | {fmt_pm(r['val_worst'])} | "
                         f"{fmt_pm(r['heldout'])} | {fmt_pm(r['last_word'])} | {fmt_pm(r['wall_time_s'], 0)} | "
                         f"{_num(r['overhead'], 2)}x | {_num(r['search_time_s'], 0)} |")
        dg = {m: r for m, r in rows.items() if math.isfinite(r.get("graph_effect", {}).get("mean", math.nan))}
        if dg:
            parts += ["", f"### {scale}: DoGraph's own evidence (mean ± sd over seeds)", "",
                      "Model nodes in force: the share of updates in which the model-perceived domains weighted the "
                      "batch (the rest fell back to the human sources). End ARI: at the last analysis probe, the run's "
                      "own clusters (model nodes; k-means of the features for human nodes) against the human sources. Graph effect: the mean over updates of "
                      "‖α − α_graph-off‖₁. ESS: mean effective sample size of the loss weights (share of the micro-batch). "
                      "Realised gap: the mean over the windows the model nodes drew of ‖window's cluster mixture − α‖₁; tolerance: "
                      "the part the source weights cannot express plus a window's sampling noise (sampling through "
                      "sources realises α when the gap is within it).", "",
                      "| method | model nodes in force | end ARI (clusters vs sources) | graph effect | ESS | realised gap | tolerance |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for m, r in dg.items():
                parts.append(f"| {m} | {fmt_pm(r['in_force'], 2)} | {fmt_pm(r['end_ari'], 2)} | "
                             f"{fmt_pm(r['graph_effect'], 3)} | {fmt_pm(r['ess'], 2)} | "
                             f"{fmt_pm(r['realised_gap'], 2)} | {fmt_pm(r['realised_tolerance'], 2)} |")
        y = a["yardstick"]
        carried = f"Carried to the later scales as `@best` (the same, uniform and natural left out): " \
                  f"**{a['first_scale_best']}**. " if scale == next(iter(agg)) and a["first_scale_best"] and len(agg) > 1 else ""
        parts += ["", f"Best baseline (lowest worst-domain loss among non-DoGraph methods): **{a['best_baseline']}**. "
                  f"{carried}"
                  f"Compute yardstick (uniform at 2x tokens, seeds {y['seeds']}) minus uniform: mean "
                  f"{_num(y['delta']['val_mean'], sign=True)}, worst {_num(y['delta']['val_worst'], sign=True)}, "
                  f"held-out {_num(y['delta']['heldout'], sign=True)}.", *_data_order_line(a.get("data_order")), "",
                  f"### {scale}: paired differences by seed (method − reference; negative = better loss; "
                  "mean ± sd [95% CI] (paired t-test p, q))", "",
                  "q is p adjusted for the number of methods compared with the same reference on the same column "
                  "(Benjamini-Hochberg): with many rows some p fall below 0.05 by chance, and q < 0.05 bounds the "
                  "expected share of such chance findings among the rows called significant.", "",
                  "| method | vs | Δ mean | Δ worst | Δ held-out | Δ last-word acc |",
                  "|---|---|---:|---:|---:|---:|"]
        for m, d in diffs.items():
            for ref in REFERENCES:
                if ref in d:
                    name = {"uniform": "uniform", "best": f"best ({a['best_baseline']})",
                            "first_best": f"{next(iter(agg))}'s carried best ({a['first_scale_best']})",
                            "parent": f"parent ({a['parents'].get(m)})"}[ref]
                    parts.append(f"| {m} | {name} | {_diff(d[ref]['val_mean'])} | {_diff(d[ref]['val_worst'])} | "
                                 f"{_diff(d[ref]['heldout'])} | {_diff(d[ref]['last_word'])} |")
        parts += ["", f"### {scale}: against the compute yardstick, and steps to uniform's final mean loss "
                  f"({_num(a['uniform_final_mean'])})", "",
                  "| method | gain / 2x gain (mean) | (worst) | (held-out) | steps to reach | seeds reaching |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m, d in diffs.items():
            g, s = d["gain_fraction"], d["steps_to_uniform"]
            parts.append(f"| {m} | {_num(g['val_mean'], 2, True)} | {_num(g['val_worst'], 2, True)} | "
                         f"{_num(g['heldout'], 2, True)} | {_num(s['mean'], 0)} | {s['reached']}/{s['n']} |")
        parts.append("")
    return "\n".join(parts)


LIVE = "gradient (live)"  # DoGraph's nodes: model, re-clustered during training


def cell_of(method: str, spec: Mapping[str, Any]) -> tuple[str, str]:
    """``(partition, mixer)`` of a method's params: the partition it names (``human`` if none; DoGraph with
    ``nodes: model`` is the live gradient partition) and its mixer type (for DoGraph, its ``rule``: on the
    live clusters ``rule: uniform`` is uniform over the nodes, ``rule: rnb`` R&B)."""
    mixer = str(spec.get("type", method))
    if mixer == "dograph":
        mixer = str(spec.get("rule") or "dograph")
        if spec.get("nodes") == "model":
            return LIVE, mixer
    return str(spec.get("partition") or "human"), mixer


def partition_markdown(agg: dict[str, Any], methods: Mapping[str, Mapping[str, Any]],
                       partitions: Mapping[str, Mapping[str, Any]]) -> str:
    """Partitions x mixers: each partition's quality, then per scale and metric a grid of the cells'
    seed means with the paired difference against uniform over the sources (``Δ``, with the t-test p)."""
    parts = ["| partition | kind | nodes | balance (smallest / largest node) | entropy | ARI vs sources | NMI vs sources |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, q in partitions.items():
        parts.append(f"| {name} | {q.get('kind', '?')} | {q.get('nodes', '–')} | {_num(q.get('balance'), 2)} | "
                     f"{_num(q.get('entropy'), 2)} | {_num(q.get('ari'), 2)} | {_num(q.get('nmi'), 2)} |")
    for scale, a in agg.items():
        cells: dict[tuple[str, str], str] = {}
        for m in a["rows"]:
            if m in methods:
                part, mixer = cell_of(m, methods[m])
                if (part, mixer) in cells:  # two methods in one cell (e.g. DoGraph's rule uniform beside plain
                    mixer = f"{mixer} ({m})"  # uniform): each gets a column, none is dropped
                cells[part, mixer] = m
        rows_ = list(dict.fromkeys(p for p, _ in cells))
        cols = list(dict.fromkeys(x for _, x in cells))
        if len(rows_) < 2:
            continue
        for metric, label in (("val_worst", "worst val loss"), ("val_mean", "mean val loss"), ("heldout", "held-out loss")):
            parts += ["", f"**{scale}, {label}**: seed mean (Δ against uniform over the sources, paired by seed; p)", "",
                      "| partition | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for prow in rows_:
                line = []
                for col in cols:
                    m = cells.get((prow, col))
                    if m is None:
                        line.append("")
                        continue
                    d = a["diffs"].get(m, {}).get("uniform", {}).get(metric)
                    delta = f" ({d['mean']:+.3f}; p {fmt_p(d['p'])})" if d and d.get("n") else ""
                    line.append(f"{_num(a['rows'][m][metric]['mean'])}{delta}")
                parts.append(f"| {prow} | " + " | ".join(line) + " |")
    return "\n".join(parts)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100, **kwargs: Any) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **kwargs)
    pyplot().close(fig)
    return path


def method_color(method: str) -> str:
    """One colour per method in every panel and plot (tab10, in the order of METHOD_ORDER)."""
    names = METHOD_ORDER
    i = names.index(method) if method in names else len(names) + sum(map(ord, method))
    return f"C{i % 10}"


def plot_curves(records: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Seed-mean validation curves per method: mean, worst and held-out loss, one row per scale."""
    plt = pyplot()
    scales = list(dict.fromkeys(r["scale"] for r in records))
    if not scales:
        return None
    keys = (("val_mean", "mean val loss"), ("val_worst", "worst val loss"), ("heldout", "held-out loss"))
    fig, axes = plt.subplots(len(scales), 3, figsize=(13, 3.4 * len(scales)), squeeze=False)
    for i, scale in enumerate(scales):
        methods = list(dict.fromkeys(r["method"] for r in records if r["scale"] == scale))
        for m in methods:
            runs = [r for r in records if r["scale"] == scale and r["method"] == m]
            steps = sorted({c["step"] for r in runs for c in r["curves"]})
            for j, (k, label) in enumerate(keys):
                ys = []
                for st in steps:
                    vals = []
                    for r in runs:
                        c = next((c for c in r["curves"] if c["step"] == st), None)
                        if c is None:
                            continue
                        v = (sum(c["heldout_loss"].values()) / len(c["heldout_loss"])) if k == "heldout" and c["heldout_loss"] else c.get(k)
                        if _ok(v):
                            vals.append(float(v))
                    ys.append(sum(vals) / len(vals) if vals else math.nan)
                axes[i][j].plot(steps, ys, label=m, color=method_color(m), linestyle="--" if m == "uniform_2x" else "-")
                axes[i][j].set_title(f"{scale}: {label}", fontsize=9)
                axes[i][j].set_xlabel("step")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_domain_deltas(records: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Per-domain final validation loss minus uniform's (seed means), one panel per scale."""
    plt = pyplot()
    scales = [s for s in dict.fromkeys(r["scale"] for r in records)
              if any(r["method"] == "uniform" and r["scale"] == s for r in records)]
    if not scales:
        return None
    fig, axes = plt.subplots(len(scales), 1, figsize=(12, 3.6 * len(scales)), squeeze=False)
    for ax, scale in zip(axes[:, 0], scales):
        rs = [r for r in records if r["scale"] == scale and r["role"] == "main"]
        held = sorted({d for r in rs for d in r["heldout_loss"]})
        domains = list(rs[0]["val_loss"]) + held

        def mean_loss(runs, d):
            vals = [(r["val_loss"].get(d, r["heldout_loss"].get(d))) for r in runs]
            vals = [v for v in vals if _ok(v)]
            return sum(vals) / len(vals) if vals else math.nan

        uni = [r for r in rs if r["method"] == "uniform"]
        methods = [m for m in dict.fromkeys(r["method"] for r in rs) if m != "uniform"]
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            runs = [r for r in rs if r["method"] == m]
            ys = [mean_loss(runs, d) - mean_loss(uni, d) for d in domains]
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(domains))], ys, width=width, label=m,
                   color=method_color(m))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(domains)), [d + (" (held out)" if d in held else "") for d in domains], fontsize=8)
        ax.set_ylabel("loss − uniform (nats)")
        ax.set_title(f"{scale}: final validation loss per domain against uniform (seed means; below 0 = better)", fontsize=9)
        if methods:
            ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path)


def write_figure1(records: Iterable[Mapping[str, Any]], out: Path) -> Optional[Path]:
    """The paper's Figure 1 in numbers over seeds: per scale and DoGraph method, the alignment of gradient
    clusters with the human sources at each analysis probe (``mixer/plots/alignment.csv`` of every run
    in ``records``, which need ``scale``, ``method`` and ``dir``), as ``figure1.md`` (mean ± sd over
    seeds) and ``figure1.png`` under ``out``. Returns the markdown's path, None without any probe."""
    cols = ("kmeans_ari", "kmeans_nmi", "labels_ari", "separation", "silhouette", "self_ari", "null_self_ari",
            "best_excess")
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for r in records:
        f = Path(r.get("dir") or "") / "mixer" / "plots" / "alignment.csv"
        if r.get("role", "main") != "main" or not r.get("dir") or not f.is_file():
            continue
        scale, method = str(r["scale"]), str(r["method"])
        for row in csv.DictReader(f.read_text().splitlines()):
            groups.setdefault((scale, method), {}).setdefault(int(row["step"]), []).append(row)
    if not groups:
        return None
    lines = ["# Are gradient domains the human sources? (Figure 1 in numbers)", "",
             "Per analysis probe (the same 256 training windows, stratified over the sources, at step 0 = the "
             "model at initialisation and at each quarter of the run): k-means of the centred, unit-normalised "
             "gradient features against the sources (ARI, NMI), the run's own live clusters against the sources "
             "(model nodes), the within-minus-between-source mean cosine, the silhouette by source, and whether "
             "the features hold clusters at all (k-means' agreement with itself at the run's K, the same on "
             "clouds of the features' spread without clusters, and the largest excess over that null at any K "
             "from 2 to the run's; `mixer/plots/alignment.md` of each run says how to read it). Mean ± sd "
             "over seeds.", ""]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.4), squeeze=False)
    for ax, ((scale, method), by_step) in zip(axes[0], sorted(groups.items())):
        lines += [f"## {scale} / {method}", "", "| step | seeds | " + " | ".join(cols) + " |",
                  "|---:|---:|" + "---:|" * len(cols)]
        steps = sorted(by_step)
        stats = {c: [mean_std(float(r[c]) if r.get(c, "") not in ("", "nan") else math.nan for r in by_step[s])
                     for s in steps] for c in cols}
        for i, s in enumerate(steps):
            lines.append(f"| {s} | {len(by_step[s])} | " + " | ".join(fmt_pm(stats[c][i]) for c in cols) + " |")
        lines.append("")
        for c in ("kmeans_ari", "kmeans_nmi", "labels_ari", "separation", "best_excess"):
            ys = [x["mean"] for x in stats[c]]
            ax.plot(steps, ys, marker="o", label=c)
        ax.set_title(f"{scale} / {method}", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    with atomic_path(out / "figure1.md") as tmp:
        tmp.write_text("\n".join(lines))
    save_figure(fig, out / "figure1.png", dpi=110, bbox_inches="tight")
    return out / "figure1.md"
