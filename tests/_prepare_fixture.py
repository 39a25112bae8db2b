"""Generated text and small source trees for the prepare-stage tests (nothing third-party committed)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from dograph_core.config import PrepareConfig

_SYLLABLES = "ka lo mi nu pe ra si to vu we xa yo ze bri cla dro fle gru".split()


def gen_text(seed: int, chars: int, line_words: int = 10) -> str:
    """Deterministic pseudo-prose of about ``chars`` characters, unique per seed."""
    rng = random.Random(seed)
    lines, n = [], 0
    while n < chars:
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(line_words)]
        line = f"{seed}.{len(lines)} " + " ".join(words) + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines)


def txt_tree(root: Path, sizes: dict[str, int], files_per_domain: int = 4) -> Path:
    """``root/<domain>/fileK.txt`` with about ``sizes[domain]`` characters per domain."""
    for di, (domain, size) in enumerate(sorted(sizes.items())):
        d = root / domain
        d.mkdir(parents=True, exist_ok=True)
        for k in range(files_per_domain):
            (d / f"file{k}.txt").write_text(gen_text(1000 * di + k, size // files_per_domain), encoding="utf-8")
    return root


def jsonl_file(path: Path, sizes: dict[str, int], doc_chars: int = 1500, text_field: str = "text",
               nested_domain: bool = False) -> Path:
    """One jsonl file holding documents of every domain, interleaved."""
    rows = []
    for di, (domain, size) in enumerate(sorted(sizes.items())):
        for k in range(max(1, size // doc_chars)):
            label = {"meta": {"source": domain}} if nested_domain else {"domain": domain}
            rows.append({text_field: gen_text(5000 + 100 * di + k, doc_chars), **label})
    random.Random(0).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(tmp: Path, **kw) -> PrepareConfig:
    """A small prepare config writing under ``tmp`` (min_ratio 1 unless given, tiny sizes)."""
    base = dict(out_dir=str(tmp / "prepared"), cache_dir=str(tmp / "cache"), total_mb=0.05, min_ratio=1.0,
                heldout=[], heldout_mb=0.01, doc_chars=1000, min_domain_chars=500)
    base.update(kw)
    return PrepareConfig.model_validate(base)


def read_split(out_dir: Path, split: str, domain: str) -> list[dict]:
    path = Path(out_dir) / split / f"{domain}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(out_dir: Path, manifest: dict) -> dict[str, list[dict]]:
    """Rows per split over all domains of a manifest."""
    return {s: [r for d in manifest["domains"] for r in read_split(out_dir, s, d)] for s in ("train", "val", "test")}
