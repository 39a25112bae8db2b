"""DoReMi (Xie et al. 2023): Group-DRO domain reweighting of a proxy against a reference model.

Three steps (:func:`search_doremi` runs them with the engine):

1. a *reference* model is trained on reference weights (natural by default);
2. a *proxy* of the same size is trained with this mixer: the batch is sampled uniformly, the
   proxy loss is re-weighted per sequence by the current domain weights, and after every
   optimizer step the weights take one exponentiated-gradient step on the per-domain excess loss
   ``max(l_proxy - l_ref, 0)`` (:func:`dograph_core.mixers.rules.doremi_update`);
3. the result is the time average of the weights over the proxy run.

The update rule and defaults are the reference implementation's (``sangmichaelxie/doremi``,
``doremiv1``); see ``docs/baselines.md`` for the line-by-line sources and what differs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from dograph_core.mixers import rules, validate_mixer_config
from dograph_core.mixers.base import (
    BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce, read_weights, write_weights,
)
from dograph_core.mixers.reference import load_reference
from dograph_core.mixers.timing import StepTiming


# The published run: scripts/runs/run_pile_doremi120M.sh passes --reweight_eta 1.0 --reweight_eps 1e-3
# (the training_args.py dataclass default for reweight_eps is 1e-4).
ETA = 1.0
SMOOTHING = 1e-3


class DoReMiConfig(MixerConfig):
    reference: Optional[str] = Field(
        None, description="the reference model: a Hugging Face model dir (save_pretrained) or a training run dir"
    )
    eta: float = Field(
        ETA, gt=0,
        description="step size of the exponentiated-gradient update (published: 1.0; the maintainer suggests 0.1 "
        "when the weights go one-hot, DoReMi issue #5): the sensitivity setting for small batches",
    )
    smoothing: float = Field(
        SMOOTHING, ge=0, lt=1,
        description="c in (1-c) a + c/k (published run_pile_doremi120M.sh: 1e-3; training_args.py default: 1e-4)",
    )
    sampling: Literal["uniform", "natural"] = Field(
        "uniform", description="how the proxy batch is sampled; the loss weights divide by it (reference: uniform)"
    )
    batch: Literal["iid", "stratified"] = Field(
        "iid",
        description="iid: each sequence's domain drawn independently (reference); stratified: every domain in every "
        "batch (each gets floor(batch * weight), at least one), the maintainer's advice for small batches "
        "(DoReMi issue #5): a sensitivity setting",
    )


class DoReMiMixer(Mixer):
    """The DoReMi proxy run: uniform sampling, loss re-weighting, Group-DRO weight updates."""

    name = "doremi"
    apply = "loss"
    needs = frozenset({"token_losses"})
    Config = DoReMiConfig

    def __init__(self, cfg: DoReMiConfig, ctx: MixerContext):
        if cfg.reference is None:
            raise MixerError(
                "doremi: no reference model; set `reference: <model dir or training run dir>` "
                "(train one with the static/natural mixer first, or run search_doremi, which does both)"
            )
        super().__init__(cfg, ctx)
        k = len(ctx.domains)
        # Read by train.py: MixtureSampler(stratified=...) puts every domain in every batch.
        self.stratified_batches = cfg.batch == "stratified"
        self.ref_model, self.ref_info = load_reference(cfg.reference, ctx)
        # Reference code: scores start at log(vocab size), so a domain absent from the first
        # batches is pushed up; the running average starts with the initial weights (counter 1).
        self.scores = np.full(k, math.log(ctx.vocab_size), dtype=np.float64)
        self.avg = self.weights.copy()
        self.n_avg = 1
        self._sum = torch.zeros(k, dtype=torch.float64)
        self._cnt = torch.zeros(k, dtype=torch.float64)
        self._checked_model = False
        self.timing = StepTiming(ctx.world_size)
        self._snap: Optional[dict[str, Any]] = None
        self._seen: Optional[BatchStats] = None

    # -- weights -------------------------------------------------------------------------------
    def sampling_weights(self) -> np.ndarray:
        if self.cfg.sampling == "natural":
            return np.asarray(self.ctx.natural, dtype=np.float64) / np.sum(self.ctx.natural)
        return np.full(len(self.ctx.domains), 1.0 / len(self.ctx.domains))

    def loss_weights(self, domain_ids: torch.Tensor) -> torch.Tensor:
        """Per-sequence loss weights ``a_d / s_d`` normalised to mean one over the micro-batch.

        With sequences of equal length this equals the reference's per-token loss
        ``sum_t l_t a_d(t) / sum_t a_d(t)``.
        """
        per_domain = torch.as_tensor(
            rules.doremi_loss_weights(self.weights, self.sampling_weights()), dtype=torch.float32
        ).to(domain_ids.device)
        w = per_domain[domain_ids.long()]
        return w / w.mean()

    def example_weights(self, stats: BatchStats) -> torch.Tensor:
        """Gather this micro-batch's excess losses, update first when the step allows it (as the
        reference does before re-weighting the loss, see ``timing.py``), then weight the loss."""
        if self.timing.begin(stats.step):
            self._restore(self._snap)
        self._accumulate(stats)
        if self.timing.in_step and stats.step % self.update_every == 0:
            self._snap = self._snapshot() if self.timing.needs_snapshot else None
            self._apply(stats.step, identity_reduce)
            self.timing.done_step = stats.step
        return self.loss_weights(stats.domain_ids)

    # -- statistics ----------------------------------------------------------------------------
    def _check_model(self, model: Optional[torch.nn.Module]) -> None:
        if self._checked_model or model is None:
            return
        cfg = getattr(model, "config", None)
        v = getattr(cfg, "vocab_size", None)
        ref_v = self.ref_model.config.vocab_size
        if v is not None and v != ref_v:
            raise MixerError(
                f"doremi: the reference model {self.ref_info['model_dir']} has a vocabulary of {ref_v} tokens, "
                f"the proxy {v}; train the reference with the same tokenizer and scale settings"
            )
        self._checked_model = True

    @torch.no_grad()
    def reference_token_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token NLL ``[B, T]`` of the reference on sequences ``[B, T+1]`` (inputs and targets)."""
        dev = next(self.ref_model.parameters()).device
        ids = input_ids.to(dev)
        if int(ids.max()) >= self.ref_model.config.vocab_size:
            raise MixerError(
                f"doremi: token id {int(ids.max())} is outside the reference model's vocabulary "
                f"({self.ref_model.config.vocab_size}); the reference was trained with another tokenizer"
            )
        logits = self.ref_model(input_ids=ids[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return loss.view(ids.shape[0], -1)

    def _accumulate(self, stats: BatchStats) -> None:
        if stats.token_loss is None:
            raise MixerError("doremi: the training loop did not provide per-token losses (needs 'token_losses')")
        self._check_model(stats.model)
        proxy = stats.token_loss.detach().float()
        ref = self.reference_token_loss(stats.input_ids).to(proxy.device)
        if ref.shape != proxy.shape:
            raise MixerError(f"doremi: proxy token losses {tuple(proxy.shape)} vs reference {tuple(ref.shape)}")
        excess = torch.clamp(proxy - ref, min=0.0)  # clip per token, then average per domain
        if not bool(torch.isfinite(excess).all()):
            raise MixerError(f"doremi: non-finite proxy or reference loss at step {stats.step}")
        k = len(self.ctx.domains)
        ids = stats.domain_ids.to(proxy.device).long()
        per_seq = excess.sum(dim=1).double()
        self._sum += torch.zeros(k, dtype=torch.float64, device=proxy.device).index_add_(0, ids, per_seq).cpu()
        self._cnt += torch.bincount(ids, minlength=k).double().cpu() * excess.shape[1]
        self._seen = stats

    def observe(self, stats: BatchStats) -> None:
        if self._seen is not stats:  # example_weights() already gathered this micro-batch
            self._accumulate(stats)
        self._seen = None

    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        if self.timing.done_step != step:
            self._apply(step, reduce)
        return self.weights

    def _apply(self, step: int, reduce: Reduce) -> None:
        """One DoReMi update from the gathered excess losses (then cleared)."""
        total = reduce(self._sum.clone()).cpu().numpy()
        count = reduce(self._cnt.clone()).cpu().numpy()
        self._sum.zero_()
        self._cnt.zero_()
        self.scores = rules.doremi_scores(total, count, self.scores)
        new = rules.doremi_update(self.weights, self.scores, self.cfg.eta, self.cfg.smoothing)
        self.set_weights(new, step)
        self.avg = rules.running_mean(self.avg, self.n_avg, self.weights)
        self.n_avg += 1

    def _snapshot(self) -> dict[str, Any]:
        return {
            "weights": self.weights.copy(), "history": list(self.history), "scores": self.scores.copy(),
            "avg": self.avg.copy(), "n_avg": self.n_avg, "sum": self._sum.clone(), "cnt": self._cnt.clone(),
        }

    def _restore(self, snap: Optional[dict[str, Any]]) -> None:
        if snap is None:
            return
        self.weights, self.history, self.scores = snap["weights"], snap["history"], snap["scores"]
        self.avg, self.n_avg, self._sum, self._cnt = snap["avg"], snap["n_avg"], snap["sum"], snap["cnt"]

    # -- results and state ---------------------------------------------------------------------
    def final_weights(self) -> np.ndarray:
        return self.avg / self.avg.sum()

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {
            "eta": self.cfg.eta,
            "smoothing": self.cfg.smoothing,
            "batch": self.cfg.batch,
            "reference": str(self.ref_info["model_dir"]),
            "updates": self.n_avg - 1,
            "timing": self.timing.mode,
            "last_weights": [float(x) for x in self.weights],
            "output": "time average of the domain weights (initial weights included, as in the reference code)",
        }
        return doc

    def diagnostics(self) -> dict[str, float]:
        out = {}
        for i, d in enumerate(self.ctx.domains):
            out[f"score/{d}"] = float(self.scores[i])
            out[f"avg_weight/{d}"] = float(self.avg[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            scores=self.scores.tolist(),
            avg=self.avg.tolist(),
            n_avg=int(self.n_avg),
            excess_sum=self._sum.clone(),
            token_count=self._cnt.clone(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        self.avg = np.asarray(state["avg"], dtype=np.float64)
        self.n_avg = int(state["n_avg"])
        self._sum = torch.as_tensor(state["excess_sum"], dtype=torch.float64).clone()
        self._cnt = torch.as_tensor(state["token_count"], dtype=torch.float64).clone()
        self.timing = StepTiming(self.ctx.world_size)


# -- the three steps ------------------------------------------------------------------------------
def _reference_weights(spec: Any, corpus) -> dict[str, float]:
    """``natural``, ``uniform``, a dict by domain, or a weights file -> weights by domain."""
    domains = corpus.train_domains
    if isinstance(spec, dict):
        if set(spec) != set(domains):
            raise MixerError(
                f"search_doremi reference_weights: domains {sorted(spec)} do not match the corpus domains {domains}"
            )
        return {d: float(spec[d]) for d in domains}
    if spec == "natural":
        return dict(zip(domains, map(float, corpus.natural_weights)))
    if spec == "uniform":
        return {d: 1.0 / len(domains) for d in domains}
    doc = read_weights(spec, domains)
    return dict(zip(doc["domains"], map(float, doc["weights"])))


def search_doremi(
    cfg,
    corpus,
    out_dir: str | Path,
    *,
    eta: float = ETA,
    smoothing: float = SMOOTHING,
    rounds: int = 1,
    reference_weights: Any = "natural",
    batch: str = "iid",
    tracker_for: Optional[Callable[[str], Any]] = None,
    resume: bool = False,
) -> dict[str, Any]:
    """DoReMi's three steps with the engine; ``rounds > 1`` is iterated DoReMi.

    Each round ``r`` trains, under ``out_dir/round<r>/``, a ``reference`` run on the reference
    weights (the ``static`` mixer; natural proportions in round 1 by default) and a ``proxy``
    run of the same size and steps with the DoReMi mixer against it; the proxy's averaged
    weights are the next round's reference weights. The last proxy's weights file is copied to
    ``out_dir/weights.json`` with every round's weights in ``meta.rounds``.
    ``batch="stratified"`` puts every domain in every proxy batch (a sensitivity setting; the
    reference runs keep iid batches). ``tracker_for(stage)`` may give a tracker per run (``round1/reference``, ...).
    With ``resume``, runs that finished (``summary.json`` present) are reused and unfinished
    ones resumed from their checkpoints. Returns the weights by domain, the file and the rounds.
    """
    from dograph_core.train import train
    from dograph_core.tracking import NullTracker

    if rounds < 1:
        raise MixerError(f"search_doremi: rounds must be at least 1, got {rounds}")
    validate_mixer_config("doremi", {"reference": ".", "eta": eta, "smoothing": smoothing, "batch": batch})
    out = Path(out_dir)
    ref_w = _reference_weights(reference_weights, corpus)
    history: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    for r in range(1, rounds + 1):
        stages = (
            ("reference", {"type": "static", "weights": ref_w}),
            # batch only when set: iid proxy runs keep the fingerprint they had (resume)
            ("proxy", {"type": "doremi", "eta": eta, "smoothing": smoothing,
                       **({"batch": batch} if batch != "iid" else {})}),
        )
        for stage, params in stages:
            run = out / f"round{r}" / stage
            if stage == "proxy":
                params = {**params, "reference": str(out / f"round{r}" / "reference")}
            if resume and (run / "summary.json").is_file() and (run / "weights.json").is_file():
                continue
            tracker = tracker_for(f"round{r}/{stage}") if tracker_for else NullTracker()
            train(cfg, corpus, f"doremi_{stage}", params, run, tracker=tracker, resume=resume)
        doc = read_weights(out / f"round{r}" / "proxy" / "weights.json", corpus.train_domains)
        history.append({"round": r, "reference_weights": ref_w, "weights": dict(zip(doc["domains"], doc["weights"]))})
        ref_w = dict(zip(doc["domains"], map(float, doc["weights"])))
    doc = dict(doc, meta={**doc.get("meta", {}), "rounds": history, "search": "doremi"})
    write_weights(out / "weights.json", doc)
    return {"weights": ref_w, "weights_file": str(out / "weights.json"), "rounds": history}
