"""The ``prepare`` stage: sources -> documents per domain, split into train/val/test.

Output (the contract the tokenize stage reads), written atomically (everything goes
to a temporary directory beside ``out_dir`` that is renamed into place at the end,
so a killed run leaves the previous output intact and no partial one)::

    <out_dir>/manifest.json
        {"source": str, "train_domains": [sorted], "heldout_domains": [sorted],
         "domains": {name: {"docs": {"train": n, "val": n, "test": n},
                            "chars": {"train": n, "val": n, "test": n},
                            "natural_chars": n, "heldout": bool, "origin": str, "label": str}},
         "skipped": [{"domain" | "file": str, "reason": str}],
         "unfetched": [default domains whose download failed], "config": {...}}
    <out_dir>/<split>/<domain>.jsonl     lines {"id": str, "domain": str, "text": str}, and
                                         "labels": {field: str} with prepare.<source>.label_fields

How documents are made and kept:

1. Each source text is cut into documents of about ``doc_chars`` characters at line
   boundaries; ids are ``<domain>/<key>#<n>`` (key: relative path, file:line, ...).
2. Exact duplicates (same text) are removed corpus-wide, keeping the first seen;
   held-out domains are visited first so no held-out text is also trained on.
3. A domain with no text, or less than ``min_domain_chars``, is skipped with a
   warning that names it.
4. Training domains keep their natural proportions scaled to ``total_mb`` (see
   :func:`plan.plan_sizes`: the smallest domain is cut if needed so that the largest
   is at least ``min_ratio`` times the smallest); held-out domains keep
   ``heldout_mb`` each. Which documents stay is a seeded, deterministic choice.
5. The split is a hash of the document id (:func:`plan.split_of`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional

from dograph_core.config import PrepareConfig
from dograph_core.data import plan
from dograph_core.data.default_corpus import DomainSpec, catalogue as default_catalogue
from dograph_core.data.local import iter_hf, iter_local
from dograph_core.data.plan import Doc
from dograph_core.data.sources import FetchError, fetch
from dograph_core.data.text import DataWarning, Issues, PrepareError, RawDoc, chunk, file_safe
from dograph_core.io import atomic_path

Labels = dict[str, dict[str, dict[str, str]]]  # domain -> record key -> {label field: value}

SPLITS = ("train", "val", "test")
MB = 1_000_000

__all__ = ["prepare", "manifest_table", "PrepareError", "DataWarning"]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"prepare: {msg}", file=sys.stderr, flush=True)


def safe_name(label: str) -> str:
    """The file-safe domain name of a label (letters, digits, ``_ . -``)."""
    name = file_safe(label)
    if not name:
        raise PrepareError(f"domain label {label!r} has no usable characters for a file name")
    return name


# --- collecting raw texts ------------------------------------------------------------------------

def _wanted(cfg: PrepareConfig, available: Iterable[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) domain names requested by ``cfg`` among ``available``."""
    available = sorted(set(available))
    clash = sorted(set(cfg.domains) & set(cfg.heldout))
    if clash:
        raise PrepareError(f"prepare.domains and prepare.heldout both name {clash}; a domain is either trained "
                           f"on or held out")
    unknown = sorted(set(cfg.domains) - set(available))
    if unknown:
        raise PrepareError(f"prepare.domains names {unknown}, which the {cfg.source} source does not have; "
                           f"available: {available}")
    train = list(cfg.domains) if cfg.domains else [d for d in available if d not in cfg.heldout]
    return sorted(train), sorted(d for d in cfg.heldout if d in available)


def _collect_default(cfg: PrepareConfig, specs: Mapping[str, DomainSpec], issues: Issues,
                     progress: bool) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    train, held = _wanted(cfg, specs)
    texts: dict[str, list[tuple[str, str]]] = {}
    origins: dict[str, str] = {}
    failed: list[str] = []
    for name in held + train:
        spec = specs[name]
        _log(progress, f"{name}: {spec.origin}")
        try:
            paths = [fetch(p, cfg.cache_dir) for p in spec.packages]
        except FetchError as e:
            issues.skip(str(e), domain=name)
            failed.append(name)
            continue
        texts[name] = list(spec.extract(paths, issues))
        origins[name] = spec.origin
    if failed:
        warnings.warn(f"{len(failed)} default domain(s) could not be fetched and are left out: {failed}; "
                      f"the other {len(texts)} were prepared (see the retry commands above)", DataWarning,
                      stacklevel=3)
    return texts, origins


