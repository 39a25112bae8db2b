"""The DoGraph mixer fed by hand (BatchStats from a nano GPT-2): both node modes, state, bad input."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dograph_fixture import make_corpus, nano_model

from dograph_core.data.corpus import TokenCorpus
from dograph_core.mixers import build_mixer
from dograph_core.mixers.base import BatchStats, MixerContext, MixerError
from dograph_core.mixers.dograph_parts import draw_probe, read_log, time_average

T = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("dgmix")))


def ctx_for(corpus, out=None, steps=30):
    return MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=steps, seq_len=T,
                        vocab_size=corpus.vocab_size, corpus=corpus, out_dir=out)


SMALL = {"k": 3, "update_every": 5, "recluster_every": 10, "probe_size": 36, "r1": 8, "r2": 16, "plots": False}


def run(mixer, model, steps, start=1, batch=12, poison=None, lr=0.05):
    """The loop's protocol by hand: sample, forward, example weights, backward, observe, update."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(start, start + steps):
        ids, _ = draw_probe(mixer.ctx.corpus, mixer.ctx.domains, batch, T, seed=step)
        dom = torch.arange(batch) % len(mixer.ctx.domains)
        o = model(ids[:, :-1], output_hidden_states=True)
        el = F.cross_entropy(o.logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(batch, -1).mean(1)
        hidden = o.hidden_states[-1].detach()
        if poison == step:
            hidden = hidden * float("nan")
        st = BatchStats(step=step, domain_ids=dom, example_loss=el.detach(), input_ids=ids,
                        hidden=hidden, logits=o.logits.detach(), model=model)
        w = mixer.example_weights(st) if mixer.apply == "loss" else None
        (el * (w if w is not None else 1.0)).mean().backward()
        opt.step()
        opt.zero_grad()
        mixer.observe(st)
        if step % mixer.update_every == 0:
            mixer.set_weights(mixer.update(step), step)
    return mixer


def test_human_nodes_sample_and_give_valid_weights_and_time_average(corpus, tmp_path):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human"}, ctx_for(corpus, tmp_path))
    assert m.apply == "sample" and m.n_nodes == 3
    run(m, nano_model(seq_len=T), 20)
    w = m.weights
    assert abs(w.sum() - 1) < 1e-9 and np.all(w > 0)
    assert [s for s, _ in m.history] == [0, 5, 10, 15, 20]
    doc = m.result()
    assert np.allclose(doc["weights"], time_average(m.history, 30))
    assert doc["meta"]["nodes"] == "human" and len(doc["schedule"]) == 5
    ups = [r for r in read_log(tmp_path / "dograph_log.jsonl") if r["event"] == "update"]
    assert len(ups) == 4 and all(r["nodes_in_force"] == "human" for r in ups)
    # the graph's effect is logged at every update: ||a - a_graph-off||_1
    assert all(r["human"]["graph_effect_l1"] is not None and r["human"]["graph_effect_l1"] >= 0 for r in ups)
    assert (tmp_path / "probes" / "step_0000000.npz").exists()   # the true step-0 panel


def batch_stats(model, corpus, n=12, seed=99, step=31):
    ids, _ = draw_probe(corpus, corpus.train_domains, n, T, seed=seed)
    o = model(ids[:, :-1], output_hidden_states=True)
    return BatchStats(step=step, domain_ids=torch.arange(n) % 3, example_loss=torch.ones(n), input_ids=ids,
                      hidden=o.hidden_states[-1].detach(), logits=o.logits.detach(), model=model)


def test_model_nodes_weight_losses_by_the_stated_formula(corpus, tmp_path):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "apply": "loss"}, ctx_for(corpus, tmp_path))
    assert m.apply == "loss" and type(m).apply == "sample"  # per instance; the class default is untouched
    model = nano_model(seq_len=T)
    run(m, model, 30)
    assert m.in_force and m.clustering is not None and m.table.sum() == 36 and m.table.shape == (3, 3)
    assert np.allclose(m.sampling_weights(), 1 / 3)  # the loop samples uniformly, the loss carries the mixture
    m.mnodes.alpha = np.array([0.7, 0.2, 0.1])       # a rough target, to see the clip and the temper act
    m.pi = np.array([0.01, 0.49, 0.5])
    st = batch_stats(model, corpus)
    w = m.example_weights(st).double()
    labels = m.clusters.assign(m._features(st).double().numpy())
    # by hand: pi floored at 0.02 and renormalised; (alpha/pi)^0.5 clipped to [0.5, 2]; over its mean under pi
    pi = np.array([0.02, 0.49, 0.5]) / 1.01
    wc = np.clip(np.sqrt(np.array([0.7, 0.2, 0.1]) / pi), 0.5, 2.0)
    wc = wc / (pi @ wc)
    assert np.allclose(w.numpy(), wc[labels], atol=1e-6)
    assert wc.max() / wc.min() <= 4 + 1e-9                          # at most 4:1, never 100:1
    ess = float(w.sum() ** 2 / (len(w) * (w ** 2).sum()))
    assert ess >= 0.64 - 1e-9                                       # 4ab/(a+b)^2 for weights in [a, b]
    doc = m.result()
    assert doc["meta"]["contingency"] == m.table.tolist() and doc["meta"]["model_nodes_in_force_share"] > 0.5
    assert len(doc["weights"]) == 3 and abs(sum(doc["weights"]) - 1) < 1e-9  # effective source weights
    ups = [r for r in read_log(tmp_path / "dograph_log.jsonl") if r["event"] == "update" and "model" in r]
    assert ups and all(0.5 <= r["ess_mean"] <= 1 for r in ups if r.get("ess_mean") is not None)
    solved = [r for r in ups if r["model"]]   # every set of weights comes from Pyomo's solver
    assert solved and all(r["model"]["solver"] == "ripopt" and r["human"]["solver"] == "ripopt" for r in solved)
    live = [r for r in ups if "realised" in r]          # all but the update that made the clusters
    assert len(live) >= len(ups) - 1 and all(len(r["realised"]) == 3 for r in live)


