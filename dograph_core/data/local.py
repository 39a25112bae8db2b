"""User data: local files and Hugging Face ``datasets``, yielded as :class:`RawDoc` records.

Local formats (``prepare.local.path``):

* a directory with one sub-directory per domain holding ``.txt`` files (searched
  recursively); the sub-directory's name is the domain;
* ``.jsonl`` (or ``.jsonl.gz``) files, a file or a directory of them, one JSON object
  per line with a text field and a domain field (names configurable, dotted paths
  such as ``meta.source`` reach nested fields);
* ``.parquet`` files, a file or a directory of them, with the same two fields.

Records (jsonl, parquet, Hugging Face) may carry labels besides their domain: each field named in
``label_fields`` (a topic or format classifier's output, say) is read as a string (an integer class
id becomes its digits; a float, a boolean, a list or null is refused) and travels with every document
cut from the record, through prepare and tokenize, to a ``file`` partition that makes one of them the
nodes (``file: {column: topic}``). A record without a usable value of each is skipped, with the reason.

Hugging Face (``prepare.hf``): ``datasets.load_dataset(name, config, split=...,
streaming=...)`` with the domain read from a dotted path, e.g. SlimPajama's
``meta.redpajama_set_name``; ``max_docs`` stops early. A packaged builder on local
files (``name: json``, ``data_files: [...]``) goes through the same code.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from dograph_core.config import HFSourceConfig, LocalSourceConfig
from dograph_core.data.text import Issues, PrepareError, RawDoc, decode, dotted_get, normalise
from dograph_core.io import is_transient

_JSONL = (".jsonl", ".jsonl.gz")


class _Fields(NamedTuple):
    """What a record reader looks up, and the params section that names it."""

    text: str
    domain: str
    labels: list[str]
    section: str

    @classmethod
    def of(cls, cfg: LocalSourceConfig | HFSourceConfig, section: str) -> "_Fields":
        return cls(cfg.text_field, cfg.domain_field, list(cfg.label_fields), section)


def detect_format(path: Path) -> str:
    """``txt``, ``jsonl`` or ``parquet`` for a local path (what ``format: auto`` means)."""
    if path.is_file():
        if path.name.endswith(_JSONL):
            return "jsonl"
        if path.suffix == ".parquet":
            return "parquet"
        raise PrepareError(f"prepare.local.path={str(path)!r}: a file must end in .jsonl, .jsonl.gz or "
                           f".parquet (or give a directory of <domain>/*.txt)")
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.name.endswith(_JSONL) for p in files):
        return "jsonl"
    if any(p.suffix == ".parquet" for p in files):
        return "parquet"
    return "txt"


def iter_local(cfg: LocalSourceConfig, issues: Issues) -> Iterator[RawDoc]:
    """Every text of the local source ``cfg`` (see the module doc for the formats)."""
    if not cfg.path:
        raise PrepareError("prepare.source is 'local' but prepare.local.path is not set; "
                           "give a directory of <domain>/*.txt, or a .jsonl/.parquet file or directory")
    path = Path(cfg.path)
    if not path.exists():
        raise PrepareError(f"prepare.local.path={cfg.path!r} does not exist")
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "txt":
        if cfg.label_fields:
            raise PrepareError(f"prepare.local.label_fields = {cfg.label_fields}: .txt files have no fields; "
                               f"give the documents as .jsonl or .parquet records with those fields")
        yield from _iter_txt_dirs(path, issues)
    else:
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and (p.name.endswith(_JSONL) if fmt == "jsonl"
                                                            else p.suffix == ".parquet"))
        if not files:
            raise PrepareError(f"prepare.local.path={cfg.path!r}: no {fmt} files found")
        reader = _iter_jsonl if fmt == "jsonl" else _iter_parquet
        for f in files:
            rel = f.name if path.is_file() else f.relative_to(path).as_posix()
            yield from reader(f, rel, _Fields.of(cfg, "prepare.local"), issues)


def _iter_txt_dirs(root: Path, issues: Issues) -> Iterator[RawDoc]:
    if not root.is_dir():
        raise PrepareError(f"prepare.local.path={str(root)!r}: format txt needs a directory of <domain>/*.txt")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if loose:
        issues.skip(f"files directly under {root} belong to no domain (put them in {root}/<domain>/): "
                    f"{loose[:5]}{' ...' if len(loose) > 5 else ''}", file=str(root))
    domains = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise PrepareError(f"prepare.local.path={str(root)!r} has no domain sub-directories "
                           f"(expected {root}/<domain>/*.txt)")
    for d in domains:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        other = [p for p in files if p.suffix != ".txt"]
        if other:
            issues.skip(f"{len(other)} file(s) not ending in .txt ignored, e.g. {other[0].name}", file=str(d))
        n = 0
        for p in files:
            if p.suffix == ".txt":
                text = decode(p.read_bytes(), str(p), issues)
                if text is not None:
                    n += 1
                    yield RawDoc(d.name, p.relative_to(d).as_posix(), text)
        if n == 0:
            # prepare() reports the empty domain by name; this keeps it in view
            yield RawDoc(d.name, "", "")


def _record(rec: Any, where: str, key: str, fields: _Fields, issues: Issues) -> Optional[RawDoc]:
    """The record as a :class:`RawDoc`, or None (skipped, with the reason) when a field is missing or unusable."""
    if not isinstance(rec, dict):
        issues.skip(f"expected a JSON object, got {type(rec).__name__}", file=where)
        return None
    values = {}
    for what, name in (("text", fields.text), ("domain", fields.domain), *(("label", f) for f in fields.labels)):
        try:
            values[what, name] = dotted_get(rec, name)
        except KeyError:
            setting = "label_fields" if what == "label" else f"{what}_field"
            issues.skip(f"no {what} field {name!r} (fields: {sorted(rec)[:10]}); set {fields.section}.{setting}",
                        file=where)
            return None
    text = values["text", fields.text]
    if not isinstance(text, str):
        issues.skip(f"text field {fields.text!r} is {type(text).__name__}, not a string", file=where)
        return None
    for (what, name), v in values.items():
        # a label is a string or an integer (a class id): a float, a list or nothing is not one
        unusable = (dict, list) if what == "domain" else (dict, list, float, bool)
        if what != "text" and (v is None or isinstance(v, unusable)):
            issues.skip(f"{what} field {name!r} is {v!r}, not a label", file=where)
            return None
    labels = {f: str(values["label", f]) for f in fields.labels} or None
    return RawDoc(str(values["domain", fields.domain]), key, normalise(text), labels)


def _iter_jsonl(f: Path, rel: str, fields: _Fields, issues: Issues) -> Iterator[RawDoc]:
    """One record per line, streamed (a corpus file of any size never sits in memory whole). The file is
    read twice: first to check it is UTF-8 text (a file that is not is skipped whole, as a text file is,
    never half-read), then for its records. Any line end (LF, CRLF, CR) ends a line."""
    def raw() -> Any:
        return gzip.open(f, "rb") if f.name.endswith(".gz") else open(f, "rb")

    def lines() -> Iterator[str]:
        with io.TextIOWrapper(raw(), encoding="utf-8", newline=None) as fh:
            yield from fh

    with raw() as fh:
        if b"\x00" in fh.read(8192):
            issues.skip("binary file (contains NUL bytes)", file=str(f))
            return
    lineno = 0
    try:
        for lineno, _ in enumerate(lines(), start=1):
            pass
    except UnicodeDecodeError as e:
        issues.skip(f"not valid UTF-8 (near line {lineno + 1}: {e.object[e.start:e.start + 1]!r}); convert it with e.g. "
                    f"`iconv -f latin1 -t utf-8`", file=str(f))
        return
    for lineno, line in enumerate(lines(), start=1):
        line = normalise(line)
        if not line.strip():
            continue
        where = f"{f}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            issues.skip(f"not valid JSON ({e.msg} at column {e.colno})", file=where)
            continue
        doc = _record(rec, where, f"{rel}:{lineno}", fields, issues)
        if doc is not None:
            yield doc


def _iter_parquet(f: Path, rel: str, fields: _Fields, issues: Issues) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        issues.skip(f"not a readable parquet file ({e})", file=str(f))
        return
    names = pf.schema_arrow.names
    cols = []
    for field, what, setting in ((fields.text, "text", "text_field"), (fields.domain, "domain", "domain_field"),
                                 *((label, "label", "label_fields") for label in fields.labels)):
        top = field if field in names else field.split(".")[0]
        if top not in names:
            raise PrepareError(f"{f}: no {what} column {field!r} (columns: {names}); set {fields.section}.{setting}")
        cols.append(top)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=sorted(set(cols))):
        for rec in batch.to_pylist():
            where = f"{f}:row {row}"
            doc = _record(rec, where, f"{rel}:{row}", fields, issues)
            if doc is not None:
                yield doc
            row += 1


def iter_hf(cfg: HFSourceConfig, issues: Issues) -> Iterator[RawDoc]:
    """Rows of a Hugging Face dataset (hub name, local path or packaged builder with data_files)."""
    if not cfg.name:
        raise PrepareError("prepare.source is 'hf' but prepare.hf.name is not set "
                           "(e.g. cerebras/SlimPajama-627B, or json with prepare.hf.data_files)")
    import datasets

    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": cfg.streaming}
    if cfg.data_files:
        kwargs["data_files"] = cfg.data_files
    try:
        ds = datasets.load_dataset(cfg.name, cfg.config, **kwargs)
    except Exception as e:  # datasets raises many types: not found, offline, bad config
        err = PrepareError(
            f"could not load Hugging Face dataset {cfg.name!r} (config {cfg.config!r}, split {cfg.split!r}): "
            f"{type(e).__name__}: {str(e)[:400]}. Without a network (HF_DATASETS_OFFLINE=1) only datasets in "
            f"the local cache or local files load."
        )
        # a network failure may pass on a retry; a missing dataset or a bad config will not
        err.transient = is_transient(e)
        raise err from None
    label = f"{cfg.name}[{cfg.split}]"
    fields = _Fields.of(cfg, "prepare.hf")
    for i, rec in enumerate(ds):
        if cfg.max_docs is not None and i >= cfg.max_docs:
            break
        doc = _record(rec, f"{label}:row {i}", f"{cfg.split}:{i}", fields, issues)
        if doc is not None:
            yield doc
