"""The study's plan: which units a pipeline run trains, and the best baseline carried across scales.

A study is ``pipeline``'s methods at each target scale (``scale_methods`` per scale, default
``methods`` everywhere) and seed, the compute yardstick (uniform at twice the steps,
``yardstick_seeds``), and offline searches at the proxy scale. A later scale may name
:data:`~dograph_core.config.BEST`: the baseline with the lowest seed-mean worst-domain loss at the
first target scale, decided once every seed of every candidate has finished there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dograph_core.config import BEST, Params
from dograph_core.io import read_json
from dograph_core.study import carried_baseline, is_carried
from tasks.params import method_spec


def best_candidates(p: Params) -> list[str]:
    """The methods of the first target scale that ``@best`` may become (:func:`dograph_core.study.is_carried`)."""
    first = p.pipeline.target_scales[0]
    return [m for m in p.pipeline.methods_at(first)
            if m != BEST and is_carried(m, method_spec(p, m)["type"], p.pipeline.parents)]


def best_baseline(p: Params, units: Iterable[Mapping[str, Any]]) -> Optional[str]:
    """The candidate with the lowest seed-mean worst-domain loss at the first target scale (the report's rule).

    None when there is no candidate or one of them has a seed that did not finish (its unit failed).
    """
    first = p.pipeline.target_scales[0]
    worst: dict[str, list[float]] = {m: [] for m in best_candidates(p)}
    for u in units:
        if u.get("scale") == first and u.get("method") in worst:
            worst[u["method"]].append(float(read_json(Path(u["dir"]) / "summary.json")["val_loss_worst"]))
    if any(len(v) < len(p.pipeline.seeds) for v in worst.values()):
        return None
    return carried_baseline({m: sum(v) / len(v) for m, v in worst.items()})


def needs_best(p: Params) -> list[str]:
    """The target scales whose methods name ``@best``."""
    return [s for s in p.pipeline.target_scales if BEST in p.pipeline.methods_at(s)]