def test_model_node_progress_is_measured_on_a_fixed_probe(corpus):
    """A model that does not learn (lr 0): re-scoring the same probe sequences shows no change at all,
    so beta stays uniform; the training windows' losses (other sequences each window) would not."""
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "min_windows": 2,
                                "min_node_samples": 1}, ctx_for(corpus))
    run(m, nano_model(seq_len=T), 30, lr=0.0)
    d = np.stack(list(m.mnodes.progress.changes))
    assert len(d) >= 2 and np.allclose(np.nan_to_num(d), 0.0, atol=1e-9)
    beta, u, _ = m.mnodes.progress.targets(1.0)
    assert np.allclose(beta, 1 / 3)
    h = np.stack(list(m.human.progress.changes))          # the batch path sees different sequences
    assert np.abs(np.nan_to_num(h)).max() > 1e-4


def without_progress(corpus, **extra):
    """Model nodes in force with the graph off, fed by a model that does not learn (lr 0): no progress signal."""
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "graph": "off", **extra}, ctx_for(corpus))
    run(m, nano_model(seq_len=T), 30, lr=0.0)
    assert m.in_force and m.updates["model"] >= 3
    return m


@pytest.mark.parametrize("prior", ["base", "uniform"])
def test_without_progress_model_nodes_do_not_reweight(corpus, prior):
    """A model that does not learn (lr 0) gives no progress signal; with the graph off the weights are
    then beta. Under the default prior that is the clusters' own frequency: every loss weight is 1 (the
    run is uniform training). A uniform prior over clusters would up-weight the small ones on no evidence."""
    m = without_progress(corpus, prior=prior, apply="loss")
    pi = m._floored(m.pi)
    assert pi.max() - pi.min() > 0.05                      # clusters of unequal size, so the prior matters
    w = m.cluster_weights()
    if prior == "base":
        assert np.allclose(m.alpha, pi, atol=0.01) and np.abs(w - 1).max() < 0.01
    else:
        assert np.allclose(m.alpha, 1 / 3, atol=0.01)
        small = int(np.argmin(pi))
        assert w[small] == w.max() and np.abs(w - 1).max() > 0.03


@pytest.mark.parametrize("table_ema", [0.8, None])
def test_without_progress_sampled_model_nodes_draw_the_base_weights(corpus, table_ema):
    """The same with the weights acting through the sampler (the default): with no progress signal and the
    graph off, the sources are drawn at their base weights (1/3 each), because the prior is the clusters'
    frequency under the table the sampler realises them through. The sampler's other estimate of that
    frequency, pi, differs here by several hundredths; a prior from it moved the source weights as much."""
    m = without_progress(corpus, apply="sample", table_ema=table_ema)
    by_table = m._cluster_given_source() @ m.base_weights()
    assert np.abs(by_table - m.pi).max() > 0.03            # the two estimates differ: the choice matters
    assert np.allclose(m.alpha, by_table, atol=2e-3)
    assert np.allclose(m.sampling_weights(), m.base_weights(), atol=1e-3)


def test_model_nodes_take_over_at_their_prior(corpus):
    """When the first clustering is accepted, the model nodes have no progress signal of their own yet:
    until their first solve they draw the sources at their base weights (1/3 each). Starting them at 1/K
    over clusters of unequal size drew the sources up to 0.02-0.04 away from 1/8 for the first update
    interval at micro, right in the loss spikes after the warm-up."""
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "apply": "sample"}, ctx_for(corpus))
    run(m, nano_model(seq_len=T), 5)                       # the first update: clustering accepted, no solve
    assert m.in_force and m.updates["model"] == 0
    by_table = m._cluster_given_source() @ m.base_weights()
    assert by_table.max() - by_table.min() > 0.05          # clusters of unequal size: 1/K would move the sources
    assert np.allclose(m.alpha, by_table / by_table.sum(), atol=1e-9)
    assert np.allclose(m.sampling_weights(), m.base_weights(), atol=1e-3)
    assert m.mnodes.history[-1] == (5, m.alpha.tolist())   # the time average counts the prior from this step


