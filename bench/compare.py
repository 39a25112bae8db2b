"""The method comparison across scales and seeds, as one command.

    .venv/bin/python bench/compare.py --preset quick      # a first look (nano, 1 seed)
    .venv/bin/python bench/compare.py --preset cpu        # nano (7 methods) + micro (5), 3 seeds
    .venv/bin/python bench/compare.py --preset gpu --data DIR --out $OUT   # one GPU: small, medium
    .venv/bin/python bench/compare.py --preset long --seeds 0,1,2,3,4 --methods uniform,odm,dograph_human \
        --out docs/results/long-5seeds                                    # more seeds for a few methods

Every training run is a separate process (``--workers`` at a time). Runs live in ``--work``
(default ``runs/compare/<preset>``); a re-run skips finished runs and resumes unfinished ones.
Results go to ``--out`` (default ``docs/results/<preset>``): ``runs.json`` (every run),
``tables.md``, ``summary.json`` (the aggregated numbers), ``loss_curves.png``, ``weights.png``,
``domain_deltas.png`` (per-domain loss against uniform),
``pca_by_source.png`` (DoGraph's gradient PCA on this corpus) and ``logs.tar.gz``.
``--report-only`` rewrites the results from what has finished. The last line printed is one
line of JSON with the headline ratio (DoGraph's worst-domain loss over the best baseline's).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_plan import Unit, is_done, plan, run_unit, search_cost  # noqa: E402
from compare_presets import PRESETS, Preset, tiny  # noqa: E402


def load_setup(params_path: str) -> tuple[dict, dict]:
    """Method definitions and the base train section of ``params.yaml``."""
    from dograph_core.config import load_params

    p = load_params(params_path)
    return {k: v.model_dump() for k, v in p.methods.items()}, p.train.model_dump()


def ensure_data(params_path: str, data_root: Path) -> Path:
    """The default corpus, prepared and tokenized once under ``data_root`` (skipped if present)."""
    tok = data_root / "tokenized"
    if (tok / "corpus.json").is_file():
        return tok
    from dograph_core.config import load_params
    from dograph_core.data.prepare import prepare
    from dograph_core.data.tokenize import tokenize

    p = load_params(params_path, None, [f"prepare.out_dir={data_root / 'prepared'}", f"tokenize.out_dir={tok}"])
    prepare(p.prepare, progress=True)
    tokenize(p.prepare.out_dir, p.tokenize, cache_dir=p.prepare.cache_dir, progress=True)
    return tok


def _log_name(key: str) -> str:
    return key.replace("/", "__") + ".log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie (finished, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def locked_elsewhere(work: Path, key: str, mine: set[int]) -> bool:
    """True when another driver's live process is running ``key`` (its PID is in ``locks/``)."""
    f = work / "locks" / (_log_name(key)[:-4] + ".pid")
    try:
        pid = int(f.read_text().strip())
    except (OSError, ValueError):
        return False
    return pid not in mine and _alive(pid)


