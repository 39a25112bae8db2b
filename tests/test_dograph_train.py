"""DoGraph inside the real training loop (nano scale, a few steps): both node modes write weights.json
that the static mixer can read back, plus the analysis plots; a resumed run matches an uninterrupted one."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from _dograph_fixture import make_corpus

from dograph_core.config import TrainConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.mixers.base import read_weights
from dograph_core.train import train

PARAMS = {"k": 3, "update_every": 3, "recluster_every": 6, "probe_size": 24, "r1": 8, "r2": 16, "min_ari": 0.0,
          "min_windows": 2, "progress_probe": 24}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("dgtrain")))


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, seq_len=32, warmup_steps=2, eval_every=0, eval_windows=2,
                ckpt_every=0, threads=1, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("nodes", ["human", "model"])
def test_dograph_trains_and_writes_a_transferable_weights_file(corpus, tmp_path, nodes):
    out = tmp_path / nodes
    s = train(cfg(), corpus, f"dograph_{nodes}", {"type": "dograph", "nodes": nodes, **PARAMS}, out)
    doc = read_weights(out / "weights.json", corpus.train_domains)  # what the static mixer reads
    assert doc["method"] == "dograph" and doc["meta"]["nodes"] == nodes
    assert abs(sum(doc["weights"]) - 1) < 1e-9 and 3 <= len(doc["schedule"]) <= 5  # changes at steps 0..12
    assert np.allclose(list(s["final_weights"].values()), doc["weights"])
    plots = {p.name for p in (out / "mixer" / "plots").iterdir()}
    assert {"pca_by_source.png", "weights.png", "graph.png", "alignment.png", "alignment.md"} <= plots
    if nodes == "model":
        assert "contingency.png" in plots and np.asarray(doc["meta"]["contingency"]).sum() == 24
        assert len(doc["meta"]["node_weights"]) == 3
    ck = torch.load(next((out / "checkpoints").iterdir()), weights_only=True)
    assert "human" in ck["mixer"] and (ck["mixer"]["model"] is not None) == (nodes == "model")


@pytest.mark.parametrize("apply", ["sample", "loss"])
def test_resumed_dograph_run_matches_uninterrupted(corpus, tmp_path, apply):
    params = {"type": "dograph", "nodes": "model", "apply": apply, **PARAMS}
    full = train(cfg(), corpus, "dg", params, tmp_path / "full")
    train(cfg(steps=12, ckpt_every=6), corpus, "dg", params, tmp_path / "cut")
    # drop the final checkpoint so the resume starts from step 6
    for p in (tmp_path / "cut" / "checkpoints").glob("step_0000012.pt"):
        p.unlink()
    resumed = train(cfg(ckpt_every=6), corpus, "dg", params, tmp_path / "cut", resume=True)
    assert resumed["resumed_from_step"] == 6
    a = json.loads((tmp_path / "full" / "weights.json").read_text())
    b = json.loads((tmp_path / "cut" / "weights.json").read_text())
    assert np.allclose(a["weights"], b["weights"], atol=1e-8)
    assert np.allclose(a["meta"]["node_weights"], b["meta"]["node_weights"], atol=1e-8)
    assert full["param_checksum"] == pytest.approx(resumed["param_checksum"], rel=1e-6)


def test_analysis_probes_are_left_out_of_train_time_and_reported_apart(corpus, tmp_path, monkeypatch):
    """Figure 1's probes are measurement, like the evaluation: the overhead column (a ratio of train
    times) must not count them. Two probes made to take 1.5 s each are in ``analysis_time_s``, not in
    ``train_time_s`` and not in the mixer's online time."""
    from dograph_core.mixers.dograph import DoGraphMixer

    real = DoGraphMixer._take_analysis_probe

    def slow(self, step):
        time.sleep(1.5)
        real(self, step)

    params = {"type": "dograph", "nodes": "human", **PARAMS, "analysis_probes": [0.0, 1.0], "plots": False}
    train(cfg(steps=6), corpus, "dograph", params, tmp_path / "warm")   # the solver's lazy import, paid here
    fast = train(cfg(steps=6), corpus, "dograph", params, tmp_path / "fast")
    monkeypatch.setattr(DoGraphMixer, "_take_analysis_probe", slow)
    s = train(cfg(steps=6), corpus, "dograph", params, tmp_path / "slow")
    assert s["analysis_time_s"] >= 3.0 > fast["analysis_time_s"] + 1.5     # two probes (steps 0 and 6), timed
    assert abs(s["train_time_s"] - fast["train_time_s"]) < 0.75            # neither 1.5 s sleep is train time
    assert s["wall_time_s"] >= s["train_time_s"] + 3.0                     # the wall time still holds them
    assert sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "slow" / "mixer" / "probes").glob("step_*.npz")) == [0, 6]
    assert json.loads((tmp_path / "slow" / "summary.json").read_text())["analysis_time_s"] == s["analysis_time_s"]
    log = [json.loads(x) for x in (tmp_path / "slow" / "mixer" / "dograph_log.jsonl").read_text().splitlines()]
    online = [r["online_s_total"] for r in log if "online_s_total" in r]
    assert online and max(online) < 1.5                                    # the step-0 probe is not online time


def test_dograph_machinery_does_not_touch_training_when_its_weights_are_uniform(corpus, tmp_path):
    """With rule: uniform over the sources DoGraph's weights are exactly uniform, while every other part runs
    (the online sketch, the node statistics and solve, the analysis probes, the update): the run must be the
    uniform run to the bit. A difference between DoGraph and uniform then comes from the weights alone."""
    train(cfg(), corpus, "uniform", {}, tmp_path / "u")
    params = {k: v for k, v in PARAMS.items() if k != "min_windows"}   # a setting of DoGraph's own rule
    train(cfg(), corpus, "dg", {"type": "dograph", "nodes": "human", "rule": "uniform", **params,
                                "analysis_probes": [0.0, 0.5, 1.0]}, tmp_path / "d")
    losses = {r: [json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)] for r in "ud"}
    assert len(losses["u"]) == 12 and losses["u"] == losses["d"]
    assert (tmp_path / "d" / "mixer" / "probes" / "step_0000000.npz").exists()   # the probes did run