def _collect_raw(raw: Iterable[RawDoc]) -> tuple[dict[str, list[tuple[str, str]]], Labels]:
    """Texts per domain label, and the labels of every record that has them (by domain label, then key)."""
    texts: dict[str, list[tuple[str, str]]] = {}
    labels: Labels = {}
    for doc in raw:
        texts.setdefault(doc.domain, []).append((doc.key, doc.text))
        if doc.labels is not None:
            labels.setdefault(doc.domain, {})[doc.key] = doc.labels
    return texts, labels


def _name_domains(texts: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """Rename labels to file-safe names; two labels that would share a file are an error."""
    out: dict[str, list[tuple[str, str]]] = {}
    labels: dict[str, str] = {}
    seen: dict[str, str] = {}
    for label in sorted(texts):
        name = safe_name(label)
        if name.lower() in seen:
            raise PrepareError(f"duplicate domain names: {seen[name.lower()]!r} and {label!r} would both be "
                               f"written as {name}.jsonl; rename one of them")
        seen[name.lower()] = label
        out[name] = texts[label]
        labels[name] = label
    return out, labels


# --- documents -----------------------------------------------------------------------------------

def _documents(texts: dict[str, list[tuple[str, str]]], order: list[str], doc_chars: int,
               labels: Optional[Labels] = None) -> dict[str, list[Doc]]:
    """Chunk every text and remove exact duplicates corpus-wide (first domain in ``order`` wins, then the
    first key in sorted order); each piece keeps its text's labels (``labels[domain][key]``), so a
    duplicate dropped here takes its record's labels with it."""
    seen: set[bytes] = set()
    out: dict[str, list[Doc]] = {}
    for name in order:
        docs: list[Doc] = []
        of_domain = (labels or {}).get(name, {})
        for key, text in sorted(texts.get(name, []), key=lambda kt: kt[0]):
            for i, piece in enumerate(chunk(text, doc_chars)):
                h = hashlib.sha1(piece.encode("utf-8", "surrogatepass")).digest()
                if h in seen:
                    continue
                seen.add(h)
                docs.append(Doc(f"{name}/{key}#{i}", piece, of_domain.get(key)))
        out[name] = docs
    return out


def _drop_unusable(docs: dict[str, list[Doc]], min_chars: int, issues: Issues) -> None:
    for name in sorted(docs):
        n = plan.chars(docs[name])
        if n == 0:
            issues.skip("empty: no usable text (no files, or every file was skipped or whitespace only)",
                        domain=name)
            del docs[name]
        elif n < min_chars:
            issues.skip(f"only {n} characters of text, less than prepare.min_domain_chars={min_chars} "
                        f"(about one training sequence); add text to it or lower min_domain_chars", domain=name)
            del docs[name]


# --- the stage -----------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig, progress: bool = True, *,
            catalogue: Optional[Mapping[str, DomainSpec]] = None) -> dict:
    """Build ``cfg.out_dir`` (see the module doc) and return its manifest.

    ``catalogue`` replaces the default corpus's domains (tests use it).
    Raises :class:`PrepareError` for input it cannot use; skipped input is warned
    about (:class:`DataWarning`) and listed in the manifest's ``skipped``.
    """
    t0 = time.time()
    issues = Issues()
    if cfg.source == "default":
        specs = catalogue if catalogue is not None else default_catalogue()
        train, held = _wanted(cfg, specs)
        texts, origins = _collect_default(cfg, specs, issues, progress)
        unfetched = sorted(d for d in train + held if d not in texts)
        train, held = [d for d in train if d in texts], [d for d in held if d in texts]
        labels = {d: d for d in texts}
        tags: Labels = {}
    else:
        unfetched = []
        raw = iter_local(cfg.local, issues) if cfg.source == "local" else iter_hf(cfg.hf, issues)
        texts, tags = _collect_raw(raw)
        texts, labels = _name_domains(texts)
        tags = {name: tags[label] for name, label in labels.items() if label in tags}
        where = cfg.local.path if cfg.source == "local" else cfg.hf.name
        origins = {d: f"{cfg.source}:{where}" for d in texts}
        missing = sorted(set(cfg.heldout) - set(texts))
        if missing:
            issues.skip(f"held-out domain(s) {missing} not found among {sorted(texts)}; set prepare.heldout "
                        f"to one of them or to []", domain=",".join(missing))
        train, held = _wanted(cfg, texts)
    _log(progress, f"chunking and de-duplicating {sum(len(v) for v in texts.values())} texts")
    docs = _documents(texts, held + train, cfg.doc_chars, tags)
    del texts
    _drop_unusable(docs, cfg.min_domain_chars, issues)
    train = [d for d in train if d in docs]
    held = [d for d in held if d in docs]
    if len(train) < 2:
        raise PrepareError(f"only {len(train)} usable training domain(s) {train}; a mixture needs at least 2. "
                           f"Skipped: {[s.get('domain') for s in issues.skipped if 'domain' in s]}")

    natural = {d: plan.chars(docs[d]) for d in train + held}
    targets = plan.plan_sizes({d: natural[d] for d in train}, cfg.total_mb * MB, cfg.min_ratio)
    if cfg.total_mb * MB > sum(natural[d] for d in train):
        warnings.warn(f"prepare.total_mb={cfg.total_mb} asks for more than the {sum(natural[d] for d in train) / MB:.3g}"
                      f" MB the training domains hold; everything available is kept", DataWarning, stacklevel=2)
    kept = {d: plan.select(docs[d], targets[d], cfg.seed) for d in train}
    plan.enforce_ratio(kept, cfg.min_ratio)
    kept.update({d: plan.select(docs[d], cfg.heldout_mb * MB, cfg.seed) for d in held})
    for d in train:
        if plan.chars(kept[d]) < cfg.min_domain_chars:
            raise PrepareError(f"prepare.total_mb={cfg.total_mb} leaves domain {d!r} only {plan.chars(kept[d])} "
                               f"characters (< min_domain_chars={cfg.min_domain_chars}); raise total_mb")
    splits = {d: plan.assign_splits(kept[d], cfg.split.val, cfg.split.test) for d in kept}

    manifest = {
        "source": cfg.source,
        "train_domains": sorted(train),
        "heldout_domains": sorted(held),
        "domains": {
            d: {
                "docs": {s: len(splits[d][s]) for s in SPLITS},
                "chars": {s: plan.chars(splits[d][s]) for s in SPLITS},
                "natural_chars": natural[d],
                "heldout": d in held,
                "origin": origins.get(d, ""),
                "label": labels.get(d, d),
            }
            for d in sorted(kept)
        },
        "skipped": issues.skipped,
        "unfetched": unfetched,  # default domains whose download failed: the output is incomplete, never marked done
        "config": cfg.model_dump(mode="json"),
    }
    _write(Path(cfg.out_dir), splits, manifest)
    _log(progress, f"wrote {cfg.out_dir} ({len(train)} training + {len(held)} held-out domains) "
                   f"in {time.time() - t0:.1f} s")
    if progress:
        print(manifest_table(manifest), file=sys.stderr)
    return manifest


