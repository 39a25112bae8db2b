"""ODM's three updaters, one step at a time, with every number worked out by hand in the test.

``smoothed_mean`` is the official ``SmoothedMeanWeightUpdater.group_update`` (exp of the loss, no
importance weighting, linear normalisation), ``exp3`` the official ``Exp3WeightUpdater`` (cumulative
loss/10 over the probability, softmax), ``ema_importance`` the DataFlex port's form. The exploration
rate is ``eps_t = min(1/K, sqrt(ln K / (K t)))`` with ``eps_0 = 1/K``; a 99-step warm-up makes the
first update happen at t = 100, where eps is already below 1/K and the policy is not uniform.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dograph_core.mixers import build_mixer, validate_mixer_config
from dograph_core.mixers.base import BatchStats, MixerContext, MixerError

E = math.e
EPS100 = math.sqrt(math.log(3) / 300)  # K = 3, t = 100: 0.0605148 < 1/3
EPS101 = math.sqrt(math.log(3) / 303)


def ctx(k: int = 3) -> MixerContext:
    doms = ["a", "b", "c", "d", "e", "f", "g", "h"][:k]
    return MixerContext(domains=doms, natural=np.arange(1, k + 1) / sum(range(1, k + 1)), total_steps=300,
                        seq_len=4, vocab_size=16)


def losses(step, domain_ids, values) -> BatchStats:
    return BatchStats(step=step, domain_ids=torch.as_tensor(domain_ids),
                      example_loss=torch.as_tensor(values, dtype=torch.float64), input_ids=torch.zeros(len(values), 5))


def odm(**params):
    m = build_mixer("odm", {"warmup_steps": 99, **params}, ctx())
    for step in range(1, 100):  # warm-up: no update, eps stays 1/K, the policy stays the initial weights
        m.update(step)
    assert m.eps == pytest.approx(1 / 3) and m.weights == pytest.approx([1 / 3] * 3)
    return m


def two_steps(m):
    """Step 100: domain a's sequences have losses 2 and 4 (mean 3), b's 1, c is not drawn.
    Step 101: only b, loss 2."""
    m.observe(losses(100, [0, 0, 1], [2.0, 4.0, 1.0]))
    w100 = m.update(100).copy()
    est100 = m.estimate.copy()
    m.observe(losses(101, [1], [2.0]))
    return w100, est100, m.update(101).copy()


def test_smoothed_mean_is_the_paper_updater_and_the_default():
    m = odm()
    assert m.cfg.updater == "smoothed_mean"
    w100, est100, w101 = two_steps(m)
    # R = 0.9 * 0 + 0.1 * exp(mean loss) for the drawn domains; c keeps 0
    R = np.array([0.1 * E**3, 0.1 * E, 0.0])
    np.testing.assert_allclose(est100, R, rtol=1e-12)
    # linear normalisation (no softmax, eps_{t-1} cancels): (1 - 3 eps) R / sum R + eps
    np.testing.assert_allclose(w100, (1 - 3 * EPS100) * R / R.sum() + EPS100, rtol=1e-12)
    np.testing.assert_allclose(w100, [0.7814081, 0.1580771, 0.0605148], atol=1e-7)  # the same, in numbers
    # step 101: b's estimate moves, no division by its probability (0.158)
    R2 = np.array([R[0], 0.9 * R[1] + 0.1 * E**2, 0.0])
    np.testing.assert_allclose(m.estimate, R2, rtol=1e-12)
    np.testing.assert_allclose(w101, (1 - 3 * EPS101) * R2 / R2.sum() + EPS101, rtol=1e-12)


def test_smoothed_mean_alpha_is_the_smoothing_factor():
    m = odm(alpha=0.5)  # the *_0.5smoothing scripts
    m.observe(losses(100, [0, 1], [3.0, 1.0]))
    m.update(100)
    np.testing.assert_allclose(m.estimate, [0.5 * E**3, 0.5 * E, 0.0], rtol=1e-12)


def test_exp3_is_the_1b_script_updater():
    m = odm(updater="exp3")
    w100, est100, w101 = two_steps(m)
    # reward = loss / 10, importance-weighted by the probability it was drawn with (1/3), summed
    R = np.array([0.3 * 3, 0.1 * 3, 0.0])  # [0.9, 0.3, 0]
    np.testing.assert_allclose(est100, R, rtol=1e-12)
    soft = np.exp(R / 3) / np.exp(R / 3).sum()  # softmax(eps_{t-1} R) with eps_99 = eps_0 = 1/3
    np.testing.assert_allclose(w100, (1 - 3 * EPS100) * soft + EPS100, rtol=1e-12)
    # step 101: b's reward 0.2 divided by its current probability; cumulative, not averaged
    R2 = R + np.array([0.0, 0.2 / w100[1], 0.0])
    np.testing.assert_allclose(m.estimate, R2, rtol=1e-12)
    soft2 = np.exp(EPS100 * R2) / np.exp(EPS100 * R2).sum()
    np.testing.assert_allclose(w101, (1 - 3 * EPS101) * soft2 + EPS101, rtol=1e-12)
    assert m.result()["meta"]["reward_scale"] == 0.1 and m.result()["meta"]["alpha"] is None


def test_ema_importance_is_the_named_project_variant():
    m = odm(updater="ema_importance")
    w100, est100, w101 = two_steps(m)
    R = np.array([0.1 * 3 / (1 / 3), 0.1 * 1 / (1 / 3), 0.0])  # 0.1 * loss / pi: [0.9, 0.3, 0]
    np.testing.assert_allclose(est100, R, rtol=1e-12)
    soft = np.exp(R / 3) / np.exp(R / 3).sum()
    np.testing.assert_allclose(w100, (1 - 3 * EPS100) * soft + EPS100, rtol=1e-12)
    R2 = np.array([R[0], 0.9 * R[1] + 0.1 * 2.0 / w100[1], 0.0])  # averaged, not summed
    np.testing.assert_allclose(m.estimate, R2, rtol=1e-12)
    soft2 = np.exp(EPS100 * R2) / np.exp(EPS100 * R2).sum()
    np.testing.assert_allclose(w101, (1 - 3 * EPS101) * soft2 + EPS101, rtol=1e-12)


def test_exp3_importance_weights_use_the_distribution_the_step_was_drawn_from():
    m = build_mixer("odm", {"updater": "exp3", "initial": "natural"}, ctx())  # [1/6, 2/6, 3/6]
    m.observe(losses(1, [0, 1, 2], [1.0, 1.0, 1.0]))
    m.update(1)
    np.testing.assert_allclose(m.estimate, [0.1 * 6, 0.1 * 3, 0.1 * 2], rtol=1e-12)


def test_long_run_fixed_points_of_the_official_updaters():
    """Constant losses, every domain drawn each step, K = 8, 250 steps (the review's idealisation).
    smoothed_mean forgets its zero start (0.9^250 ~ 0): R = exp(L) exactly, so the policy is known in
    closed form; exp3's importance weighting drives pi towards L / sum L; ema_importance stays near
    uniform (R ~ L / pi)."""
    L = np.linspace(6.04, 6.51, 8)
    runs = {}
    for updater in ("smoothed_mean", "exp3", "ema_importance"):
        m = build_mixer("odm", {"updater": updater}, ctx(8))
        for step in range(1, 251):
            m.observe(losses(step, list(range(8)), L))
            m.update(step)
        runs[updater] = m.weights.copy()
    eps = math.sqrt(math.log(8) / (8 * 250))
    np.testing.assert_allclose(runs["smoothed_mean"], (1 - 8 * eps) * np.exp(L) / np.exp(L).sum() + eps, rtol=1e-9)
    np.testing.assert_allclose(runs["exp3"], L / L.sum(), rtol=2e-3)
    spread = {u: w.max() - w.min() for u, w in runs.items()}
    assert spread["smoothed_mean"] > 4 * spread["ema_importance"]
    assert spread["exp3"] > 1.5 * spread["ema_importance"]
    assert all(np.argmax(w) == 7 for w in runs.values())  # the highest loss gets the most


def test_bad_odm_settings_are_clear_errors():
    with pytest.raises(MixerError, match="updater"):
        validate_mixer_config("odm", {"updater": "softmax"})
    with pytest.raises(MixerError, match="alpha .* exp3"):
        validate_mixer_config("odm", {"updater": "exp3", "alpha": 0.9})
    with pytest.raises(MixerError, match="importance_weighting is fixed by updater smoothed_mean"):
        validate_mixer_config("odm", {"importance_weighting": True})
    with pytest.raises(MixerError, match="importance_weighting is fixed by updater exp3"):
        validate_mixer_config("odm", {"updater": "exp3", "importance_weighting": False})
    for bad in ({"alpha": 1.0}, {"alpha": -0.1}, {"reward_scale": 0.0}, {"reward_scale": -1}, {"warmup_steps": -1}):
        with pytest.raises(MixerError):
            validate_mixer_config("odm", bad)
    cfg = validate_mixer_config("odm", {"updater": "ema_importance", "importance_weighting": False, "alpha": 0.5})
    assert cfg.alpha_value == 0.5 and cfg.scale_value == 1.0
