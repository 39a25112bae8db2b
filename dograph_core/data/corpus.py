"""Read access to a tokenized corpus: the token shards per domain and split.

On-disk layout written by the ``tokenize`` stage (``data/tokenized/`` by default)::

    corpus.json              the corpus table and metadata (schema below)
    tokenizer/               the tokenizer in Hugging Face format
    <split>/<domain>.bin     one shard per domain and split (see shards.py)
    <split>/<domain>.labels.json   {"columns": {field: [value per document]}}, only when the prepared
                             records carried labels (corpus.json's "label_columns" lists the fields)

``corpus.json``::

    {"tokenizer_hash": str,                # sha256 of tokenizer/tokenizer.json (canonical JSON)
     "tokenizer_source": str,              # tokenize.tokenizer: "train", "gpt2" or a directory
     "vocab_size": int, "eot_id": int, "dtype": "uint16",
     "train_domains": [str, ...],          # domains the mixture is over, sorted
     "heldout_domains": [str, ...],        # present, never trained on
     "table": [{"domain": str, "heldout": bool,
                "docs": {"train": int, "val": int, "test": int},
                "tokens": {"train": int, "val": int, "test": int},
                "share": float}]}          # share of all training tokens
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from dograph_core.data.shards import ShardError, read_shard
from dograph_core.io import read_json

SPLITS = ("train", "val", "test")


class CorpusError(ValueError):
    """A tokenized corpus that is missing or inconsistent."""


class _Meta(BaseModel):
    """The keys of corpus.json that reading the corpus relies on."""

    model_config = ConfigDict(extra="allow")
    tokenizer_hash: str
    vocab_size: StrictInt = Field(gt=1)
    eot_id: StrictInt = Field(ge=0)
    train_domains: list[str] = Field(min_length=1)
    heldout_domains: list[str] = Field(default_factory=list)


class TokenCorpus:
    """The token shards of one tokenized corpus, memory-mapped on demand.

    Opening a corpus checks ``corpus.json`` and every shard of every split (header, size,
    tokenizer hash, token ids below the vocabulary size), so a bad corpus fails before any work.
    """

    def __init__(self, root: str | Path):
        from dograph_core.config import describe_errors

        self.root = Path(root)
        meta_path = self.root / "corpus.json"
        if not meta_path.exists():
            raise CorpusError(
                f"no tokenized corpus at {self.root} (missing corpus.json); "
                "run the prepare and tokenize stages first (`dvc repro tokenize`)"
            )
        redo = "re-run the tokenize stage (`dograph tokenize --force`)"
        try:
            self.meta = read_json(meta_path)
            _Meta.model_validate(self.meta)
        except ValidationError as err:
            raise CorpusError(f"{meta_path}: " + "; ".join(describe_errors(err)) + f"; {redo}") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CorpusError(f"{meta_path}: not JSON ({e}); {redo}") from None
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        for split in SPLITS:
            for domain in self.all_domains:
                self.tokens(split, domain)

    @property
    def train_domains(self) -> list[str]:
        return list(self.meta["train_domains"])

    @property
    def heldout_domains(self) -> list[str]:
        return list(self.meta.get("heldout_domains", []))

    @property
    def all_domains(self) -> list[str]:
        return self.train_domains + self.heldout_domains

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.meta["tokenizer_hash"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def tokens(self, split: str, domain: str) -> np.ndarray:
        """The memory-mapped tokens of one domain and split."""
        if split not in SPLITS:
            raise CorpusError(f"unknown split {split!r}; expected one of {SPLITS}")
        if domain not in self.all_domains:
            raise CorpusError(f"unknown domain {domain!r}; the corpus has {self.all_domains}")
        key = (split, domain)
        if key not in self._maps:
            path = self.root / split / f"{domain}.bin"
            tokens = read_shard(path, self.tokenizer_hash)
            top = int(tokens.max()) if tokens.size else 0
            if top >= self.vocab_size:
                raise ShardError(
                    f"{path}: token id {top} is outside the vocabulary of {self.vocab_size} tokens (corpus.json); "
                    "the shard and corpus.json do not belong together; re-run the tokenize stage"
                )
            self._maps[key] = tokens
        return self._maps[key]

    @property
    def label_columns(self) -> list[str]:
        """The label fields carried with every document (``prepare.<source>.label_fields``)."""
        return list(self.meta.get("label_columns", []))

    def labels(self, split: str, domain: str, column: str) -> list[str]:
        """The value of label field ``column`` for each document of one shard, in order."""
        if column not in self.label_columns:
            carried = f"it carries {self.label_columns}" if self.label_columns else "it carries none"
            raise CorpusError(f"{self.root}: no label field {column!r} ({carried}); name it in "
                              f"prepare.local.label_fields (or prepare.hf.label_fields) and re-run prepare and tokenize")
        self.tokens(split, domain)  # the split and domain are checked
        path = self.root / split / f"{domain}.labels.json"
        try:
            values = read_json(path)["columns"][column]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorpusError(f"{path}: cannot read the labels ({type(e).__name__}: {e}); re-run the tokenize stage") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise CorpusError(f"{path}: {column!r} is not a list of strings; re-run the tokenize stage")
        return values

    def n_tokens(self, split: str, domain: str) -> int:
        return int(self.tokens(split, domain).shape[0])

    @cached_property
    def natural_weights(self) -> np.ndarray:
        """Weights proportional to the training tokens available per training domain."""
        sizes = np.array([self.n_tokens("train", d) for d in self.train_domains], dtype=np.float64)
        if sizes.sum() <= 0:
            raise CorpusError(f"{self.root}: the training split holds no tokens")
        return sizes / sizes.sum()


def write_corpus_json(root: str | Path, table: list[dict], *, vocab_size: int, eot_id: int,
                      tokenizer_hash: str, dtype: str = "uint16") -> Path:
    """Write ``root/corpus.json`` for shards already written (tests, benchmarks, synthetic corpora).

    ``table`` rows need ``domain``, ``heldout``, ``docs`` and ``tokens``; each row's ``share`` of the
    training tokens is filled in here (0 for held-out domains).
    """
    from dograph_core.io import write_json

    total = sum(r["tokens"]["train"] for r in table if not r["heldout"])
    for r in table:
        r["share"] = 0.0 if r["heldout"] else r["tokens"]["train"] / total
    meta = {"tokenizer_hash": tokenizer_hash, "vocab_size": int(vocab_size), "eot_id": int(eot_id), "dtype": dtype,
            "train_domains": sorted(r["domain"] for r in table if not r["heldout"]),
            "heldout_domains": sorted(r["domain"] for r in table if r["heldout"]), "table": table}
    path = Path(root) / "corpus.json"
    write_json(path, meta)
    return path
