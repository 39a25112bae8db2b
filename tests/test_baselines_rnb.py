"""R&B's Balance step (arXiv 2505.00358, Algorithm 1 line 14): ``p = softmax(lam * G q / ||G q||)``.

``G`` is the Gram matrix of the nodes' mean final-layer gradients over a round, ``q`` the share of the
evaluation in each node. The numbers are worked out by hand; the direction tests check what the rule
is for: weight goes to nodes whose gradients agree with where the evaluation is.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _engine_fixture import make_corpus, tiny_train_cfg
from dograph_core.data.corpus import TokenCorpus
from dograph_core.mixers import build_mixer
from dograph_core.mixers.base import BatchStats, MixerContext, MixerError
from dograph_core.mixers.rnb import eval_shares, rnb_update
from dograph_core.partition import NodeCorpus, PartitionConfig, build_partition
from dograph_core.train import train


def test_one_step_by_hand():
    # G = diag(4, 1), q = (1/2, 1/2): G q = (2, 1/2), ||G q|| = sqrt(4.25) = 2.061553
    # lam = 3: logits (2.910427, 0.727607); softmax: 1 / (1 + e^-2.182820) = 1 / 1.112724 = 0.898696
    p = rnb_update(np.diag([4.0, 1.0]), np.array([0.5, 0.5]), 3.0)
    assert p == pytest.approx([0.898696, 0.101304], abs=1e-6)
    # the scale of the gradients does not matter (the norm divides it out)
    assert rnb_update(1e-6 * np.diag([4.0, 1.0]), np.array([0.5, 0.5]), 3.0) == pytest.approx(p, rel=1e-12)


def test_weight_goes_to_nodes_aligned_with_the_evaluation_and_away_from_conflicting_ones():
    g = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])  # node 1 agrees with node 0, node 2 conflicts
    q = np.array([1.0, 0.0, 0.0])                          # the evaluation is all in node 0
    p = rnb_update(g @ g.T, q, 3.0)
    assert p[1] > 1 / 3 > p[2] and p[0] > p[2]
    # lam is the contrast: small lam is near uniform, a larger one is sharper
    assert np.ptp(rnb_update(g @ g.T, q, 0.01)) < 0.01 < np.ptp(p) < np.ptp(rnb_update(g @ g.T, q, 10.0))


def test_no_gradient_signal_gives_uniform_and_a_non_finite_gram_is_an_error():
    assert rnb_update(np.zeros((3, 3)), np.full(3, 1 / 3), 3.0) == pytest.approx([1 / 3] * 3)
    with pytest.raises(MixerError, match="not finite"):
        rnb_update(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0.5, 0.5]), 3.0)


def _ctx(k=3, **kw):
    return MixerContext(domains=["a", "b", "c"][:k], natural=np.full(k, 1 / k), total_steps=100, seq_len=6,
                        vocab_size=11, **kw)


def _batch(step, dom, seed=0, B=4, T=6, V=11, H=8):
    g = torch.Generator().manual_seed(seed)
    return BatchStats(step=step, domain_ids=torch.as_tensor(dom), example_loss=torch.ones(B),
                      input_ids=torch.randint(0, V, (B, T + 1), generator=g),
                      hidden=torch.randn(B, T, H, generator=g), logits=torch.randn(B, T, V, generator=g))


def test_the_round_gram_is_of_node_mean_gradients_and_an_unseen_node_keeps_its_last_mean():
    m = build_mixer("rnb", {"update_every": 2}, _ctx())
    assert m.weights == pytest.approx([1 / 3] * 3)  # p0 uniform
    from dograph_core.gradients import output_features

    b1, b2 = _batch(1, [0, 0, 1, 2], 1), _batch(2, [1, 1, 2, 2], 2)
    m.observe(b1)
    m.observe(b2)
    z1 = output_features(b1.hidden, b1.logits, b1.input_ids[:, 1:], m.proj).double()
    z2 = output_features(b2.hidden, b2.logits, b2.input_ids[:, 1:], m.proj).double()
    means = torch.stack([z1[:2].mean(0), torch.cat([z1[2:3], z2[:2]]).mean(0), torch.cat([z1[3:], z2[2:]]).mean(0)])
    w = m.update(2)
    np.testing.assert_allclose(m.G, (means @ means.T).numpy(), rtol=1e-9)
    np.testing.assert_allclose(w, rnb_update(m.G, np.full(3, 1 / 3), 3.0), rtol=1e-12)
    m.observe(_batch(3, [0, 0, 1, 1], 3))  # node c draws nothing this round
    m.update(4)
    np.testing.assert_allclose(m.means[2], means[2].numpy(), rtol=1e-9)
    state = m.state_dict()
    other = build_mixer("rnb", {"update_every": 2}, _ctx())
    other.load_state_dict(state)
    for mx in (m, other):
        mx.observe(_batch(5, [0, 1, 2, 2], 5))
    assert other.update(6) == pytest.approx(m.update(6), rel=1e-12)


def test_evaluation_shares_follow_the_partition_and_training_over_nodes_runs(tmp_path):
    corpus = TokenCorpus(make_corpus(tmp_path / "c"))
    assert eval_shares(_ctx(corpus=corpus)) == pytest.approx([1 / 3] * 3)  # sources: the evaluation's equal weights
    part = build_partition("t", PartitionConfig(kind="text", k=2, out_dir=str(tmp_path / "p")), corpus)
    view = NodeCorpus(corpus, part)
    # by hand: each source's validation tokens all fall in one node, each source counts 1/3
    node_of = {d: int(part.assign["val", d][0]) for d in corpus.train_domains}
    want = np.zeros(2)
    for n in node_of.values():
        want[n] += 1 / 3
    ctx = MixerContext(domains=view.train_domains, natural=view.natural_weights, total_steps=10, seq_len=32,
                       vocab_size=corpus.vocab_size, corpus=view)
    assert eval_shares(ctx) == pytest.approx(want)
    s = train(tiny_train_cfg(steps=4), corpus, "rnb", {"type": "rnb", "update_every": 2}, tmp_path / "run")
    assert math.isclose(sum(s["final_weights"].values()), 1.0) and s["final_weights"]["alpha"] != pytest.approx(1 / 3)