def test_model_nodes_take_over_at_their_prior_inside_the_caps(corpus):
    """A cap below the largest cluster's frequency: the take-over weights are the prior projected onto the
    capped simplex (KL), the capped cluster at the cap, the others in the prior's proportions."""
    torch.manual_seed(0)
    free = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "apply": "sample"}, ctx_for(corpus))
    run(free, nano_model(seq_len=T), 5)
    prior = free.alpha.copy()
    cap = float(prior.max()) - 0.03
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "apply": "sample", "cap": cap},
                    ctx_for(corpus))
    run(m, nano_model(seq_len=T), 5)
    assert m.in_force and m.updates["model"] == 0
    top = int(prior.argmax())
    assert m.alpha[top] == pytest.approx(cap) and m.alpha.max() <= cap + 1e-9
    rest = np.arange(len(prior)) != top
    assert np.allclose(m.alpha[rest], prior[rest] * (1 - cap) / prior[rest].sum(), atol=1e-9)


def test_unstable_clustering_falls_back_to_human_nodes(corpus, caplog, monkeypatch, tmp_path):
    from dograph_core import clustering

    monkeypatch.setattr(clustering, "adjusted_rand_score", lambda a, b: 0.0)  # the two projections disagree
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model"}, ctx_for(corpus, tmp_path))
    with caplog.at_level(logging.INFO):
        run(m, nano_model(seq_len=T), 20)
    assert not m.in_force and m.clusters is None
    assert "falling back to human nodes" in caplog.text
    assert m.example_weights(batch_stats(m._model, corpus)) is None          # no loss weights
    assert np.allclose(m.sampling_weights(), m.human.alpha)                   # the human-node mixture samples
    ups = [r for r in read_log(tmp_path / "dograph_log.jsonl") if r["event"] == "update"]
    assert {r["nodes_in_force"] for r in ups} == {"human"}
    assert m.result()["meta"]["model_nodes_in_force_share"] == 0.0


def test_model_nodes_resampling_mode_maps_clusters_to_sources(corpus):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "apply": "sample"}, ctx_for(corpus))
    assert m.apply == "sample"
    run(m, nano_model(seq_len=T), 15)
    cond = m.ctab / m.ctab.sum(1, keepdims=True)    # P(s | c) under the uniform base (rows of equal source mass)
    assert np.allclose(m.ctab, m.table)             # re-clustered at step 15: the live table starts from the probe's
    assert np.allclose(m.weights, (m.alpha @ cond) / (m.alpha @ cond).sum(), atol=1e-6)
    assert np.allclose(m.sampling_weights(), m.weights)


def in_force_three_clusters(corpus, **extra):
    """A model-node mixer in force with K = 3 clusters over the 3 sources, and a helper that folds in a
    window in which every sequence of source s lands in cluster ``where[s]``, drawn by source weights ``w``."""
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "recluster_every": 1000, **extra},
                    ctx_for(corpus))
    run(m, nano_model(seq_len=T), 10)
    assert m.in_force

    def window(w, where=(0, 1, 2), n=60, step=15):
        m.set_weights(np.asarray(w, dtype=float), step - 5)
        src = torch.tensor([s for s in range(3) for _ in range(round(n * w[s]))])
        labels = torch.tensor([where[s] for s in src.tolist()])
        z = torch.from_numpy(m.clusters.mean + m.clusters.centroids[labels.numpy()]).float()
        m._add(z, src, torch.ones(len(src)), labels, torch.ones(len(src), dtype=torch.float64))
        return m._update_model(step, lambda t: t)
    return m, window


def guard_step(occ, band=2.0, k=3):
    g = np.log((np.asarray(occ) + 1e-3) / (1 / k + 1e-3))
    return 0.1 * np.sign(g) * np.maximum(np.abs(g) - np.log(band), 0.0)


@pytest.mark.parametrize("under", ["base", "sampler"])
def test_the_occupancy_guard_does_not_push_back_on_the_weights(corpus, under):
    """Weights that draw source 0 (cluster 0) at 0.8 leave cluster 0 balanced under the uniform base sampler:
    balancing pi, that frequency (the default), keeps pi moving towards 1/3 (each sequence counted
    base/sampling) and leaves the prices where they were; balancing the sampled window's own occupancy (the
    ablation) raises cluster 0's price, against the weights, by balance times the part of log(0.8 / (1/3))
    beyond log(band)."""
    m, window = in_force_three_clusters(corpus, balance_under=under)
    before, pi0 = m.clusters.prices.copy(), m.pi.copy()
    rec = window([0.8, 0.1, 0.1])
    assert np.allclose(rec["occupancy"], [0.8, 0.1, 0.1])
    if under == "sampler":
        assert np.allclose(m.clusters.prices, np.clip(before + guard_step([0.8, 0.1, 0.1]), -0.5, 0.5))
        assert m.clusters.prices[0] > before[0]
        return
    for i in range(3):
        window([0.8, 0.1, 0.1], step=20 + 5 * i)
    assert np.allclose(m.pi, 0.8 ** 4 * pi0 + (1 - 0.8 ** 4) / 3)   # the windows were balanced under the base
    assert np.allclose(m.clusters.prices, before, atol=1e-12)


