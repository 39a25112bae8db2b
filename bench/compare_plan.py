"""The units of work of a comparison, when each counts as finished, and how one unit runs.

A unit is one training run (``<scale>/<method>/s<seed>``, or ``<scale>/uniform_2x/s<seed>`` for
the compute yardstick) or one offline search (``search/<method>``). Its outputs live in
``<work>/<key>/``. A training unit is finished when its ``summary.json`` exists; a search when
its ``search_cost.json`` exists (written last, after the weights). So a re-run skips what is done
and resumes what is not (training resumes from the run's last checkpoint).

Offline methods (DoReMi, DoGE) are searched once at the preset's search scale and trained as a
``static`` mixture at every scale (the transfer); the search's wall time is its cost. The micro
scale's ``@best`` placeholder becomes the best offline/online baseline at the first scale (lowest
worst-domain loss averaged over seeds) once every seed of those baselines has finished.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from compare_presets import BEST, OFFLINE, Preset

BEST_CANDIDATES = ("doremi", "doge", "odm")  # uniform and natural always run at every scale


@dataclass
class Unit:
    key: str
    kind: str                      # "train" | "search_doremi" | "search_train"
    method: str                    # method label (uniform_2x for the yardstick)
    scale: str
    seed: int
    role: str                      # "main" | "yardstick" | "search"
    train: dict[str, Any]          # TrainConfig fields
    mixer: dict[str, Any]          # {"type": ..., **params}
    needs: list[str] = field(default_factory=list)
    priority: tuple = ()
    cleanup: bool = False          # delete checkpoints/ and final/ once finished (big models)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def is_done(work: Path, key: str) -> bool:
    d = Path(work) / key
    return (d / "search_cost.json").is_file() if key.startswith("search/") else (d / "summary.json").is_file()


def train_fields(base: dict[str, Any], preset: Preset, scale: str, seed: int, steps: int,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    out = {**base, **preset.train, **(extra or {}), **preset.scale_train.get(scale, {})}
    out.update({"scale": scale, "seed": seed, "steps": steps})
    return out


def method_mixer(methods: dict[str, dict[str, Any]], preset: Preset, name: str) -> dict[str, Any]:
    if name not in methods:
        raise ValueError(f"method {name!r} is not defined under 'methods' in params.yaml (defined: {sorted(methods)})")
    return {**methods[name], **preset.method_overrides.get(name, {})}


def best_baseline(work: Path, preset: Preset, scale: str) -> Optional[str]:
    """The candidate baseline with the lowest seed-mean worst-domain loss at ``scale``; None until all finished."""
    if scale in preset.scales:
        cands = [m for m in preset.scales[scale] if m in BEST_CANDIDATES]
        seeds = preset.seeds[scale]
    else:  # a scale left out of this run (--scales): its finished runs on disk decide
        cands = [m for m in BEST_CANDIDATES if (Path(work) / scale / m).is_dir()]
        seeds = sorted({int(d.name[1:]) for m in cands for d in (Path(work) / scale / m).glob("s*")})
    if not cands:
        return None
    scores = {}
    for m in cands:
        vals = []
        for s in seeds:
            f = Path(work) / scale / m / f"s{s}" / "summary.json"
            if not f.is_file():
                return None
            vals.append(float(json.loads(f.read_text())["val_loss_worst"]))
        scores[m] = sum(vals) / len(vals)
    return min(scores, key=lambda m: (scores[m], m))


def plan(preset: Preset, methods: dict[str, dict[str, Any]], base_train: dict[str, Any], work: Path
         ) -> tuple[list[Unit], int]:
    """Every unit of the preset that can be named now, and the number of placeholders still unresolved."""
    units: list[Unit] = []
    scales = list(preset.scales)
    first = scales[0]
    search_steps = preset.search_steps or preset.steps
    offline = sorted({m for ms in preset.scales.values() for m in ms if m in OFFLINE})
    unresolved = 0
    if any(BEST in ms for ms in preset.scales.values()):
        best = best_baseline(work, preset, preset.best_from or first)
        if best is None:
            unresolved = 1
        elif best in OFFLINE and best not in offline:
            offline.append(best)
    else:
        best = None
    for i, m in enumerate(offline):
        tr = train_fields(base_train, preset, preset.search_scale, 0, search_steps, preset.search_train)
        mixer = method_mixer(methods, preset, m)
        kind = "search_doremi" if mixer["type"] == "doremi" else "search_train"
        units.append(Unit(f"search/{m}", kind, m, preset.search_scale, 0, "search", tr, mixer, priority=(0, i)))
    for si, scale in enumerate(scales):
        steps = preset.steps_for(scale)
        for mi, name in enumerate(preset.scales[scale]):
            if name == BEST:
                if best is None:
                    continue
                name = best
                if name in preset.scales[scale]:
                    continue
            for ki, seed in enumerate(preset.seeds[scale]):
                needs: list[str] = []
                if name in OFFLINE:
                    mixer = {"type": "static", "path": str(Path(work) / "search" / name / "weights.json")}
                    needs = [f"search/{name}"]
                else:
                    mixer = method_mixer(methods, preset, name)
                tr = train_fields(base_train, preset, scale, seed, steps)
                units.append(Unit(f"{scale}/{name}/s{seed}", "train", name, scale, seed, "main", tr, mixer,
                                  needs, priority=(1, si, ki, mi), cleanup=preset.cleanup))
        for ki, seed in enumerate(preset.yardstick_seeds.get(scale, [])):
            tr = train_fields(base_train, preset, scale, seed, 2 * steps)
            units.append(Unit(f"{scale}/uniform_2x/s{seed}", "train", "uniform_2x", scale, seed, "yardstick", tr,
                              {"type": "uniform"}, priority=(1, si, ki + 0.5, 99), cleanup=preset.cleanup))
    return units, unresolved


def run_unit(unit: Unit, data: str, work: Path) -> None:
    """Run one unit in this process (the driver starts one process per unit)."""
    import time

    from dograph_core.config import TrainConfig
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.io import write_json
    from dograph_core.train import train

    out = Path(work) / unit.key
    if out.exists() and not any((out / "checkpoints").glob("step_*.pt")) and not (out / "round1").exists():
        shutil.rmtree(out)  # a run that died before its first checkpoint starts again cleanly
    cfg = TrainConfig(**unit.train)
    corpus = TokenCorpus(data)
    t0 = time.time()
    params = dict(unit.mixer)
    if unit.kind == "train":
        train(cfg, corpus, unit.method, params, out, resume=True)
        if unit.cleanup:
            for sub in ("checkpoints", "final"):
                shutil.rmtree(out / sub, ignore_errors=True)
        return
    if unit.kind == "search_doremi":
        from dograph_core.mixers.doremi import search_doremi

        search_doremi(cfg, corpus, out, eta=float(params.get("eta", 1.0)), smoothing=float(params.get("smoothing", 1e-3)),
                      resume=True)
        runs = [out / "round1" / "reference", out / "round1" / "proxy"]
    else:
        train(cfg, corpus, unit.method, params, out, resume=True)
        runs = [out]
    sums = [json.loads((r / "summary.json").read_text()) for r in runs]
    walls = [x["wall_time_s"] for x in sums]
    write_json(out / "search_cost.json", {
        "method": unit.method, "scale": unit.scale, "steps": cfg.steps, "runs": [str(r.relative_to(out)) for r in runs],
        "wall_time_s": float(sum(walls)), "this_process_s": time.time() - t0,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len * len(runs), "device": sums[-1].get("device"),
    })


def search_cost(work: Path, method: str) -> float:
    f = Path(work) / "search" / method / "search_cost.json"
    return float(json.loads(f.read_text())["wall_time_s"]) if f.is_file() else math.nan
