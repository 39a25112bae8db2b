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

import contextlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np

from dograph_core.io import atomic_path

MAGIC = b"DGSHARD\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = 64
_DTYPES = {1: np.uint16, 2: np.uint32}
_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}
_REDO = "re-run the tokenize stage (`dvc repro tokenize`) to rewrite the shards"
_HASH_RE = re.compile(r"[\x21-\x7e]{0,32}")  # printable ASCII, no NUL or space


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


class ShardWriter:
    """Stream documents into one shard; the file appears only when closed without error.

    Use as a context manager. Each document is written followed by ``eot_id``. Token ids
    are range-checked against the dtype, so a vocabulary too large for uint16 fails loudly
    instead of wrapping around.
    """

    def __init__(
        self,
        path: str | Path,
        eot_id: int,
        tokenizer_hash: str,
        dtype: np.dtype | type = np.uint16,
    ):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"unsupported shard dtype {self.dtype}; use uint16 or uint32")
        self._limit = int(np.iinfo(self.dtype).max)
        if not 0 <= int(eot_id) <= self._limit:
            raise ValueError(f"end-of-text id {eot_id} does not fit in {self.dtype}")
        if not _HASH_RE.fullmatch(tokenizer_hash[:32]):
            raise ValueError(f"tokenizer hash must be printable ASCII (a hex digest), got {tokenizer_hash!r}")
        self.eot_id = int(eot_id)
        self.tokenizer_hash = tokenizer_hash[:32]
        self.n_tokens = 0
        self.n_docs = 0
        self._stack: contextlib.ExitStack | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> "ShardWriter":
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(self.path))
        self._file = stack.enter_context(open(tmp, "wb"))
        self._file.write(b"\0" * HEADER_SIZE)
        self._stack = stack
        return self

    def add(self, doc: Sequence[int] | np.ndarray) -> None:
        """Append one document (its token ids) and the end-of-text token."""
        self.add_many([doc])

    def add_many(self, docs: Iterable[Sequence[int] | np.ndarray]) -> None:
        """Append several documents, each followed by the end-of-text token."""
        if self._file is None:
            raise RuntimeError("ShardWriter used outside its `with` block")
        parts: list[np.ndarray] = []
        eot = np.array([self.eot_id], dtype=np.int64)
        for doc in docs:
            parts.append(np.asarray(doc, dtype=np.int64).reshape(-1))
            parts.append(eot)
        if not parts:
            return
        arr = np.concatenate(parts)
        if arr.min() < 0 or arr.max() > self._limit:
            bad = int(arr.max()) if arr.max() > self._limit else int(arr.min())
            raise ValueError(f"{self.path}: token id {bad} out of range for {self.dtype}")
        self._file.write(arr.astype(self.dtype).tobytes())
        self.n_tokens += int(arr.size)
        self.n_docs += len(parts) // 2

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._stack is not None and self._file is not None
        if exc_type is None:
            self._file.seek(0)
            self._file.write(_pack(self.dtype, self.n_tokens, self.n_docs, self.tokenizer_hash))
        self._file = None
        # closes the file, then renames it into place (or removes it on an exception)
        return bool(self._stack.__exit__(exc_type, exc, tb))

    @property
    def header(self) -> ShardHeader:
        return ShardHeader(VERSION, self.dtype, self.n_tokens, self.n_docs, self.tokenizer_hash)


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
    with ShardWriter(path, eot_id, tokenizer_hash, dtype) as w:
        for doc in docs:
            w.add(doc if isinstance(doc, (list, tuple, np.ndarray)) else list(doc))
    return w.header


def _pack(dtype: np.dtype, n_tokens: int, n_docs: int, tokenizer_hash: str) -> bytes:
    h = tokenizer_hash[:32].encode("ascii").ljust(32, b"\0")
    return HEADER.pack(MAGIC, VERSION, _CODES[dtype], n_tokens, n_docs, h).ljust(HEADER_SIZE, b"\0")


def read_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard not found: {path}; run the tokenize stage (`dvc repro tokenize`) to write it")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"{path}: truncated header ({len(raw)} of {HEADER_SIZE} bytes); {_REDO}")
    magic, version, code, n_tokens, n_docs, h = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC:
        raise ShardError(f"{path}: not a dograph shard (magic {magic!r}, expected {MAGIC!r}); {_REDO}")
    if version != VERSION:
        raise ShardError(f"{path}: shard version {version}, this code reads version {VERSION}; {_REDO}")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code} (known: {sorted(_DTYPES)}); {_REDO}")
    dtype = np.dtype(_DTYPES[code])
    expected = HEADER_SIZE + n_tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ShardError(
            f"{path}: {size} bytes on disk, the header promises {expected} "
            f"({n_tokens} tokens of {dtype}); the file is truncated or corrupt; {_REDO}"
        )
    thash = h.rstrip(b"\0").decode("ascii", errors="replace")
    if not _HASH_RE.fullmatch(thash):
        raise ShardError(f"{path}: the tokenizer hash in the header is not printable ASCII ({h!r}); {_REDO}")
    return ShardHeader(version, dtype, n_tokens, n_docs, thash)


def read_shard(path: str | Path, expect_tokenizer_hash: str | None = None) -> np.memmap:
    """Memory-map the tokens of a shard (read-only)."""
    header = read_header(path)
    if expect_tokenizer_hash is not None and header.tokenizer_hash != expect_tokenizer_hash[:32]:
        raise ShardError(
            f"{path}: written with tokenizer {header.tokenizer_hash}, expected {expect_tokenizer_hash[:32]}; "
            f"the shards and the tokenizer do not belong together; {_REDO}"
        )
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))


def split_docs(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    """Cut a shard's tokens back into documents (views, without their end-of-text token)."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else np.zeros(0, dtype=np.int64)
    return [tokens[s:e] for s, e in zip(starts, ends)]
