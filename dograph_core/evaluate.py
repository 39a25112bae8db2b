"""Evaluation that never depends on the mixture: the same tokens for every run.

* **Loss and perplexity per domain**: ``n`` windows of ``seq_len + 1`` tokens per domain and split,
  evenly spaced over the shard (:func:`fixed_windows`: a function of the shard length alone), mean
  token NLL in nats, ``ppl = exp(loss)``; their mean and worst over the training domains; held-out
  domains (present in the data, never trained on) reported separately.
* **Last-word accuracy** (LAMBADA-style): on up to ``n_docs`` test documents per domain (documents
  are separated by the end-of-text token), the model sees the document up to its final word and
  must predict every token of that word greedily. A word starts at a token whose text begins with
  a space (byte-level BPE); trailing tokens without a letter or digit (newlines, punctuation) are
  not part of the word.

Under several processes each rank scores a disjoint share of the windows and the sums are
all-reduced, so every rank gets the same numbers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dograph_core.distributed import DistInfo


class EvaluateError(ValueError):
    """A model that cannot be loaded, or does not belong to the corpus it would be scored on."""


def find_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory: ``path`` itself, or a training run's ``final/``."""
    d = Path(path)
    if (d / "final").is_dir():
        d = d / "final"
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{path}: no model (expected config.json there or in final/); train one with `dograph train`")
    return d


def load_model(path: str | Path, corpus) -> torch.nn.Module:
    """The trained model at ``path`` (a training run's directory or its ``final/``), checked against ``corpus``.

    Refused, before any scoring, when its tokenizer (the ``tokenizer.json`` training copies into
    ``final/``) or its vocabulary differs from the corpus's: the losses would look plausible and mean nothing.
    """
    from transformers import AutoModelForCausalLM

    from dograph_core.data.tokenizer import tokenizer_mismatch

    model_dir = find_model_dir(path)
    differ = tokenizer_mismatch(corpus.tokenizer_dir, model_dir)
    if differ:
        raise EvaluateError(
            f"{model_dir}: the model's tokenizer (sha256 {differ[1][:12]}) is not the corpus's ({differ[0][:12]}, "
            f"{corpus.tokenizer_dir}); evaluate it on the corpus it was trained on (--set tokenize.out_dir=...)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers/safetensors raise many kinds; name the directory and why
        files = sorted(f.name for f in model_dir.glob("*.safetensors")) or sorted(f.name for f in model_dir.glob("*.bin"))
        raise EvaluateError(
            f"{model_dir}: cannot load the model from {files or 'its files'} ({type(e).__name__}: {e}); "
            "the file may be truncated: copy or train it again"
        ) from None
    if int(model.config.vocab_size) < corpus.vocab_size:
        raise EvaluateError(
            f"{model_dir}: vocabulary of {model.config.vocab_size} tokens, smaller than the corpus's {corpus.vocab_size} "
            f"({corpus.root / 'corpus.json'}); evaluate it on the corpus it was trained on"
        )
    return model


def fixed_windows(n_tokens: int, n: int, seq_len: int) -> np.ndarray:
    """Start offsets of ``n`` evenly spaced windows of ``seq_len + 1`` tokens (fewer if the shard is short)."""
    L = seq_len + 1
    if n_tokens < 2:
        return np.zeros(0, dtype=np.int64)
    if n_tokens < L:
        return np.zeros(1, dtype=np.int64)
    last = n_tokens - L
    return np.unique(np.linspace(0, last, num=min(n, last + 1)).round().astype(np.int64))


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _allreduce(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    if not info.enabled:
        return t
    comm = device if info.backend == "nccl" else torch.device("cpu")
    out = t.to(comm, copy=True)
    dist.all_reduce(out)
    return out.cpu()


@torch.no_grad()
def domain_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    n_windows: int,
    seq_len: int,
    device: torch.device,
    batch: int = 16,
    bf16: bool = False,
    info: DistInfo = DistInfo(),
) -> dict[str, float]:
    """Mean token NLL and perplexity of ``model`` on the fixed windows of one shard."""
    starts = fixed_windows(len(tokens), n_windows, seq_len)
    L = min(seq_len + 1, len(tokens))
    mine = starts[info.rank:: info.world_size]
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch):
        x = torch.from_numpy(np.stack([np.asarray(tokens[s: s + L], dtype=np.int64) for s in mine[i: i + batch]]))
        x = x.to(device)
        with _autocast(device, bf16):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += torch.tensor([nll.item(), x[:, 1:].numel()], dtype=torch.float64)
    total = _allreduce(total, info, device)
    if total[1] == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = float(total[0] / total[1])
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(total[1])}


