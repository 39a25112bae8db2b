"""DoGE: what it samples from (uniform, always), what it scales (the domain gradients), its published
universal target (a separate mixed batch from the training domains) and the loop's total clip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from _engine_fixture import make_corpus, tiny_train_cfg

from dograph_core.data.corpus import TokenCorpus
from dograph_core.microstep import LMLoss, micro_step
from dograph_core.mixers import build_mixer, validate_mixer_config
from dograph_core.mixers.base import BatchStats, MixerContext, MixerError
from dograph_core.model import build_model
from dograph_core.train import train

T = 4
VAL = 10  # the fake corpus's val tokens are domain index + VAL, its train tokens the domain index


class FakeCorpus:
    """Each domain's train split is one repeated token (its index), its val split index + VAL."""

    def __init__(self, domains, heldout=()):
        self.all_domains = list(domains) + list(heldout)

    def tokens(self, split, domain):
        i = self.all_domains.index(domain)
        return np.full(200, i + (VAL if split == "val" else 0), dtype=np.uint16)


def ctx(domains=("a", "b", "c"), corpus=True, **kw) -> MixerContext:
    k = len(domains)
    return MixerContext(domains=list(domains), natural=np.full(k, 1 / k), total_steps=10, seq_len=T, vocab_size=16,
                        corpus=FakeCorpus(domains) if corpus else None, **kw)


def grad_stats(step, grads, lr=0.01, model=None):
    g = torch.as_tensor(grads, dtype=torch.float32)
    k = g.shape[0]
    return BatchStats(step=step, domain_ids=torch.arange(k), example_loss=torch.ones(k),
                      input_ids=torch.zeros(k, T + 1, dtype=torch.long), lr=lr, domain_grads=g,
                      domain_present=torch.ones(k, dtype=torch.bool), model=model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("corpus")))


cfg = tiny_train_cfg


# -- sampling: uniform while the weights move ------------------------------------------------------
@pytest.mark.parametrize("target", ["mix", "train"])
def test_doge_samples_uniformly_while_its_weights_move(target):
    m = build_mixer("doge", {"target": target}, ctx())
    m._target_grad = lambda domains, stats: torch.tensor([1.0, 0.0])  # a fixed mix gradient
    for step in range(1, 6):
        m.observe(grad_stats(step, [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
        m.update(step)
        np.testing.assert_array_equal(m.sampling_weights(), [1 / 3] * 3)
    assert np.ptp(m.weights) > 0.5  # the weights moved far from uniform, the sampler did not follow
    assert m.result()["meta"]["mode"] == {"mix": "mix", "train": "leave-one-out"}[target]


def test_doge_in_the_loop_draws_uniform_batches_and_moves_its_weights(corpus, tmp_path):
    s = train(cfg(), corpus, "doge", {"type": "doge"}, tmp_path / "doge")
    for d in corpus.train_domains:
        assert s["mixture"]["domains"][d]["target"] == pytest.approx(1 / 3)
    last = np.array(list(s["final_weights"].values()))
    assert not np.allclose(last, 1 / 3)


# -- the published universal target: lr <g_i, g_mix> ------------------------------------------------
def test_doge_mix_score_by_hand():
    m = build_mixer("doge", {}, ctx())  # target: mix, the default
    m._target_grad = lambda domains, stats: torch.tensor([2.0, 0.0])
    m.observe(grad_stats(1, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], lr=0.01))
    # no self term removed: W_i = lr <g_i, g_mix> / mean ||g_i|| = 0.01 * [2, 0, 2] / ((2 + sqrt 2) / 3)
    W = 0.01 * np.array([2.0, 0.0, 2.0]) / ((2 + math.sqrt(2)) / 3 + 1e-6)
    np.testing.assert_allclose(m.scores, W, rtol=1e-6)
    w = np.exp(W / 0.01) / np.exp(W / 0.01).sum()
    np.testing.assert_allclose(m.weights, w, rtol=1e-6)
    # the leave-one-out variant scores the same gradients against the others: [1, 1, 2] (b is not penalised)
    loo = build_mixer("doge", {"target": "train"}, ctx())
    loo.observe(grad_stats(1, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], lr=0.01))
    np.testing.assert_allclose(loo.scores, 0.01 * np.array([1.0, 1.0, 2.0]) / ((2 + math.sqrt(2)) / 3 + 1e-6),
                               rtol=1e-6)


def test_doge_mix_batch_comes_from_the_training_domains_train_split():
    m = build_mixer("doge", {}, ctx())
    seen = []
    for step in range(1, 31):
        b = m.target_batch(list(m.ctx.domains), 16, T + 1, step)
        assert b.shape == (16, T + 1)
        assert torch.all(b == b[:, :1])  # each row is one domain's window
        seen += b[:, 0].tolist()
    counts = np.bincount(seen, minlength=3)
    assert set(seen) == {0, 1, 2} and counts.sum() == 480 and counts.min() > 120  # uniform: 160 each
    np.testing.assert_array_equal(m.target_batch(["a", "b", "c"], 16, T + 1, 7),
                                  m.target_batch(["a", "b", "c"], 16, T + 1, 7))  # seeded by step
    val = build_mixer("doge", {"target_split": "val"}, ctx())
    assert set(val.target_batch(["a", "b", "c"], 32, T + 1, 1)[:, 0].tolist()) <= {VAL, VAL + 1, VAL + 2}


def test_doge_mix_gradient_is_the_mean_loss_gradient_and_leaves_the_model_grad_alone():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    m = build_mixer("doge", {"max_grad_norm": 0.0, "target_batch_size": 6}, ctx())
    n = sum(p.numel() for p in model.parameters())
    stats = grad_stats(3, np.zeros((3, n)), model=model)
    g = m._target_grad(list(m.ctx.domains), stats)
    assert all(p.grad is None for p in model.parameters())  # scored against, never trained on
    batch = m.target_batch(list(m.ctx.domains), 6, T + 1, 3)
    logits = model(input_ids=batch[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1)).backward()
    expect = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g, expect, rtol=1e-5, atol=1e-7)


