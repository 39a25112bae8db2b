"""Online Data Mixing (Albalak et al. 2023): a bandit over domains, online, no proxy.

Each domain is an arm; its reward is its training loss on the sequences drawn from it (free
from the forward pass, mean over the domain's sequences in the step). After every optimizer
step the domains drawn in that step update their reward estimate ``R``, the exploration rate
becomes ``eps_t = min(1/K, sqrt(ln K / (K t)))`` and the sampler draws the next batch from the
new policy ``pi``. Three updaters (``updater``), all in :mod:`dograph_core.mixers.rules`:

* ``smoothed_mean`` (default): the repository's README names ``SmoothedMeanWeightUpdater`` as
  "the data mixing implementation described in the paper". Mixed minibatches (every dograph
  batch mixes domains) take its ``group_update``: ``R_i <- alpha R_i + (1 - alpha) exp(L_i)``,
  no importance weighting, and a *linear* policy ``pi = (1 - K eps_t) R / sum R + eps_t``
  (``megatron/data/data_sampling_utils.py`` L455-528; ``scripts/train_1B_ema.sh``);
* ``exp3``: ``Exp3WeightUpdater`` as the 1B script ``scripts/train_1B_exp3.sh`` runs it:
  ``R_i <- R_i + (L_i / 10) / pi_i`` (cumulative, importance-weighted), then
  ``pi = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t`` (same file, L354-453);
* ``ema_importance``: this project's earlier form, ``R_i <- alpha R_i + (1 - alpha) L_i / pi_i``
  with the softmax policy; no official code path runs it. Its source is DataFlex's ``ODMMixer``
  port (moving-average version, e.g. ``yrywill/DataFlex-yry`` ``src/dataflex/train/mixer/odm_mixer.py``)
  and, reportedly, the paper's Algorithm 1.

See ``docs/baselines.md`` for the line-by-line sources and what differs.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from dograph_core.mixers import rules
from dograph_core.mixers.base import BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce


class ODMConfig(MixerConfig):
    updater: Literal["smoothed_mean", "exp3", "ema_importance"] = Field(
        "smoothed_mean",
        description="smoothed_mean (SmoothedMeanWeightUpdater, the paper's per the repo README), "
        "exp3 (Exp3WeightUpdater, the 1B script) or ema_importance (the DataFlex port's form)",
    )
    alpha: Optional[float] = Field(
        None, ge=0, lt=1,
        description="moving-average factor of smoothed_mean / ema_importance (default 0.9: neox_args.py "
        "data_sampling_smoothing_factor; the *_0.5smoothing scripts use 0.5); not used by exp3",
    )
    reward_scale: Optional[float] = Field(
        None, gt=0, description="reward = scale * loss (default: 0.1 for exp3, whose updater divides by 10; else 1)"
    )
    importance_weighting: Optional[bool] = Field(
        None, description="ema_importance only: divide each reward by its domain's probability (default true)"
    )
    warmup_steps: int = Field(0, ge=0, description="steps on the initial weights before the bandit starts")
    initial: Literal["uniform", "natural"] = Field("uniform", description="weights before the first update")
    output: Literal["mean", "last"] = Field(
        "mean", description="the weights file's mixture: time average of pi over the run, or the last pi"
    )

    @model_validator(mode="after")
    def _fits_updater(self) -> "ODMConfig":
        if self.updater == "exp3" and self.alpha is not None:
            raise ValueError(f"alpha ({self.alpha}) has no meaning for updater exp3 (a cumulative sum); drop it")
        if self.updater != "ema_importance" and self.importance_weighting is not None:
            raise ValueError(
                f"importance_weighting is fixed by updater {self.updater} (exp3: on, smoothed_mean: off); "
                "it can be set only with updater ema_importance"
            )
        return self

    @property
    def alpha_value(self) -> float:
        return 0.9 if self.alpha is None else self.alpha

    @property
    def scale_value(self) -> float:
        if self.reward_scale is not None:
            return self.reward_scale
        return 0.1 if self.updater == "exp3" else 1.0


class ODMMixer(Mixer):
    """A loss-rewarded bandit policy (``updater``); the sampler follows it online."""

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
            rewards = np.where(present, self.cfg.scale_value * total / np.maximum(count, 1), np.nan)
            self.last_rewards = rewards
            eps_prev, self.eps = self.eps, rules.odm_exploration(len(self.ctx.domains), step)
            self.set_weights(self._policy(np.nan_to_num(rewards), present, eps_prev), step)
        self.avg_sum += self.weights
        self.n_avg += 1
        return self.weights

    def _policy(self, rewards: np.ndarray, present: np.ndarray, eps_prev: float) -> np.ndarray:
        """Update the reward estimate with this step's rewards and return the new policy.
        ``self.weights`` is the distribution this step was sampled from (importance weights)."""
        cfg = self.cfg
        if cfg.updater == "smoothed_mean":
            self.estimate = rules.odm_smoothed_mean_rewards(self.estimate, rewards, present, cfg.alpha_value)
            return rules.odm_linear_policy(self.estimate, self.eps)
        if cfg.updater == "exp3":
            self.estimate = rules.odm_exp3_rewards(self.estimate, rewards, present, self.weights)
        else:
            iw = True if cfg.importance_weighting is None else cfg.importance_weighting
            self.estimate = rules.odm_rewards(self.estimate, rewards, present, self.weights, cfg.alpha_value, iw)
        return rules.odm_policy(self.estimate, eps_prev, self.eps)

    def final_weights(self) -> np.ndarray:
        if self.cfg.output == "last":
            return self.weights
        avg = self.avg_sum / self.n_avg
        return avg / avg.sum()

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {
            "updater": self.cfg.updater,
            "alpha": None if self.cfg.updater == "exp3" else self.cfg.alpha_value,
            "importance_weighting": {"smoothed_mean": False, "exp3": True}.get(
                self.cfg.updater, self.cfg.importance_weighting is not False
            ),
            "reward_scale": self.cfg.scale_value,
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
