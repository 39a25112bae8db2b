"""Bad input to the tokenize stage: a clear error naming the file or domain, and no output written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _prepared_fixture import prose_texts, small_corpus, stdlib_texts, write_prepared
from dograph_core.config import TokenizeConfig
from dograph_core.data.tokenize import TokenizeError, TokenizeWarning, tokenize


def _run(prepared: Path, out: Path, **kw):
    return tokenize(prepared, TokenizeConfig(out_dir=str(out), vocab_size=kw.pop("vocab_size", 400), **kw), progress=False)


def _fails(prepared: Path, tmp_path: Path, match: str, **kw) -> TokenizeError:
    out = tmp_path / "out"
    with pytest.raises(TokenizeError, match=match) as info:
        _run(prepared, out, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporaries either
    return info.value


def _two_domains(root: Path, a_train: list[str], **extra) -> Path:
    docs = prose_texts(12)
    domains = {"a": {"train": a_train, "val": docs[:2], "test": docs[2:4]},
               "b": {"train": stdlib_texts(4), "val": docs[4:6], "test": docs[6:8]}}
    domains.update(extra)
    return write_prepared(root, domains)


def test_missing_prepared_dir(tmp_path):
    err = _fails(tmp_path / "nowhere", tmp_path, "does not exist")
    assert "manifest.json" in str(err) and "prepare" in str(err)


def test_empty_prepared_dir(tmp_path):
    (tmp_path / "prepared").mkdir()
    _fails(tmp_path / "prepared", tmp_path, r"has no manifest.json.*run the prepare stage")


@pytest.mark.parametrize(
    "manifest, match",
    [
        ("{not json", "not valid JSON"),
        ({"heldout_domains": []}, "train_domains must be a list"),
        ({"train_domains": []}, "train_domains is empty"),
        ({"train_domains": ["a", "a"]}, r"\['a'\] appear more than once"),
        ({"train_domains": ["a"], "heldout_domains": ["a"]}, "more than once"),
        ({"train_domains": ["../x"]}, "not usable as file names"),
    ],
)
def test_bad_manifest(tmp_path, manifest, match):
    root = tmp_path / "p"
    root.mkdir()
    (root / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    _fails(root, tmp_path, match)


def test_missing_training_file(tmp_path):
    prepared = small_corpus(tmp_path / "p")
    (prepared / "train" / "prose.jsonl").unlink()
    _fails(prepared, tmp_path, r"missing: \[.*train/prose.jsonl")


def test_empty_training_domain(tmp_path):
    prepared = _two_domains(tmp_path / "p", [])
    err = _fails(prepared, tmp_path, r"training domain 'a': .*train/a.jsonl is empty")
    assert "tokenize.min_tokens" in str(err)


def test_domain_smaller_than_one_training_sequence(tmp_path):
    prepared = _two_domains(tmp_path / "p", ["just a few words here"])
    _fails(prepared, tmp_path, r"training domain 'a': .*a.jsonl holds \d+ tokens, fewer than tokenize.min_tokens = 256")
    meta = _run(prepared, tmp_path / "ok", min_tokens=3)  # the user may lower the threshold
    assert meta["train_domains"] == ["a", "b"]


def test_thin_or_empty_validation_split_warns_but_writes(tmp_path):
    docs = prose_texts(12)
    prepared = _two_domains(tmp_path / "p", docs[:8], c={"train": stdlib_texts(3), "val": [], "test": docs[8:]})
    with pytest.warns(TokenizeWarning, match=r"domain 'c': 0 val tokens .*val/c.jsonl"):
        meta = _run(prepared, tmp_path / "out")
    row = next(r for r in meta["table"] if r["domain"] == "c")
    assert row["docs"]["val"] == 0 and row["tokens"]["val"] == 0


def test_missing_heldout_split_file_warns(tmp_path):
    prepared = small_corpus(tmp_path / "p")
    (prepared / "train" / "letters.jsonl").unlink()
    with pytest.warns(TokenizeWarning, match=r"train/letters.jsonl is missing"):
        meta = _run(prepared, tmp_path / "out")
    assert meta["heldout_domains"] == ["letters"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{broken json\n", r"b.jsonl:3: not a JSON object"),
        (json.dumps({"id": "x", "domain": "b"}) + "\n", r"b.jsonl:3: no string field 'text'"),
        (json.dumps({"id": "x", "domain": "b", "text": 42}) + "\n", r"b.jsonl:3: no string field 'text'"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, match):
    prepared = _two_domains(tmp_path / "p", prose_texts(8))
    path = prepared / "val" / "b.jsonl"
    path.write_text(path.read_text() + line)
    _fails(prepared, tmp_path, match)


def test_non_utf8_file(tmp_path):
    prepared = _two_domains(tmp_path / "p", prose_texts(8))
    path = prepared / "test" / "b.jsonl"
    path.write_bytes(path.read_bytes() + b'{"text": "caf\xe9"}\n')
    _fails(prepared, tmp_path, r"test/b.jsonl:3: not UTF-8")


def test_user_tokenizer_dir_that_does_not_exist(tmp_path):
    prepared = small_corpus(tmp_path / "p")
    err = _fails(prepared, tmp_path, "no such tokenizer directory", tokenizer=str(tmp_path / "my-tok"))
    assert "my-tok" in str(err) and "nothing is fetched from a hub" in str(err)


def test_vocab_size_too_small(tmp_path):
    from dograph_core.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"tokenize.vocab_size = 64: .*greater than or equal to 260"):
        validate({"tokenize": {"vocab_size": 64}})
    # a config built without validation still fails inside the stage, and writes nothing
    from dograph_core.data.tokenizer import TokenizerError

    prepared = small_corpus(tmp_path / "p")
    cfg = TokenizeConfig.model_construct(**{**TokenizeConfig().model_dump(), "out_dir": str(tmp_path / "out"), "vocab_size": 64})
    with pytest.raises(TokenizerError, match="vocab_size = 64 is too small"):
        tokenize(prepared, cfg, progress=False)
    assert not (tmp_path / "out").exists()
