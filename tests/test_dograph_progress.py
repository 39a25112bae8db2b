"""The progress signal: lagging nodes gain, a node without data is neutral, noise gives uniform."""
from __future__ import annotations

import numpy as np
import pytest

from dograph_core.progress import Progress, ProgressError



def feed(p: Progress, losses, fresh=None):
    for loss in losses:
        p.record(np.asarray(loss, dtype=float), np.ones(len(loss), bool) if fresh is None else fresh)


def test_a_node_that_lags_consistently_gets_the_largest_target():
    p = Progress(3, horizon=5, min_windows=3)
    loss = np.array([4.0, 4.0, 4.0])
    seq = []
    for _ in range(6):  # nodes 0 and 1 improve 5% per window, node 2 only 1%
        seq.append(loss.copy())
        loss = loss * np.array([0.95, 0.95, 0.99])
    feed(p, seq)
    beta, u, s = p.targets(tau=1.0)
    assert s > 0.99                          # a steady difference: no shrinkage
    assert beta.argmax() == 2 and beta[0] == pytest.approx(beta[1])
    # by hand: d = r - mean r = (-1/75, -1/75, +2/75) per window; u = d / mean|d| = (-0.75, -0.75, 1.5)
    assert np.allclose(u, [-0.75, -0.75, 1.5])
    assert np.allclose(beta, np.exp(u) / np.exp(u).sum())


def test_before_enough_windows_the_targets_are_uniform():
    p = Progress(3, horizon=5, min_windows=3)
    feed(p, [[4, 4, 4], [3.8, 3.8, 3.99]])    # one change only: the noise cannot be estimated
    beta, u, s = p.targets(1.0)
    assert np.allclose(beta, 1 / 3) and s == 0.0


def test_without_a_signal_the_targets_are_the_prior_and_progress_tilts_it():
    """Model nodes pass their frequency under the base sampler: no evidence means no reweighting."""
    prior = np.array([0.5, 0.3, 0.2])
    p = Progress(3, horizon=5, min_windows=3)
    feed(p, [[4, 4, 4], [3.8, 3.8, 3.99]])    # too few changes: no signal
    assert np.allclose(p.targets(1.0, prior)[0], prior)
    loss, seq = np.array([4.0, 4.0, 4.0]), []
    for _ in range(6):                         # node 2 lags steadily (as above): u = (-0.75, -0.75, 1.5)
        seq.append(loss.copy())
        loss = loss * np.array([0.95, 0.95, 0.99])
    feed(p, seq)
    beta, u, _ = p.targets(1.0, prior)
    assert np.allclose(beta, prior * np.exp(u) / (prior * np.exp(u)).sum())
    assert beta[2] > prior[2] and beta[0] < prior[0]   # the laggard gains from its prior, the others give
    with pytest.raises(ProgressError, match="prior"):
        p.targets(1.0, np.array([0.5, -0.1, 0.6]))


def test_a_starved_node_is_neutral_not_the_largest():
    """Node 2 gets no fresh samples: its loss is frozen. It must not look like the laggard (u = 0 > the
    learning nodes' negative changes was the old bug): it is neutral, between the two learning nodes."""
    p = Progress(3, horizon=5, min_windows=3)
    loss = np.array([4.0, 4.0, 4.0])
    for _ in range(6):
        p.record(loss.copy(), np.array([True, True, False]))
        loss = loss * np.array([0.95, 0.97, 1.0])
    beta, u, _ = p.targets(1.0)
    assert u[2] == 0.0 and u[1] > 0 > u[0]    # node 1 lags node 0; node 2 has no score
    assert beta[1] > beta[2] > beta[0]
    assert beta.argmax() != 2


def test_late_flat_progress_is_shrunk_to_uniform():
    """End of a cosine schedule: every node changes by noise around zero. The old standardisation blew
    this up to unit contrast; the noise-aware scale gives (nearly) uniform targets."""
    rng = np.random.default_rng(0)
    p = Progress(4, horizon=6, min_windows=3)
    feed(p, 3.0 * (1 + 1e-3 * rng.normal(size=(7, 4))))
    beta, u, s = p.targets(1.0)
    assert s < 0.3 and beta.max() < 0.3
    off = Progress(4, horizon=6, min_windows=3, shrink=False)
    feed(off, 3.0 * (1 + 1e-3 * np.random.default_rng(0).normal(size=(7, 4))))
    assert off.targets(1.0)[0].max() > beta.max()  # without shrinkage the noise is amplified


def test_probe_path_uses_the_given_previous_losses():
    """With re-scored probe sequences the previous loss of a node is given, not remembered."""
    p = Progress(2, horizon=3, min_windows=2)
    r = p.record(np.array([2.0, 3.0]), np.ones(2, bool), prev=np.array([2.5, 3.0]))
    assert np.allclose(r, [-0.2, 0.0])


def test_bad_input_is_refused():
    with pytest.raises(ProgressError, match="min_windows"):
        Progress(3, horizon=2, min_windows=3)
    with pytest.raises(ProgressError, match="expected 3"):
        Progress(3).record(np.ones(2), np.ones(2, bool))


def test_state_round_trip():
    p = Progress(3, horizon=4, min_windows=2)
    feed(p, [[4, 4, 4], [3.8, 3.9, 3.99], [3.6, 3.8, 3.98]])
    q = Progress(3, horizon=4, min_windows=2)
    q.load_state_dict(p.state_dict())
    assert np.allclose(p.targets(1.0)[0], q.targets(1.0)[0])


def test_a_node_back_from_starvation_is_not_scored_as_the_fastest_learner():
    """Human nodes score the raw window mean loss: a node that had no data for two windows and comes back
    at the others' level gets no change for the gap (not fresh twice) and then an ordinary one."""
    import torch

    from dograph_core.mixers.dograph_config import DoGraphConfig
    from dograph_core.mixers.dograph_nodes import NodeSet

    ns = NodeSet(3, 2, DoGraphConfig(min_node_samples=1))
    z = torch.zeros(6, 2)
    for w, (loss, present) in enumerate([(4.0, True), (4.0, False), (4.0, False), (3.0, True), (2.9, True)]):
        nodes = torch.tensor([0, 0, 1, 1, 2, 2]) if present else torch.tensor([0, 0, 1, 1, 0, 1])
        base = 4.0 - 0.1 * w
        losses = torch.tensor([base, base, base, base, loss, loss])
        ns.means.add(z, nodes, losses)
        ns.commit()
        ns.record_batch_progress()
    last = ns.progress.changes[-1]
    r2 = 2.9 / 3.0 - 1                                   # its own change over the last window only
    r01 = (3.6 - 3.7) / 3.7
    assert abs(last[2] - (r2 - np.mean([r01, r01, r2]))) < 1e-6
    assert np.isnan(ns.progress.changes[-2][2])          # the window it came back in has no score (not fresh twice)