# -- what DoGE scales: the step is sum_k w_k g_k with the clipped gradients and the new weights -----
def test_doge_step_is_the_new_weights_times_the_clipped_domain_gradients(corpus):
    torch.manual_seed(0)
    model = build_model("nano", corpus.vocab_size, 32, corpus.eot_id)
    c = MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=4, seq_len=32,
                     vocab_size=corpus.vocab_size, corpus=corpus)
    m = build_mixer("doge", {"target": "train", "max_grad_norm": 0.05, "mu": 0.001}, c)
    x = torch.stack([torch.from_numpy(corpus.tokens("train", d)[i * 40: i * 40 + 33].astype(np.int64))
                     for i, d in enumerate(["alpha", "alpha", "beta", "gamma", "gamma"])])
    dom = torch.tensor([0, 0, 1, 2, 2])
    micro_step(LMLoss(model), model, m, x, dom, 1, 1e-3, 1.0)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expect = torch.zeros_like(got)
    for d in range(3):
        model.zero_grad()
        logits = model(input_ids=x[dom == d, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), x[dom == d, 1:].flatten()).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        g = g * min(1.0, 0.05 / (float(g.norm()) + 1e-6))  # each domain clipped to max_grad_norm
        expect += float(m.weights[d]) * g
    assert not np.allclose(m.weights, 1 / 3)  # the weights moved inside this step, and the step used them
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(m.sampling_weights(), [1 / 3] * 3)


# -- the loop clips the total at DoGE's own bound --------------------------------------------------
def test_loop_clips_the_total_gradient_at_the_mixers_bound(corpus, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        seen.append(max_norm)
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(cfg(steps=2), corpus, "doge", {"type": "doge", "target": "train"}, tmp_path / "a")
    assert seen == [5.0, 5.0]  # max_grad_norm, as the reference's HF Trainer (not train.grad_clip = 1.0)
    seen.clear()
    train(cfg(steps=2), corpus, "doge", {"type": "doge", "target": "train", "total_grad_clip": 0.5}, tmp_path / "b")
    assert seen == [0.5, 0.5]
    seen.clear()
    train(cfg(steps=2), corpus, "uniform", {"type": "uniform"}, tmp_path / "c")
    assert seen == [1.0, 1.0]  # other methods keep train.grad_clip


def test_bad_doge_settings_are_clear_errors():
    with pytest.raises(MixerError, match="target"):
        validate_mixer_config("doge", {"target": "universal"})
    with pytest.raises(MixerError, match="total_grad_clip"):
        validate_mixer_config("doge", {"total_grad_clip": -1})
    with pytest.raises(MixerError, match="needs the corpus"):
        build_mixer("doge", {"target": "mix"}, ctx(corpus=False))
    m = build_mixer("doge", {}, ctx())
    with pytest.raises(MixerError, match="needs the model"):
        m.observe(grad_stats(1, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    short = build_mixer("doge", {}, ctx())
    short.ctx.corpus.tokens = lambda split, d: np.zeros(3, dtype=np.uint16)
    with pytest.raises(MixerError, match="fewer than one sequence"):
        short.target_batch(["a", "b", "c"], 4, T + 1, 1)
