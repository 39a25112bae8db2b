"""Bits per byte of any causal language model on a directory of text files.

A loss in nats per token depends on the tokenizer: a model with a larger vocabulary predicts fewer,
harder tokens. Bits per byte does not: the summed negative log-likelihood of a file's tokens, in
bits, over the file's length in UTF-8 bytes. Two models with different tokenizers (ours, GPT-2's,
anyone's) are comparable on the same files.

How a file is scored (:func:`score_text`):

* the text is tokenized by the model's own tokenizer, without special tokens, and the sequence is
  prefixed with the tokenizer's BOS token (or its end-of-text token, as GPT-2 uses), so that the
  first token is predicted too: every token of the text counts;
* the sequence is cut into windows of ``context`` predicted tokens, each scored from the tokens
  before it within the window, so every token is scored exactly once and the context resets at
  window boundaries; a last, shorter window is right-aligned to take a full ``context`` of input
  (lm-evaluation-harness's rolling log-likelihood does the same; the test checks the two agree);
* ``bits_per_byte = sum(NLL) / ln 2 / len(text.encode("utf-8"))``.

The result holds, per file, bytes, tokens, nats per token and bits per byte, and over the files
their mean and the pooled figure (all bits over all bytes). A tokenizer that does not give the text
back from its tokens (a normalising one) is flagged per file (``lossless``): its bits are then of
the normalised text's tokens, over the original text's bytes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


class TextScoreError(ValueError):
    """Text that cannot be scored (no files, not UTF-8) or a model/tokenizer that cannot score it."""


def read_texts(root: str | Path, pattern: str = "**/*") -> dict[str, str]:
    """The UTF-8 text of every regular, non-hidden file under ``root`` matching ``pattern``, by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise TextScoreError(f"--text {root}: not a directory")
    files = sorted(p for p in root.glob(pattern)
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise TextScoreError(f"--text {root}: no files match {pattern!r}")
    texts = {}
    for p in files:
        try:
            texts[str(p.relative_to(root))] = p.read_bytes().decode("utf-8")  # the file's bytes: no newline translation
        except UnicodeDecodeError as e:
            raise TextScoreError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                 "convert it, or narrow the files with --glob") from None
    return texts


def load_scorer(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a Hugging Face model directory (or a training run's ``final/``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dograph_core.evaluate import find_model_dir

    model_dir = find_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - many kinds; name the directory and why
        raise TextScoreError(f"{model_dir}: no tokenizer to score text with ({type(e).__name__}: {e}); "
                             "bits per byte needs the model's own tokenizer files next to it") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise TextScoreError(f"{model_dir}: cannot load the model ({type(e).__name__}: {e})") from None
    return model, tokenizer


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # as lm-evaluation-harness reads them


def max_context(model: torch.nn.Module, tokenizer=None) -> int:
    """The model's longest input: its config's position count, else the tokenizer's ``model_max_length``."""
    for key in POSITION_KEYS:
        n = getattr(model.config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 10**9 else 1024


def _start_token(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise TextScoreError("the tokenizer has neither a BOS nor an end-of-text token, so the first token of a "
                         "file cannot be predicted; bits per byte would leave it out")


@torch.no_grad()
def score_text(model: torch.nn.Module, tokenizer, text: str, context: int, device: torch.device,
               batch: int = 8) -> dict[str, Any]:
    """Bits per byte of ``text`` under ``model`` (see the module docstring for the windows)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_bytes = len(text.encode("utf-8"))
    seq = torch.tensor([_start_token(tokenizer), *ids], dtype=torch.long)
    n = len(ids)
    nll = 0.0
    # window [s, e) predicts seq[s+1 : e+1] from seq[lo : e]; lo = s except for a last, partial window,
    # which is right-aligned to keep a full context (its tokens before s are context only): so every
    # window is min(context, n) tokens wide and a batch of them needs no padding
    width = min(context, n)
    windows = [(s, min(s + context, n)) for s in range(0, n, context)]
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        x = torch.stack([seq[e - width:e] for _, e in chunk])
        y = torch.stack([seq[e - width + 1:e + 1] for _, e in chunk])
        for r, (s, e) in enumerate(chunk):
            y[r, :s - (e - width)] = -100  # context only: scored by the window before
        logits = model(input_ids=x.to(device), use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100,
                                     reduction="sum"))
    lossless = tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    return {
        "bytes": n_bytes,
        "tokens": n,
        "nats_per_token": nll / n if n else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "bits": nll / math.log(2),
        "lossless": lossless,
    }


def bits_per_byte(model: torch.nn.Module, tokenizer, texts: dict[str, str], device: torch.device,
                  context: Optional[int] = None, batch: int = 8,
                  progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Per file and over all files: bits per byte of ``texts`` (name -> text) under ``model``.

    Empty files, and files the tokenizer gives no tokens for, are listed under ``skipped``.
    ``context`` defaults to the model's longest input (:func:`max_context`) and may not exceed it.
    """
    longest = max_context(model, tokenizer)
    context = int(context or longest)
    if not 1 <= context <= longest:
        raise TextScoreError(f"context must be 1 to {longest} tokens (the model's longest input), got {context}")
    was_training = model.training
    model.eval()
    files, skipped = {}, []
    try:
        for name, text in texts.items():
            if progress and text:
                progress(name)
            scored = score_text(model, tokenizer, text, context, device, batch)
            if scored["tokens"] == 0:  # an empty file, or one the tokenizer gives no tokens for
                skipped.append(name)
                continue
            files[name] = scored
    finally:
        model.train(was_training)
    if not files:
        raise TextScoreError(f"every file is empty: {skipped}")
    bpb = [v["bits_per_byte"] for v in files.values()]
    total_bits = sum(v["bits"] for v in files.values())
    total_bytes = sum(v["bytes"] for v in files.values())
    return {
        "files": files,
        "skipped": skipped,
        "bits_per_byte_mean": float(np.mean(bpb)),
        "bits_per_byte_pooled": total_bits / total_bytes,
        "bytes": total_bytes,
        "context": context,
        "lossless": all(v["lossless"] for v in files.values()),
    }
