"""The mixer protocol inside the loop: apply = sample | loss | grad, needs, update_every, state."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _engine_fixture import make_corpus

from dograph_core.config import TrainConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.microstep import LMLoss, micro_step
from dograph_core.mixers import REGISTRY
from dograph_core.mixers.base import Mixer, MixerContext
from dograph_core.model import build_model
from dograph_core.train import train

SEEN: list = []


class SwitchMixer(Mixer):
    """Samples; every 2 steps moves all weight to the next domain; counts what it sees."""

    name = "t_switch"
    needs = frozenset({"domain_losses", "token_losses", "hidden"})

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.observed = 0

    def observe(self, stats):
        b, t = stats.input_ids.shape[0], stats.input_ids.shape[1] - 1
        assert stats.token_loss.shape == (b, t) and stats.hidden.shape[:2] == (b, t)
        assert stats.logits.shape == (b, t, self.ctx.vocab_size)
        self.observed += 1

    def update(self, step, reduce):
        assert torch.equal(reduce(torch.ones(2)), torch.ones(2))  # one process: identity
        k = len(self.ctx.domains)
        return np.eye(k)[(step // self.update_every) % k]

    def state_dict(self):
        return {**super().state_dict(), "observed": self.observed, "arr": np.arange(3)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.observed = state["observed"]
        assert isinstance(state["arr"], np.ndarray)


class LossMixer(Mixer):
    """Re-weights examples: only the first domain counts."""

    name = "t_loss"
    apply = "loss"
    needs = frozenset({"example_losses"})

    def example_weights(self, stats):
        return (stats.domain_ids == 0).float() * 3.0


class GradMixer(Mixer):
    """Needs per-domain gradients; keeps fixed weights."""

    name = "t_grad"
    apply = "grad"
    needs = frozenset({"domain_grads"})

    def initial_weights(self):
        return np.array([0.5, 0.25, 0.25])

    def observe(self, stats):
        SEEN.append((stats.domain_grads.clone(), stats.domain_present.clone(), stats.domain_ids.clone()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    for cls in (SwitchMixer, LossMixer, GradMixer):
        monkeypatch.setitem(REGISTRY, cls.name, f"{__name__}:{cls.__name__}")


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, seq_len=32, warmup_steps=2, eval_every=0, eval_windows=4, threads=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _ctx(corpus):
    return MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=4, seq_len=32,
                        vocab_size=corpus.vocab_size)


def _batch(corpus):
    x = torch.stack([torch.from_numpy(corpus.tokens("train", d)[i * 40: i * 40 + 33].astype(np.int64))
                     for i, d in enumerate(["alpha", "alpha", "beta", "beta", "alpha"])])
    return x, torch.tensor([0, 0, 1, 1, 0])


def test_sample_mixer_weights_reach_the_sampler_every_update(corpus, tmp_path):
    s = train(cfg(steps=6), corpus, "t_switch", {"update_every": 2}, tmp_path / "r")
    # steps 1-2 at uniform, then all weight on domain 1 (steps 3-4), then domain 2 (steps 5-6)
    assert s["mixture"]["domains"]["beta"]["sequences"] >= 16
    assert s["mixture"]["domains"]["gamma"]["sequences"] >= 16
    import json

    doc = json.loads((tmp_path / "r" / "weights.json").read_text())
    assert [h["step"] for h in doc["schedule"]] == [0, 2, 4, 6]


def test_loss_mixer_gradient_is_that_of_the_weighted_loss(corpus):
    torch.manual_seed(0)
    model = build_model("nano", corpus.vocab_size, 32, corpus.eot_id)
    mixer = LossMixer(LossMixer.Config(), _ctx(corpus))
    x, dom = _batch(corpus)
    micro_step(LMLoss(model), model, mixer, x, dom, 1, 1e-3, 1.0)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=x[:, :-1]).logits
    ex = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(5, 32).mean(1)
    (((dom == 0).float() * 3.0) * ex).mean().backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_grad_mixer_gets_per_domain_gradients_and_steps_on_their_weighted_sum(corpus):
    SEEN.clear()
    torch.manual_seed(0)
    model = build_model("nano", corpus.vocab_size, 32, corpus.eot_id)
    mixer = GradMixer(GradMixer.Config(), _ctx(corpus))
    x, dom = _batch(corpus)
    micro_step(LMLoss(model), model, mixer, x, dom, 1, 1e-3, 0.5)
    grads, present, _ = SEEN[0]
    n_params = sum(p.numel() for p in model.parameters())
    assert grads.shape == (3, n_params) and present.tolist() == [True, True, False]
    assert torch.count_nonzero(grads[2]) == 0
    # g_0 is the gradient of the mean loss over domain 0's examples
    model.zero_grad()
    logits = model(input_ids=x[dom == 0, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1), x[dom == 0, 1:].flatten()).backward()
    assert torch.allclose(grads[0], torch.cat([p.grad.reshape(-1) for p in model.parameters()]), atol=1e-6)
    # and the step's gradient was scale * sum_k w_k g_k
    model.zero_grad()
    micro_step(LMLoss(model), model, mixer, x, dom, 1, 1e-3, 0.5)
    expect = 0.5 * (0.5 * grads[0] + 0.25 * grads[1])
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expect, atol=1e-6)


def test_loss_and_grad_mixers_train_end_to_end_with_accumulation(corpus, tmp_path):
    a = train(cfg(steps=3, grad_accum=2), corpus, "t_loss", {}, tmp_path / "a")
    b = train(cfg(steps=3, grad_accum=2), corpus, "t_grad", {}, tmp_path / "b")
    assert np.isfinite(a["final_loss"]) and np.isfinite(b["final_loss"])
    assert b["final_weights"] == {"alpha": 0.5, "beta": 0.25, "gamma": 0.25}


def test_mixer_state_survives_the_checkpoint_with_numpy_inside(corpus, tmp_path):
    train(cfg(steps=4, ckpt_every=2), corpus, "t_switch", {"update_every": 2}, tmp_path / "r")
    from dograph_core.checkpoint import from_storable

    ck = torch.load(tmp_path / "r" / "checkpoints" / "step_0000004.pt", weights_only=True)
    state = from_storable(ck["mixer"])
    assert state["observed"] == 4 and isinstance(state["arr"], np.ndarray)
