"""Load a trained model to serve as DoReMi's reference, and check that it fits the run.

``reference`` may name a model directory in Hugging Face format (``save_pretrained``: a
``config.json`` beside the weights) or a training run directory that holds one. Only local
files are read (never a hub). A reference that cannot score the proxy's batches (another
vocabulary, fewer positions than the sequence length, other training domains or another
tokenizer, when the run recorded them) is refused with an error that says what differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from dograph_core.mixers.base import MixerContext, MixerError

# where a training run keeps its final model, tried in this order
MODEL_SUBDIRS = ("model", "final", "final_model", "hf")
# files of a run (or beside a model) that may record the run's training domains
RUN_RECORDS = ("run.json", "result.json", "summary.json", "weights.json", "meta.json", "dograph.json")


def find_model_dir(path: str | Path) -> Path:
    """The Hugging Face model directory at ``path`` or inside a run directory at ``path``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MixerError(f"doremi reference {p}: no such file or directory; give a trained model or run directory")
    if (p / "config.json").is_file():
        return p
    for sub in MODEL_SUBDIRS:
        if (p / sub / "config.json").is_file():
            return p / sub
    found = sorted(c.parent for c in p.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise MixerError(
        f"doremi reference {p}: no model in Hugging Face format there (expected config.json in it or in one of "
        f"{list(MODEL_SUBDIRS)}; found {[str(f) for f in found] or 'none'}); point `reference` at the final model"
    )


def run_domains(model_dir: Path, given: Path) -> tuple[Optional[list[str]], Optional[Path]]:
    """The training domains the run that produced the model recorded (its ``weights.json``), if any."""
    for folder in dict.fromkeys([Path(given), model_dir, model_dir.parent]):
        for name in RUN_RECORDS:
            f = folder / name
            try:
                doc = json.loads(f.read_text()) if f.is_file() else None
            except (ValueError, OSError):
                doc = None
            if isinstance(doc, dict):
                for key in ("domains", "train_domains"):
                    if isinstance(doc.get(key), list):
                        return [str(d) for d in doc[key]], f
    return None, None


def check_run(model_dir: Path, given: Path, ctx: MixerContext) -> Optional[list[str]]:
    """Refuse a reference trained on other domains or with another tokenizer (when that can be seen)."""
    domains, where = run_domains(model_dir, given)
    if domains is not None and sorted(domains) != sorted(ctx.domains):
        raise MixerError(
            f"doremi reference {model_dir}: it was trained on domains {domains} ({where}), "
            f"this run's domains are {ctx.domains}; train the reference on the same corpus"
        )
    tok_dir = getattr(ctx.corpus, "tokenizer_dir", None) if ctx.corpus is not None else None
    if tok_dir is not None:
        from dograph_core.data.tokenizer import tokenizer_mismatch

        differ = tokenizer_mismatch(tok_dir, model_dir)
        if differ:
            raise MixerError(
                f"doremi reference {model_dir}: its tokenizer (sha256 {differ[1][:12]}) is not this corpus's "
                f"({differ[0][:12]}, {tok_dir}); train the reference on the same tokenized corpus"
            )
    return domains


def load_reference(path: str | Path, ctx: MixerContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the reference model (frozen, eval mode, on ``ctx.device``) and check it against the run."""
    from transformers import AutoModelForCausalLM

    model_dir = find_model_dir(path)
    domains = check_run(model_dir, Path(path), ctx)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds; say which file failed and why
        raise MixerError(f"doremi reference {model_dir}: cannot load the model ({type(e).__name__}: {e})") from None
    vocab = int(model.config.vocab_size)
    if vocab != ctx.vocab_size:
        raise MixerError(
            f"doremi reference {model_dir}: vocabulary of {vocab} tokens, this run's tokenizer has {ctx.vocab_size}; "
            "the reference must be trained with the same tokenizer"
        )
    positions: Optional[int] = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if positions is not None and positions < ctx.seq_len:
        raise MixerError(
            f"doremi reference {model_dir}: {positions} positions, shorter than this run's sequences "
            f"({ctx.seq_len} tokens); train the reference with train.seq_len >= {ctx.seq_len}"
        )
    model.requires_grad_(False)
    model.eval()
    model.to(ctx.device)
    return model, {"model_dir": model_dir, "domains": domains}
