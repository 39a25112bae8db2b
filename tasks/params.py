"""Checks of params.yaml that need the heavier parts of the core (model scales, mixers).

``dograph_core.config`` validates shapes and types without importing torch; this module adds
the names that only the model and mixer registries know, with the same kind of message:
the key, the value, and what was expected.
"""
from __future__ import annotations

import importlib.util

from dograph_core.config import ConfigError, Params


def check_params(p: Params, methods: list[str] | None = None) -> None:
    """Raise :class:`ConfigError` for an unknown scale, mixer type or mixer parameter."""
    from dograph_core.mixers import MixerError, registry, validate_mixer_config
    from dograph_core.model import SCALES

    errors = []
    known = registry()
    scales = [("train.scale", p.train.scale), ("pipeline.proxy_scale", p.pipeline.proxy_scale)]
    scales += [(f"pipeline.target_scales[{i}]", s) for i, s in enumerate(p.pipeline.target_scales)]
    scales += [(f"pipeline.scale_methods.{s}", s) for s in p.pipeline.scale_methods]
    for key, value in scales:
        if value not in SCALES:
            errors.append(f"  {key} = {value!r}: unknown scale; expected one of {list(SCALES)}")
    if methods is None and p.pipeline.task_runner == "dask" and importlib.util.find_spec("prefect_dask") is None:
        errors.append("  pipeline.task_runner = 'dask': prefect-dask is not installed; "
                      "install the dask extra (pip install 'dograph[dask]') or use 'thread'")
    for name in methods if methods is not None else p.pipeline.all_methods():
        if name not in p.methods:
            errors.append(f"  method {name!r}: not defined under 'methods' (defined: {sorted(p.methods)})")
            continue
        spec = method_spec(p, name)
        if spec["type"] not in known:
            errors.append(f"  methods.{name}.type = {spec['type']!r}: unknown mixer type; expected one of {sorted(known)}")
            continue
        try:
            validate_mixer_config(spec["type"], spec["params"])
        except MixerError as e:
            errors.append(f"  methods.{name}: {e}")
        except ImportError as e:
            errors.append(f"  methods.{name}.type = {spec['type']!r}: the mixer could not be loaded ({e})")
    if methods is None and not errors:
        from tasks.study import best_candidates, needs_best

        if needs_best(p) and not best_candidates(p):
            errors.append(f"  pipeline.scale_methods: '@best' at {needs_best(p)} needs a baseline at "
                          f"{p.pipeline.target_scales[0]} to carry (not uniform, natural, DoGraph or an ablation)")
    if errors:
        raise ConfigError("invalid configuration:\n" + "\n".join(errors))


def method_spec(p: Params, name: str) -> dict:
    """``{"type": mixer type, "params": the mixer's params, "partition": its partition's name (if set)}``."""
    if name not in p.methods:
        raise ConfigError(f"method {name!r} is not defined under 'methods' (defined: {sorted(p.methods)})")
    raw = p.methods[name].model_dump()
    mtype = raw.pop("type")
    part = raw.pop("partition", None)  # the nodes it mixes over; absent = the sources (unit keys unchanged)
    return {"type": mtype, "params": raw, **({"partition": part} if part else {})}
