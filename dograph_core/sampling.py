"""The mixture sampler: which training sequences each optimizer step reads.

**Weights are probabilities over training sequences of fixed length** (``seq_len`` + 1 tokens:
``seq_len`` inputs and the next-token targets). A weight of 0.3 for ``code`` means that each
sequence of a batch comes from ``code`` with probability 0.3, whatever the length of its documents.

How a step's global batch (``batch_size`` sequences over all ranks and accumulation steps) is drawn:

1. the domain of each sequence is drawn from the current weights with a generator seeded by
   ``(seed, step)``; domains whose repetition cap (``max_epochs``) is reached get weight 0 and
   the others are renormalised;
2. each sequence takes the next window of its domain: a domain's training tokens are cut into
   windows of ``seq_len + 1`` tokens (neighbours share one token) on a grid with a random offset,
   visited in a seeded random order; when all are read, the next epoch starts with a fresh order.

With ``stratified=True`` point 1 is a stratified draw instead (:func:`stratified_counts`): every
domain with positive weight gets ``floor(B * w_d)`` sequences, at least one each when the batch has
room for all of them, the remaining few sequences go to distinct domains drawn from the fractional
parts of ``B * w`` with the same seeded generator, and the batch order is shuffled by that generator
so every micro-batch and rank slice mixes domains. Each domain's count is then within one of
``B * w_d`` (unless the at-least-one rule moves a sequence), and its expected count is ``B * w_d``.
This is the DoReMi maintainer's advice for small batches (every domain in every batch).

So the stream is a deterministic function of (seed, step, weights history), and the whole state
is a few integers per domain (:meth:`MixtureSampler.state_dict`), stored in every checkpoint: a
run killed and resumed reads exactly what an uninterrupted run reads, and the weights may change
at any step. Every rank draws the same global batch and reads only its own disjoint slice
(:func:`rank_slice`), so ranks never see the same sequence.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from dograph_core.mixers.base import check_weights

_STREAM = 0x5EED  # separates the window-order stream from the domain-draw stream


class SamplerError(ValueError):
    """Bad sampler input: weights, batch shape, corpus too small, or an exhausted corpus."""


@dataclass
class Draw:
    """One step's global batch: the domain and window start of every sequence."""

    step: int
    domain_ids: np.ndarray  # [B] int64
    starts: np.ndarray      # [B] int64, token offset of each window in its domain's shard

    def crc(self) -> int:
        """A checksum of the batch's identity (which windows, in which order)."""
        return zlib.crc32(self.domain_ids.astype(np.int64).tobytes() + self.starts.astype(np.int64).tobytes())


