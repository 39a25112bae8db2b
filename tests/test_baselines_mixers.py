"""DoReMi, DoGE and ODM mixers fed by hand-made BatchStats, as the training loop would call them."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dograph_core.mixers import build_mixer, rules, validate_mixer_config
from dograph_core.mixers.base import BatchStats, MixerContext, MixerError, read_weights, write_weights
from dograph_core.mixers.simple import StaticMixer, StaticConfig

V, T = 16, 4


def ctx(domains=("a", "b"), **kw) -> MixerContext:
    k = len(domains)
    return MixerContext(
        domains=list(domains), natural=np.arange(1, k + 1, dtype=float) / sum(range(1, k + 1)),
        total_steps=10, seq_len=T, vocab_size=V, **kw,
    )


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    d = tmp_path_factory.mktemp("ref") / "final"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def stats_for(step, domain_ids, token_loss=None, **kw) -> BatchStats:
    b = len(domain_ids)
    tl = torch.as_tensor(token_loss, dtype=torch.float32) if token_loss is not None else torch.ones(b, T)
    return BatchStats(
        step=step, domain_ids=torch.as_tensor(domain_ids), example_loss=tl.mean(1),
        input_ids=torch.randint(0, V, (b, T + 1)), token_loss=tl, **kw,
    )


# -- DoReMi --------------------------------------------------------------------------------------
def doremi(ref_dir, ref_loss, **params):
    m = build_mixer("doremi", {"reference": str(ref_dir), **params}, ctx())
    m.reference_token_loss = lambda ids: torch.as_tensor(ref_loss, dtype=torch.float32)
    return m


def test_doremi_one_step_two_domains_known_excess(ref_dir):
    # proxy - reference per token: domain a [1, 1, 1, 1] -> score 1; domain b [-1, 0.5, -2, 0.5] -> clipped mean 0.25
    proxy = [[3, 3, 3, 3], [2, 2, 2, 2]]
    ref = [[2, 2, 2, 2], [3, 1.5, 4, 1.5]]
    m = doremi(ref_dir, ref, smoothing=0.0)
    s = stats_for(1, [0, 1], proxy)
    w = m.example_weights(s)
    m.observe(s)
    new = m.update(1)
    expect = np.array([0.5 * math.exp(1.0), 0.5 * math.exp(0.25)])
    expect /= expect.sum()
    np.testing.assert_allclose(new, expect, rtol=1e-12)
    np.testing.assert_allclose(m.scores, [1.0, 0.25])
    # as in the reference code, this step's loss is already weighted by the new weights
    np.testing.assert_allclose(w.numpy(), expect / expect.mean(), rtol=1e-6)
    # the output is the time average with the initial weights included
    np.testing.assert_allclose(m.final_weights(), (np.array([0.5, 0.5]) + expect) / 2, rtol=1e-12)


def test_doremi_gradient_accumulation_updates_once_from_the_whole_step(ref_dir):
    proxy = [[3, 3, 3, 3]]
    m = doremi(ref_dir, [[2, 2, 2, 2]], smoothing=0.0)
    for step in (1, 2):  # two micro-batches per step, domain a then domain b
        for dom in (0, 1):
            s = stats_for(step, [dom], proxy)
            m.example_weights(s)
            m.observe(s)
        m.update(step)
    # each step: both domains have excess 1 -> equal scores -> weights stay uniform, one update per step
    np.testing.assert_allclose(m.weights, [0.5, 0.5])
    assert m.n_avg == 3 and m.timing.mode == "next_step"
    m2 = doremi(ref_dir, [[2, 2, 2, 2]], smoothing=0.0)
    for step in (1, 2):
        for dom, p in ((0, [[3, 3, 3, 3]]), (1, [[2, 2, 2, 2]])):
            s = stats_for(step, [dom], p)
            m2.example_weights(s)
            m2.observe(s)
        m2.update(step)
    w = np.array([0.5, 0.5])
    for _ in range(2):
        w = rules.doremi_update(w, [1.0, 0.0], 1.0, 0.0)
    np.testing.assert_allclose(m2.weights, w, rtol=1e-12)


def test_doremi_absent_domain_keeps_its_score_and_weights_stay_finite(ref_dir):
    c = 1e-3
    m = doremi(ref_dir, [[2, 2, 2, 2]], smoothing=c)
    for step in range(1, 60):  # domain b never appears: its score stays log(V) (reference initial value)
        s = stats_for(step, [0], [[2.5, 2.5, 2.5, 2.5]])
        m.example_weights(s)
        m.observe(s)
        w = m.update(step)
        assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
        assert np.all(w >= c / 2 * (1 - 1e-9))
    assert m.scores[1] == pytest.approx(math.log(V))
    assert m.weights[1] > m.weights[0]


def test_doremi_state_roundtrip_weights_only(ref_dir):
    m = doremi(ref_dir, [[2, 2, 2, 2], [1, 1, 1, 1]])
    for step in (1, 2, 3):
        s = stats_for(step, [0, 1], [[3, 3, 3, 3], [2, 2, 2, 2]])
        m.example_weights(s)
        m.observe(s)
        m.update(step)
    state = roundtrip(m.state_dict())
    m2 = doremi(ref_dir, [[2, 2, 2, 2], [1, 1, 1, 1]])
    m2.load_state_dict(state)
    for mm in (m, m2):
        s = stats_for(4, [0, 1], [[3, 1, 3, 3], [2, 2, 2, 9]])
        mm.example_weights(s)
        mm.observe(s)
        mm.update(4)
    np.testing.assert_array_equal(m.weights, m2.weights)
    np.testing.assert_array_equal(m.final_weights(), m2.final_weights())
    assert m.history == m2.history


def test_doremi_reference_loss_is_the_models_own_loss(ref_dir):
    m = build_mixer("doremi", {"reference": str(ref_dir)}, ctx())
    ids = torch.randint(0, V, (3, T + 1))
    tl = m.reference_token_loss(ids)
    assert tl.shape == (3, T)
    model = GPT2LMHeadModel.from_pretrained(ref_dir)
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss
    assert float(tl.mean()) == pytest.approx(float(hf), rel=1e-5)


def test_doremi_uniform_sampling_and_loss_weights(ref_dir):
    m = build_mixer("doremi", {"reference": str(ref_dir)}, ctx())
    np.testing.assert_allclose(m.sampling_weights(), [0.5, 0.5])
    m.weights = np.array([0.2, 0.8])
    w = m.loss_weights(torch.tensor([0, 1, 1, 0]))
    np.testing.assert_allclose(w.numpy(), [0.4, 1.6, 1.6, 0.4], rtol=1e-6)
    mn = build_mixer("doremi", {"reference": str(ref_dir), "sampling": "natural"}, ctx())
    np.testing.assert_allclose(mn.sampling_weights(), [1 / 3, 2 / 3])


def test_doremi_bad_reference_and_parameters(ref_dir, tmp_path):
    with pytest.raises(MixerError, match="no reference model"):
        build_mixer("doremi", {}, ctx())
    with pytest.raises(MixerError, match="no such file"):
        build_mixer("doremi", {"reference": str(tmp_path / "nope")}, ctx())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixerError, match="no model in Hugging Face format"):
        build_mixer("doremi", {"reference": str(tmp_path / "empty")}, ctx())
    bad_vocab = ctx()
    bad_vocab.vocab_size = V + 1
    with pytest.raises(MixerError, match="vocabulary of 16 tokens"):
        build_mixer("doremi", {"reference": str(ref_dir)}, bad_vocab)
    # a run directory whose weights.json names other domains
    (ref_dir.parent / "weights.json").write_text(json.dumps({"domains": ["a", "zzz"]}))
    try:
        with pytest.raises(MixerError, match="trained on domains"):
            build_mixer("doremi", {"reference": str(ref_dir.parent)}, ctx())
    finally:
        (ref_dir.parent / "weights.json").unlink()
    assert build_mixer("doremi", {"reference": str(ref_dir.parent)}, ctx()).ref_info["model_dir"] == ref_dir
    for bad in ({"eta": 0}, {"eta": -1}, {"smoothing": 1.0}, {"smoothing": -0.1}, {"etaa": 1}):
        with pytest.raises(MixerError):
            validate_mixer_config("doremi", {"reference": str(ref_dir), **bad})


def test_doremi_token_out_of_reference_vocabulary(ref_dir):
    m = build_mixer("doremi", {"reference": str(ref_dir)}, ctx())
    with pytest.raises(MixerError, match="outside the reference model's vocabulary"):
        m.reference_token_loss(torch.full((1, T + 1), V))


# -- DoGE ----------------------------------------------------------------------------------------
def grad_stats(step, grads, present=None, lr=0.1):
    g = torch.as_tensor(grads, dtype=torch.float32)
    p = torch.ones(g.shape[0], dtype=torch.bool) if present is None else torch.as_tensor(present)
    b = int(p.sum())
    return BatchStats(
        step=step, domain_ids=torch.nonzero(p).flatten(), example_loss=torch.ones(b),
        input_ids=torch.zeros(b, T + 1, dtype=torch.long), lr=lr, domain_grads=g, domain_present=p,
    )


LOO = {"target": "train"}  # the leave-one-out variant: targets are the training gradients themselves


def test_doge_orthogonal_gradients_leave_weights_unchanged():
    m = build_mixer("doge", LOO, ctx())
    s = grad_stats(1, [[1.0, 0.0], [0.0, 1.0]])
    m.observe(s)
    np.testing.assert_allclose(m.weights, [0.5, 0.5])  # updated inside the step, before the loop combines
    np.testing.assert_allclose(m.update(1), [0.5, 0.5])
    np.testing.assert_allclose(m.scores, [0.0, 0.0], atol=1e-15)


def test_doge_one_step_by_hand_and_in_place_clipping():
    m = build_mixer("doge", {**LOO, "max_grad_norm": 1.0}, ctx(("a", "b", "c")))
    g = [[2.0, 0.0], [0.0, 3.0], [4.0, 4.0]]  # clipped to norm ~1: e1, e2, (e1 + e2) / sqrt 2
    s = grad_stats(1, g, lr=0.01)
    m.observe(s)
    expect_g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    np.testing.assert_allclose(s.domain_grads.numpy(), expect_g.numpy(), rtol=1e-5)  # the loop steps on these
    dots = expect_g.double() @ expect_g.double().T
    raw = (dots.sum(1) - dots.diag()).numpy()  # [sqrt2/2, sqrt2/2, sqrt2]
    sc = 0.01 * raw / (1.0 + 1e-6)
    w = np.exp(sc / 0.01)
    np.testing.assert_allclose(m.weights, w / w.sum(), rtol=1e-4)


def test_doge_absent_domain_keeps_last_gradient_and_weights_stay_finite():
    m = build_mixer("doge", LOO, ctx(("a", "b", "c")))
    m.observe(grad_stats(1, [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    m.update(1)
    kept = m.grads[1].clone()
    for step in range(2, 60):
        m.observe(grad_stats(step, [[1.0, 0.2], [0.0, 0.0], [0.3, 1.0]], present=[True, False, True]))
        w = m.update(step)
        assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    torch.testing.assert_close(m.grads[1], kept)
    assert m.n_updates == 59
    np.testing.assert_allclose(m.final_weights(), m.avg_sum / 59 / (m.avg_sum / 59).sum())


def test_doge_gradient_accumulation_switches_to_next_step_updates():
    m = build_mixer("doge", LOO, ctx())
    m.observe(grad_stats(1, [[1.0, 0.0], [1.0, 0.0]], present=[True, True]))
    assert m.n_updates == 1  # first micro-batch: updated inside the step
    m.observe(grad_stats(1, [[3.0, 0.0], [1.0, 0.0]], present=[True, True]))
    assert m.timing.mode == "next_step" and m.n_updates == 0
    m.update(1)
    assert m.n_updates == 1
    torch.testing.assert_close(m.grads, torch.tensor([[2.0, 0.0], [1.0, 0.0]]))


def test_doge_state_roundtrip_weights_only():
    m = build_mixer("doge", LOO, ctx())
    for step in (1, 2):
        m.observe(grad_stats(step, [[1.0, 0.5], [0.2, 1.0]]))
        m.update(step)
    m2 = build_mixer("doge", LOO, ctx())
    m2.load_state_dict(roundtrip(m.state_dict()))
    for mm in (m, m2):
        mm.observe(grad_stats(3, [[1.0, 0.1], [0.0, 0.0]], present=[True, False]))
        mm.update(3)
    np.testing.assert_array_equal(m.weights, m2.weights)
    np.testing.assert_array_equal(m.final_weights(), m2.final_weights())


def test_doge_bad_parameters():
    for bad in ({"mu": 0}, {"mu": -0.1}, {"dw_min": 2, "dw_max": 1}, {"target": []}, {"max_grad_norm": -1},
                {"target": "universal"}, {"total_grad_clip": -1.0}, {"target_batch_size": 0}):
        with pytest.raises(MixerError):
            validate_mixer_config("doge", bad)
    with pytest.raises(MixerError, match="not in the corpus"):
        build_mixer("doge", {"target": ["nope"]}, ctx())
    with pytest.raises(MixerError, match="no corpus"):
        build_mixer("doge", {"target": ["held"]}, ctx(heldout_domains=["held"]))
    with pytest.raises(MixerError, match="needs the corpus"):
        build_mixer("doge", {}, ctx())  # target 'mix' (the default) draws its batch from the corpus
    m = build_mixer("doge", LOO, ctx())
    with pytest.raises(MixerError, match="per-domain gradients"):
        m.observe(stats_for(1, [0]))
    with pytest.raises(MixerError, match="non-finite"):
        m.observe(grad_stats(1, [[float("nan"), 0.0], [0.0, 1.0]]))


# -- ODM -----------------------------------------------------------------------------------------
def loss_stats(step, domain_ids, losses):
    return BatchStats(
        step=step, domain_ids=torch.as_tensor(domain_ids), example_loss=torch.as_tensor(losses, dtype=torch.float32),
        input_ids=torch.zeros(len(domain_ids), T + 1, dtype=torch.long),
    )


EMA_IW = {"updater": "ema_importance"}  # the project's earlier form (DataFlex port)


def test_odm_ema_importance_steps_by_hand():
    m = build_mixer("odm", EMA_IW, ctx())
    m.observe(loss_stats(1, [0, 0, 1], [4.0, 4.0, 2.0]))
    w1 = m.update(1)
    # rewards 4 and 2 sampled at 1/2 each: R = 0.1 * [8, 4]; eps_1 = min(1/2, sqrt(ln2/2)) = 1/2 -> uniform
    np.testing.assert_allclose(m.estimate, [0.8, 0.4])
    np.testing.assert_allclose(w1, [0.5, 0.5])
    m.observe(loss_stats(2, [1], [3.0]))  # only domain b drawn
    m.update(2)
    est = np.array([0.8, 0.9 * 0.4 + 0.1 * 3.0 / 0.5])
    np.testing.assert_allclose(m.estimate, est)
    eps2 = math.sqrt(math.log(2) / 4)  # 0.416 < 1/2
    soft = np.exp(0.5 * est) / np.exp(0.5 * est).sum()  # eps_{t-1} = eps_1 = 1/2
    np.testing.assert_allclose(m.weights, (1 - 2 * eps2) * soft + eps2, rtol=1e-12)
    assert m.eps == pytest.approx(eps2)


def test_odm_reward_scale_and_no_importance_weighting():
    m = build_mixer("odm", {**EMA_IW, "reward_scale": 0.1}, ctx())
    m.observe(loss_stats(1, [0, 1], [4.0, 2.0]))
    m.update(1)
    np.testing.assert_allclose(m.estimate, [0.1 * 0.4 / 0.5, 0.1 * 0.2 / 0.5])
    m = build_mixer("odm", {**EMA_IW, "importance_weighting": False}, ctx())
    m.observe(loss_stats(1, [0, 1], [4.0, 2.0]))
    m.update(1)
    np.testing.assert_allclose(m.estimate, [0.4, 0.2])


@pytest.mark.parametrize("updater", ["smoothed_mean", "exp3", "ema_importance"])
def test_odm_probabilities_sum_to_one_exploration_decays_missing_domain(updater):
    m = build_mixer("odm", {"updater": updater}, ctx(("a", "b", "c", "d")))
    eps = []
    rng = np.random.default_rng(0)
    for step in range(1, 300):  # domain d never drawn
        ids = rng.integers(0, 3, size=8)
        m.observe(loss_stats(step, ids, rng.uniform(1, 6, size=8)))
        w = m.update(step)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and np.all(np.isfinite(w))
        assert np.all(w >= m.eps - 1e-15)
        eps.append(m.eps)
    assert all(a >= b for a, b in zip(eps, eps[1:])) and eps[-1] < eps[0]
    assert m.estimate[3] == 0.0 and m.weights[3] > 0
    steps = [s for s, _ in m.history]
    assert steps == sorted(set(steps))  # one history row per changed step, never two


def test_odm_warmup_keeps_initial_weights_and_state_roundtrip():
    m = build_mixer("odm", {"warmup_steps": 3, "initial": "natural"}, ctx())
    for step in (1, 2, 3):
        m.observe(loss_stats(step, [0, 1], [5.0, 1.0]))
        np.testing.assert_allclose(m.update(step), [1 / 3, 2 / 3])
    m.observe(loss_stats(4, [0, 1], [5.0, 1.0]))
    m.update(4)
    assert m.estimate[0] > 0
    m2 = build_mixer("odm", {"warmup_steps": 3, "initial": "natural"}, ctx())
    m2.load_state_dict(roundtrip(m.state_dict()))
    for mm in (m, m2):
        mm.observe(loss_stats(5, [0], [2.0]))
        mm.update(5)
    np.testing.assert_array_equal(m.weights, m2.weights)
    np.testing.assert_array_equal(m.final_weights(), m2.final_weights())
    with pytest.raises(MixerError, match="non-finite"):
        m.observe(loss_stats(6, [0], [float("inf")]))
    for bad in ({"alpha": 1.0}, {"alpha": -0.1}, {"warmup_steps": -1}, {"output": "best"}, {"reward_scale": 0}):
        with pytest.raises(MixerError):
            validate_mixer_config("odm", bad)


@pytest.mark.parametrize("name", ["odm", "doge"])
def test_result_is_a_weights_file_the_static_mixer_reads(name, tmp_path):
    doms = ("a", "b", "c")  # (with two domains DoGE's universal scores are symmetric: weights stay equal)
    m = build_mixer(name, LOO if name == "doge" else {}, ctx(doms))
    for step in range(1, 7):  # ODM explores uniformly while sqrt(ln K / (K t)) >= 1/K (t <= 3 here)
        if name == "odm":
            m.observe(loss_stats(step, [0, 1, 2], [3.0 + step, 1.0, 2.0]))
        else:
            m.observe(grad_stats(step, [[1.0, 0.0], [1.0, 0.5], [0.0, 1.0]]))
        m.update(step)
    path = tmp_path / "weights.json"
    write_weights(path, m.result())
    doc = read_weights(path, ["c", "b", "a"])
    assert doc["method"] == name and len(doc["schedule"]) >= 2
    s = StaticMixer(StaticConfig(path=str(path), use_schedule=True), ctx(doms))
    np.testing.assert_allclose(s._w, m.final_weights())
    np.testing.assert_allclose(s.update(10), m.weights)
