"""Mixing methods behind one protocol (see base.py). ``build_mixer`` validates each method's config."""
from __future__ import annotations

import importlib
from typing import Any

from dograph_core.mixers.base import Mixer, MixerConfig, MixerContext, MixerError

# type name -> "module:Class"; modules are imported lazily so a broken optional method
# never stops the others from running.
REGISTRY: dict[str, str] = {
    "uniform": "dograph_core.mixers.simple:UniformMixer",
    "natural": "dograph_core.mixers.simple:NaturalMixer",
    "static": "dograph_core.mixers.simple:StaticMixer",
    "doremi": "dograph_core.mixers.doremi:DoReMiMixer",
    "doge": "dograph_core.mixers.doge:DoGEMixer",
    "odm": "dograph_core.mixers.odm:ODMMixer",
    "dograph": "dograph_core.mixers.dograph:DoGraphMixer",
    "rnb": "dograph_core.mixers.rnb:RnBMixer",
}


def mixer_class(type_name: str) -> type[Mixer]:
    if type_name not in REGISTRY:
        raise MixerError(f"unknown mixer type {type_name!r}; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[type_name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_mixer_config(type_name: str, params: dict[str, Any]) -> MixerConfig:
    cls = mixer_class(type_name)
    from pydantic import ValidationError

    try:
        return cls.Config.model_validate({**params, "type": type_name})
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in err.errors())
        raise MixerError(f"mixer {type_name!r}: {msgs}") from None


def build_mixer(type_name: str, params: dict[str, Any], ctx: MixerContext) -> Mixer:
    """Construct a mixer of ``type_name`` with ``params`` (validated) for the run described by ``ctx``."""
    cls = mixer_class(type_name)
    return cls(validate_mixer_config(type_name, params), ctx)


__all__ = ["Mixer", "MixerConfig", "MixerContext", "MixerError", "REGISTRY", "build_mixer", "mixer_class"]
