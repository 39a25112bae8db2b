"""A tiny byte-level corpus and nano GPT-2 for the DoGraph tests, built at test time.

Three training domains with clearly different byte statistics: Python standard-library source,
generated lower-case prose, and comma-separated numbers. Tokens are raw bytes (vocabulary 257,
id 256 = end of text), so no tokenizer has to be trained.
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dograph_core.data.corpus import write_corpus_json
from dograph_core.data.shards import write_shard

DOMAINS = ["code", "numbers", "prose"]
EOT = 256
VOCAB = 257


def texts(seed: int = 0, chars: int = 60_000) -> dict[str, str]:
    rng = random.Random(seed)
    std = Path(sysconfig.get_paths()["stdlib"])
    code = ""
    for p in sorted(std.glob("*.py")):
        code += p.read_text(encoding="utf-8", errors="replace")
        if len(code) > chars:
            break
    words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    prose = " ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(chars // 5))
    numbers = ",".join(str(rng.randint(0, 99999)) for _ in range(chars // 6))
    return {"code": code[:chars], "prose": prose[:chars], "numbers": numbers[:chars]}


def make_corpus(root: Path, seed: int = 0, chars: int = 60_000, sizes: dict[str, int] | None = None) -> Path:
    """Write ``root/corpus.json`` and byte-level shards; ``sizes`` caps a domain's training characters."""
    t = texts(seed, chars)
    table = []
    for d in DOMAINS:
        text = t[d].encode("utf-8", errors="replace")
        n = len(text)
        cut = sizes.get(d, int(n * 0.8)) if sizes else int(n * 0.8)
        parts = {"train": text[:cut], "val": text[int(n * 0.8): int(n * 0.9)], "test": text[int(n * 0.9):]}
        row = {"domain": d, "heldout": False, "docs": {}, "tokens": {}}
        for split, b in parts.items():
            h = write_shard(root / split / f"{d}.bin", [list(b)] if b else [], EOT, "fixture")
            row["docs"][split], row["tokens"][split] = h.n_docs, h.n_tokens
        table.append(row)
    write_corpus_json(root, table, vocab_size=VOCAB, eot_id=EOT, tokenizer_hash="fixture")
    return root


def nano_model(seed: int = 0, n_embd: int = 32, n_layer: int = 2, seq_len: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT, eos_token_id=EOT,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def ip_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of the pairwise inner products of two feature sets (rows = the same examples)."""
    A, B = a @ a.T, b @ b.T
    iu = torch.triu_indices(len(a), len(a), 1)
    return torch.corrcoef(torch.stack([A[iu[0], iu[1]], B[iu[0], iu[1]]]))[0, 1].item()