def test_the_guard_still_acts_against_collapse_under_the_base_sampler(corpus):
    """A cluster holding most of the base sampler's sequences (pi beyond a factor 2 of 1/K) gets a higher price
    and the starved ones lower prices, by the part beyond the band, whatever the weights drew."""
    m, window = in_force_three_clusters(corpus)
    m.pi = np.array([0.8, 0.1, 0.1])
    before = m.clusters.prices.copy()
    window([1 / 3, 1 / 3, 1 / 3])
    pi = 0.8 * np.array([0.8, 0.1, 0.1]) + 0.2 / 3                # the window is balanced under the base sampler
    assert np.allclose(m.pi, pi)
    assert np.allclose(m.clusters.prices, np.clip(before + guard_step(pi), -0.5, 0.5))
    assert np.all(np.sign(m.clusters.prices - before) == [1, -1, -1])


@pytest.mark.parametrize("table_ema", [0.8, None])
def test_the_source_map_follows_where_the_sources_sequences_land_now(corpus, table_ema):
    """The live table adds each window's assignments to its decayed counts, so when source 0's sequences move
    from cluster 0 to cluster 1, weight on cluster 1 draws source 0 more; frozen (None), the map stays the
    re-clustering's. Then alpha = pi (the clusters' base frequency under the table) gives the base weights."""
    m, window = in_force_three_clusters(corpus, table_ema=table_ema)
    old = m.ctab.copy()
    m.mnodes.alpha = np.array([0.1, 0.8, 0.1])
    w_before = m._cluster_to_sources()
    for i in range(3):
        pre = m.ctab.copy()                              # the table the window was drawn by
        rec = window([1 / 3, 1 / 3, 1 / 3], where=(1, 1, 2), step=15 + 5 * i)
    counts = np.array([[0, 0, 0], [20, 20, 0], [0, 0, 20]], dtype=float)
    if table_ema is None:
        assert np.array_equal(m.ctab, old)
    else:
        assert np.allclose(m.ctab, 0.8 ** 3 * old + (0.8 ** 2 + 0.8 + 1) * counts)
    m.mnodes.alpha = np.array([0.1, 0.8, 0.1])
    w_after = m._cluster_to_sources()
    if table_ema is None:
        assert np.allclose(w_after, w_before)
    else:
        assert w_after[0] > w_before[0] + 0.04          # 0.36 -> 0.41 here
        psc = (m.ctab + 1e-9) / (m.ctab + 1e-9).sum(1, keepdims=True)     # P(s | c), uniform base
        assert np.allclose(w_after, m.alpha @ psc)
        # what the source weights express, against what was asked: expected = P(c | s) @ w, with P(c | s)
        # from the table before the window joined it (out of sample)
        given = (pre + 1e-9) / (pre + 1e-9).sum(0)
        assert np.allclose(rec["expected"], given @ np.full(3, 1 / 3))
        assert rec["expected_gap_l1"] == pytest.approx(np.abs(rec["expected"] - m.alpha).sum())
    m.mnodes.alpha = (m.ctab + 1e-9) / (m.ctab + 1e-9).sum(0) @ m.base_weights()
    assert np.allclose(m._cluster_to_sources(), m.base_weights())


def test_exact_feature_path_clusters_on_per_example_gradients(corpus, tmp_path):
    """features: exact: torch.func gradients of the output layer + the last block, online and on probes."""
    from dograph_core.gradients import exact_features, resolve_param_names

    torch.manual_seed(0)
    params = {**SMALL, "nodes": "model", "min_ari": 0.0, "features": "exact", "exact_r": (4, 8), "apply": "loss"}
    m = build_mixer("dograph", params, ctx_for(corpus, tmp_path))
    model = nano_model(seq_len=T)
    assert m.dim == 5 * 32
    run(m, model, 30)
    assert m.in_force and m.clustering.centroids.shape == (3, m.dim)
    names = resolve_param_names(model, m.cfg.exact_params)
    assert names[0] == "lm_head.weight" and names[-1] == f"transformer.h.{model.config.n_layer - 1}.mlp.c_proj.weight"
    ids, _ = draw_probe(corpus, corpus.train_domains, 4, T, seed=5)
    o = model(ids[:, :-1], output_hidden_states=True)
    st = BatchStats(step=31, domain_ids=torch.arange(4) % 3, example_loss=torch.ones(4), input_ids=ids,
                    hidden=o.hidden_states[-1].detach(), logits=o.logits.detach(), model=model)
    z = m._features(st)
    # the last block's slice is that parameter's exact per-example gradient, sketched
    spec = {names[-1]: (4, 8, m._seed * 131 + 4)}
    assert torch.allclose(z[:, -32:], exact_features(model, ids, spec), atol=1e-5)
    w = m.example_weights(st)
    assert w.shape == (4,) and torch.all(w > 0)


@pytest.mark.parametrize("bad, match", [({"features": "exact", "exact_params": []}, "at least one parameter"),
                                        ({"objective": "A1"}, "needs a target"),
                                        ({"objective": "A1", "target": "nowhere"}, "unknown"),
                                        ({"target": "code"}, "A1 only"),
                                        ({"horizon": 2, "min_windows": 3}, "min_windows")])
