"""The baselines' weight-update rules as pure functions, so each can be checked by hand.

Every function here takes plain arrays and returns new arrays; no model, no training loop,
no state. The mixers (``doremi.py``, ``doge.py``, ``odm.py``) only gather statistics and
call these. Sources (read from each method's own code, see ``docs/baselines.md``):

* DoReMi: ``sangmichaelxie/doremi`` ``doremi/trainer.py`` ``DoReMiTrainer.update_domain_weights``
  (optimizer ``doremiv1``);
* DoGE: ``Olivia-fsm/DoGE`` ``src/trainer.py`` ``DoGETrainer.update_domain_weights_distributed``;
* ODM: ``alon-albalak/online-data-mixing`` ``megatron/data/data_sampling_utils.py``
  (``SmoothedMeanWeightUpdater.group_update``, ``Exp3WeightUpdater.group_update``) and, for the
  ``ema_importance`` variant, DataFlex's ``ODMMixer`` port (Albalak et al. 2023, arXiv 2312.02406).

Weights are float64 numpy vectors that sum to one.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _log(w: np.ndarray) -> np.ndarray:
    """log of weights; an exact zero (possible only without smoothing) becomes -inf, not a warning."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(w, dtype=np.float64))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x[np.isfinite(x)]) if np.any(np.isfinite(x)) else 0.0
    z = x - m
    return z - math.log(float(np.sum(np.exp(z))))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def smooth(w: np.ndarray, c: float) -> np.ndarray:
    """``(1 - c) * w + c / k``: every weight ends at least ``c / k``."""
    w = np.asarray(w, dtype=np.float64)
    return (1.0 - c) * w + c / w.shape[0]


