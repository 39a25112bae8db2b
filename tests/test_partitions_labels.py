"""Labels carried with the data: a label field of the user's records becomes a `file` partition's nodes.

A record's label fields (``prepare.local.label_fields``) travel with every document cut from it, through
prepare (the jsonl's ``labels``) and tokenize (``<split>/<domain>.labels.json``, in shard order), to a
``file`` partition with ``file.column``. The records here are long enough to be cut into several
documents, and their topics cut across the sources, so a label lost, shifted by one document or taken
from the source instead of the record would show.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
from pydantic import ValidationError

from _prepare_fixture import cfg_for, gen_text
from dograph_core.config import PrepareConfig, TokenizeConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.data.prepare import prepare
from dograph_core.data.text import DataWarning, PrepareError
from dograph_core.data.tokenize import TokenizeError, tokenize
from dograph_core.partition import NodeCorpus, PartitionConfig, PartitionError, build_partition, ensure_partition

TOPICS = ["Science & Tech", "Sports", "Food"]


def _records(n: int = 36) -> list[dict]:
    """Records of two sources; topic and format (an integer class id) independent of the source."""
    return [{"text": gen_text(7000 + i, 3000), "domain": ["alpha", "beta"][i % 2],
             "meta": {"topic": TOPICS[(i // 2) % 3]}, "format": i % 4 // 2} for i in range(n)]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _build(tmp_path, records, label_fields=("meta.topic", "format")) -> tuple[PrepareConfig, TokenCorpus]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = _write(tmp_path / "records.jsonl", records)
    cfg = cfg_for(tmp_path, source="local", total_mb=1.0, local={"path": src, "label_fields": list(label_fields)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "prepare.total_mb=", DataWarning)  # every record is kept: wanted here
        prepare(cfg, progress=False)
    tokenize(cfg.out_dir, TokenizeConfig(out_dir=str(tmp_path / "tok"), vocab_size=600), progress=False)
    return cfg, TokenCorpus(tmp_path / "tok")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    records = _records()
    cfg, corpus = _build(tmp, records)
    return records, cfg, corpus, tmp


def _prepared_rows(cfg, split, domain) -> list[dict]:
    path = f"{cfg.out_dir}/{split}/{domain}.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _source_line(doc_id: str) -> int:
    return int(re.fullmatch(r"[^/]+/records\.jsonl:(\d+)#\d+", doc_id).group(1))


def test_every_document_cut_from_a_record_carries_that_records_labels(built):
    records, cfg, corpus, _ = built
    pieces = 0
    for split in ("train", "val", "test"):
        for d in ("alpha", "beta"):
            for row in _prepared_rows(cfg, split, d):
                rec = records[_source_line(row["id"]) - 1]
                assert row["labels"] == {"meta.topic": rec["meta"]["topic"], "format": str(rec["format"])}
                pieces += row["id"].endswith("#2")  # the third piece of a record
    assert pieces > 10  # records were cut into several documents, and each piece kept the labels


def test_the_tokenized_corpus_keeps_one_label_per_document_in_shard_order(built):
    _, cfg, corpus, _ = built
    assert corpus.label_columns == ["format", "meta.topic"]
    for split in ("train", "val", "test"):
        for d in ("alpha", "beta"):
            rows = _prepared_rows(cfg, split, d)
            assert corpus.labels(split, d, "meta.topic") == [r["labels"]["meta.topic"] for r in rows]
            assert int((np.asarray(corpus.tokens(split, d)) == corpus.eot_id).sum()) == len(rows)


def test_a_label_column_partition_makes_each_value_a_node_holding_exactly_its_documents(built):
    _, cfg, corpus, tmp = built
    part = build_partition("topic", PartitionConfig(kind="file", file={"column": "meta.topic"},
                                                    out_dir=str(tmp / "parts")), corpus)
    assert part.nodes == ["Food", "Science_Tech", "Sports"]  # file-safe names of the values
    view = NodeCorpus(corpus, part)
    for node, topic in zip(part.nodes, ["Food", "Science & Tech", "Sports"]):
        want = 0
        for d in ("alpha", "beta"):
            lengths = np.diff(np.flatnonzero(np.r_[-1, np.asarray(corpus.tokens("train", d)) == corpus.eot_id]))
            labels = corpus.labels("train", d, "meta.topic")
            want += int(sum(n for n, v in zip(lengths, labels) if v == topic))
        assert view.tokens("train", node).shape[0] == want
    # the topics cut across the sources: about balanced, no agreement with them
    assert part.quality["ari"] < 0.1 and part.quality["balance"] > 0.5
    fmt = build_partition("fmt", PartitionConfig(kind="file", k=2, file={"column": "format"},
                                                 out_dir=str(tmp / "parts")), corpus)
    assert fmt.nodes == ["0", "1"]


def test_relabelled_data_is_a_new_partition(tmp_path):
    records = _records(24)
    _, corpus = _build(tmp_path / "a", records)
    cfg = PartitionConfig(kind="file", file={"column": "meta.topic"}, out_dir=str(tmp_path / "parts"))
    first = ensure_partition("topic", cfg, corpus)
    for r in records:
        r["meta"]["topic"] = {"Sports": "Food", "Food": "Sports"}.get(r["meta"]["topic"], r["meta"]["topic"])
    _, relabelled = _build(tmp_path / "b", records)
    assert ensure_partition("topic", cfg, relabelled) != first


def test_records_without_a_usable_label_are_skipped_by_name(tmp_path):
    records = _records(24)
    del records[3]["meta"]["topic"]
    records[5]["meta"]["topic"] = 1.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, corpus = _build(tmp_path, records)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("records.jsonl:4" in m and "no label field 'meta.topic'" in m and "prepare.local.label_fields" in m
               for m in msgs)
    assert any("records.jsonl:6" in m and "label field 'meta.topic' is 1.5, not a label" in m for m in msgs)
    kept = {_source_line(r["id"]) for s in ("train", "val", "test") for d in ("alpha", "beta")
            for r in _prepared_rows(cfg, s, d)}
    assert 4 not in kept and 6 not in kept and 5 in kept


def test_bad_label_settings_are_clear_errors_that_write_nothing(built, tmp_path):
    _, _, corpus, _ = built
    with pytest.raises(ValidationError, match="distinct, non-empty"):
        PrepareConfig.model_validate({"source": "local", "local": {"path": "x", "label_fields": ["a", "a"]}})
    (tmp_path / "txt" / "alpha").mkdir(parents=True)
    (tmp_path / "txt" / "alpha" / "a.txt").write_text(gen_text(1, 3000))
    cfg = cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "txt"), "label_fields": ["topic"]})
    with pytest.raises(PrepareError, match=r"prepare\.local\.label_fields = \['topic'\]: \.txt files have no fields"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "prepared").exists()

    parts = tmp_path / "parts"
    for file, match in [({"column": "language"}, r"partitions\.p\.file\.column = 'language': .*no label field "
                                                 r"'language' \(it carries \['format', 'meta\.topic'\]\).*label_fields"),
                        ({"column": "format", "path": "l.csv"}, r"partitions\.p\.file: give a labels file \(path\) "
                                                                r"or a label field \(column\), not both")]:
        with pytest.raises(PartitionError, match=match):
            ensure_partition("p", PartitionConfig(kind="file", file=file, out_dir=str(parts)), corpus)
    with pytest.raises(PartitionError, match=r"partitions\.p\.k = 5, but partitions\.p\.file\.column = 'meta\.topic' "
                                             r"names 3 nodes"):
        ensure_partition("p", PartitionConfig(kind="file", k=5, file={"column": "meta.topic"}, out_dir=str(parts)),
                         corpus)
    assert not parts.exists() or not any(parts.iterdir())


def test_labels_that_would_share_a_node_name_are_refused(tmp_path):
    records = _records(24)
    for i, r in enumerate(records):
        r["meta"]["topic"] = ["Science & Tech", "Science_Tech"][(i // 2) % 2]
    _, corpus = _build(tmp_path, records)
    with pytest.raises(PartitionError, match=r"the labels '.+' and '.+' would both be node 'Science_Tech'"):
        build_partition("p", PartitionConfig(kind="file", file={"column": "meta.topic"},
                                             out_dir=str(tmp_path / "parts")), corpus)


def test_prepared_records_with_different_label_fields_are_refused_and_nothing_is_written(built, tmp_path):
    _, cfg, _, _ = built
    prepared = tmp_path / "prepared"
    shutil.copytree(cfg.out_dir, prepared)
    path = prepared / "train" / "beta.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[2]["labels"]["format"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TokenizeError, match=r"beta\.jsonl:3: label fields \['meta\.topic'\], but .* has "
                                            r"\['format', 'meta\.topic'\]"):
        tokenize(prepared, TokenizeConfig(out_dir=str(tmp_path / "tok"), vocab_size=600), progress=False)
    assert not (tmp_path / "tok").exists()


def test_huggingface_records_carry_labels_too(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    records = _records(12)
    src = _write(tmp_path / "records.jsonl", records)
    cfg = cfg_for(tmp_path, source="hf", total_mb=1.0,
                  hf={"name": "json", "data_files": [src], "domain_field": "domain", "label_fields": ["meta.topic"]})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "prepare.total_mb=", DataWarning)
        prepare(cfg, progress=False)
    rows = [r for s in ("train", "val", "test") for d in ("alpha", "beta") for r in _prepared_rows(cfg, s, d)]
    assert rows and all(r["labels"]["meta.topic"] == records[int(re.search(r":(\d+)#", r["id"]).group(1))]["meta"]["topic"]
                        for r in rows)


def test_an_empty_document_and_an_evaluation_only_label_keep_every_other_label_in_place(built, tmp_path):
    """tokenize skips a prepared document with no text, and its label with it; a validation document whose
    topic no training document has is left out of that split's nodes, not an error (it may be rare)."""
    _, cfg, _, _ = built
    prepared = tmp_path / "prepared"
    shutil.copytree(cfg.out_dir, prepared)
    train = prepared / "train" / "alpha.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows.insert(1, {**rows[0], "id": "alpha/empty#0", "text": "", "labels": {"meta.topic": "Empty", "format": "0"}})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = prepared / "val" / "beta.jsonl"
    vrows = [json.loads(line) for line in val.read_text().splitlines()]
    vrows[0]["labels"]["meta.topic"] = "Rare"
    val.write_text("".join(json.dumps(r) + "\n" for r in vrows))
    tokenize(prepared, TokenizeConfig(out_dir=str(tmp_path / "tok"), vocab_size=600), progress=False)
    corpus = TokenCorpus(tmp_path / "tok")
    assert corpus.labels("train", "alpha", "meta.topic") == [r["labels"]["meta.topic"] for r in rows if r["text"]]
    part = build_partition("topic", PartitionConfig(kind="file", file={"column": "meta.topic"},
                                                    out_dir=str(tmp_path / "parts")), corpus)
    assert "Empty" not in part.nodes and "Rare" not in part.nodes
    assert part.assign["val", "beta"][0] == -1 and (part.assign["val", "beta"][1:] >= 0).all()


def test_a_labels_file_partition_keeps_the_settings_and_key_it_had_before_columns_existed():
    assert PartitionConfig(kind="file", file={"path": "l.csv"}).settings() == {
        "kind": "file", "k": None, "seed": 0, "file": {"path": "l.csv"}}
    assert PartitionConfig(kind="file", file={"column": "topic"}).settings()["file"] == {"column": "topic"}
