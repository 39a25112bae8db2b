"""R&B (Ge et al. 2025, "R&B: Domain Regrouping and Data Mixture Balancing for Efficient Foundation
Model Training", arXiv 2505.00358): the Balance step, online, from the ordinary training pass.

Every ``update_every`` steps (a round), with ``G_ij = <g_i, g_j>`` the inner products of the nodes'
mean final-layer gradients over the round (Algorithm 1, line 14; Section 3.4; derived in App. B.1)::

    p  <-  softmax( lam * G q / ||G q|| )

``q`` is the share of the evaluation set that falls in each node, fixed for the run: here the
evaluation is the mean loss over the human sources, so ``q_n`` is the mean over sources of the share
of each source's validation tokens that the partition puts in node ``n`` (uniform over sources for
the human partition). The new weights replace the old (no multiplicative update), ``p`` starts
uniform, and ``lam = 3`` is the one value the paper states (Table 7). The paper does not state the
round length; ``update_every: 20`` gives about a hundred rounds over its 2000-step runs (App. G).
No public code was found, so this follows the paper's text (``docs/baselines.md``).

The final-layer gradient of a sequence is ``sum_t (softmax_t - e_{y_t}) h_t^T / T``, recovered from the
forward pass's logits and last hidden states (App. E.1), with no extra forward or backward. It is kept
as DoGraph's Kronecker sketch of that matrix (``dograph_core.gradients.output_features``; inner products
are unbiased), summed per node over the round and divided by the node's count. A node that drew no
sequence in a round keeps its previous mean gradient (the paper does not say; dividing by zero is not
an option). The Regroup step is the ``text`` partition (``dograph_core.partition``).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from dograph_core.gradients import Projection, output_features
from dograph_core.mixers.base import BatchStats, Mixer, MixerConfig, MixerContext, MixerError, Reduce, identity_reduce


class RnBConfig(MixerConfig):
    update_every: int = Field(20, gt=0, description="steps per round (the paper does not state it; ~100 rounds in App. G)")
    lam: float = Field(3.0, gt=0, description="the softmax's scale lambda (Table 7: 3)")
    sketch: Literal["dense", "count"] = Field("count", description="projection of the vocabulary dimension")
    r1: int = Field(32, gt=0, description="sketch rows over the vocabulary")
    r2: int = Field(64, gt=0, description="sketch rows over the hidden dimension")
    feature_sequences: int = Field(0, ge=0, description="sequences of each micro-batch featurised (0 = all)")
    feature_tokens: int = Field(0, ge=0, description="positions per sequence featurised (0 = all)")


def rnb_update(G: np.ndarray, q: np.ndarray, lam: float) -> np.ndarray:
    """The Balance step: ``softmax(lam * G q / ||G q||)``; uniform when ``G q`` is zero (no signal)."""
    v = np.asarray(G, dtype=np.float64) @ np.asarray(q, dtype=np.float64)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n):
        raise MixerError(f"rnb: the gradient Gram matrix is not finite: {G!r}")
    if n == 0.0:
        return np.full(len(q), 1.0 / len(q))
    x = lam * v / n
    e = np.exp(x - x.max())
    return e / e.sum()


def eval_shares(ctx: MixerContext) -> np.ndarray:
    """``q``: the share of the evaluation (mean over sources of their validation tokens) in each node."""
    k = len(ctx.domains)
    if getattr(ctx.corpus, "partition", None) is None:
        return np.full(k, 1.0 / k)
    q = ctx.corpus.source_shares("val").sum(0)
    return q / q.sum() if q.sum() > 0 else np.full(k, 1.0 / k)


class RnBMixer(Mixer):
    """R&B's Balance: weights from the round's Gram matrix of node gradients and the evaluation's shares."""

    name = "rnb"
    apply = "sample"
    needs = frozenset({"hidden"})
    Config = RnBConfig

    def __init__(self, cfg: RnBConfig, ctx: MixerContext):
        super().__init__(cfg, ctx)
        k = len(ctx.domains)
        self.q = eval_shares(ctx)
        self.proj: Projection | None = None  # built at the first batch, from the model's widths
        dim = cfg.r1 * cfg.r2
        self._sum = torch.zeros(k, dim, dtype=torch.float64)
        self._cnt = torch.zeros(k, dtype=torch.float64)
        self.means = np.zeros((k, dim))     # each node's latest mean gradient (sketched)
        self.G = np.zeros((k, k))
        self._gen = torch.Generator().manual_seed(ctx.seed * 104723 + ctx.rank)

    def observe(self, stats: BatchStats) -> None:
        if stats.hidden is None or stats.logits is None:
            raise MixerError("rnb: the training loop gave no hidden states or logits (needs 'hidden')")
        ids, hidden, logits, dom = stats.input_ids, stats.hidden, stats.logits, stats.domain_ids
        if self.cfg.feature_sequences and self.cfg.feature_sequences < ids.shape[0]:
            pick = torch.randperm(ids.shape[0], generator=self._gen)[: self.cfg.feature_sequences].sort().values
            dev = pick.to(hidden.device)
            ids, hidden, logits, dom = ids[pick.to(ids.device)], hidden[dev], logits[dev], dom[pick.to(dom.device)]
        if self.proj is None:
            self.proj = Projection(logits.shape[-1], hidden.shape[-1], self.cfg.r1, self.cfg.r2,
                                   seed=self.ctx.seed * 7919 + 17, sketch=self.cfg.sketch)
        z = output_features(hidden, logits, ids[:, 1:].to(hidden.device), self.proj,
                            tokens=self.cfg.feature_tokens or None, generator=self._gen)
        z = z.double().cpu()
        if not bool(torch.isfinite(z).all()):
            raise MixerError(f"rnb: non-finite gradient features at step {stats.step}")
        d = dom.detach().long().cpu()
        self._sum.index_add_(0, d, z)
        self._cnt += torch.bincount(d, minlength=len(self.ctx.domains)).double()

    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        total = reduce(self._sum.clone()).cpu().numpy()
        count = reduce(self._cnt.clone()).cpu().numpy()
        self._sum.zero_()
        self._cnt.zero_()
        seen = count > 0
        self.means[seen] = total[seen] / count[seen, None]
        self.G = self.means @ self.means.T
        self.set_weights(rnb_update(self.G, self.q, self.cfg.lam), step)
        return self.weights

    def result(self) -> dict[str, Any]:
        doc = super().result()
        doc["meta"] = {"lam": self.cfg.lam, "round_steps": self.cfg.update_every,
                       "eval_shares": [float(x) for x in self.q], "gram": self.G.tolist()}
        return doc

    def diagnostics(self) -> dict[str, float]:
        norms = np.sqrt(np.maximum(np.diag(self.G), 0))
        return {f"grad_norm/{d}": float(x) for d, x in zip(self.ctx.domains, norms)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(grad_sum=self._sum.clone(), grad_count=self._cnt.clone(), means=self.means.tolist(),
                     gram=self.G.tolist())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._sum = torch.as_tensor(state["grad_sum"], dtype=torch.float64).clone()
        self._cnt = torch.as_tensor(state["grad_count"], dtype=torch.float64).clone()
        self.means = np.asarray(state["means"], dtype=np.float64)
        self.G = np.asarray(state["gram"], dtype=np.float64)
