"""The training loop end to end on the nano scale: outputs, determinism, bad input, NaN, evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _engine_fixture import make_corpus

from dograph_core.checkpoint import CheckpointError
from dograph_core.config import TrainConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.evaluate import evaluate_split, fixed_windows, last_word_items
from dograph_core.mixers.base import MixerError
from dograph_core.model import ScaleError, build_model
from dograph_core.sampling import SamplerError
from dograph_core.tracking import MemoryTracker
from dograph_core.train import TrainError, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("corpus")))


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, seq_len=32, warmup_steps=2, eval_every=3, eval_windows=4,
                ckpt_every=0, threads=1, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_run_writes_every_output_and_logs_through_the_tracker(corpus, tmp_path):
    tr = MemoryTracker()
    s = train(cfg(), corpus, "natural", {}, tmp_path / "r", tracker=tr)
    out = tmp_path / "r"
    for name in ("metrics.jsonl", "eval.json", "weights.json", "summary.json", "final/model.safetensors"):
        assert (out / name).exists(), name
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000006.pt"]
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["val"]["domains"]) == {"alpha", "beta", "gamma"}
    assert set(ev["val"]["heldout"]) == {"code"}  # held out: reported apart, not in mean/worst
    assert ev["val"]["loss_worst"] == max(v["loss"] for v in ev["val"]["domains"].values())
    assert set(ev["last_word"]) == {"alpha", "beta", "gamma", "code"} and ev["last_word"]["alpha"]["n"] > 0
    logged = {k for _, m in tr.metrics for k in m}
    assert {"loss", "lr", "tokens_per_s", "weight/alpha", "val_loss/beta", "val_loss_mean", "val_loss_worst",
            "heldout_loss/code", "test_loss_mean"} <= logged
    w = json.loads((out / "weights.json").read_text())
    assert w["method"] == "natural" and np.allclose(w["weights"], corpus.natural_weights)
    assert s["mixture"]["domains"]["alpha"]["sequences"] > 0 and s["params"] > 0
    ck = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert ck["step"] == 6 and {"model", "optimizer", "scheduler", "sampler", "mixer", "rng"} <= set(ck)


def test_final_model_and_tokenizer_load_with_from_pretrained(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(cfg(steps=2, eval_every=0), corpus, "uniform", {}, tmp_path / "r")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "r" / "final")
    ids = tok("river stone light", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == corpus.vocab_size


def test_same_seed_gives_identical_losses_other_seed_does_not(corpus, tmp_path):
    train(cfg(), corpus, "uniform", {}, tmp_path / "a")
    train(cfg(), corpus, "uniform", {}, tmp_path / "b")
    train(cfg(seed=1), corpus, "uniform", {}, tmp_path / "c")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _losses(tmp_path / "a") != _losses(tmp_path / "c")


def test_data_seed_changes_the_batches_and_nothing_else(corpus, tmp_path):
    """data_seed seeds the sampler apart from the model's initialisation: equal to seed it is the default
    run to the bit; another value reads other sequences (the checkpoint's sampler says which seed) from the
    same initial model (with a negligible learning rate the final weights are the initial ones: equal across
    data seeds, not across seeds), so two such runs differ by the data order alone."""
    from safetensors.torch import load_file

    train(cfg(steps=2), corpus, "uniform", {}, tmp_path / "a")
    train(cfg(steps=2, data_seed=0), corpus, "uniform", {}, tmp_path / "b")
    train(cfg(steps=2, data_seed=7), corpus, "uniform", {}, tmp_path / "c")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _losses(tmp_path / "a") != _losses(tmp_path / "c")
    ck = {r: torch.load(tmp_path / r / "checkpoints" / "step_0000002.pt", weights_only=True) for r in "ac"}
    assert ck["a"]["sampler"]["seed"] == 0 and ck["c"]["sampler"]["seed"] == 7
    for name, kw in (("d0", {}), ("d7", {"data_seed": 7}), ("s1", {"seed": 1, "data_seed": 7})):
        train(cfg(steps=1, eval_every=0, lr=1e-12, warmup_steps=0, **kw), corpus, "uniform", {}, tmp_path / name)
    w = {r: load_file(tmp_path / r / "final" / "model.safetensors") for r in ("d0", "d7", "s1")}
    key = "transformer.wte.weight"
    assert torch.allclose(w["d0"][key], w["d7"][key], atol=1e-8)
    assert not torch.allclose(w["d0"][key], w["s1"][key], atol=1e-3)


def test_a_gradient_spike_between_two_logged_steps_is_not_lost(corpus, tmp_path):
    """With log_every > 1 each logged row holds the largest pre-clip gradient norm of its interval, and the
    summary the run's largest, its step and how many steps the clip cut: the spike that a sampled log
    misses (a run logged every 10 steps showed none of the step-32 spike of a micro run)."""
    def rows(out):
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]

    train(cfg(steps=8, eval_every=0, grad_clip=1e9), corpus, "uniform", {}, tmp_path / "free")
    clip = float(np.median([r["grad_norm"] for r in rows(tmp_path / "free")]))
    every = train(cfg(steps=8, eval_every=0, grad_clip=clip), corpus, "uniform", {}, tmp_path / "every")
    sparse = train(cfg(steps=8, eval_every=0, grad_clip=clip, log_every=4), corpus, "uniform", {}, tmp_path / "sparse")
    norms = {r["step"]: r["grad_norm"] for r in rows(tmp_path / "every")}
    logged = {r["step"]: r for r in rows(tmp_path / "sparse")}
    assert sorted(logged) == [4, 8] and "grad_norm_max" not in rows(tmp_path / "every")[0]
    assert max(norms[s] for s in range(1, 5)) > norms[4]  # the first interval's spike is not at its logged step
    for end in (4, 8):
        assert logged[end]["grad_norm"] == norms[end]
        assert logged[end]["grad_norm_max"] == max(norms[s] for s in range(end - 3, end + 1))
    top = max(norms, key=norms.get)
    for s in (every, sparse):
        assert (s["grad_norm_max"], s["grad_norm_max_step"]) == (norms[top], top)
        assert s["clipped_steps"] == sum(v > clip for v in norms.values())
    assert 0 < every["clipped_steps"] < 8


def test_static_mixer_weights_drive_the_sampled_mixture(corpus, tmp_path):
    s = train(cfg(steps=4, eval_every=0), corpus, "static", {"weights": {"alpha": 0, "beta": 1, "gamma": 0}}, tmp_path / "r")
    mix = s["mixture"]["domains"]
    assert mix["beta"]["realised"] == 1.0 and mix["alpha"]["sequences"] == 0


@pytest.mark.parametrize(
    "kw,params,err,match",
    [
        (dict(scale="tiny"), {}, ScaleError, "unknown model scale 'tiny'"),
        (dict(batch_size=6, grad_accum=4), {}, SamplerError, "not divisible"),
        (dict(), {"weights": {"alpha": -1, "beta": 1, "gamma": 1}}, MixerError, "negative"),
        (dict(), {"weights": {"alpha": float("nan"), "beta": 1, "gamma": 1}}, MixerError, "NaN"),
        (dict(), {"weights": {"alpha": 1, "beta": 1}}, MixerError, "missing domains"),
        (dict(seq_len=20000), {}, SamplerError, "shorter than one sequence"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(corpus, tmp_path, kw, params, err, match):
    method = "static" if params else "uniform"
    with pytest.raises(err, match=match):
        train(cfg(**kw), corpus, method, params, tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()


def test_checkpoint_from_another_configuration_is_refused(corpus, tmp_path):
    train(cfg(steps=2, eval_every=0), corpus, "uniform", {}, tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"different configuration:\n  train.lr"):
        train(cfg(steps=2, eval_every=0, lr=0.01), corpus, "uniform", {}, tmp_path / "r", resume=True)
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(cfg(steps=2, eval_every=0), corpus, "uniform", {}, tmp_path / "r")


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    import dograph_core.microstep as ms

    real = ms.LMLoss.forward

    def poisoned(self, x, hidden=False):
        logits, token_loss, h = real(self, x, hidden)
        if poisoned.calls >= 4:
            token_loss = token_loss * float("nan")
        poisoned.calls += 1
        return logits, token_loss, h

    poisoned.calls = 0
    monkeypatch.setattr(ms.LMLoss, "forward", poisoned)
    with pytest.raises(TrainError, match=r"loss became nan at step 5.*step_0000004.pt"):
        train(cfg(steps=8, ckpt_every=2, eval_every=0), corpus, "uniform", {}, tmp_path / "r")
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002.pt", "step_0000004.pt"]
    assert not (tmp_path / "r" / "final").exists()


def test_validation_windows_are_fixed_and_evenly_spaced():
    w = fixed_windows(1000, 5, 32)
    assert w.tolist() == [0, 242, 484, 725, 967] and np.array_equal(w, fixed_windows(1000, 5, 32))
    assert fixed_windows(10, 5, 32).tolist() == [0]  # a short shard: one (shorter) window


def test_evaluation_does_not_depend_on_the_mixture_or_the_rng(corpus):
    torch.manual_seed(0)
    model = build_model("nano", corpus.vocab_size, 32, corpus.eot_id)
    args = (model, corpus, "val", corpus.train_domains, corpus.heldout_domains, 32, 4, torch.device("cpu"))
    a = evaluate_split(*args)
    torch.manual_seed(123)
    np.random.seed(5)
    b = evaluate_split(*args)
    assert a == b


def test_last_word_items_cut_the_final_word_before_trailing_punctuation():
    # ids: 1 "The", 2 " cat", 3 " sat", 4 "ting", 5 ".", 6 "\n", 0 eot
    starts = np.array([False, False, True, True, False, False, True])
    alnum = np.array([False, True, True, True, True, False, False])
    toks = np.array([1, 2, 3, 4, 5, 6, 0, 1, 2, 0], dtype=np.uint16)
    items = last_word_items(toks, 0, (starts, alnum), n_docs=10, seq_len=32)
    assert [(seq.tolist(), n) for seq, n in items] == [([1, 2, 3, 4], 2)]


def test_bf16_autocast_runs_on_cpu_as_an_option(corpus, tmp_path):
    s = train(cfg(steps=2, eval_every=0, dtype="bf16"), corpus, "uniform", {}, tmp_path / "r")
    assert s["dtype"] == "bf16" and np.isfinite(s["final_loss"])


def test_module_entry_point_reports_bad_input_and_exits_non_zero(corpus, tmp_path, capsys):
    from dograph_core.train import main

    params = tmp_path / "params.yaml"
    params.write_text("methods: {u: {type: uniform}}\npipeline: {methods: [u]}\n")
    rc = main(["--params", str(params), "--method", "u", "--data", str(corpus.root), "--out", str(tmp_path / "r"),
               "--set", "train.scale=huge"])
    assert rc == 2 and "unknown model scale 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
