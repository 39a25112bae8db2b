"""Online Data Mixing (Albalak et al. 2023): an EXP3 bandit over domains, online, no proxy.

Each domain is an arm; its reward is its training loss on the sequences drawn from it (free
from the forward pass). After every optimizer step, for each domain drawn in that step:
``R_i <- alpha R_i + (1 - alpha) L_i / pi_i`` (importance-weighted, moving average), then the
sampling distribution becomes ``pi = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t`` with the
decaying exploration rate ``eps_t = min(1/K, sqrt(ln K / (K t)))``
(:mod:`dograph_core.mixers.rules`). The sampler draws the next batch from ``pi``.

Sources: the paper's Algorithm 1 and ``alon-albalak/online-data-mixing``
(``Exp3WeightUpdater``); see ``docs/baselines.md`` for what is kept and what differs.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from dograph_core.mixers import rules
from dograph_core.mixers.base import BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce


class ODMConfig(MixerConfig):
    alpha: float = Field(0.9, ge=0, lt=1, description="moving-average factor of the reward estimate (paper: 0.9)")
    importance_weighting: bool = Field(True, description="divide each reward by its domain's probability (EXP3)")
    reward_scale: float = Field(1.0, gt=0, description="reward = scale * loss (the repo's Exp3WeightUpdater: 0.1)")
    warmup_steps: int = Field(0, ge=0, description="steps on the initial weights before the bandit starts")
    initial: Literal["uniform", "natural"] = Field("uniform", description="weights before the first update")
    output: Literal["mean", "last"] = Field(
        "mean", description="the weights file's mixture: time average of pi over the run, or the last pi"
    )


class ODMMixer(Mixer):
    """EXP3 with smoothed, importance-weighted loss rewards; the sampler follows its policy online."""

    name = "odm"
    apply = "sample"
    needs = frozenset({"example_losses"})
    Config = ODMConfig

    def __init__(self, cfg: ODMConfig, ctx: MixerContext):
        super().__init__(cfg, ctx)
        k = len(ctx.domains)
        self.estimate = np.zeros(k)  # R_hat
        self.eps = 1.0 / k  # eps_0, as in the reference code
        self.last_rewards = np.full(k, np.nan)
        self.avg_sum = self.weights.copy()  # time average of the sampling distribution, step 0 included
        self.n_avg = 1
        self._sum = torch.zeros(k, dtype=torch.float64)
        self._cnt = torch.zeros(k, dtype=torch.float64)

    def initial_weights(self) -> np.ndarray:
        if self.cfg.initial == "natural":
            w = np.asarray(self.ctx.natural, dtype=np.float64)
            return w / w.sum()
        return super().initial_weights()

    def observe(self, stats: BatchStats) -> None:
        loss = stats.example_loss.detach().double().cpu()
        if not bool(torch.isfinite(loss).all()):
            raise MixerError(f"odm: non-finite training loss at step {stats.step}")
        ids = stats.domain_ids.detach().long().cpu()
        k = len(self.ctx.domains)
        self._sum += torch.zeros(k, dtype=torch.float64).index_add_(0, ids, loss)
        self._cnt += torch.bincount(ids, minlength=k).double()

    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        total = reduce(self._sum.clone()).cpu().numpy()
        count = reduce(self._cnt.clone()).cpu().numpy()
        self._sum.zero_()
        self._cnt.zero_()
        if step > self.cfg.warmup_steps:  # the reference's UpdateScheduler: iteration > warmup_steps
            present = count > 0
            rewards = np.where(present, self.cfg.reward_scale * total / np.maximum(count, 1), np.nan)
            self.last_rewards = rewards
            self.estimate = rules.odm_rewards(
                self.estimate, np.nan_to_num(rewards), present, self.weights, self.cfg.alpha,
                self.cfg.importance_weighting,
            )
            eps_prev, self.eps = self.eps, rules.odm_exploration(len(self.ctx.domains), step)
            self.set_weights(rules.odm_policy(self.estimate, eps_prev, self.eps), step)
        self.avg_sum += self.weights
        self.n_avg += 1
        return self.weights

    def final_weights(self) -> np.ndarray:
        if self.cfg.output == "last":
            return self.weights
        avg = self.avg_sum / self.n_avg
        return avg / avg.sum()

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {
            "alpha": self.cfg.alpha,
            "importance_weighting": self.cfg.importance_weighting,
            "reward_scale": self.cfg.reward_scale,
            "warmup_steps": self.cfg.warmup_steps,
            "exploration": self.eps,
            "last_weights": [float(x) for x in self.weights],
            "output": "time average of the sampling distribution" if self.cfg.output == "mean" else "last policy",
        }
        return doc

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {"exploration": float(self.eps)}
        for i, d in enumerate(self.ctx.domains):
            out[f"reward_estimate/{d}"] = float(self.estimate[i])
            if np.isfinite(self.last_rewards[i]):
                out[f"reward/{d}"] = float(self.last_rewards[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            estimate=self.estimate.tolist(),
            eps=float(self.eps),
            avg_sum=self.avg_sum.tolist(),
            n_avg=int(self.n_avg),
            loss_sum=self._sum.clone(),
            loss_count=self._cnt.clone(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.estimate = np.asarray(state["estimate"], dtype=np.float64)
        self.eps = float(state["eps"])
        self.avg_sum = np.asarray(state["avg_sum"], dtype=np.float64)
        self.n_avg = int(state["n_avg"])
        self._sum = torch.as_tensor(state["loss_sum"], dtype=torch.float64).clone()
        self._cnt = torch.as_tensor(state["loss_count"], dtype=torch.float64).clone()
