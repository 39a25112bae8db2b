"""Build small prepared corpora (the prepare stage's output format) for the tokenize tests.

Text comes from the Python standard library's source and from generated prose, never from
committed third-party files.
"""
from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

SPLITS = ("train", "val", "test")
_WORDS = (
    "the a graph domain mixture weight model token gradient cluster batch step loss river stone "
    "light quiet north window garden music paper letter bright under over between after before"
).split()


def stdlib_texts(n: int, max_chars: int = 3000, offset: int = 0) -> list[str]:
    """``n`` chunks of Python standard library source (deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.glob("*.py"))[offset:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 200:
            out.append(text[:max_chars])
        if len(out) == n:
            break
    return out


def prose_texts(n: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(words // 12):
            s = " ".join(rng.choice(_WORDS) for _ in range(12))
            sents.append(s[0].upper() + s[1:] + ".")
        docs.append(" ".join(sents))
    return docs


def write_prepared(
    root: str | Path,
    domains: dict[str, dict[str, list[str]]],
    heldout: tuple[str, ...] = (),
) -> Path:
    """Write ``manifest.json`` and ``<split>/<domain>.jsonl`` from ``{domain: {split: [text, ...]}}``."""
    root = Path(root)
    for domain, splits in domains.items():
        for split in SPLITS:
            path = root / split / f"{domain}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for i, text in enumerate(splits.get(split, [])):
                    f.write(json.dumps({"id": f"{domain}-{split}-{i}", "domain": domain, "text": text}) + "\n")
    manifest = {
        "train_domains": sorted(d for d in domains if d not in heldout),
        "heldout_domains": sorted(heldout),
        "domains": {d: {"docs": {s: len(v.get(s, [])) for s in SPLITS}} for d, v in domains.items()},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def small_corpus(root: str | Path) -> Path:
    """Three training domains (code, prose, numbers) and one held-out domain, about 100 KB."""
    code = stdlib_texts(24, max_chars=2500)
    prose = prose_texts(30, seed=1)
    nums = [" ".join(f"{i * j} + {j} = {i * j + j};" for j in range(40)) for i in range(12)]
    other = prose_texts(8, seed=2, words=60)
    return write_prepared(
        root,
        {
            "code": {"train": code[:18], "val": code[18:21], "test": code[21:]},
            "prose": {"train": prose[:22], "val": prose[22:26], "test": prose[26:]},
            "numbers": {"train": nums[:8], "val": nums[8:10], "test": nums[10:]},
            "letters": {"val": other[:4], "test": other[4:]},
        },
        heldout=("letters",),
    )
