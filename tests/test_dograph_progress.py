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
    this up to unit contrast; the noise-aware scale gives (nearly) uniform targets. James-Stein shrinks a
    pure-noise contrast to zero in most draws, not in every one, so this is checked over 200 draws."""
    s_all, top, top_off = [], [], []
    for seed in range(200):
        x = 3.0 * (1 + 1e-3 * np.random.default_rng(seed).normal(size=(7, 4)))
        p, off = Progress(4, horizon=6, min_windows=3), Progress(4, horizon=6, min_windows=3, shrink=False)
        feed(p, x), feed(off, x)
        beta, _, s = p.targets(1.0)
        s_all.append(s), top.append(beta.max()), top_off.append(off.targets(1.0)[0].max())
    assert np.median(s_all) == 0.0 and np.mean(s_all) < 0.2
    assert np.mean(top) < 0.32                 # uniform is 0.25
    assert np.mean(top_off) > 0.55             # without shrinkage the noise is amplified to one node


def _noisy_levels(rng, lag: float, sigma: float = 0.01, k: int = 8, windows: int = 8, curve: float = 0.0):
    """Window losses: a common learning curve (``curve`` bends it), node 0 slower by ``lag`` per update
    (relative), each window's mean measured with its own sampling noise ``sigma`` (relative)."""
    b = np.full(k, -0.01)
    b[0] += lag
    t = np.arange(windows)[:, None]
    return 6.0 * np.exp(b * t - curve * np.log1p(t) + sigma * rng.normal(size=(windows, k)))


@pytest.mark.parametrize("curve", [0.0, 0.5])
def test_window_noise_is_counted_once_so_a_real_lag_is_seen(curve):
    """Losses of the training windows are levels, each with its own sampling noise. Node 0 learns slower
    by one noise sd per update. The slope over the horizon sees it (s well above 0, node 0 the largest
    target); the mean of consecutive changes counts each window's noise twice and shrinks the same
    contrast to nothing (s = 0 in most draws). A strongly bent common curve changes neither."""
    got = {"slope": [], "mean_change": []}
    for seed in range(100):
        x = _noisy_levels(np.random.default_rng(seed), lag=0.01, curve=curve)
        for trend, out in got.items():
            p = Progress(8, horizon=5, min_windows=3, trend=trend)
            feed(p, x)
            beta, _, s = p.targets(1.0)
            out.append((s, beta.argmax() == 0))
    slope, mean_change = np.array(got["slope"]), np.array(got["mean_change"])
    assert np.median(slope[:, 0]) > 0.5 and slope[:, 1].mean() > 0.9
    assert np.mean(mean_change[:, 0] == 0) > 0.8


def test_window_noise_without_a_lag_is_mostly_shrunk_away():
    """The same levels with no lag (and a bent common curve): the slope's contrast is noise, shrunk to
    zero in most draws and small on average; the common curve does not pass for a lag."""
    s = []
    for seed in range(200):
        p = Progress(8, horizon=5, min_windows=3)
        feed(p, _noisy_levels(np.random.default_rng(seed), lag=0.0, curve=0.5))
        s.append(p.targets(1.0)[2])
    assert np.median(s) == 0.0 and np.mean(s) < 0.2


def test_slope_by_hand():
    """Three nodes, four noiseless windows, a common bend c(t) = (0, -0.1, -0.15, -0.17) in log loss:
    slopes -0.02, -0.02, +0.01 per update on top of it. The contrast is b - mean b = (-0.01, -0.01, +0.02),
    u = d / mean|d| = (-0.75, -0.75, 1.5), residuals are zero, so s = 1."""
    c = np.array([0.0, -0.1, -0.15, -0.17])
    b = np.array([-0.02, -0.02, 0.01])
    p = Progress(3, horizon=3, min_windows=2)
    feed(p, np.exp(np.log(4.0) + c[:, None] + np.arange(4)[:, None] * b[None, :]))
    beta, u, s = p.targets(1.0)
    assert s == pytest.approx(1.0) and np.allclose(u, [-0.75, -0.75, 1.5])


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
    with pytest.raises(ProgressError, match="trend"):
        Progress(3, trend="ema")


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


def test_the_mixer_setting_chooses_the_estimator():
    """`trend` reaches each node set's progress: the same window losses give the slope's signal with
    `trend: slope` and the (noise-overstating) mean change by default."""
    from dograph_core.mixers.dograph_config import DoGraphConfig
    from dograph_core.mixers.dograph_nodes import NodeSet

    x = _noisy_levels(np.random.default_rng(3), lag=0.02, k=3)
    got = {}
    for trend in ("slope", None):
        ns = NodeSet(3, 2, DoGraphConfig(**({"trend": trend} if trend else {})))
        feed(ns.progress, x)
        got[trend] = ns.progress.targets(1.0)[2]
    assert DoGraphConfig().trend == "mean_change"
    assert got["slope"] > 0.5 and got[None] < got["slope"]