def schedule(preset: Preset, methods: dict, base: dict, work: Path, data: str, workers: int,
             deadline_s: float | None, echo=print) -> list[Unit]:
    """Run every unit not yet finished, ``workers`` processes at a time, dependencies first."""
    t0 = time.time()
    running: dict[str, tuple[subprocess.Popen, Unit, float]] = {}
    failed: set[str] = set()
    idle = False
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "specs").mkdir(parents=True, exist_ok=True)
    while True:
        units, unresolved = plan(preset, methods, base, work)
        mine = {proc.pid for proc, _, _ in running.values()}
        todo = [u for u in units if not is_done(work, u.key) and u.key not in running and u.key not in failed]
        elsewhere = {u.key for u in todo if locked_elsewhere(work, u.key, mine)}
        todo = [u for u in todo if u.key not in elsewhere]
        blocked = {u.key for u in todo if any(n in failed for n in u.needs)}
        ready = sorted((u for u in todo if u.key not in blocked and all(is_done(work, n) for n in u.needs)),
                       key=lambda u: u.priority)
        late = deadline_s is not None and time.time() - t0 > deadline_s
        while ready and len(running) + len(elsewhere) < workers and not late:
            u = ready.pop(0)
            spec = work / "specs" / (_log_name(u.key)[:-4] + ".json")
            spec.write_text(u.to_json())
            env = dict(os.environ)
            th = u.train.get("threads")
            if th:
                env.update(OMP_NUM_THREADS=str(th), MKL_NUM_THREADS=str(th))
            log = open(work / "logs" / _log_name(u.key), "a")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-unit", str(spec), "--data", data, "--work", str(work)]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
            running[u.key] = (proc, u, time.time())
            log.close()
            (work / "locks").mkdir(exist_ok=True)
            (work / "locks" / (_log_name(u.key)[:-4] + ".pid")).write_text(str(proc.pid))
            echo(f"[{time.strftime('%H:%M:%S')}] start {u.key} ({len(running)} running, {len(todo)} to do)")
        if not running:
            if elsewhere:  # another driver is running some units: wait for them
                time.sleep(10)
                continue
            if todo and not late:
                echo(f"nothing runnable: {len(todo)} units wait on failed units {sorted(failed)}")
            if late and todo:
                echo(f"deadline of {deadline_s:.0f}s reached: {len(todo)} units not started")
            if unresolved and not failed and not late and not idle:
                idle = True  # the placeholder's inputs just finished: plan once more
                continue
            return units
        idle = False
        time.sleep(2)
        for key, (proc, u, ts) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[key]
            if rc == 0 and is_done(work, key):
                echo(f"[{time.strftime('%H:%M:%S')}] done  {key} in {time.time() - ts:.0f}s")
            else:
                failed.add(key)
                echo(f"[{time.strftime('%H:%M:%S')}] FAILED {key} (exit {rc}); see {work / 'logs' / _log_name(key)}")


def write_results(preset: Preset, methods: dict, base: dict, work: Path, out: Path, command: str) -> dict:
    """runs.json, tables.md, summary.json and the plots under ``out`` (at most 8 files)."""
    from compare_tables import aggregate, collect, markdown, plot_curves, plot_domain_deltas

    from dograph_core import report
    from dograph_core.io import atomic_path, write_json

    units, _ = plan(preset, methods, base, work)
    records = collect(work, units, search_cost)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        print("no finished runs yet; nothing to report")
        return {}
    agg = aggregate(records)
    searches = {u.method: json.loads((work / u.key / "search_cost.json").read_text())
                for u in units if u.key.startswith("search/") and is_done(work, u.key)}
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"preset": preset.name, "command": command, "date": now, "steps": preset.steps,
            "train": preset.train, "searches": searches,
            "runs_finished": len(records), "runs_planned": sum(1 for u in units if not u.key.startswith("search/"))}
    write_json(out / "runs.json", {"meta": meta, "runs": records})
    write_json(out / "summary.json", {"meta": meta, "scales": agg})
    search_lines = [f"- {m}: searched at {s['scale']} for {s['steps']} steps ({s['tokens']:,} tokens over "
                    f"{len(s['runs'])} run(s)), {s['wall_time_s']:.0f} s wall on {s.get('device', '?')}" for m, s in searches.items()]
    text = "\n".join([
        f"# Method comparison: preset `{preset.name}`", "",
        f"Command: `{command}`  ", f"Date: {now}; {meta['runs_finished']} of {meta['runs_planned']} training runs finished.", "",
        f"Training: {json.dumps(preset.train)}; {preset.steps} steps per run at every scale (equal tokens).", "",
        "Offline searches (their cost):" if search_lines else "", *search_lines, "",
        markdown(agg)])
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text(text)
    plot_curves(records, out / "loss_curves.png")
    plot_domain_deltas(records, out / "domain_deltas.png")
    firsts = [r for r in records if r["seed"] == min(x["seed"] for x in records if x["scale"] == r["scale"])]
    report.plot_weights({"domains": records[0]["domains"], "runs": firsts}, out / "weights.png")
    pca = sorted(work.glob("*/dograph_human/s*/mixer/plots/pca_by_source.png"))
    if pca:
        shutil.copy2(pca[0], out / "pca_by_source.png")
    write_figure1(work, out)
    with atomic_path(out / "logs.tar.gz") as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted((work / "logs").glob("*.log")):
                tar.add(f, arcname=f"logs/{f.name}")
            for f in sorted(work.glob("**/dograph_log.jsonl")):
                tar.add(f, arcname=f"dograph_logs/{f.relative_to(work)}")
            for f in sorted(work.glob("search/*/weights.json")):
                tar.add(f, arcname=str(f.relative_to(work)))
    return {"meta": meta, "scales": agg}


