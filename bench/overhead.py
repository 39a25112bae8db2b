"""DoGraph's overhead over uniform mixing as a ratio measured in one process.

For each scale, one process builds one *arm* per method: the same GPT-2 (same initial weights), the
same corpus, batch and threads, and steps each arm with the training loop's own step code
(``dograph_core.microstep.micro_step``, gradient clip, AdamW, the scheduler, and at every
``update_every``-th step ``mixer.update`` and the sampler's new weights, as ``dograph_core.train``
does). The arms run in interleaved blocks of ``--block-steps`` steps: ``U D1 D2 .. U D1 D2 .. U``,
each block timed with ``time.perf_counter``; a DoGraph block's ratio is its time over the mean of the
uniform blocks before and after it, and the per-step overhead is the median ratio - 1. Load changes
on a shared machine move both sides of a ratio, so the median of ratios is stable where a
ratio of two separate runs is not.

What a DoGraph block contains: the online part, every micro-batch (features, cluster assignment, loss
weights, ``observe``). What is timed apart and amortised: the mixer's events, which a short block
cannot sample fairly (one re-clustering in ``recluster_every`` steps):

* ``update``: every ``update_every`` steps, the graph update (the progress probe re-scored for model
  nodes, the node statistics, the Pyomo solve and the graph-off reference), timed around
  ``mixer.update``; its re-clustering part is subtracted and counted below. The first update is
  left out of ``overhead`` (a one-off: the solver's import, and no clusters yet, so no progress probe;
  ``run_overhead`` counts it once); each arm steps on, untimed, until one more update has been timed;
* ``recluster``: every ``recluster_every`` steps, the clustering probe (``probe_size`` sequences,
  two projections, k-means twice; with ``recluster_from: online`` the training features kept since and
  a probe only for the sources short of them), timed around the mixer's ``_maybe_recluster`` once more
  at the end of each arm (the first, at the first update, finds few training features kept; an online
  arm first steps on, untimed, until every source has its share of them).

Both run at their real cadence inside the DoGraph arms (so the clusters come into force as in a run);
they are amortised over the mixer's own ``update_every`` / ``recluster_every``:
``overhead = median block ratio - 1 + (update_s / T_w + recluster_s / T_c) / uniform step``.
Seconds per 1000 steps are printed for each part. The five analysis probes a run saves (diagnostics,
``analysis_probes``) are turned off in the blocks.

**A run's overhead** (``run_overhead``, ``--run-steps N``, default 250 as the ``cpu`` preset trains) is
what a preset's overhead column measures (the ratio of train times, ``summary.json``'s ``train_time_s``):
the median block ratio plus every event a run of ``N`` steps holds, over ``N`` uniform steps. The
events are counted at the mixer's own cadence and timed here: the first update (a one-off), the first
re-clustering (always a probe of the model), the later updates and re-clusterings. The analysis
probes (Figure 1's panels) are measurement, like the evaluation, and a run's train time leaves them
out (``analysis_time_s``); one is timed after the blocks and their share is printed apart. On a
short run the one-off events weigh, so ``overhead`` and ``run_overhead`` differ; ``--method NAME``
times a method exactly as ``params.yaml`` (and ``--preset``) define it:

    .venv/bin/python bench/overhead.py --scales nano --no-default --method dograph_model --run-steps 250

Variants are DoGraph parameter overrides: ``--variant name:key=value,key=value`` (repeatable);
``default`` (the mixer's own defaults, ``--nodes``) is run unless ``--no-default``.

    .venv/bin/python bench/overhead.py --scales nano --blocks 6 --block-steps 5 \\
        --variant count:sketch=count --variant tok32:feature_tokens=32

On a GPU (every arm on the same device, bf16 autocast as the ``gpu`` preset trains; the timers read
after ``torch.cuda.synchronize``), GPT-2 small and medium shapes:

    python bench/overhead.py --device cuda --dtype bf16 --scales small,medium --batch 32 --seq-len 512 \\
        --vocab 50257 --variant cheap:feature_sequences=8,progress_from=batch,recluster_every=250

(``bench/gpu_check.sh`` runs exactly this and keeps the log.)

Ends with one line of JSON:
``{"bench": "overhead", "overhead": {scale: default's overhead}, "overhead_by_variant": {scale: {name: ...}},
"run_overhead_by_variant": {scale: {name: ...}}, "variants": {scale: {name: {...}}}, scale: {uniform step, ...}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dograph_core.config import TrainConfig  # noqa: E402
from dograph_core.data.corpus import TokenCorpus  # noqa: E402
from dograph_core.microstep import LMLoss, micro_step  # noqa: E402
from dograph_core.mixers import build_mixer  # noqa: E402
from dograph_core.mixers.base import MixerContext, identity_reduce  # noqa: E402
from dograph_core.mixers.dograph import DoGraphMixer  # noqa: E402
from dograph_core.mixers.dograph_config import DoGraphConfig  # noqa: E402
from dograph_core.model import build_model  # noqa: E402
from dograph_core.sampling import MixtureSampler  # noqa: E402
from dograph_core.train import make_optimizer  # noqa: E402

ANALYSIS_DEFAULT = DoGraphConfig.model_fields["analysis_probes"].default_factory()  # a run's, unless set
DEFAULT_DATA = ROOT / "data" / "tokenized"  # the default corpus, as `dograph tokenize` (or make run) writes it


def _sync(device: torch.device) -> None:
    """GPU work is asynchronous: a timer read after a sync counts the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Arm:
    """One method's training state, stepped exactly as ``dograph_core.train`` steps it."""

    def __init__(self, name: str, method: dict, cfg: TrainConfig, corpus, seed: int,
                 device: torch.device = torch.device("cpu"), bf16: bool = False):
        self.name = name
        self.device = device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.scale, corpus.vocab_size, cfg.seq_len, corpus.eot_id).to(device)
        self.cfg = cfg
        ctx = MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=cfg.steps,
                           seq_len=cfg.seq_len, vocab_size=corpus.vocab_size, device=device,
                           seed=cfg.seed, corpus=corpus, heldout_domains=corpus.heldout_domains, out_dir=None,
                           scale=cfg.scale, rank=0, world_size=1, bf16=bf16)
        params = dict(method)
        self.mixer = build_mixer(str(params.pop("type")), params, ctx)
        self.sampler = MixtureSampler({d: corpus.tokens("train", d) for d in corpus.train_domains},
                                      corpus.train_domains, cfg.seq_len, cfg.batch_size,
                                      self.mixer.sampling_weights(), seed=cfg.seed, max_epochs=cfg.max_epochs)
        self.opt, self.sched = make_optimizer(self.model, cfg, device)
        self.fwd = LMLoss(self.model, bf16)
        self.model.train()
        self.step_no = 0
        self.events: dict[str, list[float]] = {"update": [], "recluster": []}
        self._inner: dict[str, float] = {}
        self._wrap("_maybe_recluster", "recluster")
        self._wrap("_probe_progress", "progress_probe")
        self._wrap("_solve", "solve")
        self.parts: dict[str, list[float]] = {"progress_probe": [], "solve": []}

    def _wrap(self, method: str, key: str) -> None:
        fn = getattr(self.mixer, method, None)
        if fn is None:
            return

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._inner[key] = self._inner.get(key, 0.0) + time.perf_counter() - t0

        setattr(self.mixer, method, timed)

    def step(self) -> float:
        """One optimizer step; returns the seconds spent in the mixer's events (update, re-clustering)."""
        self.step_no += 1
        step, cfg = self.step_no, self.cfg
        lr = self.sched.get_last_lr()[0]
        draw = self.sampler.draw(step)
        x = self.sampler.tokens(draw, slice(None)).to(self.device, non_blocking=True)
        dom = torch.from_numpy(draw.domain_ids).to(self.device)
        r = micro_step(self.fwd, self.model, self.mixer, x, dom, step, lr, 1.0)
        float(r.loss), float(r.objective)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        event = 0.0
        if step % self.mixer.update_every == 0:
            self._inner = {}
            _sync(self.device)
            t0 = time.perf_counter()
            new = self.mixer.update(step, identity_reduce)
            if new is not None:
                self.mixer.set_weights(new, step)
            self.sampler.set_weights(self.mixer.sampling_weights())
            _sync(self.device)
            event = time.perf_counter() - t0
            # _maybe_recluster runs at every update and returns at once unless a re-clustering is due:
            # only the calls that re-clustered are re-clustering events (the others stay in the update)
            did = getattr(self.mixer, "_last_try", None) == step
            rec = self._inner.get("recluster", 0.0) if did else 0.0
            self.events["update"].append(event - rec)
            if did:
                self.events["recluster"].append(rec)
            for k in self.parts:
                self.parts[k].append(self._inner.get(k, 0.0))
        self._inner = {}
        return event

    def block(self, n: int) -> float:
        """``n`` steps; seconds without the events (they are amortised separately)."""
        _sync(self.device)
        t0 = time.perf_counter()
        ev = sum(self.step() for _ in range(n))
        _sync(self.device)
        return time.perf_counter() - t0 - ev


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    out: dict[str, Any] = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        out[k.strip()] = json.loads(v) if v.strip()[:1] in "0123456789-[{tfn" else v.strip()
    return name, out


