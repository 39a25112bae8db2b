"""The trivial mixers: uniform, natural (proportional to training tokens) and static (from a file)."""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import Field

from dograph_core.mixers.base import Mixer, MixerConfig, MixerError, check_weights, read_weights


class UniformMixer(Mixer):
    """Every training domain gets the same share of sequences."""

    name = "uniform"


class NaturalMixer(Mixer):
    """Weights proportional to the training tokens available per domain (the corpus as it comes)."""

    name = "natural"

    def initial_weights(self) -> np.ndarray:
        return check_weights(self.ctx.natural, self.ctx.domains, "natural weights")


class StaticConfig(MixerConfig):
    path: Optional[str] = Field(None, description="a weights file (any method's result)")
    weights: Optional[dict[str, float]] = Field(None, description="weights by domain name, instead of a file")
    use_schedule: bool = Field(False, description="replay the file's schedule (by fraction of the run)")


class StaticMixer(Mixer):
    """Weights (or a step schedule) from a weights file: how a mixture found at one scale is used at another."""

    name = "static"
    Config = StaticConfig

    def __init__(self, cfg: StaticConfig, ctx):
        if (cfg.path is None) == (cfg.weights is None):
            raise MixerError("static mixer: give exactly one of 'path' (a weights file) or 'weights' (by domain)")
        self.schedule: list[tuple[int, np.ndarray]] = []
        if cfg.path is not None:
            doc = read_weights(cfg.path, ctx.domains)
            self._w = np.asarray(doc["weights"], dtype=np.float64)
            if cfg.use_schedule and doc.get("schedule"):
                self.schedule = [
                    (int(round(s["fraction"] * ctx.total_steps)), np.asarray(s["weights"], dtype=np.float64))
                    for s in doc["schedule"]
                ]
        else:
            missing = sorted(set(ctx.domains) - set(cfg.weights))
            extra = sorted(set(cfg.weights) - set(ctx.domains))
            if missing or extra:
                raise MixerError(f"static mixer weights: missing domains {missing}, unknown domains {extra}")
            self._w = np.asarray([cfg.weights[d] for d in ctx.domains], dtype=np.float64)
        self._w = check_weights(self._w, ctx.domains, "static weights")
        super().__init__(cfg, ctx)

    def initial_weights(self) -> np.ndarray:
        return self._at(0) if self.schedule else self._w

    def _at(self, step: int) -> np.ndarray:
        current = self.schedule[0][1]
        for s, w in self.schedule:
            if s <= step:
                current = w
        return check_weights(current, self.ctx.domains, "scheduled weights")

    def update(self, step, reduce=None):
        return self._at(step) if self.schedule else self.weights
