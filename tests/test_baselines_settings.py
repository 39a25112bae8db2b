"""DoReMi's published settings, and the weight history the three baselines write when driven as the loop
drives them (update(), then set_weights() with what update() returned, then the sampler)."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dograph_core.mixers import build_mixer, validate_mixer_config
from dograph_core.mixers.base import BatchStats, MixerContext
from dograph_core.mixers.doremi import search_doremi

T = 4
DOMS = ("a", "b", "c", "d", "e", "f", "g")


def ctx() -> MixerContext:
    return MixerContext(domains=list(DOMS), natural=np.full(7, 1 / 7), total_steps=100, seq_len=T, vocab_size=16)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "final"
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(d)
    return d


def test_doremi_defaults_are_the_published_run():
    cfg = validate_mixer_config("doremi", {"reference": "."})
    # scripts/runs/run_pile_doremi120M.sh: --reweight_eta 1.0 --reweight_eps 1e-3
    assert cfg.eta == 1.0 and cfg.smoothing == 1e-3
    sig = inspect.signature(search_doremi).parameters
    assert sig["eta"].default == 1.0 and sig["smoothing"].default == 1e-3


def test_doremi_eta_is_the_sensitivity_setting(ref_dir):
    # issue #5's advice, eta = 0.1: one step with scores [1, 0] from uniform moves a by e^0.1 : 1, not e : 1
    m = build_mixer("doremi", {"reference": str(ref_dir), "eta": 0.1, "smoothing": 0.0},
                    MixerContext(domains=["a", "b"], natural=np.array([0.5, 0.5]), total_steps=4, seq_len=T,
                                 vocab_size=16))
    m.reference_token_loss = lambda ids: torch.full((2, T), 2.0)
    tl = torch.tensor([[3.0] * T, [2.0] * T])
    s = BatchStats(step=1, domain_ids=torch.tensor([0, 1]), example_loss=tl.mean(1), input_ids=torch.zeros(2, T + 1,
                   dtype=torch.long), token_loss=tl)
    m.example_weights(s)
    m.observe(s)
    np.testing.assert_allclose(m.update(1), [math.exp(0.1) / (math.exp(0.1) + 1), 1 / (math.exp(0.1) + 1)])


def drive(m, step, rng):
    """One optimizer step of the loop for a baseline mixer fed with random statistics."""
    if m.name == "doremi":
        s = BatchStats(step=step, domain_ids=torch.arange(7), example_loss=torch.zeros(7),
                       input_ids=torch.zeros(7, T + 1, dtype=torch.long),
                       token_loss=torch.as_tensor(rng.uniform(1, 4, size=(7, T)), dtype=torch.float32))
        m.example_weights(s)
        m.observe(s)
    elif m.name == "doge":
        m.observe(BatchStats(step=step, domain_ids=torch.arange(7), example_loss=torch.zeros(7),
                             input_ids=torch.zeros(7, T + 1, dtype=torch.long), lr=0.01,
                             domain_grads=torch.as_tensor(rng.normal(size=(7, 5)), dtype=torch.float32),
                             domain_present=torch.ones(7, dtype=torch.bool)))
    else:
        m.observe(BatchStats(step=step, domain_ids=torch.arange(7), input_ids=torch.zeros(7, T + 1),
                             example_loss=torch.as_tensor(rng.uniform(1, 4, size=7))))
    new = m.update(step)
    if new is not None:
        m.set_weights(new, step)  # what train.py does after every update


@pytest.mark.parametrize("name", ["doremi", "doge", "odm"])
def test_weight_history_has_one_row_per_step(name, ref_dir):
    params = {"doremi": {"reference": str(ref_dir)}, "doge": {"target": "train"}, "odm": {}}[name]
    m = build_mixer(name, params, ctx())
    if name == "doremi":
        m.reference_token_loss = lambda ids: torch.full((ids.shape[0], T), 2.0)
    rng = np.random.default_rng(0)
    for step in range(1, 101):
        drive(m, step, rng)
    steps = [s for s, _ in m.history]
    assert steps == sorted(set(steps)), "a step recorded twice"  # 17 duplicates for DoReMi before the fix
    assert len(steps) > 80  # and the changes are still recorded
    np.testing.assert_allclose(m.history[-1][1], m.weights)


# -- batch: stratified (DoReMi issue #5: every domain in every batch) ---------------------------------
def test_doremi_batch_option_sets_the_sampler_flag(ref_dir):
    assert validate_mixer_config("doremi", {"reference": "."}).batch == "iid"
    assert build_mixer("doremi", {"reference": str(ref_dir)}, ctx()).stratified_batches is False
    m = build_mixer("doremi", {"reference": str(ref_dir), "batch": "stratified"}, ctx())
    assert m.stratified_batches is True and m.result()["meta"]["batch"] == "stratified"
    with pytest.raises(Exception, match="batch"):
        validate_mixer_config("doremi", {"reference": ".", "batch": "balanced"})
    assert inspect.signature(search_doremi).parameters["batch"].default == "iid"


def test_doremi_stratified_proxy_run_reads_the_stratified_stream(tmp_path):
    """A tiny search: the proxy's batches are the stratified stream (every domain, every step); the
    reference run keeps iid batches."""
    import json

    from _engine_fixture import make_corpus

    from dograph_core.config import TrainConfig
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.sampling import MixtureSampler

    corpus = TokenCorpus(make_corpus(tmp_path / "corpus"))
    cfg = TrainConfig(steps=3, batch_size=8, seq_len=32, warmup_steps=1, eval_every=0, eval_windows=2, threads=1,
                      progress=False)
    search_doremi(cfg, corpus, tmp_path / "s", batch="stratified")
    doms = corpus.train_domains
    toks = {d: corpus.tokens("train", d) for d in doms}

    def crcs(weights, stratified):
        s = MixtureSampler(toks, doms, cfg.seq_len, cfg.batch_size, weights, seed=cfg.seed, stratified=stratified)
        draws = [s.draw(k) for k in range(1, cfg.steps + 1)]
        return [d.crc() for d in draws], [np.bincount(d.domain_ids, minlength=len(doms)) for d in draws]

    def logged(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["batch_crc"] for r in rows if "loss" in r]

    uniform = np.full(len(doms), 1 / len(doms))
    want, counts = crcs(uniform, True)
    assert all((c >= 2).all() for c in counts)  # 8 sequences over 3 domains: 2 or 3 each, every step
    assert logged(tmp_path / "s" / "round1" / "proxy") == want
    assert logged(tmp_path / "s" / "round1" / "proxy") != crcs(uniform, False)[0]
    assert logged(tmp_path / "s" / "round1" / "reference") == crcs(corpus.natural_weights, False)[0]
    meta = json.loads((tmp_path / "s" / "weights.json").read_text())["meta"]
    assert meta["batch"] == "stratified"
