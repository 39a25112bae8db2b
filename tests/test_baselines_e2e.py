"""DoReMi, DoGE and ODM inside the real training engine at the nano scale, for a few steps each."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _engine_fixture import make_corpus, tiny_train_cfg

from dograph_core.data.corpus import TokenCorpus
from dograph_core.mixers import build_mixer
from dograph_core.mixers.base import MixerContext, MixerError, read_weights
from dograph_core.mixers.doremi import search_doremi
from dograph_core.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("corpus")))


cfg = tiny_train_cfg


def static_reads(corpus, path) -> np.ndarray:
    ctx = MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=10,
                       seq_len=32, vocab_size=corpus.vocab_size)
    return build_mixer("static", {"path": str(path)}, ctx).initial_weights()


def check_run(corpus, run, method) -> dict:
    doc = read_weights(run / "weights.json", corpus.train_domains)
    assert doc["method"] == method
    w = np.asarray(doc["weights"])
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(static_reads(corpus, run / "weights.json"), w)
    summary = json.loads((run / "summary.json").read_text())
    np.testing.assert_allclose([summary["final_weights"][d] for d in doc["domains"]], w)
    return doc


def test_odm_runs_and_writes_its_weights(corpus, tmp_path):
    s = train(cfg(steps=6), corpus, "odm", {"type": "odm"}, tmp_path / "odm")
    assert np.isfinite(s["final_loss"])
    doc = check_run(corpus, tmp_path / "odm", "odm")
    assert len(doc["schedule"]) >= 2  # the policy moved away from uniform once exploration fell below 1/K
    assert doc["meta"]["exploration"] == pytest.approx(np.sqrt(np.log(3) / (3 * 6)))


def test_doge_universal_runs_and_writes_its_weights(corpus, tmp_path):
    s = train(cfg(), corpus, "doge", {"type": "doge"}, tmp_path / "doge")
    assert np.isfinite(s["final_loss"])
    doc = check_run(corpus, tmp_path / "doge", "doge")
    # the published universal form: a separate mix batch from the training domains' train split
    assert doc["meta"]["mode"] == "mix" and doc["meta"]["updates"] == 3
    assert doc["meta"]["target_split"] == {d: "train" for d in corpus.train_domains}
    assert doc["meta"]["timing"] == "same_step" and doc["meta"]["total_grad_clip"] == 5.0
    assert [r["step"] for r in doc["schedule"]] == [0, 1, 2, 3]  # initial + one row per step, none twice


def test_doge_out_of_domain_target_is_a_heldout_domain(corpus, tmp_path):
    train(cfg(), corpus, "doge_ood", {"type": "doge", "target": ["code"], "mu": 0.05}, tmp_path / "ood")
    doc = check_run(corpus, tmp_path / "ood", "doge")
    assert doc["meta"]["mode"] == "out-of-domain" and doc["meta"]["target_split"] == {"code": "val"}
    assert not np.allclose(doc["meta"]["last_weights"], 1 / 3)


def test_doremi_search_two_rounds_reference_proxy_average(corpus, tmp_path):
    res = search_doremi(cfg(), corpus, tmp_path / "s", rounds=2, eta=0.5)
    out = tmp_path / "s"
    for r in (1, 2):
        check_run(corpus, out / f"round{r}" / "reference", "static")
        check_run(corpus, out / f"round{r}" / "proxy", "doremi")
    # round 1's reference trained on the natural mixture, round 2's on round 1's DoReMi weights
    np.testing.assert_allclose(list(res["rounds"][0]["reference_weights"].values()), corpus.natural_weights)
    assert res["rounds"][1]["reference_weights"] == pytest.approx(res["rounds"][0]["weights"])
    final = read_weights(out / "weights.json", corpus.train_domains)
    assert final["method"] == "doremi" and len(final["meta"]["rounds"]) == 2
    np.testing.assert_allclose(final["weights"], [res["weights"][d] for d in corpus.train_domains])
    assert final["meta"]["updates"] == 3
    assert [r["step"] for r in final["schedule"]] == sorted({r["step"] for r in final["schedule"]})
    # resuming a finished search trains nothing and gives the same answer
    again = search_doremi(cfg(), corpus, tmp_path / "s", rounds=2, eta=0.5, resume=True)
    assert again["weights"] == pytest.approx(res["weights"])

    # a reference from another corpus is refused: other domains, or another tokenizer
    ctx = MixerContext(domains=corpus.train_domains, natural=corpus.natural_weights, total_steps=3, seq_len=32,
                       vocab_size=corpus.vocab_size, corpus=corpus)
    bad = tmp_path / "bad_ref"
    shutil.copytree(out / "round1" / "reference", bad)
    doc = json.loads((bad / "weights.json").read_text())
    doc["domains"] = ["alpha", "beta", "delta"]
    (bad / "weights.json").write_text(json.dumps(doc))
    with pytest.raises(MixerError, match="trained on domains"):
        build_mixer("doremi", {"reference": str(bad)}, ctx)
    (bad / "weights.json").unlink()
    tj = json.loads((bad / "final" / "tokenizer.json").read_text())
    tj["model"]["vocab"] = {k + "x": v for k, v in tj["model"]["vocab"].items()}
    (bad / "final" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(MixerError, match="tokenizer"):
        build_mixer("doremi", {"reference": str(bad)}, ctx)


def test_doremi_search_bad_settings(corpus, tmp_path):
    with pytest.raises(MixerError, match="eta"):
        search_doremi(cfg(), corpus, tmp_path / "x", eta=0.0)
    with pytest.raises(MixerError, match="rounds"):
        search_doremi(cfg(), corpus, tmp_path / "x", rounds=0)
    with pytest.raises(MixerError, match="do not match"):
        search_doremi(cfg(), corpus, tmp_path / "x", reference_weights={"alpha": 1.0})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["doremi", "doge", "odm"])
def test_resumed_run_gives_the_same_weights_as_an_uninterrupted_one(method, corpus, tmp_path):
    params = {"type": method}
    if method == "doremi":
        train(cfg(), corpus, "ref", {"type": "natural"}, tmp_path / "ref")
        params["reference"] = str(tmp_path / "ref")
    full = tmp_path / "full"
    train(cfg(steps=4, ckpt_every=2), corpus, method, params, full)
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints", part / "checkpoints")
    (part / "checkpoints" / "step_0000004.pt").unlink()  # as if killed after the step-2 checkpoint
    train(cfg(steps=4, ckpt_every=2), corpus, method, params, part, resume=True)
    a = json.loads((full / "weights.json").read_text())
    b = json.loads((part / "weights.json").read_text())
    assert a["weights"] == b["weights"] and a["schedule"] == b["schedule"]


@pytest.mark.parametrize("method", ["doremi", "doge"])
def test_gradient_accumulation_runs_with_next_step_updates(method, corpus, tmp_path):
    params = {"type": method}
    if method == "doremi":
        train(cfg(), corpus, "ref", {"type": "natural"}, tmp_path / "ref")
        params["reference"] = str(tmp_path / "ref")
    train(cfg(grad_accum=2), corpus, method, params, tmp_path / "run")
    doc = check_run(corpus, tmp_path / "run", method)
    assert doc["meta"]["updates"] == 3  # one update per optimizer step, not per micro-batch
    assert doc["meta"]["timing"] == "next_step"