def test_exact_feature_path_rejects_bad_settings(corpus, bad, match):
    with pytest.raises(Exception, match=match):
        build_mixer("dograph", {**SMALL, **bad}, ctx_for(corpus))


def test_exact_feature_path_names_a_missing_parameter(corpus):
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "features": "exact",
                                "exact_params": ["transformer.h.-1.mlp.nonexistent.weight"]}, ctx_for(corpus))
    with pytest.raises(Exception, match="nonexistent"):
        run(m, nano_model(seq_len=T), 1)


@pytest.mark.parametrize("nodes,extra", [("human", {}), ("model", {}), ("model", {"feature_sequences": 5})])
def test_state_survives_weights_only_checkpoint_and_resume_is_exact(corpus, nodes, extra):
    params = {**SMALL, "nodes": nodes, "min_ari": 0.0, **extra}
    torch.manual_seed(1)
    model_a = nano_model(seq_len=T)
    model_b = nano_model(seq_len=T)
    model_b.load_state_dict(model_a.state_dict())
    a = run(build_mixer("dograph", params, ctx_for(corpus)), model_a, 10)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = build_mixer("dograph", params, ctx_for(corpus))
    b.load_state_dict(state)
    b._model = model_b
    model_b.load_state_dict(model_a.state_dict())
    run(a, model_a, 10, start=11)
    run(b, model_b, 10, start=11)
    assert np.allclose(a.alpha, b.alpha, atol=1e-10) and np.allclose(a.weights, b.weights, atol=1e-10)
    assert a.history == b.history


@pytest.mark.parametrize("nodes", ["human", "model"])
def test_a_checkpoint_inside_a_window_with_bad_features_resumes_exactly(corpus, nodes):
    """Bad features at step 12 drop the statistics of the window 11-15; a checkpoint at step 13, inside
    it, must remember that, or the resumed run updates at step 15 from steps 14-15 alone."""
    params = {**SMALL, "nodes": nodes, "min_ari": 0.0}
    torch.manual_seed(1)
    model_a = nano_model(seq_len=T)
    model_b = nano_model(seq_len=T)
    a = run(build_mixer("dograph", params, ctx_for(corpus)), model_a, 13, poison=12)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_mixer("dograph", params, ctx_for(corpus))
    b.load_state_dict(torch.load(buf, weights_only=True))
    b._model = model_b
    model_b.load_state_dict(model_a.state_dict())
    run(a, model_a, 7, start=14)
    run(b, model_b, 7, start=14)
    assert a.history == b.history and np.allclose(a.weights, b.weights, atol=1e-10)


def test_bad_config_is_refused_with_the_key(corpus):
    with pytest.raises(MixerError, match="probe_size"):
        build_mixer("dograph", {"nodes": "model", "k": 16, "probe_size": 8}, ctx_for(corpus))
    with pytest.raises(MixerError, match="floors sum to 1.2"):
        build_mixer("dograph", {"nodes": "human", "floor": 0.4}, ctx_for(corpus))
    with pytest.raises(MixerError, match="caps sum"):
        build_mixer("dograph", {"nodes": "model", "k": 4, "cap": 0.2}, ctx_for(corpus))
    with pytest.raises(MixerError, match="no_such_key"):
        build_mixer("dograph", {"no_such_key": 1}, ctx_for(corpus))
    with pytest.raises(MixerError, match="objective"):
        build_mixer("dograph", {"objective": "A9"}, ctx_for(corpus))
    with pytest.raises(MixerError, match="feature_sequences needs apply: sample"):
        build_mixer("dograph", {"nodes": "model", "apply": "loss", "feature_sequences": 4}, ctx_for(corpus))
    with pytest.raises(MixerError, match=r"rule uniform does not use \['graph', 'tau'\]: they apply to rule dograph"):
        build_mixer("dograph", {"rule": "uniform", "graph": "off", "tau": 2.0}, ctx_for(corpus))
    with pytest.raises(MixerError, match=r"rule dograph does not use \['lam'\]: they apply to rule rnb only"):
        build_mixer("dograph", {"lam": 2.0}, ctx_for(corpus))
    with pytest.raises(MixerError, match=r"progress_probe \(11\) gives some of the 3 sources only 3 windows, under "
                                         r"min_node_samples \(4\).*at least 12"):
        build_mixer("dograph", {"nodes": "human", "progress_from": "probe", "progress_probe": 11}, ctx_for(corpus))


def test_rule_uniform_keeps_equal_weights_on_the_live_clusters_and_samples_the_sources_they_cover(corpus, tmp_path):
    """The live gradient partition on its own: the clusters re-cluster and follow the model as with DoGraph,
    but every node keeps weight 1/K, so the sources are drawn by how the clusters cover them,
    w_s = mean_c P(s | c) (under the base sampler, from the live table), not uniformly; DoGraph's rule on the
    same run moves the cluster weights."""
    weights = {}
    for rule in ("uniform", "dograph"):
        torch.manual_seed(0)
        m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "rule": rule}, ctx_for(corpus, tmp_path))
        run(m, nano_model(seq_len=T), 30)
        assert m.in_force and m.updates["model"] >= 3
        weights[rule] = m.alpha.copy()
        if rule == "uniform":
            given = m.ctab / m.ctab.sum(0, keepdims=True)                 # P(c | s)
            cond = given / given.sum(1, keepdims=True)                      # P(s | c), the base being uniform
            assert np.array_equal(m.alpha, np.full(3, 1 / 3))
            assert np.allclose(m.weights, cond.mean(0) / cond.mean(0).sum(), atol=1e-6)
            assert np.abs(m.weights - 1 / 3).max() > 1e-3         # the clusters do not cover the sources evenly
    assert np.abs(weights["dograph"] - 1 / 3).max() > 0.01