def bench_scale(scale: str, corpus, args, variants: dict[str, dict]) -> dict[str, Any]:
    total = args.warmup + args.blocks * args.block_steps + 1
    cfg = TrainConfig(scale=scale, steps=max(total, 100), batch_size=args.batch, seq_len=args.seq_len,
                      warmup_steps=2, eval_every=0, threads=1 if args.device == "cpu" else None, progress=False,
                      seed=args.seed)
    device, bf16 = torch.device(args.device), args.dtype == "bf16"
    base = {"type": "dograph", "nodes": args.nodes, "plots": False, "analysis_probes": []}
    arms = [Arm("uniform", {"type": "uniform"}, cfg, corpus, args.seed, device, bf16)]
    arms += [Arm(n, {**base, **v}, cfg, corpus, args.seed, device, bf16) for n, v in variants.items()]
    dg = arms[1:]
    t0 = time.perf_counter()
    # warm-up: past the first update (the first re-clustering), so the timed blocks see model nodes in force
    for a in arms:
        for _ in range(args.warmup if a.name != "uniform" else 2):
            a.step()
    uni: list[float] = [arms[0].block(args.block_steps)]
    times: dict[str, list[float]] = {a.name: [] for a in dg}
    for b in range(args.blocks):
        for a in dg:
            times[a.name].append(a.block(args.block_steps))
        uni.append(arms[0].block(args.block_steps))
    # the first update is a one-off (solver import, no clusters yet, so no progress probe): time at least one more
    for a in dg:
        while len(a.events["update"]) < 2:
            a.step()
    # the re-clustering timed is one more at the end of each arm, forced: the first (at the first update)
    # is not the steady state when it reuses training features (`recluster_from: online` has few then)
    for a in dg:
        if hasattr(a.mixer, "_maybe_recluster") and a.mixer.cfg.nodes == "model":
            a.mixer.flush()
            if a.mixer.cfg.recluster_from == "online":  # untimed steps until every source has its rows
                for _ in range(a.mixer.cfg.recluster_every):
                    if all(len(r) >= q for r, q in zip(a.mixer._rows, a.mixer._quota)):
                        break
                    a.step()
                    a.mixer.flush()
            a.first_recluster = a.events["recluster"][0] if a.events["recluster"] else None
            a.mixer._last_try = a.step_no - a.mixer.cfg.recluster_every  # due now (and not the first)
            _sync(a.device)
            t1 = time.perf_counter()
            a.mixer._maybe_recluster(a.step_no, identity_reduce)
            _sync(a.device)
            a.events["recluster"] = [time.perf_counter() - t1]
            if a.first_recluster is None:  # no first re-clustering was seen: count the forced one in its place
                print(f"{scale} {a.name}: no first re-clustering in the warm-up; the run projection counts a "
                      f"later one in its place", file=sys.stderr)
                a.first_recluster = a.events["recluster"][0]
    for a in dg:  # one analysis probe (a run takes len(analysis_steps()) of them; the arms' own are off)
        a.run_probes = variants[a.name].get("analysis_probes", ANALYSIS_DEFAULT)
        a.analysis_s = _time_analysis_probe(a) if a.run_probes else 0.0
    wall = time.perf_counter() - t0
    n = args.block_steps
    u_step = statistics.median(uni) / n
    out: dict[str, Any] = {"uniform_step_s": u_step, "wall_s": wall, "blocks": args.blocks, "block_steps": n}
    for a in dg:
        ratios = [t / ((uni[i] + uni[i + 1]) / 2) for i, t in enumerate(times[a.name])]
        mcfg = a.mixer.cfg
        upd = statistics.median(a.events["update"][1:])
        rec = statistics.median(a.events["recluster"]) if a.events["recluster"] else 0.0
        online = statistics.median(ratios) - 1
        upd_share = upd / mcfg.update_every / u_step
        model = mcfg.nodes == "model"
        rec_share = (rec / mcfg.recluster_every / u_step) if model else 0.0
        run = run_projection(args.run_steps, mcfg, a.run_probes, first_update=a.events["update"][0], update=upd,
                             first_recluster=getattr(a, "first_recluster", 0.0), recluster=rec, analysis=a.analysis_s)
        run_overhead = online + run["event_s"] / (args.run_steps * u_step)
        dims = {"in_force": bool(getattr(a.mixer, "in_force", False)),
                "feature_s_per_step": a.mixer.feature_time / a.step_no, "online_s_per_step": a.mixer.online_time / a.step_no}
        out[a.name] = {
            "overhead": online + upd_share + rec_share, "online": online,
            "ratios": [round(r, 4) for r in ratios], "ratio_iqr": _iqr(ratios),
            "update_s": upd, "update_share": upd_share, "update_s_per_1000": upd * 1000 / mcfg.update_every,
            "recluster_s": rec, "recluster_share": rec_share,
            "recluster_s_per_1000": rec * 1000 / mcfg.recluster_every if model else 0.0,
            "run_steps": args.run_steps, "run_overhead": run_overhead, "run_events": run,
            "first_update_s": a.events["update"][0], "first_recluster_s": run["first_recluster_s"],
            "analysis_probe_s": a.analysis_s,
            "progress_probe_s": statistics.median(a.parts["progress_probe"][1:]),
            "solve_s": statistics.median(a.parts["solve"][1:]),
            "n_updates": len(a.events["update"]), "n_reclusters": len(a.events["recluster"]),
            "T_w": mcfg.update_every, "T_c": mcfg.recluster_every, "params": variants[a.name], **dims,
        }
        print(f"{scale} {a.name}: overhead {100 * out[a.name]['overhead']:+.1f}% = online {100 * online:+.1f}% "
              f"(median of {len(ratios)} block ratios, IQR {100 * out[a.name]['ratio_iqr']:.1f} pts) "
              f"+ update {100 * upd_share:.1f}% ({upd:.2f} s / {mcfg.update_every} steps, of which progress probe "
              f"{statistics.median(a.parts['progress_probe'][1:]):.2f} s, solve {statistics.median(a.parts['solve'][1:]):.2f} s) "
              f"+ recluster {100 * rec_share:.1f}% ({rec:.2f} s / {mcfg.recluster_every} steps); "
              f"uniform step {u_step:.3f} s; feature {dims['feature_s_per_step']:.3f} s/step; "
              f"model nodes in force: {dims['in_force']}", file=sys.stderr)
        print(f"{scale} {a.name}: a {args.run_steps}-step run: {100 * run_overhead:+.1f}% = online {100 * online:+.1f}% "
              f"+ its events {run['event_s']:.1f} s ({run['updates']} updates, the first {a.events['update'][0]:.2f} s; "
              f"{run['reclusters']} re-clusterings, the first {run['first_recluster_s']:.2f} s) over {args.run_steps} "
              f"uniform steps; not counted, as a run's train time does not count them: "
              f"{run['analysis_probes']} analysis probes of {a.analysis_s:.2f} s "
              f"({100 * run['analysis_s'] / (args.run_steps * u_step):.1f}% more)",
              file=sys.stderr)
    return out


