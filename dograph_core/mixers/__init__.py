"""Mixing methods behind one protocol (see base.py). ``build_mixer`` validates each method's config."""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

from dograph_core.mixers.base import Mixer, MixerConfig, MixerContext, MixerError

log = logging.getLogger(__name__)

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


ENTRY_POINT_GROUP = "dograph.mixers"


def registry() -> dict[str, str]:
    """Every mixer type: the built-in ones, then those installed packages declare under the entry-point
    group ``dograph.mixers`` (``name = "module:Class"``, a subclass of :class:`Mixer`; its ``Config``
    validates its params). A plug-in cannot take a built-in name; it is skipped with a warning."""
    return {**plugins(), **REGISTRY}


@functools.lru_cache(maxsize=1)
def plugins() -> dict[str, str]:
    """The installed plug-in mixers (read once per process: scanning the installed packages costs tens of
    milliseconds, and every unit asks; ``plugins.cache_clear()`` reads them again)."""
    from importlib.metadata import entry_points

    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in REGISTRY:
            log.warning("mixer plug-in %s = %s ignored: %r is a built-in mixer type", ep.name, ep.value, ep.name)
            continue
        found.setdefault(ep.name, ep.value)
    return found


def mixer_module(type_name: str) -> str:
    """The module a mixer type lives in (``""`` for an unknown type)."""
    return registry().get(type_name, "").partition(":")[0]


def mixer_class(type_name: str) -> type[Mixer]:
    reg = registry()
    if type_name not in reg:
        raise MixerError(f"unknown mixer type {type_name!r}; known: {sorted(reg)}")
    module, _, attr = reg[type_name].partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):  # "module:Class" or, from an entry point, "module:Outer.Class"
        obj = getattr(obj, part)
    return obj


def plugin_source_hash(type_name: str) -> str | None:
    """For a plug-in mixer, the code of the module its entry point names (as the core's own code is keyed:
    :func:`~dograph_core.io.code_fingerprint`, so a comment does not count), so a changed plug-in re-runs
    what it trained; None for a built-in type."""
    if type_name not in plugins():
        return None
    import inspect

    from dograph_core.io import code_fingerprint

    module = importlib.import_module(mixer_module(type_name))
    source = inspect.getsourcefile(module)
    # no source file (a compiled module): its version stands in
    return code_fingerprint(source) if source else str(getattr(module, "__version__", "unknown"))


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


__all__ = ["Mixer", "MixerConfig", "MixerContext", "MixerError", "REGISTRY", "build_mixer", "mixer_class",
           "mixer_module", "plugin_source_hash", "plugins", "registry"]
