"""The baselines' update rules on small cases computed by hand (dograph_core.mixers.rules)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dograph_core.mixers import rules

E = math.e


# -- DoReMi --------------------------------------------------------------------------------------
def test_doremi_one_step_two_domains_known_excess():
    # scores 1 and 0 from uniform weights: a' = softmax(log .5 + [1, 0]) = [e, 1] / (e + 1)
    w = rules.doremi_update([0.5, 0.5], [1.0, 0.0], eta=1.0, smoothing=0.0)
    np.testing.assert_allclose(w, [E / (E + 1), 1 / (E + 1)], rtol=1e-12)
    # with smoothing c: (1 - c) a' + c / 2
    c = 1e-4
    w = rules.doremi_update([0.5, 0.5], [1.0, 0.0], eta=1.0, smoothing=c)
    np.testing.assert_allclose(w, [(1 - c) * E / (E + 1) + c / 2, (1 - c) / (E + 1) + c / 2], rtol=1e-12)


def test_doremi_eta_scales_the_step_and_keeps_the_old_weights_in_the_exponent():
    # from [0.8, 0.2], scores [0, 2], eta 0.5: a' ∝ [0.8, 0.2 e]
    w = rules.doremi_update([0.8, 0.2], [0.0, 2.0], eta=0.5, smoothing=0.0)
    np.testing.assert_allclose(w, np.array([0.8, 0.2 * E]) / (0.8 + 0.2 * E), rtol=1e-12)


def test_doremi_scores_mean_per_domain_and_previous_for_absent():
    # domain 0: clipped excess summing to 3 over 4 tokens; domain 1 absent; domain 2: 0 over 2 tokens
    s = rules.doremi_scores([3.0, 0.0, 0.0], [4, 0, 2], previous=[9.0, 7.0, 9.0])
    np.testing.assert_allclose(s, [0.75, 7.0, 0.0])


@pytest.mark.parametrize("c", [1e-4, 1e-3, 0.1])
def test_doremi_smoothing_keeps_every_weight_above_c_over_k(c):
    k = 5
    w = np.full(k, 1 / k)
    for step in range(200):  # domain 0 always has a huge excess: the others are squeezed
        w = rules.doremi_update(w, [50.0, 0, 0, 0, 0], eta=1.0, smoothing=c)
        assert np.all(np.isfinite(w))
        assert np.all(w >= c / k * (1 - 1e-12))
        assert w.sum() == pytest.approx(1.0)
    assert w[0] > 0.5


def test_doremi_loss_weights_divide_by_sampling():
    np.testing.assert_allclose(rules.doremi_loss_weights([0.2, 0.8], [0.5, 0.5]), [0.2, 0.8])
    # sampled 4:1, weights 1:1 -> loss factors 1/4 : 1 normalised
    np.testing.assert_allclose(rules.doremi_loss_weights([0.5, 0.5], [0.8, 0.2]), [0.2, 0.8])


def test_running_mean():
    m = rules.running_mean([0.5, 0.5], 1, [0.9, 0.1])
    np.testing.assert_allclose(m, [0.7, 0.3])
    np.testing.assert_allclose(rules.running_mean(m, 2, [0.1, 0.9]), [0.5, 0.5])


# -- DoGE ----------------------------------------------------------------------------------------
def test_doge_orthogonal_gradients_score_zero_in_universal_mode():
    g = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    s = rules.doge_scores(g, g, lr=0.1, remove_self=True, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(rules.doge_update([0.3, 0.7], s, mu=0.01), [0.3, 0.7])


def test_doge_orthogonal_gradients_against_a_heldout_target():
    # target t = e1: only domain 0 aligns. W = lr <g_i, t> / mean norm = [0.01, 0] / 1
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0]])
    s = rules.doge_scores(g, t, lr=0.01, remove_self=False, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s, [0.01 / (1 + 1e-6), 0.0], rtol=1e-12)
    w = rules.doge_update([0.5, 0.5], s, mu=0.01)
    np.testing.assert_allclose(w, [E / (E + 1), 1 / (E + 1)], rtol=1e-5)


def test_doge_self_term_removed_and_normalised_by_mean_norm():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # <g_i, sum_j g_j> - <g_i, g_i> = [1, 1, 2]; mean norm = (2 + sqrt 2) / 3
    mean_norm = (2 + math.sqrt(2)) / 3
    expect = 0.01 * np.array([1.0, 1.0, 2.0]) / (mean_norm + 1e-6)
    s = rules.doge_scores(g, g, lr=0.01, remove_self=True, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s, expect, rtol=1e-12)
    w = rules.doge_update(np.full(3, 1 / 3), s, mu=0.01)
    np.testing.assert_allclose(w[2] / w[0], math.exp(expect[2] / 0.01 - expect[0] / 0.01), rtol=1e-10)


def test_doge_scores_clipped_to_lr_times_bounds():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    # raw alignments with the others: [0, -2, 0] ... plus signs: <g0,g1+g2> = 0, <g1,g0+g2> = -2, <g2,g0+g1> = 0
    s = rules.doge_scores(g, g, lr=1.0, remove_self=True, dw_min=0.0, dw_max=0.5)
    assert s.min() >= 0.0 and s.max() <= 0.5
    np.testing.assert_allclose(s, [0.0, 0.0, 0.0], atol=1e-12)  # the negative one is clipped up to 0
    g2 = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    s2 = rules.doge_scores(g2, g2, lr=0.1, remove_self=True, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s2, [0.5, 0.5])  # 0.1 * 100 / 10 = 1.0 > lr * dw_max = 0.5


def test_clip_rows_like_clip_grad_norm():
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = rules.clip_rows(g.clone(), 1.0)
    np.testing.assert_allclose(out[0].numpy(), np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [0.3, 0.4])  # under the bound: unchanged
    np.testing.assert_allclose(rules.clip_rows(g.clone(), 0.0).numpy(), g.numpy())  # 0 = no clipping
    # the same as torch's own clipping of one parameter
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g[0].clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    np.testing.assert_allclose(out[0].numpy(), p.grad.numpy(), rtol=1e-6)


# -- ODM -----------------------------------------------------------------------------------------
def test_odm_exploration_decays_and_starts_at_one_over_k():
    k = 5
    eps = [rules.odm_exploration(k, t) for t in range(1, 2000)]
    assert eps[0] == pytest.approx(1 / k)
    assert all(a >= b for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(math.sqrt(math.log(k) / (k * 1999)))
    assert eps[-1] < eps[0] / 5
    with pytest.raises(ValueError):
        rules.odm_exploration(k, 0)


def test_odm_policy_by_hand_and_sums_to_one():
    eps_t = math.sqrt(math.log(2) / 6)  # t = 3, K = 2
    pi = rules.odm_policy([2.0, 0.0], eps_prev=0.5, eps_t=eps_t)
    soft = np.array([E, 1.0]) / (E + 1)  # softmax(0.5 * [2, 0])
    np.testing.assert_allclose(pi, (1 - 2 * eps_t) * soft + eps_t, rtol=1e-12)
    rng = np.random.default_rng(0)
    for t in range(1, 300):
        est = rng.normal(0, 50, size=7)
        pi = rules.odm_policy(est, rules.odm_exploration(7, max(t - 1, 1)), rules.odm_exploration(7, t))
        assert pi.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(pi >= rules.odm_exploration(7, t) - 1e-15)


def test_odm_policy_is_uniform_while_exploration_is_one_over_k():
    np.testing.assert_allclose(rules.odm_policy([5.0, 0.0, 1.0], 1 / 3, 1 / 3), [1 / 3] * 3)


def test_odm_reward_estimate_importance_weighted_moving_average():
    r = rules.odm_rewards([0.0, 1.0], rewards=[4.0, 2.0], present=[True, False], probs=[0.5, 0.5], alpha=0.9)
    np.testing.assert_allclose(r, [0.1 * 4.0 / 0.5, 1.0])  # drawn: 0.9*0 + 0.1*8; not drawn: kept
    r2 = rules.odm_rewards(r, [3.0, 2.0], [True, True], [0.25, 0.75], alpha=0.9)
    np.testing.assert_allclose(r2, [0.9 * 0.8 + 0.1 * 12.0, 0.9 * 1.0 + 0.1 * 2.0 / 0.75])
    r3 = rules.odm_rewards([0.0, 0.0], [4.0, 2.0], [True, True], [0.5, 0.5], alpha=0.9, importance=False)
    np.testing.assert_allclose(r3, [0.4, 0.2])


def test_odm_official_reward_updates_by_hand():
    # SmoothedMeanWeightUpdater: alpha R + (1 - alpha) exp(loss); losses ln 2 and ln 3, domain 1 not drawn
    r = rules.odm_smoothed_mean_rewards([0.0, 1.0], [math.log(2), math.log(3)], [True, False], alpha=0.5)
    np.testing.assert_allclose(r, [0.5 * 0.0 + 0.5 * 2.0, 1.0])
    # Exp3WeightUpdater: R + r / pi, cumulative
    r = rules.odm_exp3_rewards([1.0, 1.0], [0.2, 0.4], [True, True], probs=[0.5, 0.25])
    np.testing.assert_allclose(r, [1.0 + 0.4, 1.0 + 1.6])


def test_odm_linear_policy_by_hand():
    # (1 - 2 * 0.1) * [3, 1] / 4 + 0.1 = [0.7, 0.3]
    np.testing.assert_allclose(rules.odm_linear_policy([3.0, 1.0], 0.1), [0.7, 0.3])
    np.testing.assert_allclose(rules.odm_linear_policy([0.0, 0.0, 0.0], 0.2), [1 / 3] * 3)
    np.testing.assert_allclose(rules.odm_linear_policy([5.0, 1.0, 2.0], 1 / 3), [1 / 3] * 3)  # eps = 1/K: uniform