def test_rule_rnb_is_the_balance_step_on_the_last_windows_mean_gradients(corpus):
    """R&B's rule on DoGraph's nodes, by hand: softmax(lam G q / ||G q||), G the Gram matrix of each node's
    plain mean feature over the window just closed (not the running average across windows), a node
    without a sequence in that window keeping its previous mean, q = 1/3 per source."""
    m = build_mixer("dograph", {**SMALL, "rule": "rnb", "lam": 3.0}, ctx_for(corpus))
    ns, d = m.human, m.human.means.dim
    e0, e1 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    e0[0], e1[1] = 1.0, 1.0

    def window(rows: dict[int, torch.Tensor]) -> None:
        for node, z in rows.items():
            ns.means.add(torch.stack([z] * 4), torch.full((4,), node), torch.ones(4))
        ns.commit()

    window({0: e0, 1: e1, 2: e0 + e1})
    window({0: 2 * e1, 1: e1})               # node 2 draws nothing: it keeps e0 + e1
    m._by_rule(ns, 10)
    # means (e0, e1 coordinates) [[0, 2], [0, 1], [1, 1]]: G q = [8, 4, 5] / 3, ||G q|| = sqrt(105) / 3
    x = 3.0 * np.array([8.0, 4.0, 5.0]) / np.sqrt(105.0)
    assert np.allclose(ns.alpha, np.exp(x) / np.exp(x).sum(), atol=1e-12)
    assert int(np.argmax(ns.alpha)) == 0                     # the node most aligned with the evaluation leads


def test_rule_rnb_runs_on_the_live_clusters_with_the_evaluations_share_as_q(corpus):
    """R&B weighs each node's gradient by the evaluation's share in it. The evaluation weighs the sources
    equally, so on live clusters q is mean_s P(c | s) from the table the sampler uses, not pi (the
    clusters' occupancy, another estimate) nor 1/K."""
    from dograph_core.mixers.rnb import rnb_update

    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "min_ari": 0.0, "rule": "rnb"}, ctx_for(corpus))
    run(m, nano_model(seq_len=T), 20)
    assert m.in_force and m.updates["model"] >= 2
    last = m.mnodes.means.last.numpy()
    q = m._cluster_given_source().mean(1)                  # the table as the last update read it
    assert np.abs(q - m.pi).max() > 0.01 and np.abs(q - 1 / 3).max() > 0.005
    assert np.allclose(m.mnodes.alpha, rnb_update(last @ last.T, q, 3.0), atol=1e-12)
    for other in (m.pi, np.full(3, 1 / 3)):
        assert not np.allclose(m.mnodes.alpha, rnb_update(last @ last.T, other, 3.0), atol=1e-3)


def test_human_probe_progress_measures_the_model_not_the_sample(corpus):
    """progress_from: probe re-scores the same windows at every update: a model that does not learn
    (lr 0) shows no change in any node, where the training windows' losses change by sampling alone;
    a model that learns shows its own change."""
    changes = {}
    for src, lr in (("batch", 0.0), ("probe", 0.0), ("probe", 0.05)):
        torch.manual_seed(0)
        m = build_mixer("dograph", {**SMALL, "progress_from": src, "progress_probe": 12}, ctx_for(corpus))
        run(m, nano_model(seq_len=T), 20, lr=lr)
        changes[src, lr] = np.abs(np.stack(list(m.human.progress.changes)))
        assert changes[src, lr].shape == (3, 3)
    assert changes["probe", 0.0].max() < 1e-6
    assert changes["batch", 0.0].max() > 1e-3
    assert changes["probe", 0.05].max() > 1e-3


def test_feature_sequences_feed_the_statistics_exact_features_of_a_subset(corpus):
    """The cost lever keeps each feature exact and only takes fewer of them: 4 micro-batches of 12
    sequences add 4 x 4 features, from the sources of the drawn sequences, and the features it adds are
    rows of the full batch's features."""
    params = {**SMALL, "nodes": "human", "feature_sequences": 4}
    m = build_mixer("dograph", params, ctx_for(corpus))
    run(m, nano_model(seq_len=T), 4)
    twin = build_mixer("dograph", params, ctx_for(corpus))  # the same draws, replayed
    dom = torch.arange(12) % 3
    st12 = BatchStats(step=1, domain_ids=dom, example_loss=torch.ones(12), input_ids=torch.zeros(12, T + 1))
    expected = [torch.bincount(dom[twin._subset(st12)], minlength=3) for _ in range(4)]
    # each micro-batch's features are folded in when the next one is observed (on a GPU the host waits
    # for them then, not at once); flush (as the update and a checkpoint do) folds in the last one too
    assert m.human.means.counts.tolist() == sum(expected[:3]).double().tolist()
    m.flush()
    assert m.human.means.counts.tolist() == sum(expected).double().tolist() and float(sum(expected).sum()) == 16.0
    model = nano_model(seq_len=T)
    ids, _ = draw_probe(corpus, corpus.train_domains, 12, T, seed=99)
    o = model(ids[:, :-1], output_hidden_states=True)
    st = BatchStats(step=5, domain_ids=torch.arange(12) % 3, example_loss=torch.ones(12), input_ids=ids,
                    hidden=o.hidden_states[-1].detach(), logits=o.logits.detach(), model=model)
    idx = m._subset(st)
    assert idx is not None and len(idx) == 4 and len(set(idx.tolist())) == 4
    assert torch.allclose(m._features(st, idx), m._features(st)[idx], atol=1e-6)


