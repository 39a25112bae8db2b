"""The cheap variants of DoGraph's online features: what they compute, what they cost, how faithful they are.

* ``sketch: count`` (a CountSketch of the vocabulary dimension) is the same Kronecker sketch as the
  dense one with ``R_b`` replaced by a signed bucket matrix ``S``: checked against ``S G R_h^T`` of the
  exact per-example output-layer gradient ``G``, and its inner-product fidelity is tested with the dense
  sketch's test (``test_dograph_gradients.py``, parametrised over the sketch).
* it is cheaper by an operation count (no timing in tests): ``V`` instead of ``r1 V`` multiply-adds per
  token on the left side, and the ``[N, V] x [V, r1]`` matmul is gone from the counted FLOPs.
* token subsampling (``feature_tokens``) is measured here against the same exact gradients: at half of
  the tokens it is well below the 0.8 bar (0.65 after 30 steps), so it is a cost lever, not a default.
* the mixer's default stays the dense sketch, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from _dograph_fixture import VOCAB, ip_corr, make_corpus, nano_model
from torch.utils.flop_counter import FlopCounterMode

from dograph_core.data.corpus import TokenCorpus
from dograph_core.gradients import (FeatureError, Projection, exact_features, feature_macs, output_features,
                                    per_example_grads, probe_features)
from dograph_core.mixers.dograph_parts import draw_probe

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("dgcost")))


@pytest.fixture(scope="module")
def ids(corpus):
    return draw_probe(corpus, corpus.train_domains, 48, T, seed=0)[0]


def test_count_sketch_is_the_exact_gradient_under_a_signed_bucket_matrix(ids):
    model = nano_model(seq_len=T).eval()
    p = Projection(VOCAB, 32, 8, 16, seed=3, sketch="count")
    S = p.left_matrix()
    assert S.shape == (8, VOCAB) and torch.equal((S != 0).sum(0), torch.ones(VOCAB, dtype=torch.long))
    g = per_example_grads(model, ids[:8], ["lm_head.weight"])["lm_head.weight"]   # [8, V, H]
    ref = torch.einsum("ri,bij,sj->brs", S, g, p.R_h).reshape(8, -1)
    (z,), _ = probe_features(model, ids[:8], [p])
    assert torch.allclose(z, ref, rtol=1e-4, atol=1e-6)
    # seeded; a dense and a count projection of one seed in one call share the softmax and match their own calls
    q = Projection(VOCAB, 32, 8, 16, seed=3, sketch="count")
    assert torch.equal(q.bucket, p.bucket) and torch.equal(q.sign, p.sign) and torch.equal(q.R_h, p.R_h)
    d = Projection(VOCAB, 32, 8, 16, seed=3)
    with torch.no_grad():
        o = model(ids[:8, :-1], output_hidden_states=True)
    both = output_features(o.hidden_states[-1], o.logits, ids[:8, 1:], [d, p])
    assert torch.allclose(both[1], z, rtol=1e-4, atol=1e-6)
    assert torch.allclose(both[0], output_features(o.hidden_states[-1], o.logits, ids[:8, 1:], d), rtol=1e-5, atol=1e-7)
    with pytest.raises(FeatureError, match="sketch must be"):
        Projection(VOCAB, 32, 8, 16, sketch="sparse")


def test_count_sketch_is_cheaper_by_operation_count():
    dense, count = Projection(4096, 128, 32, 64, 0), Projection(4096, 128, 32, 64, 0, "count")
    md, mc = feature_macs(dense), feature_macs(count)
    assert md["left"] == 32 * 4096 and mc["left"] == 4096
    assert mc["total"] * 4 < md["total"]
    # counted FLOPs of the code path itself: the [N, V] x [V, r1] matmul is gone
    B, V, H = 4, 4096, 128
    h, logits, y = torch.randn(B, T, H), torch.randn(B, T, V), torch.randint(0, V, (B, T))
    flops = {}
    for name, p in (("dense", dense), ("count", count)):
        with FlopCounterMode(display=False) as fc:
            output_features(h, logits, y, p)
        flops[name] = fc.get_total_flops()
    assert flops["dense"] - flops["count"] == 2 * B * T * V * 32


@pytest.mark.parametrize("tokens,floor", [(16, 0.55)])
def test_token_subsample_fidelity_is_measured_not_assumed(corpus, ids, tokens, floor):
    """Half of the 32 positions: 0.65 / 0.64 / 0.66 (dense, seeds 0-2) after 30 steps, below the full
    sketch's 0.8 bar; the per-sequence estimate is unbiased but noisy."""
    torch.manual_seed(0)
    model = nano_model(seq_len=T)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for s in range(30):
        b, _ = draw_probe(corpus, corpus.train_domains, 16, T, 100 + s)
        torch.nn.functional.cross_entropy(model(b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    exact = exact_features(model, ids, {"lm_head.weight": (0, 0, 0)}, project=False)
    with torch.no_grad():
        o = model(ids[:, :-1], output_hidden_states=True)
    p = Projection(VOCAB, 32, 32, 64, seed=0)
    full = output_features(o.hidden_states[-1], o.logits, ids[:, 1:], p)
    sub = output_features(o.hidden_states[-1], o.logits, ids[:, 1:], p, tokens=tokens,
                          generator=torch.Generator().manual_seed(0))
    r_full, r_sub = ip_corr(full, exact), ip_corr(sub, exact)
    assert r_full > 0.8 and floor < r_sub < r_full


def test_mixer_default_projection_is_unchanged_and_count_is_opt_in():
    from dograph_core.mixers.dograph_config import DoGraphConfig

    assert DoGraphConfig().sketch == "dense"
    assert DoGraphConfig(sketch="count").sketch == "count"
    with pytest.raises(ValueError):
        DoGraphConfig(sketch="sparse")
    a, b = Projection(VOCAB, 32, 32, 64, 5), Projection(VOCAB, 32, 32, 64, 5, "dense")
    assert torch.equal(a.R_b, b.R_b) and torch.equal(a.R_h, b.R_h) and a.bucket is None
