"""A tiny tokenized corpus for the training-engine tests, built at test time.

Three training domains of generated text with different vocabularies and sizes, plus one held-out
domain of Python standard library source; a byte-level BPE trained on the generated text; shards
written with ``write_shard`` and a ``corpus.json`` like the tokenize stage's.
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from dograph_core.data.corpus import write_corpus_json
from dograph_core.data.shards import write_shard
from dograph_core.data.tokenizer import load_tokenizer, train_tokenizer

VOCABS = {
    "alpha": "river stone light quiet north window garden music paper letter bright under over".split(),
    "beta": "graph domain mixture weight model token gradient cluster batch step loss rate".split(),
    "gamma": "one two three four five six seven eight nine ten zero plus minus equals".split(),
}
SIZES = {"alpha": 120, "beta": 60, "gamma": 30}  # documents in the training split


def _doc(rng: random.Random, words: list[str]) -> str:
    sents = []
    for _ in range(rng.randint(2, 5)):
        sents.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return " ".join(sents)


def _stdlib_docs(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="replace")
        if len(t) > 500:
            out.append(t[:800])
        if len(out) == n:
            break
    return out


def make_corpus(root: Path, seed: int = 0, scale: int = 1) -> Path:
    """Write a tokenized corpus at ``root``; ``scale`` multiplies the training documents."""
    rng = random.Random(seed)
    texts: dict[tuple[str, str], list[str]] = {}
    for d, words in VOCABS.items():
        texts[("train", d)] = [_doc(rng, words) for _ in range(SIZES[d] * scale)]
        texts[("val", d)] = [_doc(rng, words) for _ in range(12)]
        texts[("test", d)] = [_doc(rng, words) for _ in range(12)]
    code = _stdlib_docs(24)
    texts[("train", "code")] = []
    texts[("val", "code")] = code[:12]
    texts[("test", "code")] = code[12:]
    tok_dir = root / "tokenizer"
    train_tokenizer([t for (s, _), ts in texts.items() if s == "train" for t in ts], 400, 2, tok_dir)
    tok = load_tokenizer(tok_dir)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    table = []
    for d in [*VOCABS, "code"]:
        row = {"domain": d, "heldout": d == "code", "docs": {}, "tokens": {}}
        for split in ("train", "val", "test"):
            docs = [tok(t)["input_ids"] for t in texts[(split, d)]]
            if split == "train" and d == "code":
                docs = [[eot]]  # held-out domains have no training text
            h = write_shard(root / split / f"{d}.bin", docs, eot, "fixture")
            row["docs"][split] = h.n_docs
            row["tokens"][split] = h.n_tokens
        table.append(row)
    write_corpus_json(root, table, vocab_size=len(tok), eot_id=eot, tokenizer_hash="fixture")
    return root


def tiny_train_cfg(**kw):
    """A few CPU steps of the smallest model, for end-to-end mixer tests (keyword overrides)."""
    from dograph_core.config import TrainConfig

    base = dict(steps=3, batch_size=8, seq_len=32, warmup_steps=1, eval_every=0, eval_windows=2, threads=1,
                progress=False)
    return TrainConfig(**{**base, **kw})