def test_nan_features_skip_the_window_and_keep_weights(corpus, caplog):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human"}, ctx_for(corpus))
    model = nano_model(seq_len=T)
    run(m, model, 5)
    before = m.weights.copy()
    with caplog.at_level(logging.WARNING):
        run(m, model, 5, start=6, poison=8)
    assert np.allclose(m.weights, before, rtol=0, atol=1e-15)   # kept (the loop's renormalisation aside)
    assert "NaN" in caplog.text and "previous weights kept" in caplog.text
    run(m, model, 5, start=11)                   # the next clean window updates again
    assert not np.array_equal(m.weights, before) and np.all(np.isfinite(m.weights))


def test_domain_without_samples_is_neutral_not_favoured(corpus):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human", "min_node_samples": 4, "min_windows": 2}, ctx_for(corpus))
    model = nano_model(seq_len=T)
    run(m, model, 10)
    kept = m.human.means.mean_matrix()[2].clone()
    orig = m.observe

    def observe_without_domain_2(st):   # windows where domain 2 never appears
        keep = st.domain_ids != 2
        orig(BatchStats(step=st.step, domain_ids=st.domain_ids[keep], example_loss=st.example_loss[keep],
                        input_ids=st.input_ids[keep], hidden=st.hidden[keep], logits=st.logits[keep], model=st.model))

    m.observe = observe_without_domain_2
    run(m, model, 25, start=11)
    assert torch.equal(m.human.means.mean_matrix()[2], kept)
    beta, u, _ = m.human.progress.targets(1.0)
    assert u[2] == 0.0                                       # no score: neutral
    assert beta.argmax() != 2 or np.allclose(beta, 1 / 3)   # never the largest (the old bug gave it the most)
    assert np.all(np.isfinite(m.weights)) and abs(m.weights.sum() - 1) < 1e-9


def test_solver_failure_keeps_previous_weights_when_asked(corpus, caplog, monkeypatch):
    from dograph_core import optimize as opt

    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human", "fallback": "keep", "solver": "ripopt"}, ctx_for(corpus))
    model = nano_model(seq_len=T)
    run(m, model, 10)
    before = m.weights.copy()

    def broken(name):
        raise opt.SolverUnavailableError("solver 'ripopt' is not installed: pip install pyomo-ripopt")

    monkeypatch.setattr(opt, "_pyomo_solver", broken)
    with caplog.at_level(logging.WARNING):
        run(m, model, 5, start=11)
    assert np.array_equal(m.weights, before) and "pip install pyomo-ripopt" in caplog.text


@pytest.mark.parametrize("extra", [{"objective": "F2"}, {"objective": "F2", "tau_kl": 0.0, "rho": None},
                                   {"graph": "off"}, {"graph": "cosine", "knn": 1}, {"rho": 1.0}])
def test_objective_variants_give_weights_on_the_simplex(corpus, extra):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human", "floor": 0.05, "cap": 0.8, "min_windows": 2, **extra},
                    ctx_for(corpus))
    run(m, nano_model(seq_len=T), 20)
    w = m.weights
    assert abs(w.sum() - 1) < 1e-9 and np.all(w >= 0.05 - 1e-9) and np.all(w <= 0.8 + 1e-9)
    assert len(m.human.history) == 5


def test_a1_moves_the_mixture_towards_its_explicit_target(corpus, tmp_path):
    torch.manual_seed(0)
    m = build_mixer("dograph", {**SMALL, "nodes": "human", "objective": "A1", "target": "numbers", "tau_kl": 0.0},
                    ctx_for(corpus, tmp_path))
    run(m, nano_model(seq_len=T), 10)
    assert m.weights.argmax() == corpus.train_domains.index("numbers") and m.weights.max() > 0.5
    assert m.result()["meta"]["target"] == {"numbers": 1.0}


def test_analysis_probes_land_on_update_steps_even_at_the_run_end(corpus):
    # 250 steps, updates every 20: the last update is step 240, so the final probe must be there
    m = build_mixer("dograph", {**SMALL, "nodes": "human", "update_every": 20}, ctx_for(corpus, steps=250))
    assert m.analysis_steps() == [0, 60, 120, 180, 240]
    assert all(s % 20 == 0 for s in m.analysis_steps())


