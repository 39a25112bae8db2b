"""Partitions: what a domain is. Each kind, the view training reads, and every bad input a user can give.

The engine fixture has three training sources with disjoint vocabularies, so a text clustering with
k = 3 must find them exactly (ARI 1): that pins down the representation, the clustering and the view
(a node's tokens are then exactly one source's tokens).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from _engine_fixture import make_corpus, tiny_train_cfg
from dograph_core.config import ConfigError, load_params
from dograph_core.data.corpus import TokenCorpus
from dograph_core.partition import (
    NodeCorpus, Partition, PartitionConfig, PartitionError, build_partition, doc_bounds, ensure_partition,
    open_partition, partition_dir,
)
from dograph_core.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return TokenCorpus(make_corpus(tmp_path_factory.mktemp("corpus")))


def _cfg(tmp_path, **kw) -> PartitionConfig:
    return PartitionConfig(**{"out_dir": str(tmp_path / "parts"), **kw})


def test_doc_bounds_split_at_the_end_token_and_keep_a_last_document_without_one():
    t = np.array([5, 6, 0, 7, 0, 8, 9])
    np.testing.assert_array_equal(doc_bounds(t, 0), [0, 3, 5, 7])
    np.testing.assert_array_equal(doc_bounds(np.array([5, 0]), 0), [0, 2])
    np.testing.assert_array_equal(doc_bounds(np.zeros(0, dtype=np.uint16), 0), [0])  # an empty split: no document


def test_text_clusters_find_sources_with_disjoint_words_and_a_node_is_that_source(corpus, tmp_path):
    part = build_partition("text", _cfg(tmp_path, kind="text", k=3), corpus)
    q = part.quality
    assert q["ari"] == pytest.approx(1.0) and q["nmi"] == pytest.approx(1.0)
    assert q["documents"] == sum(corpus.meta["table"][i]["docs"]["train"] for i in range(3))
    view = NodeCorpus(corpus, part, seq_len=32)
    for n in part.nodes:  # every node is exactly one source, its documents in corpus order
        (src,) = {d for d in corpus.train_domains if (part.assign["train", d] == part.nodes.index(n)).any()}
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(view.tokens(split, n), corpus.tokens(split, src))
    assert view.heldout_domains == corpus.heldout_domains
    np.testing.assert_array_equal(view.tokens("val", "code"), corpus.tokens("val", "code"))
    assert sorted(view.natural_weights) == pytest.approx(sorted(corpus.natural_weights))


def test_quality_reports_balance_and_disagreement_for_a_partition_that_cuts_across_sources(corpus, tmp_path):
    """A file partition by document parity cuts every source in two: about balanced, no agreement."""
    labels = _labels(corpus, tmp_path / "labels.csv")
    part = build_partition("parity", _cfg(tmp_path, kind="file", file={"path": str(labels)}), corpus)
    assert part.nodes == ["even", "odd"]
    q = part.quality
    assert q["balance"] > 0.8 and abs(q["ari"]) < 0.05 and q["nmi"] < 0.05
    view = NodeCorpus(corpus, part)
    a = corpus.tokens("train", "alpha")
    b = doc_bounds(a, corpus.eot_id)
    assert view.tokens("train", "even")[: b[1]].tolist() == a[: b[1]].tolist()  # alpha's document 0 comes first
    assert view.n_tokens("train", "even") + view.n_tokens("train", "odd") == sum(
        corpus.n_tokens("train", d) for d in corpus.train_domains)


def test_save_and_load_keep_every_assignment_and_a_corrupt_file_is_a_clear_error(corpus, tmp_path):
    cfg = _cfg(tmp_path, kind="text", k=2)
    path = ensure_partition("t2", cfg, corpus)
    assert path == partition_dir("t2", cfg, corpus) and path.name.startswith("t2-")
    back = Partition.load(path)
    again = build_partition("t2", cfg, corpus)
    assert back.key == again.key and back.nodes == again.nodes
    for k, a in again.assign.items():
        np.testing.assert_array_equal(back.assign[k], a)
    assert back.centroids.shape[0] == 2
    assert ensure_partition("t2", cfg, corpus) == path  # stored: not computed again
    (path / "partition.json").write_text("{not json")
    with pytest.raises(PartitionError, match="cannot read the partition"):
        Partition.load(path)


def test_human_partition_is_the_corpus_itself(corpus, tmp_path):
    path = ensure_partition("h", _cfg(tmp_path, kind="human"), corpus)
    assert open_partition({"dir": str(path)}, corpus) is corpus


@pytest.mark.parametrize("kw, match", [
    ({"kind": "text", "k": 10_000}, r"partitions\.bad\.k = 10000 is larger than the \d+ training documents"),
    ({"kind": "text", "k": 2, "text": {"min_df": 10_000}}, r"partitions\.bad\.text: no text representation.*min_df"),
    ({"kind": "file"}, r"partitions\.bad\.file\.path: a file partition needs a labels file"),
    ({"kind": "file", "file": {"path": "/nonexistent/labels.csv"}}, r"no such file"),
])
def test_bad_partition_settings_fail_with_the_setting_and_write_nothing(corpus, tmp_path, kw, match):
    cfg = _cfg(tmp_path, **kw)
    with pytest.raises(PartitionError, match=match):
        ensure_partition("bad", cfg, corpus)
    assert not partition_dir("bad", cfg, corpus).exists()
    assert not list(tmp_path.glob("parts/bad-*")) and not list(tmp_path.glob("parts/.bad-*"))  # no half-written copy


def test_a_file_that_does_not_cover_every_training_document_is_refused(corpus, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps({"split": "train", "domain": d, "doc": 0, "node": "x"})
                                for d in corpus.train_domains) + "\n")
    cfg = _cfg(tmp_path, kind="file", file={"path": str(labels)})
    with pytest.raises(PartitionError, match=r"does not cover every training document: \d+ missing, first \['train/alpha/1'"):
        ensure_partition("f", cfg, corpus)
    assert not partition_dir("f", cfg, corpus).exists()
    no_node = tmp_path / "no_node.csv"
    no_node.write_text("split,domain,doc\ntrain,alpha,0\n")
    with pytest.raises(PartitionError, match="row 1 needs split, domain, doc"):
        build_partition("f", _cfg(tmp_path, kind="file", file={"path": str(no_node)}), corpus)


def test_a_node_shorter_than_one_sequence_names_the_k_to_lower(corpus, tmp_path):
    part = build_partition("t", _cfg(tmp_path, kind="text", k=3), corpus)
    with pytest.raises(PartitionError, match=r"fewer training tokens than one sequence .*lower partitions\.t\.k"):
        NodeCorpus(corpus, part, seq_len=10**7)


def test_a_partition_of_other_data_is_refused(corpus, tmp_path):
    part = build_partition("t", _cfg(tmp_path, kind="text", k=3), corpus)
    part.assign["train", "alpha"] = part.assign["train", "alpha"][:-1]
    with pytest.raises(PartitionError, match="computed on other data"):
        NodeCorpus(corpus, part)


def test_a_method_naming_an_undefined_partition_is_a_config_error(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("partitions:\n  text: {kind: text, k: 4}\nmethods:\n  u: {type: uniform, partition: txt}\n"
                 "pipeline: {methods: [u]}\n")
    with pytest.raises(ConfigError, match=r"methods\.u\.partition = 'txt': not a partition defined under 'partitions'"):
        load_params(p)
    p.write_text("partitions:\n  text: {kind: texts}\n")
    with pytest.raises(ConfigError, match=r"partitions\.text\.kind"):
        load_params(p)


def test_training_over_nodes_mixes_nodes_and_evaluates_the_sources(corpus, tmp_path):
    cfg = _cfg(tmp_path, kind="text", k=2)
    path = ensure_partition("t2", cfg, corpus)
    spec = {"name": "t2", "key": Partition.load(path).key, "dir": str(path)}
    s = train(tiny_train_cfg(steps=3), corpus, "odm", {"type": "odm", "partition": spec}, tmp_path / "run")
    assert list(s["final_weights"]) == ["node00", "node01"]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(ev["val"]["domains"]) == corpus.train_domains and list(ev["val"]["heldout"]) == ["code"]
    with pytest.raises(PartitionError, match="expected deadbeef"):
        train(tiny_train_cfg(steps=3), corpus, "odm", {"type": "odm", "partition": {**spec, "key": "deadbeef"}},
              tmp_path / "run2")


def test_hidden_and_gradient_partitions_share_one_warm_up_and_are_reproducible(corpus, tmp_path):
    warm = {"warmup_steps": 4, "seq_len": 32, "batch_size": 8, "device": "cpu"}
    parts = {kind: build_partition(kind, _cfg(tmp_path, kind=kind, k=3, hidden=warm), corpus, work_dir=tmp_path / "w")
             for kind in ("hidden", "gradient")}
    assert len(list((tmp_path / "w").glob("warmup-*/final"))) == 1  # trained once, read twice
    again = build_partition("gradient", _cfg(tmp_path, kind="gradient", k=3, hidden=warm), corpus, work_dir=tmp_path / "w")
    for key, a in parts["gradient"].assign.items():
        np.testing.assert_array_equal(again.assign[key], a)
    for part in parts.values():
        assert part.centroids.shape[0] == 3 and set(part.quality) >= {"balance", "ari", "nmi", "token_share"}


@pytest.mark.parametrize("mtype, params", [
    ("uniform", {}), ("natural", {}), ("odm", {}), ("doge", {}), ("rnb", {"update_every": 1}),
    ("dograph", {"nodes": "human", "update_every": 1}),
])
def test_every_online_mixer_trains_over_a_partition(corpus, tmp_path, mtype, params):
    path = ensure_partition("t2", _cfg(tmp_path, kind="text", k=2), corpus)
    spec = {"name": "t2", "key": Partition.load(path).key, "dir": str(path)}
    s = train(tiny_train_cfg(steps=3), corpus, mtype, {"type": mtype, **params, "partition": spec}, tmp_path / "run")
    assert list(s["final_weights"]) == ["node00", "node01"]
    if mtype == "natural":  # natural over nodes: the nodes' token shares
        view = open_partition(spec, corpus)
        assert list(s["final_weights"].values()) == pytest.approx(list(view.natural_weights))


def test_doremi_searches_over_the_nodes(corpus, tmp_path):
    from dograph_core.mixers.doremi import search_doremi

    part = build_partition("t2", _cfg(tmp_path, kind="text", k=2), corpus)
    res = search_doremi(tiny_train_cfg(steps=2), NodeCorpus(corpus, part), tmp_path / "s", rounds=1)
    assert sorted(json.loads((tmp_path / "s" / "weights.json").read_text())["domains"]) == ["node00", "node01"], res


def test_the_report_grid_puts_each_method_in_its_partition_and_mixer_cell():
    from dograph_core.study import LIVE, cell_of, partition_markdown

    methods = {"uniform": {"type": "uniform"}, "odm_text": {"type": "odm", "partition": "text"},
               "uniform_text": {"type": "uniform", "partition": "text"},
               "dograph_model": {"type": "dograph", "nodes": "model"}}
    assert cell_of("odm_text", methods["odm_text"]) == ("text", "odm")
    assert cell_of("dograph_model", methods["dograph_model"]) == (LIVE, "dograph")
    assert cell_of("uniform_live", {"type": "dograph", "nodes": "model", "rule": "uniform"}) == (LIVE, "uniform")
    assert cell_of("rnb_live", {"type": "dograph", "nodes": "model", "rule": "rnb"}) == (LIVE, "rnb")
    assert cell_of("dograph_text", {"type": "dograph", "partition": "text"}) == ("text", "dograph")

    def row(w):
        return {k: {"mean": w + i} for i, k in enumerate(("val_worst", "val_mean", "heldout"))}

    d = {"n": 3, "mean": -0.05, "p": 0.1}
    agg = {"nano": {"rows": {"uniform": row(6.5), "uniform_text": row(6.4), "odm_text": row(6.3),
                             "dograph_model": row(6.45)},
                    "diffs": {"uniform_text": {"uniform": {"val_worst": d}}, "odm_text": {}, "dograph_model": {}}}}
    md = partition_markdown(agg, methods, {"text": {"kind": "text", "nodes": 8, "balance": 0.42, "ari": 0.61}})
    assert "| text | text | 8 | 0.42 | – | 0.61 | – |" in md
    assert "| partition | uniform | odm | dograph |" in md
    assert "| human | 6.500 |  |  |" in md
    assert "| text | 6.400 (-0.050; p 0.100) | 6.300 |  |" in md
    assert f"| {LIVE} |  |  | 6.450 |" in md
    # a second method in a taken cell gets its own column instead of being dropped
    methods["uniform_text_rule"] = {"type": "dograph", "nodes": "human", "partition": "text", "rule": "uniform"}
    agg["nano"]["rows"]["uniform_text_rule"] = row(6.2)
    md = partition_markdown(agg, methods, {})
    assert "| partition | uniform | odm | dograph | uniform (uniform_text_rule) |" in md
    assert "| text | 6.400 (-0.050; p 0.100) | 6.300 |  | 6.200 |" in md


def test_text_from_a_local_embedding_model_directory(corpus, tmp_path):
    """``text.model``: any local Hugging Face encoder directory with its tokenizer (here a tiny GPT-2
    saved with the corpus's own tokenizer); its mean-pooled states are clustered like TF-IDF's."""
    import shutil

    import torch

    from dograph_core.model import build_model

    torch.manual_seed(0)
    model_dir = tmp_path / "encoder"
    build_model("nano", corpus.vocab_size, 64, corpus.eot_id).save_pretrained(model_dir)
    for f in corpus.tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    part = build_partition("emb", _cfg(tmp_path, kind="text", k=3, text={"model": str(model_dir)}), corpus)
    assert part.centroids.shape[0] == 3 and part.quality["documents"] == 210
    with pytest.raises(PartitionError, match=r"partitions\.emb\.text\.model = .*not a local model directory"):
        build_partition("emb", _cfg(tmp_path, kind="text", k=3, text={"model": str(tmp_path / "none")}), corpus)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PartitionError, match=r"partitions\.emb\.text\.model = .*not a model directory"):
        build_partition("emb", _cfg(tmp_path, kind="text", k=3, text={"model": str(tmp_path / "empty")}), corpus)


def _labels(corpus, path, name=lambda s, d, j: "even" if j % 2 == 0 else "odd"):
    rows = ["split,domain,doc,node"]
    for s in ("train", "val", "test"):
        for d in corpus.train_domains:
            n = len(doc_bounds(corpus.tokens(s, d), corpus.eot_id)) - 1
            rows += [f"{s},{d},{j},{name(s, d, j)}" for j in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_file_node_names_are_checked_and_a_changed_labels_file_is_a_new_partition(corpus, tmp_path):
    path = _labels(corpus, tmp_path / "l.csv", lambda s, d, j: "code" if j % 2 else "prose")
    with pytest.raises(PartitionError, match=r"node names \['code'\] .*not a held-out source's name"):
        build_partition("f", _cfg(tmp_path, kind="file", file={"path": str(path)}), corpus)
    cfg = _cfg(tmp_path, kind="file", file={"path": str(_labels(corpus, tmp_path / "l.csv"))})
    first = partition_dir("f", cfg, corpus)
    _labels(corpus, tmp_path / "l.csv", lambda s, d, j: "a" if j % 3 else "b")
    assert partition_dir("f", cfg, corpus) != first  # same settings, other labels: computed again, not reused


def test_training_takes_a_computed_partition_and_the_train_module_resolves_a_name(corpus, tmp_path):
    from dograph_core.train import main

    with pytest.raises(PartitionError, match="training takes a computed partition"):
        train(tiny_train_cfg(steps=2), corpus, "uniform", {"type": "uniform", "partition": "text"}, tmp_path / "r0")
    params = tmp_path / "params.yaml"
    params.write_text(f"train: {{steps: 2, batch_size: 8, seq_len: 32, warmup_steps: 1, eval_every: 0, eval_windows: 2, "
                      f"progress: false}}\npartitions:\n  t: {{kind: text, k: 2, out_dir: {tmp_path / 'parts'}}}\n"
                      f"methods:\n  ut: {{type: uniform, partition: t}}\npipeline: {{methods: [ut]}}\n")
    assert main(["--params", str(params), "--data", str(corpus.root), "--method", "ut", "--out", str(tmp_path / "r1")]) == 0
    assert list(json.loads((tmp_path / "r1" / "summary.json").read_text())["final_weights"]) == ["node00", "node01"]
    # what a torchrun launch writes: the computed partition in the method's params, accepted as it is
    spec = {"name": "t", "key": "k", "dir": str(tmp_path / "parts")}
    text = params.read_text().replace("{type: uniform, partition: t}", "{type: uniform, partition: " + json.dumps(spec) + "}")
    params.write_text(text)
    assert load_params(params).methods["ut"].model_extra["partition"] == spec
