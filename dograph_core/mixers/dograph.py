"""DoGraph: weights over gradient-defined domains, scheduled by a graph-constrained optimisation.

The method as implemented (the reference note's section 3.2, with the feasibility note's defaults;
``docs/method.md`` gives every parameter and why):

* every training micro-batch: the cheap forward-only sketch ``z`` of each sequence's output-layer
  gradient (:func:`dograph_core.gradients.output_features`, ``d = r1 r2``);
* ``nodes: human``: nodes are the training sources; the node means of ``z`` and the node losses
  accumulate over a window of ``update_every`` steps and are EMA-smoothed across windows; the
  weights act through the sampler (``apply = "sample"``);
* ``nodes: model``: nodes are ``k`` clusters found by k-means of centred, unit-normalised probe
  features (a stratified probe from the corpus, every ``recluster_every`` steps, accepted only if
  stable across two projection seeds, warm-started and matched to the previous clusters); each
  training sequence goes to its nearest centroid; the weights act as per-sequence loss weights
  ``a_c / pi_c`` (clipped, mean 1; ``apply = "loss"``) or, with ``apply: sample``, through the
  sampler via the cluster x source table;
* every ``update_every`` steps: the graph (cosine of node means, optional k-NN), progress targets
  ``beta`` from the node losses, and the Pyomo problem of :mod:`dograph_core.optimize`; the result
  is smoothed ``(1 - eps) a + eps / K``. Any failure keeps the previous weights and logs why.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from dograph_core import clustering as cl
from dograph_core import graph as gr
from dograph_core import optimize as opt
from dograph_core.gradients import (FeatureError, Projection, check_features, output_features, per_example_grads,
                                    probe_features, project_grads, resolve_param_names)
from dograph_core.mixers.base import BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce
from dograph_core.mixers.dograph_parts import EventLog, ProbeError, draw_probe, progress_targets, time_average

log = logging.getLogger(__name__)


class DoGraphConfig(MixerConfig):
    update_every: int = Field(20, gt=0, description="T_w: rebuild the graph and re-solve every this many steps")
    nodes: Literal["human", "model"] = Field("human", description="graph nodes: the human sources or k-means clusters")
    k: int = Field(8, ge=2, description="number of model-perceived domains (nodes: model)")
    r1: int = Field(32, gt=0, description="rows of the output-residual projection R_b")
    r2: int = Field(64, gt=0, description="rows of the hidden-state projection R_h (d = r1 r2)")
    proj_seed: int = Field(0, description="projection seed (combined with the run seed); the check uses +1")
    recluster_every: int = Field(250, gt=0, description="T_c: re-cluster every this many steps (nodes: model)")
    probe_size: int = Field(256, gt=0, description="sequences in each clustering probe, stratified over sources")
    probe_batch: int = Field(32, gt=0, description="probe sequences per forward pass")
    min_ari: float = Field(0.2, ge=-1, le=1, description="accept a clustering only if its ARI across two projection seeds is at least this")
    ema: float = Field(0.8, ge=0, lt=1, description="EMA of node means and losses across update windows")
    min_node_samples: int = Field(4, ge=1, description="a node with fewer sequences in a window keeps its previous mean")
    feature_tokens: Optional[int] = Field(None, gt=0, description="positions per sequence used by the online sketch (None = all)")
    graph: Literal["cosine", "gram"] = Field("cosine", description="edge weights: cosine of node means, or their Gram matrix")
    knn: Optional[int] = Field(None, gt=0, description="keep each node's k strongest edges (None = dense)")
    objective: Literal["main", "A1", "A2"] = "main"
    progress: Literal["relative", "ratio"] = Field("relative", description="lag score: relative loss decrease, or L/L0")
    standardize: bool = Field(True, description="divide lag scores by their mean magnitude before the softmax")
    tau: float = Field(1.0, gt=0, description="temperature of beta = softmax(u / tau)")
    c: float = Field(1.0, ge=0, description="curvature (L eta) of the smoothness bound")
    lam: float = Field(0.1, ge=0, description="Laplacian smoothness weight")
    tau_kl: float = Field(0.1, ge=0, description="KL(a || a_prev) weight: schedule smoothness")
    mu: float = Field(0.05, gt=0, description="log-sum-exp temperature of A2")
    eps: float = Field(1e-3, ge=0, lt=1, description="final smoothing (1 - eps) a + eps / K")
    floor: float = Field(0.0, ge=0, le=1, description="lower bound of every node weight")
    cap: float = Field(1.0, gt=0, le=1, description="upper bound of every node weight")
    clip: tuple[float, float] = Field((0.1, 10.0), description="per-sequence loss weights are clipped to this range")
    apply: Literal["loss", "sample"] = Field("loss", description="nodes: model: loss weights, or sampling through the cluster x source table")
    base: Literal["uniform", "natural"] = Field("uniform", description="sampling under loss weighting (nodes: model)")
    solver: Literal["auto", "ripopt", "highs", "numpy"] = "auto"
    fallback: Literal["numpy", "keep"] = Field("numpy", description="on a solver failure: the numpy reference solver, or keep the weights")
    block: Optional[str] = Field(None, description="also sketch this linear layer on probes, e.g. transformer.h.-1.mlp.c_proj")
    block_r: tuple[int, int] = (32, 64)
    features: Literal["sketch", "exact"] = Field(
        "sketch", description="sketch: the forward-only output-layer sketch; exact: torch.func per-example gradients "
                              "of exact_params (online and on probes; an ablation, about one extra backward per step)")
    exact_params: list[str] = Field(
        default_factory=lambda: ["lm_head.weight", *(f"transformer.h.-1.{m}.weight" for m in
                                                     ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))],
        description="features: exact: the parameters whose per-example gradients are used (negative block indices count from the end)")
    exact_r: tuple[int, int] = Field((16, 32), description="features: exact: Kronecker sketch size of each parameter's gradient")
    analysis_probes: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0],
                                         description="fractions of the run at which probe features are saved for the PCA (nodes: human)")
    plots: bool = Field(True, description="write the analysis PNGs at the end of the run")

    @model_validator(mode="after")
    def _check(self) -> "DoGraphConfig":
        if self.nodes == "model" and self.probe_size < self.k:
            raise ValueError(f"probe_size ({self.probe_size}) must be at least k ({self.k})")
        if self.clip[0] <= 0 or self.clip[0] > self.clip[1]:
            raise ValueError(f"clip must be (low, high) with 0 < low <= high, got {self.clip}")
        if self.block is not None and self.nodes == "human":
            raise ValueError("block is used by the clustering probe; set nodes: model (the human-node graph uses the online sketch)")
        if self.block is not None and self.features == "exact":
            raise ValueError("block adds a sketched layer to the sketch features; with features: exact list it in exact_params")
        if self.features == "exact" and not self.exact_params:
            raise ValueError("features: exact needs at least one parameter in exact_params")
        return self


class DoGraphMixer(Mixer):
    """DoGraph over human sources (sampling) or model-perceived domains (loss weights)."""

    name = "dograph"
    apply = "sample"
    needs = frozenset({"hidden", "example_losses"})
    Config = DoGraphConfig

    def __init__(self, cfg: DoGraphConfig, ctx: MixerContext):
        self.cfg = cfg
        self.ctx = ctx
        self.model_mode = cfg.nodes == "model"
        if self.model_mode and ctx.corpus is None:
            raise MixerError("dograph with nodes: model draws its clustering probes from the corpus, "
                             "but the mixer context has none (MixerContext.corpus)")
        # per instance: the class default is "sample"; model-perceived domains act through the loss
        self.apply = "loss" if (self.model_mode and cfg.apply == "loss") else "sample"
        h = len(ctx.domains)
        self.n_nodes = cfg.k if self.model_mode else h
        self.lo = np.full(self.n_nodes, cfg.floor)
        self.hi = np.full(self.n_nodes, cfg.cap)
        try:
            opt.check_bounds(self.lo, self.hi)
        except opt.InfeasibleBoundsError as e:
            raise MixerError(f"dograph: {e} (nodes: {cfg.nodes}, {self.n_nodes} nodes)") from None
        self.alpha = np.full(self.n_nodes, 1.0 / self.n_nodes)
        self.alpha_history: list[tuple[int, list[float]]] = [(0, self.alpha.tolist())]
        seed = int(ctx.seed) * 7919 + cfg.proj_seed
        self.proj: Optional[Projection] = None
        self._seed = seed
        d = cfg.r1 * cfg.r2 if cfg.features == "sketch" else len(cfg.exact_params) * cfg.exact_r[0] * cfg.exact_r[1]
        self.dim = d
        self.nodes = gr.NodeMeans(self.n_nodes, d, cfg.ema, cfg.min_node_samples)
        self.sources = gr.NodeMeans(h, d, cfg.ema, 1)        # per-source means: A1 target, analysis
        self.pi = np.full(self.n_nodes, 1.0 / self.n_nodes)  # cluster frequency under the base sampler
        self._pi_counts = torch.zeros(self.n_nodes, dtype=torch.float64)
        self._mass = torch.zeros(h, dtype=torch.float64)     # loss-weight mass per source in the window
        self.loss_prev: Optional[np.ndarray] = None
        self.loss_first: Optional[np.ndarray] = None
        self.clustering: Optional[cl.Clustering] = None
        self.table: Optional[np.ndarray] = None              # cluster x source counts of the last accepted probe
        self.last_step = 0
        self.bad_window: Optional[str] = None
        self._model: Optional[torch.nn.Module] = None
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._diag: dict[str, float] = {}
        self.feature_time = 0.0   # seconds in the online sketch (diagnostics, benchmark)
        self.online_time = 0.0    # seconds in example_weights + observe
        self.events = EventLog(ctx.out_dir, ctx.rank == 0)
        self._analysis_done: set[int] = set()
        self._last_try: Optional[int] = None
        self._exact_names: Optional[list[str]] = None
        super().__init__(cfg, ctx)

    # -- weights over human sources (what the loop samples and logs) --------------------------
    def base_weights(self) -> np.ndarray:
        h = len(self.ctx.domains)
        if self.cfg.base == "natural":
            return np.asarray(self.ctx.natural, dtype=np.float64) / float(np.sum(self.ctx.natural))
        return np.full(h, 1.0 / h)

    def initial_weights(self) -> np.ndarray:
        return self.base_weights() if self.model_mode else np.full(len(self.ctx.domains), 1.0 / len(self.ctx.domains))

    def sampling_weights(self) -> np.ndarray:
        return self.base_weights() if self.apply == "loss" else self.weights

    # -- features ---------------------------------------------------------------------------
    def _projection(self, vocab: int, hidden: int) -> Projection:
        if self.proj is None or self.proj.vocab_size != vocab or self.proj.hidden_size != hidden:
            self.proj = Projection(vocab, hidden, self.cfg.r1, self.cfg.r2, self._seed)
        return self.proj

    def _features(self, stats: BatchStats) -> Optional[torch.Tensor]:
        if stats.hidden is None or stats.logits is None:
            raise MixerError("dograph needs hidden states and logits (needs = {'hidden'}); the loop did not pass them")
        t0 = time.perf_counter()
        if self.cfg.features == "exact":
            self._see_model(stats)
            if self._model is None:
                raise MixerError("dograph with features: exact needs the model in BatchStats.model")
            (z,) = self._exact(stats.input_ids, [self._seed])
        else:
            proj = self._projection(stats.logits.shape[-1], stats.hidden.shape[-1])
            gen = torch.Generator().manual_seed(self._seed * 100003 + stats.step) if self.cfg.feature_tokens else None
            z = output_features(stats.hidden, stats.logits, stats.input_ids[:, 1:], proj,
                                tokens=self.cfg.feature_tokens, generator=gen)
        self.feature_time += time.perf_counter() - t0
        try:
            check_features(z, f"step {stats.step} training batch features")
        except FeatureError as e:
            if self.bad_window is None:
                log.warning("dograph: %s; this window's statistics are dropped and the weights kept", e)
            self.bad_window = str(e)
            return None
        return z

    def _exact_param_names(self) -> list[str]:
        if self._exact_names is None:
            try:
                self._exact_names = resolve_param_names(self._model, self.cfg.exact_params)
            except FeatureError as e:
                raise MixerError(f"dograph exact_params: {e}") from None
        return self._exact_names

    def _exact(self, ids: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """``features: exact``: per-example gradients of ``exact_params`` (torch.func), computed once per
        chunk and Kronecker-sketched under each projection seed."""
        r1, r2 = self.cfg.exact_r
        names = self._exact_param_names()
        specs = [{n: (r1, r2, seed * 131 + i) for i, n in enumerate(names)} for seed in seeds]
        chunk = self.cfg.probe_batch
        outs: list[list[torch.Tensor]] = [[] for _ in seeds]
        for s in range(0, ids.shape[0], chunk):
            grads = per_example_grads(self._model, ids[s:s + chunk], names)
            for out, spec in zip(outs, specs):
                out.append(project_grads(grads, spec))
        return [torch.cat(o) for o in outs]

    def _assign(self, z: torch.Tensor) -> torch.Tensor:
        c = self.clustering
        d = z.shape[1]
        labels = cl.assign(z.double().cpu().numpy(), c.mean[:d], _unit(c.centroids[:, :d]))
        return torch.from_numpy(labels)

    # -- hooks ------------------------------------------------------------------------------
    def example_weights(self, stats: BatchStats) -> Optional[torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self._example_weights(stats)
        finally:
            self.online_time += time.perf_counter() - t0

    def _example_weights(self, stats: BatchStats) -> Optional[torch.Tensor]:
        self._pending = None
        if not self.model_mode or self.clustering is None:
            return None
        z = self._features(stats)
        if z is None:
            return None
        labels = self._assign(z)
        lo, hi = self.cfg.clip
        w = np.clip(self.alpha[labels.numpy()] / np.maximum(self.pi[labels.numpy()], 1e-12), lo, hi)
        w = torch.as_tensor(w / w.mean(), dtype=torch.float32, device=stats.example_loss.device)
        self._pending = (z, labels, w)
        return w

    def observe(self, stats: BatchStats) -> None:
        t0 = time.perf_counter()
        try:
            self._observe(stats)
        finally:
            self.online_time += time.perf_counter() - t0

    def _see_model(self, stats: BatchStats) -> None:
        self._model = stats.model if stats.model is not None else self._model

    def _observe(self, stats: BatchStats) -> None:
        self._see_model(stats)
        if self.cfg.features == "exact" and self._model is not None:
            self._exact_param_names()  # a misspelt parameter fails the run at its first step, not at every probe
        if self._pending is not None:
            z, labels, w = self._pending
            self._pending = None
        else:
            if self.model_mode and self.clustering is None:
                self._mass += torch.bincount(stats.domain_ids.cpu(), minlength=len(self.ctx.domains)).double()
                return
            z = self._features(stats)
            if z is None:
                return
            labels = stats.domain_ids.cpu() if not self.model_mode else self._assign(z)
            w = torch.ones(z.shape[0])
        src = stats.domain_ids.cpu()
        loss = stats.example_loss.detach().float().cpu()
        self.nodes.add(z, labels, loss)
        self.sources.add(z, src, loss)
        self._mass.index_add_(0, src, w.detach().double().cpu())
        if self.model_mode:
            self._pi_counts += torch.bincount(labels, minlength=self.n_nodes).double()

    # -- the update -------------------------------------------------------------------------
    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        self.last_step = step
        self._diag = {}
        for nm in (self.nodes, self.sources):
            for t in (nm.sums, nm.counts, nm.loss_sums):
                t.copy_(reduce(t.clone()))
        mass = reduce(self._mass.clone())
        pi_counts = reduce(self._pi_counts.clone())
        self._mass.zero_(), self._pi_counts.zero_()
        bad = self.bad_window if reduce is identity_reduce else self._any_bad(reduce)
        self.bad_window = None
        if bad:
            self._discard_window()
            self.events.write({"step": step, "event": "skipped", "reason": bad})
            log.warning("dograph step %d: update skipped (%s); previous weights kept", step, bad)
            return self.weights
        if self.model_mode:
            self._maybe_recluster(step)
        else:
            self._maybe_analysis_probe(step)
        skipped = self.nodes.commit()
        self.sources.commit()
        if self.model_mode and pi_counts.sum() > 0:
            self.pi = self.cfg.ema * self.pi + (1 - self.cfg.ema) * (pi_counts / pi_counts.sum()).numpy()
        if self.model_mode and self.clustering is None:
            return self.weights
        self._solve(step, skipped)
        if not self.model_mode:
            return self.alpha.copy()
        if self.apply == "sample":
            return self._cluster_to_sources()
        return (mass / mass.sum()).numpy() if mass.sum() > 0 else self.weights

    def _any_bad(self, reduce: Reduce) -> Optional[str]:
        flag = reduce(torch.tensor([1.0 if self.bad_window else 0.0]))
        return (self.bad_window or "bad features on another rank") if float(flag[0]) > 0 else None

    def _discard_window(self) -> None:
        for nm in (self.nodes, self.sources):
            nm.sums.zero_(), nm.counts.zero_(), nm.loss_sums.zero_()

    def _problem(self) -> opt.Problem:
        cfg = self.cfg
        means = self.nodes.mean_matrix().numpy()
        g = gr.gram(means)
        b = None
        if cfg.objective == "A1":  # MMD matching to the mean gradient of a uniform mix of the sources
            scale = max(float(np.max(np.diag(g))), 1e-30)
            src = self.sources.mean_matrix().numpy()[self.sources.seen.numpy()]
            target = src.mean(0) if src.size else np.zeros(self.dim)
            W, b = g / scale, means @ target / scale
        else:
            W = gr.cosine_affinity(g) if cfg.graph == "cosine" else g
            if cfg.knn:
                W = gr.knn_sparsify(W, cfg.knn)
            W = gr.normalise_by_diag(W)
        loss = self.nodes.mean_loss().numpy()
        seen = self.nodes.seen.numpy()
        beta, u = progress_targets(loss, self.loss_prev, self.loss_first, seen, cfg.progress, cfg.tau, cfg.standardize)
        self._graph = W
        self._beta, self._u = beta, u
        if self.loss_first is None and seen.all():
            self.loss_first = loss.copy()
        elif self.loss_first is not None:
            self.loss_first = np.where(np.isfinite(self.loss_first) & (self.loss_first > 0), self.loss_first, loss)
        self.loss_prev = np.where(seen, loss, self.loss_prev if self.loss_prev is not None else np.nan)
        return opt.Problem(W=W, prev=self.alpha, objective=cfg.objective, beta=beta, b=b,
                           L=gr.laplacian(W) if cfg.lam > 0 else None, c=cfg.c, lam=cfg.lam,
                           tau_kl=cfg.tau_kl, mu=cfg.mu, lo=self.lo, hi=self.hi)

    def _solve(self, step: int, skipped: list[int]) -> None:
        cfg = self.cfg
        if not self.nodes.seen.any():
            log.info("dograph step %d: no node has any samples yet; weights kept", step)
            return
        t0 = time.perf_counter()
        p = self._problem()
        try:
            a, info = opt.solve(p, cfg.solver, fallback=cfg.fallback == "numpy")
        except opt.OptimizationError as e:
            log.warning("dograph step %d: optimisation failed (%s); previous weights kept", step, e)
            self.events.write({"step": step, "event": "solve_failed", "reason": str(e)})
            return
        a = opt.smooth(a, cfg.eps, self.lo, self.hi)
        self.alpha = a
        self.alpha_history.append((step, a.tolist()))
        self._diag.update({"solve_s": float(info.get("solve_s", 0.0)), "objective": p.value(a)})
        self._diag.update({f"alpha_{i}": float(x) for i, x in enumerate(a)} if self.model_mode else {})
        self.events.write({"step": step, "event": "update", "alpha": a, "beta": self._beta, "u": self._u,
                           "W": self._graph, "node_loss": self.nodes.mean_loss().numpy(),
                           "node_total": self.nodes.total.numpy(), "skipped_nodes": skipped,
                           "solver": info.get("solver"), "pi": self.pi if self.model_mode else None,
                           "update_s": time.perf_counter() - t0, "feature_s_total": self.feature_time,
                           "online_s_total": self.online_time})

    # -- model-perceived domains --------------------------------------------------------------
    def _probe(self, step: int, n: int, check: bool = True) -> tuple[list[torch.Tensor], np.ndarray]:
        if self._model is None:
            raise ProbeError("no model seen yet (observe() was never called)")
        ids, src = draw_probe(self.ctx.corpus, self.ctx.domains, n, self.ctx.seq_len, self._seed * 1009 + step)
        dev = next(self._model.parameters()).device
        cfg = self.cfg
        vocab = self._model.get_output_embeddings().weight.shape[0]
        hidden = self._model.get_output_embeddings().weight.shape[1]
        if cfg.features == "exact":  # the same seeds as the online features, + 1 for the stability check
            zs = self._exact(ids.to(dev), [self._seed + i for i in range(2 if check else 1)])
            return [z.cpu() for z in zs], src
        projs = [self._projection(vocab, hidden)]
        if check:  # the second projection seed of the stability check
            projs.append(Projection(vocab, hidden, cfg.r1, cfg.r2, self._seed + 1))
        zs, _ = probe_features(self._model, ids.to(dev), projs, cfg.block, tuple(cfg.block_r), cfg.probe_batch)
        return [z.cpu() for z in zs], src

    def _maybe_recluster(self, step: int) -> None:
        # first attempt at the first update; then every recluster_every steps (accepted or not)
        if self._last_try is not None and step - self._last_try < self.cfg.recluster_every:
            return
        self._last_try = step
        t0 = time.perf_counter()
        try:
            (z, zc), src = self._probe(step, self.cfg.probe_size)
            check_features(z, f"step {step} probe features")
            new, ari = cl.recluster(z.numpy(), zc.numpy(), self.cfg.k, self.clustering, step, self.cfg.min_ari, self._seed)
        except (ProbeError, FeatureError, cl.ClusteringError) as e:
            log.warning("dograph step %d: re-clustering failed (%s); %s", step, e,
                        "previous clustering kept" if self.clustering else "training continues unweighted")
            self.events.write({"step": step, "event": "cluster_failed", "reason": str(e)})
            return
        accepted = new is not None and new.step == step
        self._diag["ari"] = ari
        table = cl.contingency(new.labels, src, self.cfg.k, len(self.ctx.domains)) if accepted else None
        if accepted:
            first = self.clustering is None
            self.clustering = new
            self.table = table
            if first:  # cluster frequencies under the base sampler, from the stratified probe
                base = self.base_weights()
                share = np.bincount(src, minlength=len(base)) / len(src)
                wts = base[src] / np.maximum(share[src], 1e-12)
                self.pi = np.bincount(new.labels, weights=wts, minlength=self.cfg.k) / wts.sum()
                self.pi = np.maximum(self.pi, 1e-3)
                self.pi /= self.pi.sum()
        self.events.write({"step": step, "event": "cluster", "accepted": accepted, "ari": ari,
                           "contingency": table, "domains": self.ctx.domains, "probe_s": time.perf_counter() - t0,
                           "online_s_total": self.online_time})
        self._save_probe(step, z, src, new.labels if accepted else None)

    def _cluster_to_sources(self) -> np.ndarray:
        """Sampling weights over sources that realise cluster weights: ``sum_c a_c P(source | c)``."""
        t = self.table.astype(np.float64) + 1e-9
        cond = t / t.sum(1, keepdims=True)
        w = self.alpha @ cond
        return w / w.sum()

    # -- analysis -----------------------------------------------------------------------------
    def analysis_steps(self) -> list[int]:
        """The steps of the analysis probes: each fraction of the run, moved down to an update step.

        Probes are taken inside ``update()``, which runs only every ``update_every`` steps, so a
        target between two updates (the run's last step, say) would otherwise never be reached.
        """
        every = self.cfg.update_every
        total = max(self.ctx.total_steps, every)
        return sorted({max(every, int(round(f * total)) // every * every) for f in self.cfg.analysis_probes})

    def _maybe_analysis_probe(self, step: int) -> None:
        if self.ctx.out_dir is None or self.ctx.rank != 0 or not self.cfg.analysis_probes or self.ctx.corpus is None:
            return
        for target in self.analysis_steps():
            if target not in self._analysis_done and step >= target:
                self._analysis_done.add(target)
                try:
                    (z,), src = self._probe(step, self.cfg.probe_size, check=False)
                except (ProbeError, FeatureError) as e:
                    log.warning("dograph step %d: analysis probe failed (%s)", step, e)
                    return
                self._save_probe(step, z, src, None)
                return

    def _save_probe(self, step: int, z: torch.Tensor, src: np.ndarray, labels: Optional[np.ndarray]) -> None:
        if self.ctx.out_dir is None or self.ctx.rank != 0:
            return
        from dograph_core.io import atomic_path

        path = self.ctx.out_dir / "probes" / f"step_{step:07d}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, z=z.numpy().astype(np.float32), sources=src,
                                    labels=labels if labels is not None else np.full(len(src), -1),
                                    domains=np.asarray(self.ctx.domains), step=step)

    # -- state, result ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        return dict(self._diag)

    def state_dict(self) -> dict[str, Any]:
        c = self.clustering
        return {
            **super().state_dict(),
            "alpha": self.alpha.tolist(), "alpha_history": [[s, w] for s, w in self.alpha_history],
            "nodes": self.nodes.state_dict(), "sources": self.sources.state_dict(),
            "pi": self.pi.tolist(), "pi_counts": self._pi_counts.clone(), "mass": self._mass.clone(),
            "loss_prev": None if self.loss_prev is None else self.loss_prev.tolist(),
            "loss_first": None if self.loss_first is None else self.loss_first.tolist(),
            "clustering": None if c is None else {
                "mean": torch.from_numpy(c.mean.copy()), "centroids": torch.from_numpy(c.centroids.copy()),
                "labels": torch.from_numpy(c.labels.copy()), "ari": float(c.ari), "step": int(c.step)},
            "table": None if self.table is None else self.table.tolist(),
            "last_step": self.last_step, "analysis_done": sorted(self._analysis_done), "last_try": self._last_try,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if len(state["alpha"]) != self.n_nodes:
            raise MixerError(f"dograph checkpoint has {len(state['alpha'])} nodes, this run {self.n_nodes} (nodes/k changed?)")
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.alpha_history = [(int(s), list(w)) for s, w in state["alpha_history"]]
        self.nodes.load_state_dict(state["nodes"])
        self.sources.load_state_dict(state["sources"])
        self.pi = np.asarray(state["pi"], dtype=np.float64)
        self._pi_counts = torch.as_tensor(state["pi_counts"]).double().clone()
        self._mass = torch.as_tensor(state["mass"]).double().clone()
        self.loss_prev = None if state["loss_prev"] is None else np.asarray(state["loss_prev"], dtype=np.float64)
        self.loss_first = None if state["loss_first"] is None else np.asarray(state["loss_first"], dtype=np.float64)
        c = state["clustering"]
        self.clustering = None if c is None else cl.Clustering(
            mean=_np(c["mean"]), centroids=_np(c["centroids"]), labels=_np(c["labels"]).astype(np.int64),
            ari=float(c["ari"]), step=int(c["step"]))
        self.table = None if state["table"] is None else np.asarray(state["table"], dtype=np.int64)
        self.last_step = int(state["last_step"])
        self._last_try = None if state.get("last_try") is None else int(state["last_try"])
        self._analysis_done = set(int(x) for x in state["analysis_done"])
        self.events.truncate(self.last_step)

    def final_weights(self) -> np.ndarray:
        """Human nodes: the time average of the schedule. Model nodes: the time average of the
        effective source weights (loss-weight mass per source), so a static transfer is possible."""
        return time_average(self.history, self.ctx.total_steps)

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {
            "nodes": self.cfg.nodes, "apply": self.apply, "k": self.n_nodes, "d": self.dim,
            "node_weights": self.alpha.tolist(),
            "node_schedule": [{"step": s, "weights": w} for s, w in self.alpha_history],
            "contingency": None if self.table is None else self.table.tolist(),
            "clustering_step": None if self.clustering is None else self.clustering.step,
            "clustering_ari": None if self.clustering is None else self.clustering.ari,
            "final_weights": "time average of the schedule" if not self.model_mode
            else "time average of the loss-weight mass per source (effective source weights)",
        }
        if self.cfg.plots and self.ctx.out_dir is not None and self.ctx.rank == 0:
            try:
                from dograph_core.analysis import render

                render(self.ctx.out_dir, doc)
            except Exception as e:  # plots must never lose the weights file
                log.warning("dograph: analysis plots failed: %s: %s", type(e).__name__, e)
        return doc


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _np(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
