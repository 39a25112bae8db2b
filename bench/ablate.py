"""Ablations of DoGraph's choices at nano, as one command and one table.

    .venv/bin/python bench/ablate.py                  # 3 seeds, the cpu preset's nano budget
    .venv/bin/python bench/ablate.py --seeds 0        # one seed (a first look)
    .venv/bin/python bench/ablate.py --reuse runs/compare/cpu   # reuse the comparison's finished runs
    .venv/bin/python bench/ablate.py --preset long --variants dograph_model_loss --reuse runs/compare/long
                                                      # chosen rows at the long preset's 4x budget

Each variant changes one setting of a DoGraph default (``params.yaml`` ``methods:``) or of another
variant, and is compared by seed with the run it changes (paired differences, paired t-test). Every
part of the method has a row that removes it:

* nodes: human sources vs model-perceived domains (the two defaults, also against uniform);
* the graph: off (the transfer matrix is the identity), for both node modes and both ways model
  domains act; the F3 Laplacian constraint (off by default) at ``rho: 1.0`` or tight (``0.25``);
  F2 (weighted max-min) for F1 and no noise shrinkage (``shrink: false``), both measured against
  ``rho: 1.0`` (the default when they were run);
* the progress signal: model-node progress from the training windows instead of the fixed probe
  (``progress_from: batch``), or a probe of 32 sequences instead of 96 (``progress_probe: 32``; both
  are the cost issue's levers: the probe is most of model-node DoGraph's overhead); a uniform prior
  over clusters instead of their base frequency (``prior: uniform``, against tempered loss weights
  with ``rho: 1.0``);
* the sketch's size: d = 64 x 128 = 8192 instead of 32 x 64 = 2048 (``wide``: clusterings that stay
  stable across projection seeds longer, at about twice the sketch's cost: its main product grows with r1);
* cost: online features for 4 sequences of each micro-batch (``feature_sequences: 4``), progress from
  the training windows and a re-clustering every 250 steps instead of 100, together (``cheap``);
* model-perceived domains: frozen between re-clusterings (``live: false``) vs live; no occupancy guard
  (``balance: 0``); K = 4; exact per-example gradients (``features: exact``);
* how model-perceived domains act: sampling through the cluster x source table (default) vs tempered
  loss weights (``apply: loss``);
* A1 with an explicit target: the held-out domain (``target: email``; that row's held-out loss is no
  longer held out: the method saw the domain's training text).

Runs are resumable like the comparison's; results go to ``docs/results/ablation/``
(``ablation.json`` with every run, ``ablation.md``). Ends with one line of JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import ensure_data, load_setup, schedule  # noqa: E402
from compare_plan import plan  # noqa: E402
from compare_presets import PRESETS, Preset, tiny  # noqa: E402
from compare_tables import collect  # noqa: E402

# variant -> (the run it is compared with, the setting changed, the change); a variant's settings are
# its parent's plus the change, so a parent may itself be a variant (defined above it)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "dograph_human_graph_off": ("dograph_human", "graph", {"graph": "off"}),
    "dograph_human_F3": ("dograph_human", "F3 constraint", {"rho": 1.0}),
    "dograph_human_F3_tight": ("dograph_human", "F3 constraint", {"rho": 0.25}),
    "dograph_human_F2": ("dograph_human_F3", "objective", {"objective": "F2"}),
    "dograph_human_no_shrink": ("dograph_human_F3", "progress noise", {"shrink": False}),
    "dograph_human_A1_email": ("dograph_human", "objective (targeted)", {"objective": "A1", "target": "email"}),
    "dograph_model_graph_off": ("dograph_model", "graph", {"graph": "off"}),
    "dograph_model_loss": ("dograph_model", "how clusters act", {"apply": "loss"}),
    "dograph_model_loss_graph_off": ("dograph_model_loss", "graph", {"graph": "off"}),
    "dograph_model_loss_F3": ("dograph_model_loss", "F3 constraint", {"rho": 1.0}),
    "dograph_model_prior_uniform": ("dograph_model_loss_F3", "progress prior", {"prior": "uniform"}),
    "dograph_model_batch_progress": ("dograph_model", "progress source", {"progress_from": "batch"}),
    "dograph_model_probe32": ("dograph_model", "progress probe size", {"progress_probe": 32}),
    "dograph_model_wide": ("dograph_model", "sketch size", {"r1": 64, "r2": 128}),
    "dograph_model_cheap": ("dograph_model", "cost levers", {"feature_sequences": 4, "progress_from": "batch",
                                                             "recluster_every": 250}),
    "dograph_model_fixed": ("dograph_model", "live clusters", {"live": False}),
    "dograph_model_no_balance": ("dograph_model", "occupancy guard", {"balance": 0.0}),
    "dograph_model_k4": ("dograph_model", "K", {"k": 4}),
    "dograph_model_exact": ("dograph_model", "feature path", {"features": "exact"}),
}
DEFAULTS = ("uniform", "dograph_human", "dograph_model")


def ablation_preset(seeds: list[int], dry_tiny: bool, budget: str = "cpu", variants: Optional[list[str]] = None) -> Preset:
    """The ablation's runs at nano with the budget (steps, train settings) of the comparison preset ``budget``."""
    base = PRESETS[budget]
    unknown = sorted(set(variants or []) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    names = [*DEFAULTS, *(variants or VARIANTS)]
    p = replace(base, name="ablation", scales={"nano": names}, seeds={"nano": seeds}, yardstick_seeds={},
                method_overrides={}, search_steps=None, scale_train={})
    if dry_tiny:
        t = tiny(p)
        p = replace(t, name="ablation", seeds={"nano": seeds[:1]}, yardstick_seeds={})
    return p


def ablation_methods(methods: dict, preset: Preset) -> dict:
    out = {m: {**v, **preset.method_overrides.get(m, {})} for m, v in methods.items()}
    for name, (parent, _, change) in VARIANTS.items():
        out[name] = {**out[parent], **change}
    return out


def reuse(src: Path, work: Path, units) -> int:
    """Link the finished runs of ``src`` whose unit key and training config match."""
    n = 0
    for u in units:
        s, d = Path(src) / u.key, work / u.key
        spec = Path(src) / "specs" / (u.key.replace("/", "__") + ".json")
        if d.exists() or not (s / "summary.json").is_file() or not spec.is_file():
            continue
        old = json.loads(spec.read_text())
        new = json.loads(u.to_json())  # the same JSON round trip (tuples become lists)
        if old.get("train") != new["train"] or old.get("mixer") != new["mixer"]:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(s.resolve(), d)
        n += 1
    return n


def table(records: list[dict]) -> tuple[str, list[dict]]:
    from dograph_core.stats import fmt_p, fmt_pm, mean_std, paired

    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    rows, lines = [], [
        "| variant | setting | vs | seeds | mean val loss | worst val loss | held-out loss | Δ mean | Δ worst | Δ held-out "
        "| model nodes in force | end ARI (clusters vs sources) | graph effect ‖α−α_off‖₁ | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = [*DEFAULTS, *VARIANTS]
    for name in [n for n in order if n in by]:
        parent, setting, change = VARIANTS.get(name, ("uniform" if name != "uniform" else None, "nodes" if name != "uniform" else "reference", {}))
        runs = by[name]
        row = {"variant": name, "setting": setting, "vs": parent, "change": change, "seeds": sorted(r["seed"] for r in runs)}
        cells = []
        for k in ("val_mean", "val_worst", "heldout", "train_time_s", "in_force", "end_ari", "graph_effect"):
            row[k] = mean_std(r.get(k, float("nan")) for r in runs)
        for k in ("val_mean", "val_worst", "heldout"):
            if parent and parent in by:
                d = paired({r["seed"]: r[k] for r in runs}, {r["seed"]: r[k] for r in by[parent]})
                row[f"d_{k}"] = d
                sd = f" ± {d['std']:.3f}" if d["n"] > 1 else ""
                cells.append(f"{d['mean']:+.3f}{sd} (p {fmt_p(d['p'])})" if d["n"] else "–")
            else:
                cells.append("–")
        rows.append(row)
        label = ", ".join(f"{k}={v}" for k, v in change.items()) or setting
        held = fmt_pm(row['heldout']) + (" (not held out)" if change.get("target") == "email" else "")
        lines.append(f"| {name} | {label} | {parent or '–'} | {len(runs)} | {fmt_pm(row['val_mean'])} | {fmt_pm(row['val_worst'])} | "
                     f"{held} | {cells[0]} | {cells[1]} | {cells[2]} | {fmt_pm(row['in_force'], 2)} | "
                     f"{fmt_pm(row['end_ari'], 2)} | {fmt_pm(row['graph_effect'], 3)} | {fmt_pm(row['train_time_s'], 0)} |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--preset", default="cpu", choices=["cpu", "long"], help="the comparison preset whose budget the runs use")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", default=None, help="a comparison work dir whose identical runs are linked, not re-run")
    ap.add_argument("--dry-tiny", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v for v in args.variants.split(",") if v.strip()] if args.variants else None
    preset = ablation_preset(seeds, args.dry_tiny, args.preset, variants)
    suffix = ("-tiny" if args.dry_tiny else "") + ("" if args.preset == "cpu" else f"-{args.preset}")
    work = Path(args.work or ROOT / "runs" / "compare" / f"ablation{suffix}").resolve()
    out = Path(args.out or ROOT / "docs" / "results" / f"ablation{suffix}").resolve()
    methods, base = load_setup(args.params)
    methods = ablation_methods(methods, preset)
    units, _ = plan(preset, methods, base, work)
    if args.reuse:
        print(f"reused {reuse(Path(args.reuse), work, units)} finished runs from {args.reuse}")
    if not args.report_only:
        data = Path(args.data).resolve() if args.data else ensure_data(args.params, ROOT / "runs" / "compare" / "data")
        schedule(preset, methods, base, work, str(data), args.workers, None)
    records = collect(work, units, lambda *_: float("nan"))
    from dograph_core.io import atomic_path, write_json

    text, rows = table(records)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", "bench/ablate.py", *(argv if argv is not None else sys.argv[1:])])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ablation.json", {"meta": {"command": command, "date": now, "train": preset.train, "steps": preset.steps},
                                       "rows": rows, "runs": records})
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(f"# DoGraph ablations at nano\n\nCommand: `{command}`  \nDate: {now}; "
                       f"{len(records)} of {len(units)} runs finished; {preset.steps} steps per run.\n\n"
                       "Δ columns: paired by seed against the default named under *vs* (negative = lower loss).\n\n"
                       f"{text}\n")
    print(f"results in {out}")
    best = min(rows, key=lambda r: r["val_worst"]["mean"]) if rows else None
    print(json.dumps({"bench": "ablate", "runs": len(records), "best_worst": best and best["variant"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
