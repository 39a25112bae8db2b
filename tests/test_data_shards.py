"""Token shards: round trip through memory maps, header checks, atomic writes (also under SIGKILL)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dograph_core.data.corpus import CorpusError, TokenCorpus
from dograph_core.data.shards import (
    HEADER_SIZE,
    ShardError,
    ShardWriter,
    dtype_for_vocab,
    read_header,
    read_shard,
    split_docs,
    write_shard,
)

REPO = Path(__file__).resolve().parent.parent
HASH = "0123456789abcdef" * 4
DOCS = [[5, 6, 7], [], [8], list(range(10, 110))]


def test_round_trip_is_a_read_only_memmap(tmp_path):
    path = tmp_path / "train" / "code.bin"
    header = write_shard(path, DOCS, eot_id=1, tokenizer_hash=HASH)
    assert (header.n_tokens, header.n_docs, header.tokenizer_hash) == (108, 4, HASH[:32])
    tokens = read_shard(path, expect_tokenizer_hash=HASH)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert not tokens.flags.writeable
    assert [d.tolist() for d in split_docs(tokens, 1)] == DOCS
    assert path.stat().st_size == HEADER_SIZE + 2 * 108
    assert read_header(path) == header


def test_streaming_writer_matches_write_shard(tmp_path):
    with ShardWriter(tmp_path / "a.bin", 0, HASH, np.uint32) as w:
        w.add_many([np.array([70000, 3]), [4]])
        w.add([])
    tokens = read_shard(tmp_path / "a.bin")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [70000, 3, 0, 4, 0, 0]
    assert (w.n_docs, w.n_tokens) == (3, 6)


def test_dtype_for_vocab():
    assert dtype_for_vocab(4096) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def test_token_out_of_range_fails_and_writes_nothing(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(ValueError, match="70000 out of range for uint16"):
        write_shard(path, [[1, 2], [70000]], eot_id=0, tokenizer_hash=HASH)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left either
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(path, [[1]], eot_id=70000, tokenizer_hash=HASH)


def test_empty_shard_reads_as_zero_tokens(tmp_path):
    write_shard(tmp_path / "e.bin", [], eot_id=0, tokenizer_hash=HASH)
    assert read_header(tmp_path / "e.bin").n_docs == 0
    assert read_shard(tmp_path / "e.bin").shape == (0,)


def _shard(tmp_path: Path) -> Path:
    path = tmp_path / "s.bin"
    write_shard(path, DOCS, eot_id=1, tokenizer_hash=HASH)
    return path


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="shard not found.*tokenize"):
        read_shard(tmp_path / "nope.bin")


def test_truncated_file_is_refused(tmp_path):
    path = _shard(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardError, match="truncated or corrupt"):
        read_shard(path)
    path.write_bytes(data[:20])
    with pytest.raises(ShardError, match="truncated header"):
        read_shard(path)


def test_wrong_magic_is_refused(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(b"NOTSHARD" + path.read_bytes()[8:])
    with pytest.raises(ShardError, match="not a dograph shard"):
        read_header(path)


def test_wrong_version_and_dtype_code_are_refused(tmp_path):
    path = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="version 99"):
        read_header(path)
    data[8:12] = (1).to_bytes(4, "little")
    data[12:16] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="unknown dtype code 7"):
        read_header(path)


def test_tokenizer_hash_mismatch_is_refused(tmp_path):
    path = _shard(tmp_path)
    with pytest.raises(ShardError, match="do not belong together"):
        read_shard(path, expect_tokenizer_hash="f" * 64)


def test_bad_tokenizer_hash_is_refused(tmp_path):
    with pytest.raises(ValueError, match="printable ASCII"):
        write_shard(tmp_path / "h.bin", [[1]], eot_id=0, tokenizer_hash="has space")


def test_exception_mid_write_keeps_the_old_shard(tmp_path):
    path = _shard(tmp_path)
    before = path.read_bytes()

    def docs():
        yield [1, 2, 3]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_shard(path, docs(), eot_id=0, tokenizer_hash=HASH)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_write_leaves_no_partial_shard(tmp_path, existing):
    path = tmp_path / "k.bin"
    if existing:
        write_shard(path, [[9, 9]], eot_id=0, tokenizer_hash=HASH)
    before = path.read_bytes() if existing else None
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from dograph_core.data.shards import write_shard
        def docs():
            for i in range(1000):
                yield list(range(500))
                if i == 50:  # half the shard is on disk: die without any cleanup
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        write_shard({str(path)!r}, docs(), eot_id=0, tokenizer_hash={HASH!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    partial = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    assert partial and partial[0].stat().st_size > HEADER_SIZE  # the kill did hit mid-write
    if existing:
        assert path.read_bytes() == before
        assert read_shard(path).tolist() == [9, 9, 0]
    else:
        assert not path.exists()


def _corpus(root: Path) -> Path:
    for split in ("train", "val", "test"):
        write_shard(root / split / "a.bin", [[2, 3, 4]] * 3, eot_id=0, tokenizer_hash=HASH)
        write_shard(root / split / "b.bin", [[5]], eot_id=0, tokenizer_hash=HASH)
    meta = {"tokenizer_hash": HASH, "vocab_size": 10, "eot_id": 0, "dtype": "uint16",
            "train_domains": ["a", "b"], "heldout_domains": [], "table": []}
    (root / "corpus.json").write_text(json.dumps(meta))
    return root


def test_token_corpus_reads_shards_and_natural_weights(tmp_path):
    corpus = TokenCorpus(_corpus(tmp_path))
    assert corpus.n_tokens("train", "a") == 12 and corpus.n_tokens("val", "b") == 2
    np.testing.assert_allclose(corpus.natural_weights, [12 / 14, 2 / 14])
    with pytest.raises(CorpusError, match="unknown split"):
        corpus.tokens("dev", "a")
    with pytest.raises(CorpusError, match="unknown domain 'c'"):
        corpus.tokens("train", "c")


def test_token_corpus_refuses_missing_dir_and_foreign_shards(tmp_path):
    with pytest.raises(CorpusError, match="missing corpus.json.*tokenize"):
        TokenCorpus(tmp_path / "none")
    root = _corpus(tmp_path)
    write_shard(root / "train" / "a.bin", [[1]], eot_id=0, tokenizer_hash="ffff")
    with pytest.raises(ShardError, match="do not belong together"):
        TokenCorpus(root).tokens("train", "a")