def test_recluster_from_online_reuses_training_features_and_probes_only_short_sources(corpus, tmp_path, monkeypatch):
    """``recluster_from: online``: a re-clustering takes, per source, the newest featurised training
    sequences (probe_size stratified over sources, as a probe is) and runs the model forward only for
    the sources short of rows; the rows survive a checkpoint."""
    params = {**SMALL, "nodes": "model", "recluster_from": "online", "progress_from": "batch", "analysis_probes": []}
    m = build_mixer("dograph", params, ctx_for(corpus, tmp_path))
    probed = []
    real = m._probe_features
    monkeypatch.setattr(m, "_probe_features", lambda ids, n: probed.append(len(ids)) or real(ids, n))
    model = nano_model(seq_len=T)
    run(m, model, 14)            # 4 sequences of each source per micro-batch; quota 36 / 3 = 12 each
    assert probed == [36] and m.clustering is not None   # the first clustering probes the model as it is
    assert [len(r) for r in m._rows] == [12, 12, 12] and all(r[1].shape == r[2].shape == (128,) for r in m._rows[0])
    assert not torch.allclose(m._rows[0][-1][1], m._rows[0][-1][2])   # two projections of one gradient
    m.flush()
    m._rows[2] = []              # source 2 no longer drawn: the next re-clustering probes 12 - 4 of it
    run(m, model, 1, start=15)
    assert probed == [36, 8]
    clusters = [r for r in read_log(tmp_path / "dograph_log.jsonl") if r["event"] == "cluster"]
    assert [r["rows_online"] for r in clusters] == [0, 28]
    twin = build_mixer("dograph", params, ctx_for(corpus))
    twin.load_state_dict(m.state_dict())
    assert [[s for s, _, _ in r] for r in twin._rows] == [[s for s, _, _ in r] for r in m._rows]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for ra, rb in zip(twin._rows, m._rows)
               for a, b in zip(ra, rb))
    for bad in ({"features": "exact"}, {"apply": "loss"}):
        with pytest.raises(MixerError, match="recluster_from: online"):
            build_mixer("dograph", {"nodes": "model", "recluster_from": "online", **bad}, ctx_for(corpus))


def test_another_rank_adopts_rank_0s_clustering_labels_its_own_rows_by_it_and_resumes_without_rank_0s_rows(
        corpus, monkeypatch):
    """Under several processes rank 0 decides: rank 1 runs no k-means of its own, labels its training rows
    by rank 0's centroids (not all in cluster 0), and sums its table with the other ranks'. A checkpoint
    holds rank 0's rows only, so rank 1 resumes with none rather than count rank 0's twice."""
    import dograph_core.clustering as cl

    params = {**SMALL, "nodes": "model", "recluster_from": "online", "progress_from": "batch", "analysis_probes": []}
    ctx = ctx_for(corpus)
    ctx.rank, ctx.world_size = 1, 2
    m = build_mixer("dograph", params, ctx)
    run(m, nano_model(seq_len=T), 14)  # one process's protocol (identity reduce): rows filled, first clustering
    m.flush()
    z, zc, src, _ = m._recluster_rows(20)
    rank0 = cl.recluster(z.numpy(), zc.numpy(), 3, 20, seed=5)  # what rank 0 found on its own rows
    sent = [torch.tensor([1.0]), torch.from_numpy(rank0.mean), torch.from_numpy(rank0.centroids)]
    calls = []

    def reduce(t):  # the all-reduce: rank 0's numbers (this rank sends zeros), then the tables' sum
        calls.append(t.shape)
        return t + (sent.pop(0).double() if sent else 0.0)

    monkeypatch.setattr(cl, "recluster", lambda *a, **k: pytest.fail("rank 1 ran its own k-means"))
    m._last_try = 20 - SMALL["recluster_every"]
    m._maybe_recluster(20, reduce)
    want = cl.assign(z.numpy(), rank0.mean, rank0.centroids)
    assert len(set(want.tolist())) > 1
    # rank 0's clusters, renumbered to match the live ones (as on every rank): the labels follow
    perm = np.array([int(np.argmin(np.linalg.norm(rank0.centroids - c, axis=1))) for c in m.clustering.centroids])
    assert sorted(perm) == [0, 1, 2]
    np.testing.assert_allclose(m.clustering.centroids, rank0.centroids[perm])
    np.testing.assert_array_equal(perm[m.clustering.labels], want)
    assert len(calls) == 4 and m.table.sum() == len(src)  # flag, mean, centroids, the table
    twin = build_mixer("dograph", params, ctx)
    twin.load_state_dict(m.state_dict())
    assert [len(r) for r in twin._rows] == [0, 0, 0]


def test_cluster_frequency_under_the_base_sampler_from_the_table(corpus):
    """pi_c = sum_s base_s P(c | s): by hand for a 2 x 3 table with one source absent."""
    m = build_mixer("dograph", {**SMALL, "nodes": "model", "k": 2}, ctx_for(corpus))
    m._init_pi(np.array([[2, 0, 0], [1, 3, 0]]))      # uniform base; source 2 has no rows
    assert np.allclose(m.pi, [0.5 * 2 / 3, 0.5 * 1 / 3 + 0.5 * 1.0])
