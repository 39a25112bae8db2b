"""DoGE (Fan, Pagliardini & Jaggi 2024): domain reweighting by generalisation estimation.

The proxy batch is sampled **uniformly** over the training domains for the whole run: the
reference keeps its data loader on the initial uniform ``train_dw`` (``src/dataloader.py``
L261, L316) and rebinds, then edits, only the trainer's own copy (``src/trainer.py`` L357, L401),
so the weights act on gradients only. Every optimizer step the loop computes one gradient per
training domain present in the batch (``stats.domain_grads``). This mixer clips each to
``max_grad_norm`` (in place, so the model update uses the clipped gradients, as in the reference
trainer), scores each training domain by how well its gradient aligns with the target gradient,
and takes a multiplicative step (:func:`dograph_core.mixers.rules.doge_scores`,
:func:`~dograph_core.mixers.rules.doge_update`). The model is updated on ``sum_k w_k g_k``, then the
loop clips that total at ``total_grad_clip`` (the reference's HF Trainer clips it at the same
``max_grad_norm``); the result is the average of the weights over the run.

Three targets (``target``):

* ``mix`` (universal, the published ``config/doge.json``): a separate batch drawn uniformly from
  the training domains (the reference's held-out ``mix`` domain, ``src/data/utils.py`` L75-103);
  its gradient is scored against, never trained on: ``W_i = lr <g_i, g_mix>``;
* ``train`` (leave-one-out, the project's earlier form): the target is the training domains
  themselves and the self term ``<g_i, g_i>`` is left out of domain i's score (the reference's
  ``set(train_ids) == set(tgt_ids)`` branch, ``src/trainer.py`` L753, which no published config runs);
* ``[<domain>, ...]`` (out-of-domain): the target domains' gradients; a domain that is not
  trained on (a held-out domain) has its gradient computed here.

Target batches (``mix`` and held-out domains) are seeded, drawn from ``target_split`` shards,
and their gradients taken with the proxy at the same parameters as the training gradients.
Rule and defaults: ``Olivia-fsm/DoGE`` (``src/trainer.py``, ``config/doge.json``); see
``docs/baselines.md``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from dograph_core.mixers import rules
from dograph_core.mixers.base import BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce
from dograph_core.mixers.timing import StepTiming


class DoGEConfig(MixerConfig):
    mu: float = Field(0.01, gt=0, description="step 1/mu of the multiplicative update (config/doge.json: 0.01)")
    dw_max: float = Field(5.0, description="score clip upper bound, times the learning rate")
    dw_min: float = Field(0.0, description="score clip lower bound, times the learning rate")
    smoothing: float = Field(0.0, ge=0, lt=1, description="eps in (1-eps) w + eps/k (reference: 0)")
    max_grad_norm: float = Field(5.0, ge=0, description="per-domain gradient clipping (0 = none; reference 5.0)")
    total_grad_clip: Optional[float] = Field(
        None, ge=0,
        description="clip of the combined gradient sum_k w_k g_k, replacing train.grad_clip for this run "
        "(default: max_grad_norm, as the reference's HF Trainer; 0 = none)",
    )
    target: Union[Literal["mix", "train"], list[str]] = Field(
        "mix", description="'mix' (universal, published: a separate batch from the training domains), "
        "'train' (leave-one-out variant) or the target domains (out-of-domain mode)",
    )
    target_split: Literal["auto", "train", "val"] = Field(
        "auto",
        description="split of the mix and held-out target batches (auto: train if it holds a sequence, else val)",
    )
    target_batch_size: Optional[int] = Field(
        None, gt=0, description="sequences in a mix or held-out target batch (default: the micro-batch)"
    )

    @model_validator(mode="after")
    def _bounds(self) -> "DoGEConfig":
        if self.dw_min > self.dw_max:
            raise ValueError(f"dw_min ({self.dw_min}) must not exceed dw_max ({self.dw_max})")
        if isinstance(self.target, list) and not self.target:
            raise ValueError("target: give at least one domain, or 'mix' or 'train'")
        return self


class DoGEMixer(Mixer):
    """Gradient-alignment reweighting; the loop steps on the weighted sum of domain gradients."""

    name = "doge"
    apply = "grad"
    needs = frozenset({"domain_grads"})
    Config = DoGEConfig

    def __init__(self, cfg: DoGEConfig, ctx: MixerContext):
        super().__init__(cfg, ctx)
        modes = {"mix": "mix", "train": "leave-one-out"}
        self.mode = "out-of-domain" if isinstance(cfg.target, list) else modes[cfg.target]
        self.targets: list[str] = list(ctx.domains) if self.mode != "out-of-domain" else list(cfg.target)
        known = list(ctx.domains) + [d for d in ctx.heldout_domains if d not in ctx.domains]
        if ctx.corpus is not None:
            known += [d for d in getattr(ctx.corpus, "all_domains", []) if d not in known]
        unknown = [d for d in self.targets if d not in known]
        if unknown:
            raise MixerError(f"doge: target domains {unknown} are not in the corpus (domains: {known})")
        self.external = [d for d in self.targets if d not in ctx.domains]
        if self.external and ctx.corpus is None:
            raise MixerError(f"doge: target {self.external} is not trained on and there is no corpus to draw it from")
        if self.mode == "mix" and ctx.corpus is None:
            raise MixerError("doge: target 'mix' draws a separate batch from the training domains and needs the corpus")
        # as in the reference (trainer.py L753), targets equal to the training domains remove the self term
        self.remove_self = self.mode != "mix" and sorted(self.targets) == sorted(ctx.domains)
        # read by the loop instead of train.grad_clip (the reference clips the total at max_grad_norm)
        self.total_grad_clip = cfg.max_grad_norm if cfg.total_grad_clip is None else cfg.total_grad_clip
        self.avg_sum = np.zeros(len(ctx.domains))
        self.n_updates = 0
        self.scores = np.zeros(len(ctx.domains))
        self.last_lr = 0.0
        self.grads: Optional[torch.Tensor] = None  # [k, P] last gradient of each domain (stale if absent)
        self.target_grads: dict[str, torch.Tensor] = {}
        self._acc: Optional[torch.Tensor] = None
        self._acc_n: Optional[torch.Tensor] = None
        self._target_step = -1
        self.timing = StepTiming(ctx.world_size)
        self._snap: Optional[dict[str, Any]] = None

    def sampling_weights(self) -> np.ndarray:
        """Uniform over the training domains for the whole run: the weights scale gradients only."""
        return np.full(len(self.ctx.domains), 1.0 / len(self.ctx.domains))

    # -- statistics ----------------------------------------------------------------------------
    def observe(self, stats: BatchStats) -> None:
        g = stats.domain_grads
        if g is None or stats.domain_present is None:
            raise MixerError("doge: the training loop did not provide per-domain gradients (needs 'domain_grads')")
        k = len(self.ctx.domains)
        if g.ndim != 2 or g.shape[0] != k:
            raise MixerError(f"doge: domain_grads must be [{k}, n_params], got {tuple(g.shape)}")
        if self.timing.begin(stats.step):
            self._restore(self._snap)
        present = stats.domain_present.to(g.device).bool()
        if not bool(torch.isfinite(g[present]).all()):
            raise MixerError(f"doge: non-finite domain gradient at step {stats.step}")
        rows = torch.nonzero(present).flatten()
        if rows.numel():
            g[rows] = rules.clip_rows(g[rows], self.cfg.max_grad_norm)  # the loop steps on these
        if self._acc is None or self._acc.shape != g.shape:
            self._acc = torch.zeros_like(g, dtype=torch.float32)
            self._acc_n = torch.zeros(k, dtype=torch.float32, device=g.device)
        self._acc[rows] += g[rows].float()
        self._acc_n[rows] += 1.0
        self.last_lr = float(stats.lr)
        if (self.external or self.mode == "mix") and stats.step != self._target_step:
            self._target_step = stats.step
            if self.mode == "mix":
                self.target_grads["mix"] = self._target_grad(list(self.ctx.domains), stats)
            for d in self.external:
                self.target_grads[d] = self._target_grad([d], stats)
        if self.timing.in_step and stats.step % self.update_every == 0:
            # update now, so that the loop's sum_k w_k g_k for this step uses the new weights (reference order)
            self._snap = self._snapshot() if self.timing.needs_snapshot else None
            self._apply(stats.step, identity_reduce)
            self.timing.done_step = stats.step

    def target_split(self, domain: str, width: int) -> str:
        """The split a target batch reads ``domain`` from (``auto``: its train split if it holds one
        sequence, else val: held-out domains usually have no train split; the test split stays untouched)."""
        if self.cfg.target_split != "auto":
            return self.cfg.target_split
        return "train" if self.ctx.corpus.tokens("train", domain).shape[0] >= width else "val"

    def target_batch(self, domains: list[str], b: int, width: int, step: int) -> torch.Tensor:
        """``b`` seeded windows of ``width`` tokens, each from a domain drawn uniformly from ``domains``
        (for ``mix``, the training domains: the reference's mix is an equal slice of each, shuffled)."""
        rng = np.random.default_rng([self.ctx.seed, step, self.ctx.rank, 7919])
        picks = np.zeros(b, dtype=np.int64) if len(domains) == 1 else rng.integers(0, len(domains), size=b)
        rows = []
        for j, d in enumerate(domains):
            n = int((picks == j).sum())
            if not n:
                continue
            split = self.target_split(d, width)
            tokens = self.ctx.corpus.tokens(split, d)
            if tokens.shape[0] < width:
                raise MixerError(
                    f"doge: target domain {d!r} has {tokens.shape[0]} tokens in its {split} split, "
                    f"fewer than one sequence ({width}); choose another target or target_split"
                )
            starts = rng.integers(0, tokens.shape[0] - width + 1, size=n)
            rows += [np.asarray(tokens[s : s + width], dtype=np.int64) for s in starts]
        return torch.as_tensor(np.stack(rows))

    def _target_grad(self, domains: list[str], stats: BatchStats) -> torch.Tensor:
        """Gradient of the mean token loss on a :meth:`target_batch` at the current parameters, clipped
        like the training gradients. Uses ``autograd.grad`` (the parameters' ``.grad`` are untouched:
        the target is scored against, never trained on) and a forked RNG, so the step is unchanged.
        """
        model = stats.model
        if model is None:
            raise MixerError(f"doge: target {self.cfg.target!r} needs the model in BatchStats to compute its gradient")
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        if stats.domain_grads is not None and n != stats.domain_grads.shape[1]:
            raise MixerError(f"doge: model has {n} trainable values, domain_grads has {stats.domain_grads.shape[1]}")
        b = self.cfg.target_batch_size or stats.input_ids.shape[0]
        dev = next(model.parameters()).device
        batch = self.target_batch(domains, b, stats.input_ids.shape[1], stats.step).to(dev)
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            logits = model(input_ids=batch[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1) for gr, p in zip(grads, params)])
        flat = flat.detach().float()
        if not bool(torch.isfinite(flat).all()):
            what = domains[0] if len(domains) == 1 else "mix"
            raise MixerError(f"doge: non-finite gradient on target {what!r} at step {stats.step}")
        return rules.clip_rows(flat.unsqueeze(0), self.cfg.max_grad_norm)[0]

    # -- update --------------------------------------------------------------------------------
    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        if self.timing.done_step != step:
            self._apply(step, reduce)
        return self.weights

    def _apply(self, step: int, reduce: Reduce) -> None:
        """One DoGE update from the gathered domain gradients (then cleared)."""
        if self._acc is None:
            raise MixerError("doge: update() before any observe(); the loop gave no domain gradients")
        acc = reduce(self._acc)
        cnt = reduce(self._acc_n)
        present = cnt > 0
        if self.grads is None:
            self.grads = torch.zeros_like(acc)  # the reference starts from a zero gradient matrix
        self.grads[present] = acc[present] / cnt[present].unsqueeze(-1)
        self._acc.zero_()
        self._acc_n.zero_()
        if self.mode == "mix":
            t = reduce(self.target_grads["mix"].clone()) / max(self.ctx.world_size, 1)
            target = t.to(self.grads.device).unsqueeze(0)
        elif not self.external:
            idx = [self.ctx.domains.index(d) for d in self.targets]
            target = self.grads[idx]
        else:
            rows = []
            for d in self.targets:
                if d in self.ctx.domains:
                    rows.append(self.grads[self.ctx.domains.index(d)])
                else:
                    t = reduce(self.target_grads[d].clone()) / max(self.ctx.world_size, 1)
                    rows.append(t.to(self.grads.device))
            target = torch.stack(rows)
        self.scores = rules.doge_scores(
            self.grads, target, self.last_lr, self.remove_self, self.cfg.dw_min, self.cfg.dw_max
        )
        new = rules.doge_update(self.weights, self.scores, self.cfg.mu, self.cfg.smoothing)
        self.set_weights(new, step)
        self.avg_sum += self.weights
        self.n_updates += 1

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": self.weights.copy(), "history": list(self.history), "scores": self.scores.copy(),
            "avg_sum": self.avg_sum.copy(), "n": self.n_updates, "acc": self._acc.clone(),
            "acc_n": self._acc_n.clone(), "grads": None if self.grads is None else self.grads.clone(),
        }

    def _restore(self, snap: Optional[dict[str, Any]]) -> None:
        if snap is None:
            return
        self.weights, self.history, self.scores = snap["weights"], snap["history"], snap["scores"]
        self.avg_sum, self.n_updates, self._acc, self._acc_n = snap["avg_sum"], snap["n"], snap["acc"], snap["acc_n"]
        self.grads = snap["grads"]

    # -- results and state ---------------------------------------------------------------------
    def final_weights(self) -> np.ndarray:
        """Average of the weights after each update (the reference's ``avg_dw``)."""
        if self.n_updates == 0:
            return self.weights
        avg = self.avg_sum / self.n_updates
        return avg / avg.sum()

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {
            "mu": self.cfg.mu,
            "dw_min": self.cfg.dw_min,
            "dw_max": self.cfg.dw_max,
            "max_grad_norm": self.cfg.max_grad_norm,
            "total_grad_clip": self.total_grad_clip,
            "target": "mix" if self.mode == "mix" else self.targets,
            "target_split": {
                d: self.target_split(d, self.ctx.seq_len + 1)
                for d in (self.targets if self.mode == "mix" else self.external)
            },
            "mode": self.mode,
            "sampling": "uniform over the training domains (weights scale gradients only)",
            "updates": self.n_updates,
            "timing": self.timing.mode,
            "last_weights": [float(x) for x in self.weights],
            "output": "average of the domain weights after each update (reference avg_dw)",
        }
        return doc

    def diagnostics(self) -> dict[str, float]:
        out = {f"score/{d}": float(self.scores[i]) for i, d in enumerate(self.ctx.domains)}
        if self.grads is not None:
            norms = torch.linalg.vector_norm(self.grads.float(), dim=-1).cpu().tolist()
            out.update({f"grad_norm/{d}": float(norms[i]) for i, d in enumerate(self.ctx.domains)})
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            avg_sum=self.avg_sum.tolist(),
            n_updates=int(self.n_updates),
            scores=self.scores.tolist(),
            grads=None if self.grads is None else self.grads.detach().cpu().clone(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.avg_sum = np.asarray(state["avg_sum"], dtype=np.float64)
        self.n_updates = int(state["n_updates"])
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        g = state.get("grads")
        self.grads = None if g is None else torch.as_tensor(g).to(self.ctx.device)
        self.timing = StepTiming(self.ctx.world_size)
