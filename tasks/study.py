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
from tasks.params import method_spec

NOT_CANDIDATES = ("uniform", "natural")  # mixer types that run at every scale anyway


def is_dograph(p: Params, method: str) -> bool:
    return str(method_spec(p, method)["type"]).startswith("dograph")


def best_candidates(p: Params) -> list[str]:
    """The baselines of the first target scale that ``@best`` may become (not DoGraph, uniform, natural or an ablation)."""
    first = p.pipeline.target_scales[0]
    return [m for m in p.pipeline.methods_at(first)
            if m not in p.pipeline.parents and not is_dograph(p, m)
            and method_spec(p, m)["type"] not in NOT_CANDIDATES]


def best_baseline(p: Params, units: Iterable[Mapping[str, Any]]) -> Optional[str]:
    """The candidate with the lowest seed-mean worst-domain loss at the first target scale.

    None when there is no candidate or one of them has a seed that did not finish (its unit failed).
    """
    first = p.pipeline.target_scales[0]
    cands = best_candidates(p)
    worst: dict[str, list[float]] = {m: [] for m in cands}
    for u in units:
        if u.get("scale") == first and u.get("method") in worst:
            worst[u["method"]].append(float(read_json(Path(u["dir"]) / "summary.json")["val_loss_worst"]))
    if not cands or any(len(v) < len(p.pipeline.seeds) for v in worst.values()):
        return None
    return min(cands, key=lambda m: (sum(worst[m]) / len(worst[m]), m))


def needs_best(p: Params) -> list[str]:
    """The target scales whose methods name ``@best``."""
    return [s for s in p.pipeline.target_scales if BEST in p.pipeline.methods_at(s)]
