"""The prepare stage on local data: output contract, proportions, split, determinism, formats."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dograph_core.data import plan
from dograph_core.data.prepare import manifest_table, prepare, read_manifest
from dograph_core.data.text import chunk
from tests._prepare_fixture import all_rows, cfg_for, gen_text, jsonl_file, read_split, txt_tree

pytestmark = pytest.mark.filterwarnings("ignore::dograph_core.data.text.DataWarning")

SIZES = {"alpha": 60_000, "beta": 30_000, "gamma": 15_000}


def _local(tmp_path: Path, **kw):
    txt_tree(tmp_path / "src", SIZES)
    return cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "src")}, **kw)


def test_output_contract_txt_dirs(tmp_path):
    cfg = _local(tmp_path, total_mb=1.0)
    m = prepare(cfg, progress=False)
    out = Path(cfg.out_dir)
    assert m == read_manifest(out)
    assert m["source"] == "local" and m["train_domains"] == ["alpha", "beta", "gamma"]
    assert m["heldout_domains"] == []
    rows = all_rows(out, m)
    ids = [r["id"] for s in rows for r in rows[s]]
    assert len(ids) == len(set(ids)), "ids are unique across splits"
    texts = [r["text"] for s in rows for r in rows[s]]
    assert len(texts) == len(set(texts)), "no exact duplicate survives"
    for d, info in m["domains"].items():
        for s in ("train", "val", "test"):
            part = read_split(out, s, d)
            assert info["docs"][s] == len(part)
            assert info["chars"][s] == sum(len(r["text"]) for r in part)
            assert all(r["domain"] == d and r["id"].startswith(f"{d}/") and r["text"].strip() for r in part)
            assert all(plan.split_of(r["id"], cfg.split.val, cfg.split.test) == s or len(part) <= 1 for r in part)
        assert info["docs"]["val"] >= 1 and info["docs"]["test"] >= 1
    # total_mb above what exists keeps everything: the kept text is the source text, cut at line ends
    kept = sum(v["chars"][s] for v in m["domains"].values() for s in ("train", "val", "test"))
    src = sum(len(p.read_text()) for p in (tmp_path / "src").rglob("*.txt"))
    assert kept == src
    assert "alpha" in manifest_table(m) and m["config"]["total_mb"] == 1.0


def test_natural_proportions_scaled_to_total(tmp_path):
    cfg = _local(tmp_path, total_mb=0.05, min_ratio=1.0)
    m = prepare(cfg, progress=False)
    tot = {d: sum(v["chars"].values()) for d, v in m["domains"].items()}
    assert abs(sum(tot.values()) - 50_000) <= 3 * cfg.doc_chars * 1.2
    # 4 : 2 : 1 natural sizes stay 4 : 2 : 1 within a document's worth
    assert tot["alpha"] / tot["gamma"] == pytest.approx(4.0, rel=0.25)
    assert tot["beta"] / tot["gamma"] == pytest.approx(2.0, rel=0.25)
    assert all(v["natural_chars"] > sum(v["chars"].values()) for v in m["domains"].values())


def test_min_ratio_cuts_the_smallest_domain(tmp_path):
    cfg = _local(tmp_path, total_mb=0.06, min_ratio=10.0)
    m = prepare(cfg, progress=False)
    tot = {d: sum(v["chars"].values()) for d, v in m["domains"].items()}
    assert max(tot.values()) >= 10.0 * min(tot.values())
    assert min(tot, key=tot.get) == "gamma"
    assert tot["alpha"] / tot["beta"] == pytest.approx(2.0, rel=0.25), "the other domains keep their proportions"


def test_plan_sizes_arithmetic():
    t = plan.plan_sizes({"a": 400, "b": 200, "c": 100}, 70, 1.0)
    assert t == pytest.approx({"a": 40, "b": 20, "c": 10})
    t = plan.plan_sizes({"a": 400, "b": 200, "c": 100}, 1e9, 20.0)
    assert t == pytest.approx({"a": 400, "b": 200, "c": 20}), "never above natural; smallest cut to max/20"
    assert plan.plan_sizes({"a": 5}, 1, 20.0) == pytest.approx({"a": 1})


def test_deterministic_and_split_independent_of_total_and_seed(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    runs = []
    for i, (total, seed) in enumerate([(0.05, 0), (0.05, 0), (0.09, 0), (0.05, 7)]):
        cfg = cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "src")}, total_mb=total, seed=seed,
                      out_dir=str(tmp_path / f"out{i}"))
        prepare(cfg, progress=False)
        files = sorted(Path(cfg.out_dir).rglob("*.jsonl"))
        runs.append({p.relative_to(cfg.out_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert runs[0] == runs[1], "same config, same bytes"
    where = []
    for i in range(4):
        m = read_manifest(tmp_path / f"out{i}")
        rows = all_rows(tmp_path / f"out{i}", m)
        where.append({r["id"]: s for s in rows for r in rows[s]})
        # the split is a function of the id alone, except the one document moved into an otherwise
        # empty val or test split of a small domain
        for s in rows:
            for r in rows[s]:
                if plan.split_of(r["id"], 0.05, 0.05) != s:
                    assert s != "train" and m["domains"][r["domain"]]["docs"][s] == 1
    for other in where[2:]:
        common = set(where[0]) & set(other)
        moved = [k for k in common if where[0][k] != other[k]]
        assert common and len(moved) <= 2 * len(SIZES), "a document's split does not change with total or seed"
    assert set(where[0]) <= set(where[2]), "a larger total keeps a superset"
    assert set(where[0]) != set(where[3]), "the seed changes which documents are kept"


def test_chunk_cuts_at_line_boundaries():
    text = gen_text(3, 20_000)
    pieces = chunk(text, 1000)
    assert "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces)
    assert all(900 <= len(p) < 1200 for p in pieces[:-1])
    long_line = "x" * 2500 + "\n" + "short\n"
    assert chunk(long_line, 1000)[0] == "x" * 1000
    assert chunk("  \n\n \t\n", 10) == []


def test_long_texts_become_several_documents_with_stable_ids(tmp_path):
    src = tmp_path / "src"
    (src / "books").mkdir(parents=True)
    (src / "books" / "one.txt").write_text(gen_text(1, 30_000))
    (src / "notes").mkdir()
    (src / "notes" / "n.txt").write_text(gen_text(2, 3_000))
    cfg = cfg_for(tmp_path, source="local", local={"path": str(src)}, total_mb=1.0, split={"val": 0.0, "test": 0.0})
    prepare(cfg, progress=False)
    rows = read_split(Path(cfg.out_dir), "train", "books")
    assert len(rows) >= 25
    assert sorted(r["id"] for r in rows) == sorted(f"books/one.txt#{i}" for i in range(len(rows)))


def test_exact_duplicates_removed_across_files_and_domains(tmp_path):
    src = tmp_path / "src"
    same = gen_text(9, 2_500)
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        (src / d / "same.txt").write_text(same)
        (src / d / "own.txt").write_text(gen_text(ord(d), 4_000))
    (src / "a" / "copy.txt").write_text(same)
    cfg = cfg_for(tmp_path, source="local", local={"path": str(src)}, total_mb=1.0, doc_chars=5000)
    m = prepare(cfg, progress=False)
    rows = all_rows(Path(cfg.out_dir), m)
    texts = [r["text"] for s in rows for r in rows[s]]
    assert texts.count(same) == 1
    assert len(texts) == 3


def test_jsonl_custom_fields_nested_domain_and_heldout(tmp_path):
    path = jsonl_file(tmp_path / "data" / "all.jsonl", {"web": 30_000, "code": 15_000, "mail": 9_000},
                      text_field="content", nested_domain=True)
    cfg = cfg_for(tmp_path, source="local", total_mb=1.0, heldout=["mail"], heldout_mb=0.005,
                  local={"path": str(path.parent), "text_field": "content", "domain_field": "meta.source"})
    m = prepare(cfg, progress=False)
    assert m["train_domains"] == ["code", "web"] and m["heldout_domains"] == ["mail"]
    assert m["domains"]["mail"]["heldout"] is True
    assert sum(m["domains"]["mail"]["chars"].values()) <= 5_000 + 1600
    ids = [r["id"] for r in read_split(Path(cfg.out_dir), "train", "web")]
    assert all(i.startswith("web/all.jsonl:") and "#" in i for i in ids)


def test_parquet_file_with_struct_domain(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = json.loads(json.dumps([
        {"body": gen_text(k, 1500), "meta": {"set": d}} for d, n in (("x", 20), ("y", 6)) for k in range(n)
    ]))
    for k, r in enumerate(rows):
        r["body"] = f"{k} {r['body']}"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = cfg_for(tmp_path, source="local", total_mb=1.0, doc_chars=5000,
                  local={"path": str(tmp_path / "d.parquet"), "text_field": "body", "domain_field": "meta.set"})
    m = prepare(cfg, progress=False)
    assert m["train_domains"] == ["x", "y"]
    assert sum(m["domains"]["x"]["docs"].values()) == 20


def test_huggingface_datasets_path_on_local_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    path = jsonl_file(tmp_path / "hf" / "part.jsonl", {"RedPajamaC4": 30_000, "RedPajamaArXiv": 12_000},
                      nested_domain=True)
    for streaming in (True, False):
        cfg = cfg_for(tmp_path, source="hf", total_mb=1.0, out_dir=str(tmp_path / f"p{streaming}"), doc_chars=5000,
                      hf={"name": "json", "data_files": [str(path)], "domain_field": "meta.source",
                          "streaming": streaming})
        m = prepare(cfg, progress=False)
        assert m["train_domains"] == ["RedPajamaArXiv", "RedPajamaC4"]
        assert sum(m["domains"]["RedPajamaC4"]["docs"].values()) == 20
    cfg = cfg_for(tmp_path, source="hf", total_mb=1.0, out_dir=str(tmp_path / "capped"), doc_chars=5000,
                  hf={"name": "json", "data_files": [str(path)], "domain_field": "meta.source", "max_docs": 10})
    m = prepare(cfg, progress=False)
    assert sum(sum(v["docs"].values()) for v in m["domains"].values()) == 10