def _time_analysis_probe(a: Arm) -> float:
    """Seconds of one of the analysis probes a run takes (Figure 1's panels), written to a scratch directory."""
    with tempfile.TemporaryDirectory() as tmp:
        a.mixer.ctx.out_dir = Path(tmp)
        try:
            _sync(a.device)
            t0 = time.perf_counter()
            a.mixer._analysis_probe(a.step_no)
            _sync(a.device)
            return time.perf_counter() - t0
        finally:
            a.mixer.ctx.out_dir = None


def run_projection(steps: int, mcfg, analysis_probes: list[float], *, first_update: float, update: float,
                   first_recluster: float, recluster: float, analysis: float) -> dict[str, Any]:
    """The mixer's events in a run of ``steps`` steps, at the cadence the mixer keeps in a run: an update
    every ``update_every`` steps (the first a one-off), a re-clustering at the first update and then once
    ``recluster_every`` steps have passed (model nodes), and the analysis probes at the steps
    ``DoGraphMixer.analysis_steps`` gives for that length."""
    ups = list(range(mcfg.update_every, steps + 1, mcfg.update_every))
    rec, last = 0, None
    for s in ups if mcfg.nodes == "model" else []:  # human nodes never re-cluster
        if last is None or s - last >= mcfg.recluster_every:
            rec, last = rec + 1, s
    shape = SimpleNamespace(cfg=SimpleNamespace(update_every=mcfg.update_every, analysis_probes=analysis_probes),
                            ctx=SimpleNamespace(total_steps=steps))
    n_probes = len(DoGraphMixer.analysis_steps(shape))
    event_s = (first_update + (len(ups) - 1) * update if ups else 0.0) \
        + (first_recluster + (rec - 1) * recluster if rec else 0.0)
    return {"updates": len(ups), "reclusters": rec, "analysis_probes": n_probes, "event_s": event_s,
            "first_recluster_s": first_recluster if rec else 0.0, "analysis_s": n_probes * analysis}


