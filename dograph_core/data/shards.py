"""Token shards: one binary file per (domain, split).

Layout (little-endian), a 64-byte header followed by the tokens::

    offset  size  field
    0       8     magic  b"DGSHARD\\0"
    8       4     version (uint32, currently 1)
    12      4     dtype code (uint32: 1 = uint16, 2 = uint32)
    16      8     token count (uint64)
    24      8     document count (uint64)
    32      32    tokenizer hash (ASCII hex, first 32 chars of a sha256)

Documents are separated by the end-of-text token. Shards are written atomically
(temporary file + rename) and read back as read-only memory maps, so resident memory
does not grow with the corpus.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from dograph_core.io import atomic_path

MAGIC = b"DGSHARD\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = 64
_DTYPES = {1: np.uint16, 2: np.uint32}
_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}


class ShardError(ValueError):
    """A shard file that is missing, truncated, or not a shard."""


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    n_tokens: int
    n_docs: int
    tokenizer_hash: str


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(
    path: str | Path,
    docs: Iterable[Iterable[int]],
    eot_id: int,
    tokenizer_hash: str,
    dtype: np.dtype | type = np.uint16,
) -> ShardHeader:
    """Write documents (token id sequences) to ``path``, each followed by ``eot_id``.

    The file appears only when complete: a crash mid-write leaves no shard behind.
    """
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"unsupported shard dtype {dtype}; use uint16 or uint32")
    limit = np.iinfo(dtype).max
    n_tokens = n_docs = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            for doc in docs:
                arr = np.fromiter((*doc, eot_id), dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise ValueError(f"token id out of range for {dtype} in {path}")
                f.write(arr.astype(dtype).tobytes())
                n_tokens += arr.size
                n_docs += 1
            f.seek(0)
            f.write(_pack(dtype, n_tokens, n_docs, tokenizer_hash))
    return ShardHeader(VERSION, dtype, n_tokens, n_docs, tokenizer_hash[:32])


def _pack(dtype: np.dtype, n_tokens: int, n_docs: int, tokenizer_hash: str) -> bytes:
    h = tokenizer_hash[:32].encode("ascii").ljust(32, b"\0")
    return HEADER.pack(MAGIC, VERSION, _CODES[dtype], n_tokens, n_docs, h).ljust(HEADER_SIZE, b"\0")


def read_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"{path}: truncated header ({len(raw)} bytes)")
    magic, version, code, n_tokens, n_docs, h = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC:
        raise ShardError(f"{path}: not a dograph shard (bad magic {magic!r})")
    if version != VERSION:
        raise ShardError(f"{path}: shard version {version}, this code reads version {VERSION}")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code}")
    dtype = np.dtype(_DTYPES[code])
    expected = HEADER_SIZE + n_tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ShardError(f"{path}: size {size} bytes, header says {expected}")
    return ShardHeader(version, dtype, n_tokens, n_docs, h.rstrip(b"\0").decode("ascii"))


def read_shard(path: str | Path, expect_tokenizer_hash: str | None = None) -> np.memmap:
    """Memory-map the tokens of a shard (read-only)."""
    header = read_header(path)
    if expect_tokenizer_hash is not None and header.tokenizer_hash != expect_tokenizer_hash[:32]:
        raise ShardError(
            f"{path}: written with tokenizer {header.tokenizer_hash}, expected {expect_tokenizer_hash[:32]}"
        )
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))