def stratified_counts(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sequences per domain for a stratified draw of ``n`` sequences from probabilities ``p``.

    ``floor(n * p_d)`` each; the ``r`` left over go to ``r`` distinct domains drawn by systematic
    sampling on the fractional parts (one uniform from ``rng``), so domain ``d`` gets an extra one
    with probability exactly ``frac(n * p_d)``: counts are within one of ``n * p`` and unbiased.
    If ``n`` is at least the number of domains with positive ``p``, each of them gets at least one,
    taken from the largest allocation (ties: lowest index).
    """
    k = len(p)
    target = n * np.asarray(p, dtype=np.float64)
    counts = np.floor(target + 1e-9).astype(np.int64)  # 1e-9: 0.3 * 10 is 3, not 2.999...
    r = n - int(counts.sum())
    if r > 0:
        frac = np.clip(target - counts, 0.0, None)
        frac = frac * (r / frac.sum())
        cum = np.minimum(np.cumsum(frac), r)
        cum[int(np.flatnonzero(frac > 0)[-1]):] = r
        points = rng.random() + np.arange(r)
        counts += np.bincount(np.searchsorted(cum, points, side="right"), minlength=k)
    positive = np.flatnonzero(np.asarray(p) > 0)
    if n >= positive.size:
        for d in positive[counts[positive] == 0]:
            counts[int(np.argmax(counts))] -= 1
            counts[d] = 1
    return counts


def rank_slice(batch_size: int, rank: int, world_size: int, micro: int = 0, grad_accum: int = 1) -> slice:
    """Indices of the global batch that ``rank`` reads in micro-batch ``micro``; disjoint across ranks."""
    parts = world_size * grad_accum
    if batch_size % parts:
        raise SamplerError(
            f"train.batch_size={batch_size} is not divisible by world_size x grad_accum = "
            f"{world_size} x {grad_accum}; choose a batch size that is a multiple of {parts}"
        )
    per_rank = batch_size // world_size
    per_micro = per_rank // grad_accum
    lo = rank * per_rank + micro * per_micro
    return slice(lo, lo + per_micro)


class MixtureSampler:
    """Draws each step's sequences from a domain mixture that may change at any step."""

    def __init__(
        self,
        tokens: Mapping[str, np.ndarray],
        domains: list[str],
        seq_len: int,
        batch_size: int,
        weights: Any,
        seed: int = 0,
        max_epochs: Optional[float] = None,
        stratified: bool = False,
    ):
        if seq_len < 1:
            raise SamplerError(f"seq_len must be positive, got {seq_len}")
        if batch_size < 1:
            raise SamplerError(f"batch_size must be positive, got {batch_size}")
        if max_epochs is not None and not max_epochs > 0:
            raise SamplerError(f"max_epochs must be positive, got {max_epochs}")
        self.domains = list(domains)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.max_epochs = max_epochs
        self.stratified = bool(stratified)
        self._tokens = [tokens[d] for d in self.domains]
        self.sizes = np.array([len(t) for t in self._tokens], dtype=np.int64)
        short = [f"{d} ({n} tokens)" for d, n in zip(self.domains, self.sizes) if n < seq_len + 1]
        if short:
            raise SamplerError(
                f"training domains shorter than one sequence of seq_len+1={seq_len + 1} tokens: {short}; "
                "lower train.seq_len or add data"
            )
        k = len(self.domains)
        self.weights = check_weights(weights, self.domains, "sampler weights")
        self.next_step = 1
        self.epoch = np.zeros(k, dtype=np.int64)      # current epoch per domain
        self.cursor = np.zeros(k, dtype=np.int64)     # windows read in the current epoch
        self.windows_read = np.zeros(k, dtype=np.int64)
        self.target_sum = np.zeros(k, dtype=np.float64)  # sum over steps of batch_size * requested weights
        self.capped_at: list[int] = [0] * k           # step at which each domain hit its cap (0 = never)
        self._orders: dict[int, tuple[int, np.ndarray, int]] = {}  # domain -> (epoch, order, offset)

    # -- weights -----------------------------------------------------------------------------
    def set_weights(self, w: Any) -> None:
        """Use ``w`` from the next draw on (validated: length, finite, non-negative, not all zero)."""
        self.weights = check_weights(w, self.domains, "sampler weights")

    def _remaining(self) -> np.ndarray:
        """Windows each domain may still give before its repetition cap (a large number if uncapped)."""
        if self.max_epochs is None:
            return np.full(len(self.domains), np.iinfo(np.int64).max // 4, dtype=np.int64)
        allowed = np.floor(self.max_epochs * (self.sizes - 1) / self.seq_len).astype(np.int64)
        return np.maximum(allowed - self.windows_read, 0)

    # -- windows -----------------------------------------------------------------------------
    def _order(self, d: int) -> tuple[np.ndarray, int]:
        e = int(self.epoch[d])
        cached = self._orders.get(d)
        if cached is None or cached[0] != e:
            rng = np.random.default_rng([self.seed, _STREAM, d, e])
            offset = int(rng.integers(0, self.seq_len)) if self.sizes[d] - 1 >= 2 * self.seq_len else 0
            n = max((int(self.sizes[d]) - 1 - offset) // self.seq_len, 1)
            cached = (e, rng.permutation(n), offset)
            self._orders[d] = cached
        return cached[1], cached[2]

    def _next_window(self, d: int) -> int:
        order, offset = self._order(d)
        if self.cursor[d] >= len(order):
            self.epoch[d] += 1
            self.cursor[d] = 0
            order, offset = self._order(d)
        start = offset + int(order[self.cursor[d]]) * self.seq_len
        self.cursor[d] += 1
        self.windows_read[d] += 1
        return start

    # -- drawing -----------------------------------------------------------------------------
    def draw(self, step: int) -> Draw:
        """The global batch of ``step``; steps must be drawn in order (1, 2, ...), once each."""
        if step != self.next_step:
            raise SamplerError(f"sampler asked for step {step}, expected step {self.next_step} (steps are drawn in order)")
        rng = np.random.default_rng([self.seed, step])
        k = len(self.domains)
        self.target_sum += self.batch_size * self.weights
        remaining = self._remaining()
        w = self.weights.copy()
        ids = np.full(self.batch_size, -1, dtype=np.int64)
        todo = np.arange(self.batch_size)
        while todo.size:
            w = np.where(remaining > 0, w, 0.0)
            if w.sum() <= 0:
                raise SamplerError(
                    f"step {step}: every domain with positive weight has reached the repetition cap "
                    f"train.max_epochs={self.max_epochs}; raise the cap, add data or train fewer steps"
                )
            for d in np.flatnonzero((remaining <= 0) & (self.weights > 0)):
                if not self.capped_at[d]:
                    self.capped_at[d] = step
            if self.stratified:
                # Blocks by domain here; the whole batch is shuffled once every sequence has its domain.
                ids[todo] = np.repeat(np.arange(k), stratified_counts(w / w.sum(), todo.size, rng))
            else:
                ids[todo] = rng.choice(k, size=todo.size, p=w / w.sum())
            # Keep, per domain, only as many sequences as its cap allows; redraw the rest.
            over = []
            for d in range(k):
                pos = todo[ids[todo] == d]
                if pos.size > remaining[d]:
                    over.append(pos[remaining[d]:])
                remaining[d] -= min(pos.size, remaining[d])
            todo = np.sort(np.concatenate(over)) if over else np.empty(0, dtype=np.int64)
        if self.stratified:
            ids = ids[rng.permutation(self.batch_size)]
        starts = np.array([self._next_window(int(d)) for d in ids], dtype=np.int64)
        self.next_step = step + 1
        return Draw(step, ids, starts)

    def tokens(self, draw: Draw, idx: slice | None = None) -> torch.Tensor:
        """The token windows ``[b, seq_len + 1]`` (int64) of the selected sequences of a draw."""
        ids = draw.domain_ids if idx is None else draw.domain_ids[idx]
        starts = draw.starts if idx is None else draw.starts[idx]
        L = self.seq_len + 1
        out = np.empty((len(ids), L), dtype=np.int64)
        for i, (d, s) in enumerate(zip(ids, starts)):
            out[i] = self._tokens[int(d)][int(s): int(s) + L]
        return torch.from_numpy(out)

    # -- reporting and state -------------------------------------------------------------------
    def epochs(self) -> np.ndarray:
        """How many times each domain's training tokens have been read (1.0 = once)."""
        return self.windows_read * self.seq_len / np.maximum(self.sizes - 1, 1)

    def report(self) -> dict[str, Any]:
        """Realised mixture against the target, epochs per domain, and which domains hit the cap."""
        n = max(int(self.windows_read.sum()), 1)
        tsum = max(float(self.target_sum.sum()), 1e-12)
        ep = self.epochs()
        return {
            "unit": "share of training sequences of fixed length",
            "sequences": int(self.windows_read.sum()),
            "max_epochs": self.max_epochs,
            "domains": {
                d: {
                    "target": float(self.target_sum[i] / tsum),
                    "realised": float(self.windows_read[i] / n),
                    "sequences": int(self.windows_read[i]),
                    "epochs": float(ep[i]),
                    "capped_at_step": int(self.capped_at[i]) or None,
                }
                for i, d in enumerate(self.domains)
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "sizes": self.sizes.tolist(),
            "stratified": self.stratified,
            "next_step": self.next_step,
            "weights": self.weights.tolist(),
            "epoch": self.epoch.tolist(),
            "cursor": self.cursor.tolist(),
            "windows_read": self.windows_read.tolist(),
            "target_sum": self.target_sum.tolist(),
            "capped_at": list(self.capped_at),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("domains", "seed", "seq_len", "batch_size", "sizes", "stratified"):
            mine = self.state_dict()[key]
            theirs = state.get(key, False) if key == "stratified" else state[key]  # older checkpoints: iid
            if theirs != mine:
                raise SamplerError(f"sampler state does not match this run: {key} was {theirs}, now {mine}")
        self.next_step = int(state["next_step"])
        self.weights = check_weights(state["weights"], self.domains, "sampler weights in checkpoint")
        self.epoch = np.asarray(state["epoch"], dtype=np.int64)
        self.cursor = np.asarray(state["cursor"], dtype=np.int64)
        self.windows_read = np.asarray(state["windows_read"], dtype=np.int64)
        self.target_sum = np.asarray(state["target_sum"], dtype=np.float64)
        self.capped_at = [int(x) for x in state["capped_at"]]
        self._orders.clear()