def write_figure1(work: Path, out: Path) -> None:
    """The paper's Figure 1 in numbers over seeds: per scale and DoGraph method, the alignment of gradient
    clusters with the human sources at each analysis probe (``alignment.csv`` of every run), as
    ``figure1.md`` (mean ± sd over seeds) and ``figure1.png``."""
    import csv

    from dograph_core.io import atomic_path
    from dograph_core.stats import fmt_pm, mean_std

    cols = ("kmeans_ari", "kmeans_nmi", "labels_ari", "separation", "silhouette")
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for f in sorted(work.glob("*/dograph_*/s*/mixer/plots/alignment.csv")):
        scale, method = f.parts[-6], f.parts[-5]
        for row in csv.DictReader(f.read_text().splitlines()):
            groups.setdefault((scale, method), {}).setdefault(int(row["step"]), []).append(row)
    if not groups:
        return
    lines = ["# Are gradient domains the human sources? (Figure 1 in numbers)", "",
             "Per analysis probe (the same 256 training windows, stratified over the sources, at step 0 = the "
             "model at initialisation and at each quarter of the run): k-means of the centred, unit-normalised "
             "gradient features against the sources (ARI, NMI), the run's own live clusters against the sources "
             "(model nodes), the within-minus-between-source mean cosine and the silhouette by source. Mean ± sd "
             "over seeds.", ""]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.4), squeeze=False)
    for ax, ((scale, method), by_step) in zip(axes[0], sorted(groups.items())):
        lines += [f"## {scale} / {method}", "", "| step | seeds | " + " | ".join(cols) + " |",
                  "|---:|---:|" + "---:|" * len(cols)]
        steps = sorted(by_step)
        stats = {c: [mean_std(float(r[c]) if r[c] not in ("", "nan") else math.nan for r in by_step[s]) for s in steps]
                 for c in cols}
        for i, s in enumerate(steps):
            lines.append(f"| {s} | {len(by_step[s])} | " + " | ".join(fmt_pm(stats[c][i]) for c in cols) + " |")
        lines.append("")
        for c in ("kmeans_ari", "kmeans_nmi", "labels_ari", "separation"):
            ys = [x["mean"] for x in stats[c]]
            ax.plot(steps, ys, marker="o", label=c)
        ax.set_title(f"{scale} / {method}", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    with atomic_path(out / "figure1.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(out / "figure1.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def narrow(preset: Preset, seeds: str | None, methods: str | None, error) -> Preset:
    """The preset with other seeds at every scale and/or a subset of its methods (``--seeds``, ``--methods``)."""
    if seeds:
        try:
            ss = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            error(f"--seeds {seeds!r}: expected comma-separated integers")
        preset = replace(preset, seeds={k: ss for k in preset.scales})
    if methods:
        wanted = [x.strip() for x in methods.split(",") if x.strip()]
        known = {m for ms in preset.scales.values() for m in ms}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            error(f"--methods {unknown}: not in preset {preset.name!r} (its methods: {sorted(known)})")
        preset = replace(preset, scales={k: [m for m in v if m in wanted] for k, v in preset.scales.items()})
    return preset


def headline(agg: dict) -> dict:
    """DoGraph's best mode vs the best baseline on worst-domain loss, at the first scale."""
    if not agg:
        return {"bench": "compare", "ratio": None}
    scale, a = next(iter(agg.items()))
    rows, best = a["rows"], a["best_baseline"]
    dg = [m for m in ("dograph_human", "dograph_model") if m in rows]
    if not dg or best is None:
        return {"bench": "compare", "scale": scale, "ratio": None}
    m = min(dg, key=lambda k: rows[k]["val_worst"]["mean"])
    return {"bench": "compare", "scale": scale, "method": m, "baseline": best,
            "ratio": rows[m]["val_worst"]["mean"] / rows[best]["val_worst"]["mean"],
            "delta_worst": rows[m]["val_worst"]["mean"] - rows[best]["val_worst"]["mean"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--data", default=None, help="a tokenized corpus (default: the default corpus under runs/compare/data)")
    ap.add_argument("--work", default=None, help="run directories (default runs/compare/<preset>)")
    ap.add_argument("--out", default=None, help="results (default docs/results/<preset>)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--deadline-s", type=float, default=None, help="stop starting new runs after this many seconds")
    ap.add_argument("--search-from", default=None, help="a work dir whose search/<method>/ results are reused (transfer)")
    ap.add_argument("--scales", default=None, help="comma-separated subset of the preset's scales (e.g. nano)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for every scale (default: the preset's)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the preset's methods (e.g. more seeds for a few)")
    ap.add_argument("--no-yardstick", action="store_true", help="skip the compute yardstick (uniform at 2x the budget)")
    ap.add_argument("--dry-tiny", action="store_true", help="the preset's plan on nano and a few CPU steps (a logic check)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--run-unit", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_unit:
        run_unit(Unit(**json.loads(Path(args.run_unit).read_text())), args.data, Path(args.work))
        return 0
    preset = PRESETS[args.preset]
    if args.dry_tiny:
        preset = tiny(preset)
    if args.scales:
        wanted = [x.strip() for x in args.scales.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in preset.scales]
        if unknown:
            ap.error(f"--scales {unknown}: not in preset {preset.name!r} (its scales: {list(preset.scales)})")
        preset = replace(preset, scales={k: v for k, v in preset.scales.items() if k in wanted},
                         best_from=preset.best_from or next(iter(preset.scales)))
    if args.seeds or args.methods:
        preset = narrow(preset, args.seeds, args.methods, ap.error)
    if args.no_yardstick:
        preset = replace(preset, yardstick_seeds={})
    suffix = "-tiny" if args.dry_tiny else ""
    work = Path(args.work or ROOT / "runs" / "compare" / f"{preset.name}{suffix}").resolve()
    out = Path(args.out or ROOT / "docs" / "results" / f"{preset.name}{suffix}").resolve()
    methods, base = load_setup(args.params)
    command = " ".join(["python", "bench/compare.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:
        data = Path(args.data).resolve() if args.data else ensure_data(args.params, ROOT / "runs" / "compare" / "data")
        if args.search_from:
            for src in sorted(Path(args.search_from).glob("search/*/search_cost.json")):
                dst = work / "search" / src.parent.name
                if not is_done(work, f"search/{src.parent.name}"):
                    dst.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src.parent / "weights.json", dst / "weights.json")
                    shutil.copy2(src, dst / "search_cost.json")
        deadline = args.deadline_s if args.deadline_s is not None else preset.deadline_s
        schedule(preset, methods, base, work, str(data), args.workers or preset.workers, deadline)
    res = write_results(preset, methods, base, work, out, command)
    print(f"results in {out}")
    print(json.dumps(headline(res.get("scales", {}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
