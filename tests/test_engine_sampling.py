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
