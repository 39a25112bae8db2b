"""A tiny Hugging Face causal LM with its own byte-level tokenizer in one directory, built at test time:
what `dograph evaluate --text` and `--lm-eval` load (any model directory with its tokenizer)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_scorer(d: Path, texts: list[str], n_positions: int, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dograph_core.data.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(texts, 300, 2, d)
    tok = load_tokenizer(d)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d