# -- DoReMi --------------------------------------------------------------------------------------
def doremi_scores(excess_sum: np.ndarray, token_count: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Per-domain score = mean over the domain's tokens of ``max(l_proxy - l_ref, 0)``.

    ``excess_sum[i]`` is the sum of the *already clipped* per-token excess losses of domain i
    over every token of the step, ``token_count[i]`` the number of those tokens. A domain
    with no token in the step keeps its ``previous`` score (as in the reference code).
    """
    excess_sum = np.asarray(excess_sum, dtype=np.float64)
    token_count = np.asarray(token_count, dtype=np.float64)
    present = token_count > 0
    out = np.asarray(previous, dtype=np.float64).copy()
    out[present] = excess_sum[present] / token_count[present]
    return out


def doremi_update(weights: np.ndarray, scores: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One exponentiated-gradient step: ``a' = softmax(log a + eta * score)``, then ``(1-c) a' + c/k``."""
    return smooth(np.exp(log_softmax(_log(weights) + eta * np.asarray(scores, dtype=np.float64))), smoothing)


def doremi_loss_weights(weights: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Per-domain factor on the proxy loss: ``a / s`` renormalised (``a`` itself under uniform sampling).

    The reference code divides by the sampling weights when the batch is not sampled
    uniformly, so the expected loss is the ``a``-weighted mixture of domain losses.
    """
    r = np.asarray(weights, dtype=np.float64) / np.asarray(sampling, dtype=np.float64)
    return r / r.sum()


def running_mean(mean: np.ndarray, count: int, new: np.ndarray) -> np.ndarray:
    """Mean of ``count`` vectors updated with one more: ``(mean * count + new) / (count + 1)``."""
    return (np.asarray(mean, dtype=np.float64) * count + np.asarray(new, dtype=np.float64)) / (count + 1)


# -- DoGE ----------------------------------------------------------------------------------------
def clip_rows(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row to norm at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does
    for one domain's whole gradient (coefficient ``max_norm / (norm + 1e-6)`` capped at 1).
    ``max_norm <= 0`` means no clipping. Works in place and returns ``grads``."""
    if max_norm <= 0 or grads.numel() == 0:
        return grads
    norms = torch.linalg.vector_norm(grads.float(), dim=-1)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0).to(grads.dtype)
    grads.mul_(coef.unsqueeze(-1))
    return grads


def doge_scores(
    train_grads: torch.Tensor,
    target_grads: torch.Tensor,
    lr: float,
    remove_self: bool,
    dw_min: float,
    dw_max: float,
) -> np.ndarray:
    """DoGE's generalisation-estimation score per training domain.

    ``W_i = lr * <g_i, sum_j t_j>`` (minus ``lr * <g_i, g_i>`` when the target set *is* the
    training set, ``remove_self``), divided by the mean norm of the training gradients
    (+1e-6), then clipped to ``[lr * dw_min, lr * dw_max]``.
    """
    g = train_grads.double()
    t = target_grads.double()
    dots = g @ t.T  # [k, m]
    raw = dots.sum(dim=-1)
    if remove_self:
        if dots.shape[0] != dots.shape[1]:
            raise ValueError("remove_self needs the target set to be the training set (square score matrix)")
        raw = raw - torch.diagonal(dots)
    scores = lr * raw
    avg_norm = torch.linalg.vector_norm(g, dim=-1).mean()
    scores = scores / (avg_norm + 1e-6)
    scores = torch.clamp(scores, min=lr * dw_min, max=lr * dw_max)
    return scores.cpu().numpy().astype(np.float64)


def doge_update(weights: np.ndarray, scores: np.ndarray, mu: float, smoothing: float = 0.0) -> np.ndarray:
    """``w' = softmax(log w + W / mu)``, then ``(1 - eps) w' + eps / k`` (eps = 0 in the reference)."""
    return smooth(np.exp(log_softmax(_log(weights) + np.asarray(scores, dtype=np.float64) / mu)), smoothing)


# -- ODM (EXP3 family) ----------------------------------------------------------------------------
def odm_exploration(k: int, t: int) -> float:
    """Exploration rate ``eps_t = min(1/K, sqrt(ln K / (K t)))`` (t >= 1)."""
    if t < 1:
        raise ValueError(f"ODM exploration rate needs t >= 1, got {t}")
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def odm_rewards(
    estimate: np.ndarray,
    rewards: np.ndarray,
    present: np.ndarray,
    probs: np.ndarray,
    alpha: float,
    importance: bool = True,
) -> np.ndarray:
    """``ema_importance`` reward estimate: for each domain drawn this step,
    ``R_i <- alpha R_i + (1 - alpha) r_i / pi_i`` (``r_i / pi_i`` is the importance-weighted
    reward; without ``importance`` just ``r_i``). Domains not drawn keep their estimate."""
    out = np.asarray(estimate, dtype=np.float64).copy()
    present = np.asarray(present, dtype=bool)
    r = np.asarray(rewards, dtype=np.float64)
    if importance:
        r = r / np.asarray(probs, dtype=np.float64)
    out[present] = alpha * out[present] + (1.0 - alpha) * r[present]
    return out


def odm_exp3_rewards(estimate: np.ndarray, rewards: np.ndarray, present: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``Exp3WeightUpdater``: cumulative importance-weighted reward ``R_i <- R_i + r_i / pi_i`` for
    each domain drawn this step (``r_i`` is already scaled: the reference divides the loss by 10)."""
    out = np.asarray(estimate, dtype=np.float64).copy()
    present = np.asarray(present, dtype=bool)
    r = np.asarray(rewards, dtype=np.float64) / np.asarray(probs, dtype=np.float64)
    out[present] += r[present]
    return out


def odm_smoothed_mean_rewards(
    estimate: np.ndarray, rewards: np.ndarray, present: np.ndarray, alpha: float
) -> np.ndarray:
    """``SmoothedMeanWeightUpdater``: ``R_i <- alpha R_i + (1 - alpha) exp(r_i)`` for each domain
    drawn this step (a smoothed mean of the exponentiated loss, no importance weighting)."""
    out = np.asarray(estimate, dtype=np.float64).copy()
    present = np.asarray(present, dtype=bool)
    r = np.exp(np.asarray(rewards, dtype=np.float64)[present])
    out[present] = alpha * out[present] + (1.0 - alpha) * r
    return out


def odm_policy(estimate: np.ndarray, eps_prev: float, eps_t: float) -> np.ndarray:
    """``pi_i = (1 - K eps_t) softmax(eps_{t-1} R)_i + eps_t``: sums to one, every entry >= eps_t."""
    est = np.asarray(estimate, dtype=np.float64)
    k = est.shape[0]
    return (1.0 - k * eps_t) * softmax(eps_prev * est) + eps_t


def odm_linear_policy(estimate: np.ndarray, eps_t: float) -> np.ndarray:
    """``SmoothedMeanWeightUpdater.group_update``: ``pi_i = (1 - K eps_t) R_i / sum_j R_j + eps_t``.

    The reference multiplies every ``R_j`` by ``eps_{t-1}`` in both the numerator and the sum, so
    it cancels. Estimates must be non-negative (means of ``exp``); all zero gives the uniform policy.
    """
    est = np.asarray(estimate, dtype=np.float64)
    k = est.shape[0]
    total = est.sum()
    share = est / total if total > 0 else np.full(k, 1.0 / k)
    return (1.0 - k * eps_t) * share + eps_t
