"""The mixture sampler: determinism, weights changing mid-run, realised mixture, epochs, cap, DDP slices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dograph_core.mixers.base import MixerError
from dograph_core.sampling import MixtureSampler, SamplerError, rank_slice

DOMAINS = ["a", "b", "c"]


def _tokens(sizes=(5000, 3000, 800)):
    # Each domain's tokens carry its index in the high digits, so a window tells where it came from.
    return {d: (np.arange(n) % 1000 + 1000 * (i + 1)).astype(np.uint16) for i, (d, n) in enumerate(zip(DOMAINS, sizes))}


def _sampler(weights=(1, 1, 1), batch=16, seed=0, max_epochs=None, sizes=(5000, 3000, 800)):
    return MixtureSampler(_tokens(sizes), DOMAINS, seq_len=16, batch_size=batch, weights=weights, seed=seed, max_epochs=max_epochs)


def _run(s, steps, changes=None):
    out = []
    for step in range(1, steps + 1):
        if changes and step in changes:
            s.set_weights(changes[step])
        d = s.draw(step)
        out.append((d.domain_ids.copy(), d.starts.copy()))
    return out


def _same(a, b):
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_same_seed_same_stream_other_seed_other_stream():
    assert _same(_run(_sampler(), 20), _run(_sampler(), 20))
    assert not _same(_run(_sampler(), 20), _run(_sampler(seed=1), 20))


def test_windows_come_from_the_drawn_domain_and_have_seq_len_plus_one_tokens():
    s = _sampler()
    d = s.draw(1)
    x = s.tokens(d)
    assert x.shape == (16, 17) and x.dtype == torch.int64
    assert torch.equal(x[:, 0] // 1000 - 1, torch.from_numpy(d.domain_ids))


def test_weights_change_at_any_step_without_touching_the_past():
    base = _run(_sampler(), 30)
    changed = _run(_sampler(), 30, changes={11: [1, 0, 0]})
    assert _same(base[:10], changed[:10])
    assert all((ids == 0).all() for ids, _ in changed[10:])


def test_state_dict_resumes_the_exact_stream():
    full = _run(_sampler(), 40, changes={7: [0.2, 0.3, 0.5]})
    s = _sampler()
    first = _run(s, 20, changes={7: [0.2, 0.3, 0.5]})
    state = s.state_dict()
    t = _sampler()
    t.load_state_dict(state)
    rest = [(d.domain_ids, d.starts) for d in (t.draw(k) for k in range(21, 41))]
    assert _same(full, first + rest)


def test_steps_are_drawn_in_order():
    s = _sampler()
    s.draw(1)
    with pytest.raises(SamplerError, match="expected step 2"):
        s.draw(3)


def test_realised_mixture_follows_the_target():
    s = _sampler(weights=[0.6, 0.3, 0.1], batch=64, sizes=(50000, 50000, 50000))
    _run(s, 100)
    rep = s.report()["domains"]
    for d, w in zip(DOMAINS, [0.6, 0.3, 0.1]):
        assert rep[d]["target"] == pytest.approx(w)
        assert abs(rep[d]["realised"] - w) < 0.02


def test_epochs_count_repetitions_and_each_epoch_reads_every_window_once():
    s = _sampler(weights=[0, 0, 1], batch=10, sizes=(5000, 3000, 801))  # c: 800/16 = 50 windows per epoch
    starts = np.concatenate([s.draw(k).starts for k in range(1, 6)])
    assert len(set(starts.tolist())) == 50  # first epoch: no window twice
    _run_from = [s.draw(k) for k in range(6, 11)]
    assert s.report()["domains"]["c"]["epochs"] == pytest.approx(2.0)
    assert len(_run_from) == 5


def test_cap_renormalises_the_others_and_is_reported():
    s = _sampler(weights=[1, 1, 1], batch=12, max_epochs=1.0, sizes=(20000, 20000, 801))
    _run(s, 40)
    rep = s.report()["domains"]
    assert rep["c"]["epochs"] <= 1.0 + 1e-9
    assert rep["c"]["capped_at_step"] is not None
    assert rep["a"]["capped_at_step"] is None
    assert rep["c"]["realised"] < rep["c"]["target"]
    assert rep["a"]["sequences"] + rep["b"]["sequences"] + rep["c"]["sequences"] == 40 * 12


def test_all_domains_capped_is_a_clear_error():
    s = _sampler(weights=[0, 0, 1], batch=10, max_epochs=1.0, sizes=(5000, 3000, 801))
    _run(s, 5)
    with pytest.raises(SamplerError, match="repetition cap"):
        s.draw(6)


@pytest.mark.parametrize("w,msg", [([1, -1, 1], "negative"), ([1, float("nan"), 1], "NaN"), ([1, 1], "expected 3"), ([0, 0, 0], "zero")])
def test_bad_weights_are_refused(w, msg):
    with pytest.raises(MixerError, match=msg):
        _sampler(weights=w)
    s = _sampler()
    with pytest.raises(MixerError, match=msg):
        s.set_weights(w)


def test_domain_shorter_than_one_sequence_is_refused():
    with pytest.raises(SamplerError, match="shorter than one sequence"):
        _sampler(sizes=(5000, 3000, 10))


def test_rank_slices_are_disjoint_and_cover_the_batch():
    seen = []
    for r in range(2):
        for m in range(2):
            sl = rank_slice(16, r, 2, m, 2)
            seen.extend(range(16)[sl])
    assert sorted(seen) == list(range(16))
    with pytest.raises(SamplerError, match="not divisible"):
        rank_slice(10, 0, 2, 0, 2)


# -- the default (iid) stream is pinned -------------------------------------------------------------
def _stream_crc(s, steps=30, changes=None):
    import zlib

    c = 0
    for k in range(1, steps + 1):
        if changes and k in changes:
            s.set_weights(changes[k])
        c = zlib.crc32(s.draw(k).crc().to_bytes(4, "little"), c)
    return c


def test_default_stream_is_unchanged_by_the_stratified_option():
    # Values computed with the sampler before the stratified option existed (issue 12): bit for bit.
    assert _stream_crc(_sampler(), changes={7: [0.2, 0.3, 0.5]}) == 2655999081
    assert _stream_crc(_sampler(batch=12, max_epochs=1.0, sizes=(20000, 20000, 801))) == 936900030
    assert _stream_crc(MixtureSampler(_tokens(), DOMAINS, 16, 16, (1, 1, 1), stratified=False),
                       changes={7: [0.2, 0.3, 0.5]}) == 2655999081


# -- stratified batches (DoReMi issue #5: every domain in every batch) -------------------------------
def _strat(weights=(1, 1, 1), batch=16, seed=0, max_epochs=None, sizes=(5000, 3000, 800)):
    return MixtureSampler(_tokens(sizes), DOMAINS, seq_len=16, batch_size=batch, weights=weights, seed=seed,
                          max_epochs=max_epochs, stratified=True)


def _counts(ids, k=3):
    return np.bincount(ids, minlength=k)


@pytest.mark.parametrize("weights,batch", [((1, 1, 1), 16), ((0.6, 0.3, 0.1), 16), ((0.8, 0.15, 0.05), 32),
                                           ((0.5, 0.25, 0.25), 8), ((0.34, 0.33, 0.33), 3)])
def test_stratified_batches_hold_every_domain_with_counts_within_one_of_the_target(weights, batch):
    s = _strat(weights, batch=batch, sizes=(50000, 50000, 50000))
    target = batch * np.asarray(weights) / np.sum(weights)
    for k in range(1, 101):
        c = _counts(s.draw(k).domain_ids)
        assert c.sum() == batch
        assert (c >= 1).all(), (k, c)
        assert (np.abs(c - target) < 1).all(), (k, c, target)


def test_stratified_domains_of_zero_weight_never_appear_and_weights_change_at_any_step():
    s = _strat((0.5, 0, 0.5), sizes=(50000, 50000, 50000))
    for k in range(1, 21):
        if k == 11:
            s.set_weights([0.25, 0.5, 0.25])
        c = _counts(s.draw(k).domain_ids)
        assert (c == ([8, 0, 8] if k <= 10 else [4, 8, 4])).all(), (k, c)


def test_stratified_gives_every_positive_domain_one_sequence_taken_from_the_largest():
    s = _strat((0.9, 0.05, 0.05), batch=8, sizes=(50000, 50000, 50000))  # 7.2, 0.4, 0.4
    for k in range(1, 51):
        c = _counts(s.draw(k).domain_ids)
        assert c[1] == 1 and c[2] == 1 and c[0] == 6, c
    s = _strat((0.9, 0.05, 0.05), batch=2, sizes=(50000, 50000, 50000))  # no room for all three: no promise
    assert all(_counts(s.draw(k).domain_ids).sum() == 2 for k in range(1, 11))


def test_stratified_counts_are_unbiased_and_a_partial_sum_at_most_one_each():
    from dograph_core.sampling import stratified_counts

    p = np.array([0.6, 0.3, 0.1])
    np.testing.assert_array_equal(stratified_counts(np.array([0.5, 0.3, 0.2]), 10, np.random.default_rng(0)), [5, 3, 2])
    rng = np.random.default_rng(1)
    draws = np.array([stratified_counts(p, 16, rng) for _ in range(4000)])  # 9.6, 4.8, 1.6
    assert (draws.sum(1) == 16).all()
    assert set(draws[:, 0]) == {9, 10} and set(draws[:, 1]) == {4, 5} and set(draws[:, 2]) == {1, 2}
    np.testing.assert_allclose(draws.mean(0), 16 * p, atol=0.05)


def test_stratified_realised_mixture_follows_the_target():
    s = _strat((0.6, 0.3, 0.1), batch=16, sizes=(50000, 50000, 50000))
    _run(s, 200)
    rep = s.report()["domains"]
    for d, w in zip(DOMAINS, [0.6, 0.3, 0.1]):
        assert abs(rep[d]["realised"] - w) < 0.01


def test_stratified_batch_order_is_shuffled_so_slices_mix_domains():
    s = _strat((1, 1, 1), batch=16, sizes=(50000, 50000, 50000))
    draws = [s.draw(k).domain_ids for k in range(1, 51)]
    assert sum(bool(np.all(np.diff(ids) >= 0)) for ids in draws) == 0  # never blocks by domain
    first = np.array([ids[rank_slice(16, 0, 2, 0, 2)] for ids in draws])  # rank 0, micro-batch 0 (4 sequences)
    assert set(first.ravel()) == {0, 1, 2} and len({tuple(r) for r in first}) > 10


def test_stratified_windows_come_from_the_drawn_domain():
    s = _strat()
    d = s.draw(1)
    x = s.tokens(d)
    assert x.shape == (16, 17)
    assert torch.equal(x[:, 0] // 1000 - 1, torch.from_numpy(d.domain_ids))


def test_stratified_stream_is_deterministic_seeded_and_not_the_iid_stream():
    assert _same(_run(_strat(), 20), _run(_strat(), 20))
    assert not _same(_run(_strat(), 20), _run(_strat(seed=1), 20))
    assert not _same(_run(_strat(), 20), _run(_sampler(), 20))


def test_stratified_state_dict_resumes_the_exact_stream_mid_run():
    changes = {7: [0.2, 0.3, 0.5], 25: [0.7, 0.2, 0.1]}
    full = _run(_strat(), 40, changes=changes)
    s = _strat()
    first = _run(s, 20, changes=changes)
    state = s.state_dict()
    assert state["stratified"] is True
    t = _strat()
    t.load_state_dict(state)
    rest = []
    for k in range(21, 41):
        if k in changes:
            t.set_weights(changes[k])
        d = t.draw(k)
        rest.append((d.domain_ids, d.starts))
    assert _same(full, first + rest)


def test_stratified_is_a_structural_key_and_old_checkpoints_load_as_iid():
    iid, strat = _sampler(), _strat()
    iid.draw(1)
    strat.draw(1)
    with pytest.raises(SamplerError, match="stratified was False, now True"):
        _strat().load_state_dict(iid.state_dict())
    with pytest.raises(SamplerError, match="stratified was True, now False"):
        _sampler().load_state_dict(strat.state_dict())
    old = {k: v for k, v in iid.state_dict().items() if k != "stratified"}  # a checkpoint from before the option
    t = _sampler()
    t.load_state_dict(old)
    assert t.draw(2).crc() == iid.draw(2).crc()
    with pytest.raises(SamplerError, match="stratified was False"):
        _strat().load_state_dict(old)


def test_stratified_respects_the_repetition_cap():
    s = _strat((1, 1, 1), batch=12, max_epochs=1.0, sizes=(20000, 20000, 801))  # c: 50 windows, 4 a step
    seen_c = []
    for k in range(1, 41):
        c = _counts(s.draw(k).domain_ids)
        assert c.sum() == 12 and c[0] >= 1 and c[1] >= 1
        seen_c.append(c[2])
    assert seen_c[:12] == [4] * 12  # 48 windows in 12 steps, then the last 2, then none
    assert seen_c[12] == 2 and seen_c[13:] == [0] * 27
    rep = s.report()["domains"]
    assert rep["c"]["epochs"] <= 1.0 + 1e-9 and rep["c"]["sequences"] == 50
    assert rep["c"]["capped_at_step"] == 13 and rep["a"]["capped_at_step"] is None
    assert rep["a"]["sequences"] + rep["b"]["sequences"] + rep["c"]["sequences"] == 40 * 12
    s = _strat((0, 0, 1), batch=10, max_epochs=1.0, sizes=(5000, 3000, 801))
    _run(s, 5)
    with pytest.raises(SamplerError, match="repetition cap"):
        s.draw(6)