def methods_from_params(path: str, preset: Optional[str], names: list[str]) -> tuple[dict[str, dict], Any]:
    """DoGraph methods as ``params.yaml`` (and a preset) define them, as bench variants (what a run trains),
    and the params' train section (the run's steps, batch and sequence length)."""
    from dograph_core.config import load_params

    p = load_params(path, preset, [])
    out: dict[str, dict] = {}
    for name in names:
        if name not in p.methods:
            raise SystemExit(f"--method {name}: not a method of {path} (known: {sorted(p.methods)})")
        m = {k: v for k, v in p.methods[name].model_dump().items() if v is not None}
        if m.pop("type", None) != "dograph" or m.pop("partition", None):
            raise SystemExit(f"--method {name}: the bench times DoGraph over the sources; {name} is not that")
        out[name] = m
    return out, p.train


def _iqr(x: list[float]) -> float:
    if len(x) < 4:
        return max(x) - min(x)
    q = statistics.quantiles(x, n=4)
    return q[2] - q[0]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", default="nano,micro")
    ap.add_argument("--blocks", type=int, default=6, help="timed blocks per DoGraph arm")
    ap.add_argument("--block-steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=21, help="untimed steps first (default: past the first update)")
    ap.add_argument("--batch", type=int, default=None, help="default: the params' train.batch_size with --method, else 16")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the params' train.seq_len with --method, else 128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", choices=["human", "model"], default="model")
    ap.add_argument("--data", default=None, help=f"a tokenized corpus (default: {DEFAULT_DATA} if present, else synthetic)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--method", action="append", default=[], metavar="NAME",
                    help="also time a DoGraph method as --params (and --preset) define it, e.g. dograph_model")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--preset", default=None)
    ap.add_argument("--run-steps", type=int, default=None,
                    help="project the overhead of a run this long, one-off events included "
                         "(default: the params' train.steps with --method, else 250, the cpu preset's)")
    ap.add_argument("--no-default", action="store_true", help="skip the default DoGraph arm")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every arm on it)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as training on a GPU")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the synthetic corpus (when there is no --data)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")
    if args.device == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("DO_NOT_TRACK", "true")
    variants: dict[str, dict] = {} if args.no_default else {"default": {}}
    shape = {"batch": 16, "seq_len": 128, "run_steps": 250}
    if args.method:  # the method and the run's shape as the params (and preset) define them
        methods, train = methods_from_params(args.params, args.preset, args.method)
        variants.update(methods)
        shape = {"batch": train.batch_size, "seq_len": train.seq_len, "run_steps": train.steps}
    for k, v in shape.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.run_steps <= 0 or args.batch <= 0 or args.seq_len <= 0:
        ap.error("--run-steps, --batch and --seq-len must be positive")
    variants.update(dict(parse_variant(v) for v in args.variant))
    if len(variants) > 1:  # lazy imports (the solver, k-means) are paid by the first DoGraph arm of the process
        print(f"note: {len(variants)} DoGraph arms: only the first ({next(iter(variants))}) pays the one-off imports "
              "in its first update and re-clustering, so the others' run_overhead is low by that much; "
              "time one method per call (--no-default --method NAME) for a run's overhead", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data or DEFAULT_DATA.exists():
            corpus, data = TokenCorpus(args.data or DEFAULT_DATA), str(args.data or DEFAULT_DATA)
        else:
            from dograph_overhead import synthetic_corpus

            corpus, data = synthetic_corpus(Path(tmp) / "corpus", vocab=args.vocab), f"synthetic (vocabulary {args.vocab})"
        res: dict[str, Any] = {"bench": "overhead", "data": data, "device": args.device, "dtype": args.dtype,
                               "threads": 1 if args.device == "cpu" else torch.get_num_threads(), "batch": args.batch,
                               "seq_len": args.seq_len, "run_steps": args.run_steps, "overhead": {}, "variants": {}}
        for scale in [s for s in args.scales.split(",") if s]:
            r = bench_scale(scale, corpus, args, variants)
            res["variants"][scale] = {k: v for k, v in r.items() if isinstance(v, dict)}
            res[scale] = {k: v for k, v in r.items() if not isinstance(v, dict)}
            if "default" in r:
                res["overhead"][scale] = round(r["default"]["overhead"], 4)
            res["overhead_by_variant"] = res.get("overhead_by_variant", {})
            res["overhead_by_variant"][scale] = {k: round(v["overhead"], 4) for k, v in r.items() if isinstance(v, dict)}
            res.setdefault("run_overhead_by_variant", {})[scale] = {
                k: round(v["run_overhead"], 4) for k, v in r.items() if isinstance(v, dict)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
