"""DoGraph: weights over gradient-defined domains, scheduled by a graph-constrained optimisation.

The method as implemented (``docs/method.md`` derives it and gives every parameter):

* every training micro-batch: the cheap forward-only sketch ``z`` of each sequence's output-layer
  gradient (:func:`dograph_core.gradients.output_features`, ``d = r1 r2``);
* **nodes** are the human sources (``nodes: human``) or ``k`` clusters of the features
  (``nodes: model``). Model nodes are *live*: a full re-clustering of a stratified probe every
  ``recluster_every`` steps (accepted only when stable across two projection seeds, matched to the
  live clusters), and in between the centroids, the centring mean and a balancing price per cluster
  follow the training sequences' features (:class:`~dograph_core.clustering.LiveClusters`). While
  the last re-clustering is unstable, the mixer falls back to DoGraph over the human sources (or
  uniform) and logs it: it never weights by stale clusters;
* every ``update_every`` steps: node mean gradients and the progress targets ``beta``
  (:mod:`dograph_core.progress`: relative loss changes, neutral for nodes without fresh data, shrunk
  towards uniform within noise; for model nodes measured on a fixed probe set re-scored at each
  update), then the graph-constrained problem of :mod:`dograph_core.optimize` (F1 / F2, optionally
  with the F3 Laplacian constraint; :mod:`dograph_core.mixers.dograph_nodes` builds it), smoothed
  ``(1 - eps) a + eps / K``. The graph's effect ``||a - a_graph-off||_1`` is logged at every update;
* how weights act: human nodes through the sampler; model nodes through the sampler via the cluster
  x source table (``apply: sample``, the default), or through tempered per-sequence loss weights
  ``clip((a_c / pi_c)^temper, clip)`` normalised by their expectation under the base sampler (the
  same constant on every micro-batch and rank; ``apply: loss``).

``rule`` replaces the objective by a baseline's rule over the same nodes, so a partition and a mixer
can be told apart on the live clusters too: ``uniform`` (every node 1/K: the live gradient partition's
own effect) or ``rnb`` (R&B's Balance step ``softmax(lam G q / ||G q||)`` on the nodes' mean gradients,
:func:`dograph_core.mixers.rnb.rnb_update`).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch

from dograph_core import clustering as cl
from dograph_core import optimize as opt
from dograph_core.gradients import (FeatureError, Projection, check_features, output_features, per_example_grads,
                                    probe_features, project_grads, resolve_param_names, sequence_loss, to_device)
from dograph_core.mixers.base import BatchStats, Mixer, MixerContext, MixerError, Reduce, identity_reduce
from dograph_core.mixers.dograph_config import DoGraphConfig
from dograph_core.mixers.dograph_nodes import NodeSet, build_problem
from dograph_core.mixers.dograph_parts import EventLog, ProbeError, draw_probe, time_average
from dograph_core.mixers.rnb import eval_shares, rnb_update

log = logging.getLogger(__name__)

__all__ = ["DoGraphConfig", "DoGraphMixer"]

MAX_RATIO = 20.0  # bound of the base/sampling importance ratio in the pi estimate (a source at 1e-4 would give 1e3)


class DoGraphMixer(Mixer):
    """DoGraph over human sources or live model-perceived domains; both act by sampling the sources
    (model domains through the cluster x source table), or model domains by tempered loss weights."""

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
        self.apply = "loss" if (self.model_mode and cfg.apply == "loss") else "sample"
        h = len(ctx.domains)
        if cfg.progress_from == "probe" and not self.model_mode and cfg.progress_probe // h < cfg.min_node_samples:
            raise MixerError(
                f"dograph: progress_probe ({cfg.progress_probe}) gives some of the {h} sources only "
                f"{cfg.progress_probe // h} windows, under min_node_samples ({cfg.min_node_samples}): those sources "
                f"would never have a progress score; raise progress_probe to at least {cfg.min_node_samples * h} "
                f"or lower min_node_samples")
        self.dim = cfg.r1 * cfg.r2 if cfg.features == "sketch" else len(cfg.exact_params) * cfg.exact_r[0] * cfg.exact_r[1]
        try:
            self.human = NodeSet(h, self.dim, cfg)
            self.mnodes = NodeSet(cfg.k, self.dim, cfg) if self.model_mode else None
        except opt.InfeasibleBoundsError as e:
            raise MixerError(f"dograph: {e} (nodes: {cfg.nodes})") from None
        self.n_nodes = cfg.k if self.model_mode else h
        self._seed = int(ctx.seed) * 7919 + cfg.proj_seed
        self.proj: Optional[Projection] = None
        self.proj_check: Optional[Projection] = None          # the stability check's projection (seed + 1)
        # recluster_from: online: per source, (step, feature, check feature) of its newest featurised sequences
        self._rows: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in ctx.domains]
        self._quota = [cfg.probe_size // h + (1 if i < cfg.probe_size % h else 0) for i in range(h)]
        self.clusters: Optional[cl.LiveClusters] = None
        self.clustering: Optional[cl.Clustering] = None     # the last accepted re-clustering
        self.table: Optional[np.ndarray] = None              # its cluster x source table
        self.ctab: Optional[np.ndarray] = None               # the live table: decayed counts of assignments
        self._tab_counts = torch.zeros(self.n_nodes, h, dtype=torch.float64)  # the window's cluster x source counts
        self.in_force = False                                # model nodes weight the batch now
        self.pi = np.full(self.n_nodes, 1.0 / self.n_nodes)  # cluster frequency under the base sampler
        self._pi_counts = torch.zeros(self.n_nodes, dtype=torch.float64)
        self._mass = torch.zeros(h, dtype=torch.float64)     # loss-weight mass per source in the window
        self._ess = torch.zeros(3, dtype=torch.float64)      # sum of ESS ratios, micro-batches, those < 0.5
        self._occ = np.full(self.n_nodes, 1.0 / self.n_nodes)
        self._pprobe: Optional[tuple[torch.Tensor, np.ndarray]] = None   # fixed progress probe
        self._pprobe_prev: Optional[np.ndarray] = None                   # its per-sequence losses last update
        self.target = self._parse_target()
        self.updates = {"total": 0, "model": 0}
        self.last_step = 0
        self.bad_window: Optional[str] = None
        self._model: Optional[torch.nn.Module] = None
        self._pending: Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]] = None
        # (step, features, sources, losses, check features or None, CUDA event or None) on their way to the host
        self._inbox: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Any]] = []
        self._diag: dict[str, float] = {}
        self.feature_time = 0.0   # seconds in the online sketch (diagnostics, benchmark)
        self.online_time = 0.0    # seconds in example_weights + observe
        self.analysis_time = 0.0  # seconds in the analysis probes (measurement: a run's train time leaves them out)
        self.events = EventLog(ctx.out_dir, ctx.rank == 0)
        self._analysis_done: set[int] = set()
        self._last_try: Optional[int] = None
        self._subset_draws = 0
        self._exact_names: Optional[list[str]] = None
        super().__init__(cfg, ctx)

    @property
    def alpha(self) -> np.ndarray:
        """The weights over this mixer's nodes (clusters in model mode, sources otherwise)."""
        return self.mnodes.alpha if self.model_mode else self.human.alpha

    def _parse_target(self) -> Optional[dict[str, float]]:
        t = self.cfg.target
        if t is None:
            return None
        t = {t: 1.0} if isinstance(t, str) else dict(t)
        known = list(self.ctx.domains) + list(self.ctx.heldout_domains)
        bad = [d for d in t if d not in known]
        if bad or not t or any(v < 0 for v in t.values()) or sum(t.values()) <= 0:
            raise MixerError(f"dograph target {self.cfg.target!r}: expected a domain or a non-negative mixture over "
                             f"{known}" + (f"; unknown {bad}" if bad else ""))
        total = sum(t.values())
        return {d: v / total for d, v in t.items()}

    # -- weights over human sources (what the loop samples and logs) --------------------------
    def base_weights(self) -> np.ndarray:
        h = len(self.ctx.domains)
        if self.cfg.base == "natural":
            return np.asarray(self.ctx.natural, dtype=np.float64) / float(np.sum(self.ctx.natural))
        return np.full(h, 1.0 / h)

    def initial_weights(self) -> np.ndarray:
        return np.full(len(self.ctx.domains), 1.0 / len(self.ctx.domains))

    def _by_loss(self) -> bool:
        return self.model_mode and self.in_force and self.cfg.apply == "loss"

    def sampling_weights(self) -> np.ndarray:
        return self.base_weights() if self._by_loss() else self.weights

    # -- features ---------------------------------------------------------------------------
    def _projection(self, vocab: int, hidden: int, check: bool = False) -> Projection:
        cur = self.proj_check if check else self.proj
        if cur is None or cur.vocab_size != vocab or cur.hidden_size != hidden:
            cur = Projection(vocab, hidden, self.cfg.r1, self.cfg.r2, self._seed + int(check), self.cfg.sketch)
            if check:
                self.proj_check = cur
            else:
                self.proj = cur
        return cur

    @property
    def _online_rows(self) -> bool:
        return self.model_mode and self.cfg.recluster_from == "online"

    def _subset(self, stats: BatchStats) -> Optional[torch.Tensor]:
        """The sequences of this micro-batch whose features are computed (``feature_sequences``), or None for all."""
        n, b = self.cfg.feature_sequences, stats.example_loss.shape[0]
        if n is None or n >= b:
            return None
        self._subset_draws += 1  # a new subset for every micro-batch, reproducible from the seed
        gen = torch.Generator().manual_seed(self._seed * 1000003 + self._subset_draws)
        return torch.randperm(b, generator=gen)[:n].sort().values

    def _features(self, stats: BatchStats, idx: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """This micro-batch's features on the host, checked (None: unusable, the window is dropped)."""
        dev = None if idx is None else to_device(idx, stats.input_ids.device)
        return self._checked(self._launch_features(stats, dev)[0].cpu(), stats.step)

    def _launch_features(self, stats: BatchStats, idx: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The features and (``recluster_from: online``) the check projection's, on the model's device,
        of the sequences ``idx`` (on that device; None = all): on a GPU the work is queued, not waited for."""
        if stats.hidden is None or stats.logits is None:
            raise MixerError("dograph needs hidden states and logits (needs = {'hidden'}); the loop did not pass them")
        t0 = time.perf_counter()
        ids, hidden, logits = stats.input_ids, stats.hidden, stats.logits
        if idx is not None:
            ids, hidden, logits = ids[idx], hidden[idx], logits[idx]
        if self.cfg.features == "exact":
            self._see_model(stats)
            if self._model is None:
                raise MixerError("dograph with features: exact needs the model in BatchStats.model")
            (z,) = self._exact(ids, [self._seed])
            zc = None
        else:
            projs = [self._projection(logits.shape[-1], hidden.shape[-1])]
            if self._online_rows:  # the softmax is shared: the second projection costs its matmuls only
                projs.append(self._projection(logits.shape[-1], hidden.shape[-1], check=True))
            gen = torch.Generator().manual_seed(self._seed * 100003 + stats.step) if self.cfg.feature_tokens else None
            z, *rest = output_features(hidden, logits, ids[:, 1:], projs, tokens=self.cfg.feature_tokens, generator=gen)
            zc = rest[0].detach() if rest else None
        self.feature_time += time.perf_counter() - t0
        return z.detach(), zc

    def _checked(self, z: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        try:
            check_features(z, f"step {step} training batch features")
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

    def _probe_features(self, ids: torch.Tensor, n_proj: int) -> tuple[list[torch.Tensor], np.ndarray]:
        """Features of probe windows under ``n_proj`` projection seeds, and their losses."""
        if self._model is None:
            raise ProbeError("no model seen yet (observe() was never called)")
        dev = next(self._model.parameters()).device
        ids = ids.to(dev)
        if self.cfg.features == "exact":
            zs = self._exact(ids, [self._seed + i for i in range(n_proj)])
            losses = self._probe_losses(ids)
        else:
            emb = self._model.get_output_embeddings().weight
            # the stability check's projection is the one the online sketch uses (seed + 1), built once
            projs = [self._projection(emb.shape[0], emb.shape[1], check=c) for c in (False, True)[:n_proj]]
            # in the training's precision, as the online features are: fp32 would cost about 3x on the CPU
            # and an order of magnitude on a GPU
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.ctx.bf16):
                zs, losses = probe_features(self._model, ids, projs, None, (1, 1), self.cfg.probe_batch)
        return [z.detach().cpu() for z in zs], losses.detach().float().cpu().numpy()

    def _probe_losses(self, ids: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """Each probe window's mean loss, forward only, ``probe_batch`` windows at a time (``ids`` on the model's device)."""
        b = self.cfg.probe_batch
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            return torch.cat([sequence_loss(self._model(ids[s:s + b, :-1]).logits, ids[s:s + b, 1:])
                              for s in range(0, ids.shape[0], b)])

    def _progress_probe(self) -> tuple[torch.Tensor, np.ndarray]:
        """The fixed progress probe (``progress_probe`` windows stratified over the nodes' sources), drawn once."""
        if self._pprobe is None:
            self._pprobe = draw_probe(self.ctx.corpus, self.ctx.domains, self.cfg.progress_probe,
                                      self.ctx.seq_len, self._seed * 7 + 3)
        return self._pprobe

    # -- hooks ------------------------------------------------------------------------------
    def _floored(self, freq: np.ndarray) -> np.ndarray:
        """A cluster frequency floored at ``pi_floor`` and renormalised."""
        f = np.maximum(freq, self.cfg.pi_floor)
        return f / f.sum()

    def _base_frequency(self) -> np.ndarray:
        """The clusters' frequency under the base sampler, estimated as the weights are realised: sampling
        through sources, the live table's ``sum_s base_s P(c | s)`` (the divisor of :meth:`_cluster_to_sources`,
        so ``a`` equal to it draws exactly the base weights while no cluster is below ``pi_floor``);
        weighting losses, ``pi`` (the divisor of :meth:`cluster_weights`). The two estimates of one frequency
        differ by up to a tenth, and a prior from the other one moved the source weights with no signal."""
        by_table = self.apply == "sample" and self.ctab is not None
        return self._floored(self._cluster_given_source() @ self.base_weights() if by_table else self.pi)

    def _prior(self, ns: NodeSet) -> Optional[np.ndarray]:
        """beta without a progress signal (None = uniform): no signal, no reweighting, so for model nodes
        under ``prior: base`` their frequency under the base sampler; human nodes are uniform."""
        return self._base_frequency() if ns is self.mnodes and self.cfg.prior == "base" else None

    def cluster_weights(self) -> np.ndarray:
        """Per-cluster loss weights: ``clip((a/pi)^temper)``, divided by their mean under the base sampler."""
        cfg = self.cfg
        pi = self._floored(self.pi)
        w = np.clip((self.alpha / pi) ** cfg.temper, *cfg.clip)
        return w / float(pi @ w)

    def example_weights(self, stats: BatchStats) -> Optional[torch.Tensor]:
        t0 = time.perf_counter()
        try:
            self._pending = None
            if not self._by_loss():
                return None
            z = self._features(stats)
            if z is None:
                return None
            labels = torch.from_numpy(self.clusters.assign(z.double().numpy()))
            w = torch.from_numpy(self.cluster_weights()[labels.numpy()])
            ess = float(w.sum() ** 2 / (w.numel() * (w ** 2).sum()))
            self._ess += torch.tensor([ess, 1.0, float(ess < 0.5)], dtype=torch.float64)
            self._pending = (z, labels, w)
            return w.to(dtype=torch.float32, device=stats.example_loss.device)
        finally:
            self.online_time += time.perf_counter() - t0

    def observe(self, stats: BatchStats) -> None:
        t0, a0 = time.perf_counter(), self.analysis_time
        try:
            self._observe(stats)
        finally:  # the step-0 analysis probe is taken here; it is measurement, not the online part
            self.online_time += time.perf_counter() - t0 - (self.analysis_time - a0)

    def _see_model(self, stats: BatchStats) -> None:
        self._model = stats.model if stats.model is not None else self._model

    def _observe(self, stats: BatchStats) -> None:
        self._see_model(stats)
        if self.cfg.features == "exact" and self._model is not None:
            self._exact_param_names()  # a misspelt parameter fails the run at its first step, not at every probe
        if 0 not in self._analysis_done and 0.0 in self.cfg.analysis_probes:
            self._analysis_probe(0)    # before the first optimizer step: the model at initialisation
        if self._pending is not None:  # acting by loss: example_weights already brought the features over
            z, labels, w = self._pending
            self._pending = None
            self._add(z, stats.domain_ids.cpu(), stats.example_loss.detach().float().cpu(), labels, w)
            return
        idx = self._subset(stats)
        dev = None if idx is None else to_device(idx, stats.input_ids.device)  # one copy for all three uses
        z, zc = self._launch_features(stats, dev)
        src, loss = stats.domain_ids, stats.example_loss.detach().float()
        if dev is not None:  # the statistics of this window come from the sampled sequences alone
            src, loss = src[dev.to(src.device)], loss[dev.to(loss.device)]
        # On a GPU: copies to pinned host memory, waited for one micro-batch later (or at the update), so
        # the GPU keeps this backward and the next forward queued instead of idling while the host waits.
        # The CPU takes the same path (its copies are no-ops), so the tests run the deferred fold too.
        host = [None if t is None else t.to("cpu", non_blocking=True) for t in (z, src, loss, zc)]
        done = None
        if z.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        self._inbox.append((stats.step, *host, done))
        self.flush(keep=1)

    def flush(self, keep: int = 0) -> None:
        """Fold in the features that reached the host, all but the ``keep`` newest. Nothing that reads
        the window (the update, a checkpoint, the result) runs before ``keep = 0``, and nothing that
        changes how features are counted (weights, clusters) changes between a launch and its fold, so
        the statistics are those of folding each micro-batch at once."""
        while len(self._inbox) > keep:
            step, z, src, loss, zc, done = self._inbox.pop(0)
            if done is not None:
                done.synchronize()
            z = self._checked(z, step)
            if z is None or (zc is not None and self._checked(zc, step) is None):
                continue
            labels = torch.from_numpy(self.clusters.assign(z.double().numpy())) if self.clusters is not None else None
            self._add(z, src, loss, labels, torch.ones(z.shape[0], dtype=torch.float64))
            if zc is not None:
                for i, s_ in enumerate(src.tolist()):
                    rows = self._rows[s_]
                    rows.append((step, z[i].clone(), zc[i].clone()))  # not views: the batch's buffer is freed
                    if len(rows) > self._quota[s_]:   # the newest quota rows of each source (a quota may be 0)
                        del rows[:len(rows) - self._quota[s_]]

    def _add(self, z: torch.Tensor, src: torch.Tensor, loss: torch.Tensor, labels: Optional[torch.Tensor],
             w: torch.Tensor) -> None:
        self.human.means.add(z, src, loss)
        self._mass.index_add_(0, src, w.double())
        if labels is not None:
            self.mnodes.means.add(z, labels, loss)
            self.clusters.add(z.double().numpy(), labels.numpy())
            self._tab_counts.index_put_((labels, src), torch.ones(labels.numel(), dtype=torch.float64), accumulate=True)
            # frequencies under the base sampler: reweight what the current sampler drew
            ratio = np.minimum(self.base_weights() / np.maximum(self.sampling_weights(), 1e-12), MAX_RATIO)
            self._pi_counts.index_add_(0, labels, torch.from_numpy(ratio[src.numpy()]))

    # -- the update -------------------------------------------------------------------------
    def _window(self) -> list[torch.Tensor]:
        ts = [self.human.means.sums, self.human.means.counts, self.human.means.loss_sums,
              self._mass, self._pi_counts, self._ess]
        if self.mnodes is not None:
            ts += [self.mnodes.means.sums, self.mnodes.means.counts, self.mnodes.means.loss_sums]
        if self.clusters is not None:
            ts += [*self.clusters.window(), self._tab_counts]
        return ts

    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        self.flush()
        self.last_step = step
        self._diag = {}
        for t in self._window():
            t.copy_(reduce(t.clone()))
        bad = self.bad_window if reduce is identity_reduce else self._any_bad(reduce)
        self.bad_window = None
        if bad:
            for t in self._window():
                t.zero_()
            self.events.write({"step": step, "event": "skipped", "reason": bad})
            log.warning("dograph step %d: update skipped (%s); previous weights kept", step, bad)
            return self.weights
        self.updates["total"] += 1
        rec: dict[str, Any] = {"step": step, "event": "update"}
        if self.model_mode:
            rec.update(self._update_model(step, reduce))
        self._maybe_analysis_probe(step)
        self.human.commit()
        if self.cfg.progress_from == "probe" and not self.model_mode:
            rec["probe_nodes"] = self._human_probe_progress()
        else:
            self.human.record_batch_progress()
        rec["human"] = self._solve(self.human, step)
        if self.model_mode and self.in_force:
            rec["model"] = self._solve(self.mnodes, step)
            self.updates["model"] += rec["model"] is not None
        rec["nodes_in_force"] = self._nodes_in_force()
        rec["feature_s_total"], rec["online_s_total"] = self.feature_time, self.online_time
        self._diag["model_nodes_in_force"] = float(self._nodes_in_force() == "model")
        self.events.write(rec)
        w = self._source_weights()
        self._mass.zero_()
        return w

    def _nodes_in_force(self) -> str:
        if not self.model_mode:
            return "human"
        return "model" if self.in_force else self.cfg.fallback_nodes

    def _source_weights(self) -> np.ndarray:
        """The weights over sources the loop logs (and samples from, unless acting by loss)."""
        who = self._nodes_in_force()
        if who == "human":
            return self.human.alpha.copy()
        if who == "uniform":
            return self.initial_weights()
        if self.cfg.apply == "sample":
            return self._cluster_to_sources()
        mass = self._mass.numpy()
        return mass / mass.sum() if mass.sum() > 0 else self.weights

    def _update_model(self, step: int, reduce: Reduce) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        if self.clusters is not None:
            cfg = self.cfg
            counts = self._pi_counts.numpy()
            base_occ = counts / counts.sum() if counts.sum() > 0 else None
            if base_occ is not None:
                self.pi = cfg.ema * self.pi + (1 - cfg.ema) * base_occ
            # the guard balances the clusters under the base sampler, not the window the weights drew
            self._occ = self.clusters.commit(np.full(cfg.k, 1.0 / cfg.k),
                                             occupancy=self.pi if cfg.balance_under == "base" else None)
            drew = self.sampling_weights()   # the source weights of the window just closed
            tab = self._tab_counts.numpy().copy()
            self.mnodes.commit()
            if self.cfg.progress_from == "batch":
                self.mnodes.record_batch_progress()
            else:
                rec["probe_nodes"] = self._probe_progress()
            ess = self._ess.numpy()
            if ess[1] > 0:
                self._diag.update(ess_mean=float(ess[0] / ess[1]), ess_low_share=float(ess[2] / ess[1]))
            rec.update(pi=self.pi, occupancy=self._occ, prices=self.clusters.prices,
                       ess_mean=self._diag.get("ess_mean"), ess_low_share=self._diag.get("ess_low_share"))
            if self.in_force:  # the window just closed was drawn (or weighted) by the model nodes' weights
                if self.apply == "loss":  # the mixture the loss weights realise under the base sampler
                    w = self.cluster_weights()
                    eff = self.pi * w / float(self.pi @ w)
                else:                     # sampling: the window's own cluster shares, against what the
                    eff = self._occ       # table said before the window joined it (out of sample)
                    rec.update(self._realisation(drew, float(tab.sum())))
                rec.update(realised=eff, realised_gap_l1=float(np.abs(eff - self.alpha).sum()))
                self._diag["realised_gap_l1"] = rec["realised_gap_l1"]
            if cfg.table_ema is not None and self.ctab is not None:
                self.ctab = cfg.table_ema * self.ctab + tab
        self._pi_counts.zero_(), self._ess.zero_(), self._tab_counts.zero_()
        self._maybe_recluster(step, reduce)
        return rec

    def _any_bad(self, reduce: Reduce) -> Optional[str]:
        flag = reduce(torch.tensor([1.0 if self.bad_window else 0.0]))
        return (self.bad_window or "bad features on another rank") if float(flag[0]) > 0 else None

    def _solve(self, ns: NodeSet, step: int) -> Optional[dict[str, Any]]:
        cfg = self.cfg
        if not ns.means.seen.any():
            return None
        if cfg.rule != "dograph":
            return self._by_rule(ns, step)
        t0 = time.perf_counter()
        prior = self._prior(ns)
        beta, u, shrink = ns.progress.targets(cfg.tau, prior)
        try:
            target = self._target_mean() if cfg.objective == "A1" else None
            p = build_problem(cfg, ns.means.mean_matrix().numpy(), beta, ns.alpha, ns.lo, ns.hi, target)
            a, info = opt.solve(p, cfg.solver, fallback=cfg.fallback == "numpy")
        except (opt.OptimizationError, ProbeError, FeatureError) as e:
            log.warning("dograph step %d: optimisation failed (%s); previous weights kept", step, e)
            self.events.write({"step": step, "event": "solve_failed", "reason": str(e)})
            return None
        effect = None
        if cfg.objective != "A1":  # the diagnostic: the same problem with the graph removed
            try:
                effect = float(np.abs(a - opt.solve(opt.off_problem(p), "numpy")[0]).sum())
            except opt.OptimizationError as e:
                log.info("dograph step %d: the graph-off reference failed (%s); effect not logged", step, e)
        a = opt.smooth(a, cfg.eps, ns.lo, ns.hi)
        ns.set_alpha(a, step)
        tag = "model" if ns is self.mnodes else "human"
        self._diag.update({f"{tag}_graph_effect_l1": effect if effect is not None else float("nan"),
                           f"{tag}_shrink": shrink, "solve_s": float(info.get("solve_s", 0.0))})
        if ns is self.mnodes:
            self._diag.update({f"alpha_{i}": float(x) for i, x in enumerate(a)})
        return {"alpha": a, "beta": beta, "prior": prior, "u": u, "shrink": shrink, "graph_effect_l1": effect, "T": p.T,
                "node_loss": ns.means.mean_loss().numpy(), "window_loss": ns.window_loss, "fresh": ns.fresh,
                "node_total": ns.means.total.numpy(),
                "solver": info.get("solver"), "update_s": time.perf_counter() - t0}

    def _by_rule(self, ns: NodeSet, step: int) -> dict[str, Any]:
        """The weights over the nodes in force by a baseline's rule (``rule``), not DoGraph's objective:
        ``uniform`` (the nodes alone) or R&B's Balance step on the nodes' mean gradients of the window just
        closed (a node without a sequence in it keeps its previous mean, as in :class:`RnBMixer`), with ``q``
        the evaluation's share in each node. The evaluation weighs the sources equally, so for model nodes
        that is ``mean_s P(c | s)`` from the live table the sampler realises the weights through, not ``pi``
        (the clusters' occupancy under the base sampler, a separate estimate that drifts from the table's)."""
        if self.cfg.rule == "uniform":
            a, extra = np.full(ns.k, 1.0 / ns.k), {}
        else:
            m = ns.means.last.numpy()
            g = m @ m.T
            q = self._cluster_given_source().mean(1) if ns is self.mnodes else eval_shares(self.ctx)
            a, extra = rnb_update(g, q, self.cfg.lam), {"gram": g, "q": q}
        ns.set_alpha(a, step)
        if ns is self.mnodes:
            self._diag.update({f"alpha_{i}": float(x) for i, x in enumerate(a)})
        return {"alpha": a, "rule": self.cfg.rule, "node_loss": ns.means.mean_loss().numpy(),
                "window_loss": ns.window_loss, "fresh": ns.fresh,
                "node_total": ns.means.total.numpy(), **extra}

    def _target_mean(self) -> np.ndarray:
        """A1: the target's mean gradient (a held-out domain's from a probe of its training split)."""
        means = self.human.means.mean_matrix().numpy()
        m = np.zeros(self.dim)
        for d, w in self.target.items():
            if d in self.ctx.domains:
                m += w * means[self.ctx.domains.index(d)]
            else:
                ids, _ = draw_probe(self.ctx.corpus, [d], 64, self.ctx.seq_len, self._seed * 31 + self.last_step)
                (z,), _ = self._probe_features(ids, 1)
                m += w * z.double().numpy().mean(0)
        return m

    # -- model-perceived domains --------------------------------------------------------------
    def _probe_progress(self) -> dict[str, Any]:
        """Model-node losses on a fixed probe set: the same sequences at this and the last update,
        both grouped by their *current* cluster, so membership drift is not mistaken for progress."""
        (z,), loss = self._probe_features(self._progress_probe()[0], 1)
        labels = self.clusters.assign(z.double().numpy())
        k = self.cfg.k
        n = np.bincount(labels, minlength=k).astype(np.float64)
        now = np.bincount(labels, weights=loss, minlength=k) / np.maximum(n, 1)
        prev = None
        if self._pprobe_prev is not None:
            prev = np.bincount(labels, weights=self._pprobe_prev, minlength=k) / np.maximum(n, 1)
        self.mnodes.progress.record(now, n >= self.cfg.min_node_samples, prev=prev)
        self._pprobe_prev = loss
        return {"count": n, "loss": now}

    def _human_probe_progress(self) -> dict[str, Any]:
        """Human-node losses on a fixed probe set (``progress_from: probe``): the same windows of every
        source at each update, forward only, so a node's change is the model's and not the sampling noise
        of different training windows."""
        if self._model is None:
            raise ProbeError("no model seen yet (observe() was never called)")
        ids, src = self._progress_probe()
        ids = ids.to(next(self._model.parameters()).device)
        loss = self._probe_losses(ids, self.ctx.bf16).float().cpu().numpy()
        k = self.human.k
        n = np.bincount(src, minlength=k).astype(np.float64)
        now = np.bincount(src, weights=loss, minlength=k) / np.maximum(n, 1)
        self.human.progress.record(now, n >= self.cfg.min_node_samples)
        return {"count": n, "loss": now}

    def _maybe_recluster(self, step: int, reduce: Reduce) -> None:
        # first attempt at the first update; then every recluster_every steps
        if self._last_try is not None and step - self._last_try < self.cfg.recluster_every:
            return
        first, self._last_try = self._last_try is None, step
        cfg = self.cfg
        t0 = time.perf_counter()
        n_online, src = 0, np.zeros(0, dtype=np.int64)  # src stays empty if this rank's rows fail
        z, new, reason = None, None, "rank 0 decides"
        try:
            if self._online_rows and not first:  # the first clustering: a probe of the model as it is now
                z, zc, src, n_online = self._recluster_rows(step)
            else:
                ids, src = draw_probe(self.ctx.corpus, self.ctx.domains, cfg.probe_size, self.ctx.seq_len,
                                      self._seed * 1009 + step)
                (z, zc), _ = self._probe_features(ids, 2)
            check_features(z, f"step {step} probe features")
            if self.ctx.rank == 0 or reduce is identity_reduce:  # the other ranks adopt rank 0's clustering
                new = cl.recluster(z.numpy(), zc.numpy(), cfg.k, step, self._seed)
        except (ProbeError, FeatureError, cl.ClusteringError) as e:
            new, reason = None, str(e)
            if isinstance(e, (ProbeError, FeatureError)):  # no usable rows here: no labels of our own
                z, src = None, np.zeros(0, dtype=np.int64)
        # rank 0 decides; every rank adopts its clustering (a sum all-reduce of rank 0's numbers) and
        # labels its own rows by it (probe windows are the same on every rank; training rows are each
        # rank's own, so their cluster x source table is summed over ranks)
        stable = new is not None and new.ari >= cfg.min_ari
        flag = self._from_rank0(torch.tensor([float(stable)]), reduce)
        stable = bool(flag[0] > 0.5)
        if stable:
            d, k = self.dim, cfg.k
            mean = self._from_rank0(torch.from_numpy(new.mean if new is not None else np.zeros(d)), reduce).numpy()
            cents = self._from_rank0(torch.from_numpy(new.centroids if new is not None else np.zeros((k, d))), reduce).numpy()
            if new is None:  # another rank, or k-means failed here: rank 0's clusters label this rank's rows
                labels = cl.assign(z.numpy(), mean, cents) if z is not None else np.zeros(0, dtype=np.int64)
                new = cl.Clustering(mean=mean, centroids=cents, labels=labels, ari=float("nan"), step=step)
            elif reduce is not identity_reduce:
                new.mean, new.centroids = mean, cents
                new.labels = cl.assign(z.numpy(), mean, cents)
            if self.clusters is None:
                self.clusters = cl.LiveClusters(new, cfg.cluster_lr if cfg.live else 0.0,
                                                cfg.balance if cfg.live else 0.0, cfg.max_price,
                                                cfg.balance_band)
            else:
                self.clusters.replace(new)
            table = cl.contingency(new.labels, src, cfg.k, len(self.ctx.domains))
            if self._online_rows and reduce is not identity_reduce:  # each rank's rows are its own: sum them
                table = reduce(torch.from_numpy(table).double()).round().long().numpy()
            self.table = table
            self.ctab = table.astype(np.float64)
            self._init_pi(table)   # the new clusters' sizes, not the old ones'
            self.clustering = new
        was = self.in_force
        self.in_force = stable
        if stable and not was and cfg.rule == "dograph":
            # model nodes take over with no progress signal of their own yet: they start at their prior (the
            # sources keep their base weights), not at the 1/K they were built with
            # (inside the node bounds, as every solve's weights: a cap below a cluster's frequency projects)
            prior = self._prior(self.mnodes)
            a0 = np.full(cfg.k, 1.0 / cfg.k) if prior is None else prior
            self.mnodes.set_alpha(opt.smooth(a0, 0.0, self.mnodes.lo, self.mnodes.hi), step)
        if was != stable or not stable:
            what = "model-perceived domains in force" if stable else f"falling back to {cfg.fallback_nodes} nodes"
            why = reason if new is None else f"ARI across projections {new.ari:.3f} vs min_ari {cfg.min_ari}"
            log.info("dograph step %d: %s (%s)", step, what, why)
        self._diag["ari"] = float("nan") if new is None else new.ari
        self.events.write({"step": step, "event": "cluster", "accepted": stable,
                           "ari": None if new is None else new.ari, "ari_init": None if new is None else new.ari_init,
                           "reason": None if new is not None else reason, "in_force": stable,
                           "contingency": self.table if stable else None, "domains": self.ctx.domains,
                           "rows_online": n_online, "probe_s": time.perf_counter() - t0})
        if new is not None and not np.isnan(new.ari):
            self._save_probe(step, z, src, new.labels if stable else None)

    def _from_rank0(self, t: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        if reduce is identity_reduce:
            return t
        return reduce(t.double() * (1.0 if self.ctx.rank == 0 else 0.0))

    def _recluster_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
        """``recluster_from: online``: per source, its newest training sequences featurised in the last
        ``recluster_every`` steps (``probe_size`` stratified over sources, as a probe is), and probe
        sequences only for the sources short of rows. Returns (features, check features, source per row, rows
        reused from training)."""
        cfg = self.cfg
        have = [[r for r in rows if r[0] > step - cfg.recluster_every] for rows in self._rows]
        short = [(i, self._quota[i] - len(h)) for i, h in enumerate(have) if len(h) < self._quota[i]]
        ids, psrc = [], []
        for i, n in short:
            try:
                x, _ = draw_probe(self.ctx.corpus, [self.ctx.domains[i]], n, self.ctx.seq_len,
                                  self._seed * 1009 + step * 31 + i + 7919 * self.ctx.rank)  # ranks differ
            except ProbeError:  # no full window in this source: left out, as a probe leaves it out
                continue
            ids.append(x)
            psrc += [i] * x.shape[0]
        pz = pzc = None
        if ids:
            (pz, pzc), _ = self._probe_features(torch.cat(ids), 2)
        zs, zcs, src = [], [], []
        for i, h in enumerate(have):
            zs += [r[1] for r in h]
            zcs += [r[2] for r in h]
            src += [i] * len(h)
        n_online = len(src)
        if pz is not None:
            zs += list(pz)
            zcs += list(pzc)
            src += psrc
        if not zs:
            raise ProbeError("no training features and no probe windows to re-cluster")
        return torch.stack(zs), torch.stack(zcs), np.asarray(src, dtype=np.int64), n_online

    def _init_pi(self, table: np.ndarray) -> None:
        """Cluster frequencies under the base sampler from the cluster x source counts of a stratified
        set of rows: ``pi_c = sum_s base_s P(c | s)`` (floored)."""
        base = self.base_weights()
        t = table.astype(np.float64)
        per_source = t.sum(0)
        present = np.where(per_source > 0, base, 0.0)
        pi = (t / np.maximum(per_source, 1e-12)) @ present / max(float(present.sum()), 1e-12)
        pi = np.maximum(pi, 1e-3)
        self.pi = pi / pi.sum()

    def _cluster_given_source(self) -> np.ndarray:
        """``R[c, s] = P(cluster c | source s)`` from the live table (the last re-clustering's until a
        window is folded in). Conditioning on the source makes it independent of how often each source
        was drawn, so the windows' own assignments estimate it under any source weights. A source with
        no counts (none in the probe, or not drawn for a long time) gets ``1/K`` for every cluster: its
        weight is then the base weight scaled by the mean of ``a_c / pi_c``, neither starved nor favoured."""
        t = self.ctab + 1e-9   # set with every accepted table (and restored with it)
        return t / t.sum(0, keepdims=True)

    def _cluster_to_sources(self) -> np.ndarray:
        """Sampling weights over sources that realise cluster weights: ``sum_c a_c P(source | c)``, with
        ``P(source | c)`` under the base sampler (``base_s R[c, s] / pi_c``, ``pi_c = sum_s base_s R[c, s]``),
        so that ``a = pi`` gives the base weights."""
        R, base = self._cluster_given_source(), self.base_weights()
        w = base * ((self.alpha / (R @ base)) @ R)
        return w / w.sum()

    def _realisation(self, drew: np.ndarray, n: float) -> dict[str, Any]:
        """How well sampling sources realises the cluster weights: ``expected`` is the cluster mixture the
        source weights ``drew`` give under the live table, ``expected_gap_l1`` its distance from ``a``
        (what sources cannot express), and ``noise_l1`` the L1 distance a window of ``n`` featurised
        sequences drawn from ``expected`` shows by chance (normal approximation of the multinomial)."""
        exp = self._cluster_given_source() @ drew
        exp = exp / exp.sum()
        noise = float(np.sum(np.sqrt(2.0 * exp * (1 - exp) / (np.pi * max(n, 1.0)))))
        gap = float(np.abs(exp - self.alpha).sum())
        self._diag.update(expected_gap_l1=gap, noise_l1=noise)
        return {"expected": exp, "expected_gap_l1": gap, "noise_l1": noise}

    # -- analysis -----------------------------------------------------------------------------
    def analysis_steps(self) -> list[int]:
        """The steps of the analysis probes: 0 (taken at the first micro-batch, before any optimizer
        step), then each fraction of the run moved down to an update step (probes are taken inside
        ``update()``, so a target between two updates would otherwise never be reached)."""
        every = self.cfg.update_every
        total = max(self.ctx.total_steps, every)
        return sorted({0 if f == 0 else max(every, int(round(f * total)) // every * every) for f in self.cfg.analysis_probes})

    def _maybe_analysis_probe(self, step: int) -> None:
        for target in self.analysis_steps():
            if target > 0 and target not in self._analysis_done and step >= target:
                self._analysis_probe(target)
                return

    def _analysis_probe(self, step: int) -> None:
        t0 = time.perf_counter()
        try:
            self._take_analysis_probe(step)
        finally:
            self.analysis_time += time.perf_counter() - t0

    def _take_analysis_probe(self, step: int) -> None:
        self._analysis_done.add(step)
        if self.ctx.out_dir is None or self.ctx.rank != 0 or self.ctx.corpus is None:
            return
        try:   # the same probe windows at every checkpoint, so the panels compare like with like
            ids, src = draw_probe(self.ctx.corpus, self.ctx.domains, self.cfg.probe_size, self.ctx.seq_len, self._seed * 1013)
            (z,), _ = self._probe_features(ids, 1)
        except (ProbeError, FeatureError) as e:
            log.warning("dograph step %d: analysis probe failed (%s)", step, e)
            return
        labels = self.clusters.assign(z.double().numpy()) if self.clusters is not None else None
        self._save_probe(step, z, src, labels, kind="analysis")

    def _save_probe(self, step: int, z: torch.Tensor, src: np.ndarray, labels: Optional[np.ndarray],
                    kind: str = "cluster") -> None:
        if self.ctx.out_dir is None or self.ctx.rank != 0:
            return
        from dograph_core.io import atomic_path

        name = f"step_{step:07d}.npz" if kind == "analysis" else f"cluster_{step:07d}.npz"
        path = self.ctx.out_dir / "probes" / name
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, z=z.numpy().astype(np.float32), sources=src,
                                    labels=labels if labels is not None else np.full(len(src), -1),
                                    domains=np.asarray(self.ctx.domains), step=step)

    # -- state, result ------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        return dict(self._diag)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        c = self.clustering
        return {
            **super().state_dict(),
            "human": self.human.state_dict(), "model": None if self.mnodes is None else self.mnodes.state_dict(),
            "pi": self.pi.tolist(), "pi_counts": self._pi_counts.clone(), "mass": self._mass.clone(),
            "ess": self._ess.clone(), "occ": self._occ.tolist(), "in_force": self.in_force,
            "clusters": None if self.clusters is None else self.clusters.state_dict(),
            "clustering": None if c is None else {
                "mean": torch.from_numpy(c.mean.copy()), "centroids": torch.from_numpy(c.centroids.copy()),
                "labels": torch.from_numpy(c.labels.copy()), "ari": float(c.ari), "ari_init": float(c.ari_init),
                "step": int(c.step)},
            "table": None if self.table is None else self.table.tolist(),
            "ctab": None if self.ctab is None else self.ctab.tolist(), "tab_counts": self._tab_counts.clone(),
            "pprobe_prev": None if self._pprobe_prev is None else torch.from_numpy(self._pprobe_prev.copy()),
            "updates": dict(self.updates), "last_step": self.last_step,
            "analysis_done": sorted(self._analysis_done), "last_try": self._last_try,
            "subset_draws": self._subset_draws,
            "bad_window": self.bad_window,   # a checkpoint inside a window with bad features must still drop it
            "rows": [None if not rows else {"step": torch.tensor([r[0] for r in rows]),
                                            "z": torch.stack([r[1] for r in rows]),
                                            "zc": torch.stack([r[2] for r in rows])} for rows in self._rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        try:
            self.human.load_state_dict(state["human"])
            if self.mnodes is not None:
                self.mnodes.load_state_dict(state["model"])
        except (ValueError, KeyError) as e:
            raise MixerError(f"dograph checkpoint does not match this run: {e}") from None
        self.pi = np.asarray(state["pi"], dtype=np.float64)
        self._pi_counts = torch.as_tensor(state["pi_counts"]).double().clone()
        self._mass = torch.as_tensor(state["mass"]).double().clone()
        self._ess = torch.as_tensor(state["ess"]).double().clone()
        self._occ = np.asarray(state["occ"], dtype=np.float64)
        self.in_force = bool(state["in_force"])
        c = state["clustering"]
        self.clustering = None if c is None else cl.Clustering(
            mean=_np(c["mean"]), centroids=_np(c["centroids"]), labels=_np(c["labels"]).astype(np.int64),
            ari=float(c["ari"]), step=int(c["step"]), ari_init=float(c["ari_init"]))
        if state["clusters"] is not None:
            self.clusters = cl.LiveClusters(self.clustering, self.cfg.cluster_lr if self.cfg.live else 0.0,
                                            self.cfg.balance if self.cfg.live else 0.0, self.cfg.max_price,
                                            self.cfg.balance_band)
            self.clusters.load_state_dict(state["clusters"])
        self.table = None if state["table"] is None else np.asarray(state["table"], dtype=np.int64)
        ctab = state.get("ctab", state["table"])   # a checkpoint from before the live table: the probe's
        self.ctab = None if ctab is None else np.asarray(ctab, dtype=np.float64)
        if state.get("tab_counts") is not None:
            self._tab_counts = torch.as_tensor(state["tab_counts"]).double().clone()
        self._pprobe_prev = None if state["pprobe_prev"] is None else _np(state["pprobe_prev"])
        self.updates = {k: int(v) for k, v in state["updates"].items()}
        self.last_step = int(state["last_step"])
        self._last_try = None if state.get("last_try") is None else int(state["last_try"])
        self._subset_draws = int(state.get("subset_draws", 0))
        self.bad_window = state.get("bad_window")
        self._inbox.clear()
        self._pending = None
        # a checkpoint holds rank 0's rows: the other ranks start theirs again (a re-clustering before they
        # refill probes what is short), rather than count rank 0's rows once per rank in the summed table
        saved = (state.get("rows") if self.ctx.rank == 0 else None) or [None] * len(self._rows)
        self._rows = [[] if r is None else list(zip(r["step"].tolist(), r["z"], r["zc"])) for r in saved]
        self._analysis_done = set(int(x) for x in state["analysis_done"])
        self.events.truncate(self.last_step)

    def final_weights(self) -> np.ndarray:
        """The time average of the source weights the loop used (model nodes acting by loss: the
        loss-weight mass per source, i.e. the effective source weights), so a static transfer is possible."""
        return time_average(self.history, self.ctx.total_steps)

    def result(self) -> dict[str, Any]:
        doc = super().result()
        total = max(self.updates["total"], 1)
        node_hist = self.mnodes.history if self.model_mode else self.human.history
        doc["meta"] = {
            "nodes": self.cfg.nodes, "apply": self.apply, "k": self.n_nodes, "d": self.dim,
            "objective": self.cfg.objective, "graph": self.cfg.graph,
            "node_weights": self.alpha.tolist(),
            "node_schedule": [{"step": s, "weights": w} for s, w in node_hist],
            "model_nodes_in_force_share": self.updates["model"] / total if self.model_mode else None,
            "contingency": None if self.table is None else self.table.tolist(),
            "contingency_live": None if self.ctab is None else np.round(self.ctab, 3).tolist(),
            "clustering_step": None if self.clustering is None else self.clustering.step,
            "clustering_ari": None if self.clustering is None else self.clustering.ari,
            "target": self.target,
            "heldout_used_as_target": [d for d in (self.target or {}) if d in self.ctx.heldout_domains],
            "final_weights": "time average of the source weights the loop used" + (
                " (loss-weight mass per source while model nodes acted by loss)" if self.model_mode else ""),
        }
        if self.cfg.plots and self.ctx.out_dir is not None and self.ctx.rank == 0:
            try:
                from dograph_core.analysis import render

                render(self.ctx.out_dir, doc)
            except Exception as e:  # plots must never lose the weights file
                log.warning("dograph: analysis plots failed: %s: %s", type(e).__name__, e)
        return doc


def _np(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