def _write_jsonl(path: Path, domain: str, docs: list[Doc]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            rec = {"id": d.id, "domain": domain, "text": d.text, **({"labels": d.labels} if d.labels is not None else {})}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove what a killed earlier run left beside ``out_dir`` (its hidden temporary directories)."""
    gone = []
    if out_dir.parent.is_dir():
        for p in [*out_dir.parent.glob(f".{out_dir.name}.*.tmp"), *out_dir.parent.glob(f".{out_dir.name}.old-*")]:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _write(out_dir: Path, splits: dict[str, dict[str, list[Doc]]], manifest: dict) -> None:
    remove_stale_temporaries(out_dir)
    with atomic_path(out_dir) as tmp:
        for s in SPLITS:
            (tmp / s).mkdir(parents=True)
            for d in sorted(splits):
                _write_jsonl(tmp / s / f"{d}.jsonl", d, splits[d][s])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a prepared directory (clear error if it is missing)."""
    path = Path(out_dir) / "manifest.json"
    if not path.exists():
        raise PrepareError(f"no prepared corpus at {out_dir} (missing manifest.json); run the prepare stage first")
    return json.loads(path.read_text())


def manifest_table(manifest: dict) -> str:
    """A plain-text table: domain, documents and characters per split, share of training characters."""
    total = sum(v["chars"]["train"] for d, v in manifest["domains"].items() if not v["heldout"]) or 1
    head = f"{'domain':<14}{'docs tr/va/te':>20}{'chars train':>14}{'val':>11}{'test':>11}{'share':>8}"
    rows = [head, "-" * len(head)]
    for d, v in manifest["domains"].items():
        docs = "/".join(str(v["docs"][s]) for s in SPLITS)
        share = "held" if v["heldout"] else f"{v['chars']['train'] / total:.3f}"
        rows.append(f"{d:<14}{docs:>20}{v['chars']['train']:>14,}{v['chars']['val']:>11,}"
                    f"{v['chars']['test']:>11,}{share:>8}")
    return "\n".join(rows)