def evaluate_split(
    model: torch.nn.Module,
    corpus: Any,
    split: str,
    domains: list[str],
    heldout: list[str],
    seq_len: int,
    n_windows: int,
    device: torch.device,
    bf16: bool = False,
    info: DistInfo = DistInfo(),
) -> dict[str, Any]:
    """Per-domain loss/ppl on ``split``, their mean and worst over ``domains``, held-out domains apart."""
    was_training = model.training
    model.eval()
    try:
        per = {d: domain_loss(model, corpus.tokens(split, d), n_windows, seq_len, device, bf16=bf16, info=info)
               for d in domains}
        held = {d: domain_loss(model, corpus.tokens(split, d), n_windows, seq_len, device, bf16=bf16, info=info)
                for d in heldout}
    finally:
        model.train(was_training)
    losses = {d: v["loss"] for d, v in per.items() if v["tokens"]}
    worst = max(losses, key=losses.get) if losses else None
    return {
        "domains": per,
        "heldout": held,
        "loss_mean": float(np.mean(list(losses.values()))) if losses else float("nan"),
        "loss_worst": losses[worst] if worst else float("nan"),
        "worst_domain": worst,
    }


def split_metrics(res: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Flat tracker metrics: ``val_loss/<d>``, ``val_loss_mean``, ``val_loss_worst``, ``heldout_loss/<d>``."""
    out = {f"{prefix}_loss/{d}": v["loss"] for d, v in res["domains"].items()}
    out[f"{prefix}_loss_mean"] = res["loss_mean"]
    out[f"{prefix}_loss_worst"] = res["loss_worst"]
    hp = "heldout" if prefix == "val" else f"{prefix}_heldout"
    out.update({f"{hp}_loss/{d}": v["loss"] for d, v in res["heldout"].items()})
    return out


# -- last-word accuracy ----------------------------------------------------------------------------

@lru_cache(maxsize=4)
def word_tables(tokenizer_dir: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per token id: (starts a word, contains a letter or digit); None when there is no tokenizer."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    n = tok.get_vocab_size(with_added_tokens=True)
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(n)]
    starts = np.array([t[:1].isspace() for t in texts], dtype=bool)
    alnum = np.array([any(c.isalnum() for c in t) for t in texts], dtype=bool)
    return starts, alnum


def last_word_items(tokens: np.ndarray, eot_id: int, tables: tuple[np.ndarray, np.ndarray], n_docs: int,
                    seq_len: int) -> list[tuple[np.ndarray, int]]:
    """(context + word tokens, word length) for up to ``n_docs`` evenly chosen documents."""
    starts_word, alnum = tables
    ends = np.flatnonzero(np.asarray(tokens) == eot_id)
    bounds = np.concatenate([[-1], ends])
    docs = [(int(bounds[i]) + 1, int(bounds[i + 1])) for i in range(len(ends))]
    docs = [d for d in docs if d[1] - d[0] >= 3]
    if not docs:
        return []
    pick = np.unique(np.linspace(0, len(docs) - 1, num=min(n_docs, len(docs))).round().astype(int))
    items = []
    for j in pick:
        lo, hi = docs[j]
        doc = np.asarray(tokens[lo:hi], dtype=np.int64)
        doc = doc[doc < len(alnum)]
        end = len(doc)
        while end > 0 and not alnum[doc[end - 1]]:
            end -= 1
        begin = end - 1
        while begin > 0 and not starts_word[doc[begin]]:
            begin -= 1
        n_word = end - begin
        if begin < 1 or n_word < 1 or n_word >= seq_len:
            continue
        ctx_lo = max(0, end - seq_len)
        items.append((doc[ctx_lo:end], n_word))
    return items


@torch.no_grad()
def last_word_accuracy(model: torch.nn.Module, items: list[tuple[np.ndarray, int]], device: torch.device,
                       bf16: bool = False) -> dict[str, float]:
    """Share of items whose final word the model predicts exactly, token by token, greedily."""
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for seq, n_word in items:
            x = torch.from_numpy(seq).to(device)[None]
            with _autocast(device, bf16):
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
            pred = logits[0, -n_word:].argmax(-1)
            hits += int(torch.equal(pred, x[0, -n_word:]))
    finally:
        model.train(was_training)
    return {"accuracy": hits / len(items) if items else float("nan"), "n": len(items)}


def evaluate_final(model, corpus, domains, heldout, seq_len, n_windows, device, bf16=False,
                   info: DistInfo = DistInfo(), n_docs: int = 100) -> dict[str, Any]:
    """Validation and test losses, and last-word accuracy on test documents (computed on every rank)."""
    val = evaluate_split(model, corpus, "val", domains, heldout, seq_len, n_windows, device, bf16, info)
    test = evaluate_split(model, corpus, "test", domains, heldout, seq_len, n_windows, device, bf16, info)
    tables = word_tables(str(corpus.tokenizer_dir))
    lw: dict[str, Any] = {}
    if tables is not None:
        for d in [*domains, *heldout]:
            items = last_word_items(corpus.tokens("test", d), corpus.eot_id, tables, n_docs, seq_len)
            lw[d] = last_word_accuracy(model, items, device, bf16)
    accs = [v["accuracy"] for d, v in lw.items() if d in domains and v["n"]]
    return {
        "val": val,
        "test": test,
        "last_word": lw,
        "last_word_mean": float(np.mean(accs)) if accs else None,
        "windows_per_domain": n_windows,
        "seq_len": seq_len,
    }
