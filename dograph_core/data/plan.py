"""Pure arithmetic of the prepare stage: how much of each domain to keep, which documents, which split.

* :func:`plan_sizes` keeps the domains' natural proportions, scaled to a total, and
  makes the largest domain at least ``min_ratio`` times the smallest by cutting the
  smallest one down when the natural sizes are closer than that.
* :func:`select` keeps, per domain, a seeded hash-ordered prefix of its documents
  until the target is reached, so a larger target keeps a superset.
* :func:`split_of` puts a document in train/val/test from a hash of its id alone,
  so val and test never depend on the mixture, the seed or the other domains.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple, Optional, Sequence


class Doc(NamedTuple):
    id: str
    text: str
    labels: Optional[dict[str, str]] = None  # the source record's label fields, when it has any


def unit_hash(s: str) -> float:
    """A uniform number in [0, 1) from ``s`` (sha256, stable across machines and runs)."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big") / 2.0**64


def plan_sizes(natural: Mapping[str, int], total_chars: float, min_ratio: float) -> dict[str, float]:
    """Characters to keep per domain: natural proportions scaled so they sum to ``total_chars``.

    If the natural sizes give ``max / min < min_ratio``, the smallest domain is cut to
    ``max / min_ratio`` first (every other domain is then above it, so the ratio holds).
    Nothing is ever scaled above its natural size: if ``total_chars`` exceeds what
    the domains hold, everything is kept.
    """
    sizes = {d: float(n) for d, n in natural.items() if n > 0}
    if not sizes:
        return {}
    if len(sizes) > 1:
        big = max(sizes.values())
        small = min(sizes, key=lambda d: (sizes[d], d))
        if big / sizes[small] < min_ratio:
            sizes[small] = big / min_ratio
    scale = min(1.0, total_chars / sum(sizes.values()))
    return {d: n * scale for d, n in sizes.items()}


def select(docs: Sequence[Doc], target_chars: float, seed: int) -> list[Doc]:
    """Documents in seeded hash order until their characters reach ``target_chars``.

    Deterministic in (ids, seed); overshoots the target by less than one document.
    """
    order = sorted(docs, key=lambda d: (unit_hash(f"{seed}:{d.id}"), d.id))
    out: list[Doc] = []
    total = 0
    for d in order:
        if total >= target_chars:
            break
        out.append(d)
        total += len(d.text)
    return out


def chars(docs: Sequence[Doc]) -> int:
    return sum(len(d.text) for d in docs)


def enforce_ratio(kept: dict[str, list[Doc]], min_ratio: float) -> None:
    """Drop the last-selected documents of the smallest domain until ``max >= min_ratio * min``.

    Selection overshoots its target by up to one document; this removes that slack
    where it would break the ratio. Modifies ``kept`` in place.
    """
    if len(kept) < 2:
        return
    sizes = {d: chars(v) for d, v in kept.items()}
    big = max(sizes.values())
    d = min(kept, key=lambda d: (sizes[d], d))
    while len(kept[d]) > 1 and big < min_ratio * sizes[d]:
        sizes[d] -= len(kept[d].pop().text)


def split_of(doc_id: str, val: float, test: float) -> str:
    """``train``, ``val`` or ``test`` from a hash of the id alone."""
    u = unit_hash(f"split:{doc_id}")
    if u < val:
        return "val"
    if u < val + test:
        return "test"
    return "train"


def assign_splits(docs: Sequence[Doc], val: float, test: float) -> dict[str, list[Doc]]:
    """Split by :func:`split_of`; a domain with at least 3 documents gets at least one in val and test.

    The fallback moves the train documents with the lowest split hash, so it is as
    deterministic as the rest.
    """
    out: dict[str, list[Doc]] = {"train": [], "val": [], "test": []}
    for d in docs:
        out[split_of(d.id, val, test)].append(d)
    if len(docs) >= 3:
        for name, frac in (("val", val), ("test", test)):
            if frac > 0 and not out[name] and len(out["train"]) > 1:
                first = min(out["train"], key=lambda d: (unit_hash(f"split:{d.id}"), d.id))
                out["train"].remove(first)
                out[name].append(first)
    return out
