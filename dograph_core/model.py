"""Named GPT-2 scales, built from scratch with ``transformers`` (never loaded from a hub).

The shapes of ``small`` .. ``xl`` are the GPT-2 family's (12/24/36/48 layers); the parameter
counts quoted for them (124M .. 1.5B) are at GPT-2's own vocabulary of 50,257 tokens and
1,024 positions. With the project's smaller tokenizer the embedding is smaller, so
:func:`scale_table` prints the count at the vocabulary actually used.

Dropout is off (modern pretraining practice; it also keeps CPU runs bit-for-bit repeatable).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel


class ScaleError(ValueError):
    """An unknown scale name or a shape that does not fit."""


@dataclass(frozen=True)
class Scale:
    n_layer: int
    n_embd: int
    n_head: int
    note: str = ""


SCALES: dict[str, Scale] = {
    "nano": Scale(2, 128, 2, "CPU tests and proxies; under 1M parameters at vocab 4096"),
    "micro": Scale(6, 192, 3, "about 3M at vocab 4096"),
    "mini": Scale(6, 384, 6, "about 12M at vocab 4096"),
    "small": Scale(12, 768, 12, "GPT-2 small, 124M at vocab 50257"),
    "medium": Scale(24, 1024, 16, "GPT-2 medium, 355M at vocab 50257"),
    "large": Scale(36, 1280, 20, "GPT-2 large, 774M at vocab 50257"),
    "xl": Scale(48, 1600, 25, "GPT-2 XL, 1.5B at vocab 50257"),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ScaleError(f"unknown model scale {name!r}; known scales: {list(SCALES)} (set train.scale)")
    return SCALES[name]


def gpt2_config(scale: str, vocab_size: int, seq_len: int, eot_id: int, attn: str = "sdpa") -> GPT2Config:
    s = get_scale(scale)
    if vocab_size < 2:
        raise ScaleError(f"vocab_size must be at least 2, got {vocab_size}")
    if not 0 <= eot_id < vocab_size:
        raise ScaleError(f"end-of-text id {eot_id} is outside the vocabulary of {vocab_size} tokens")
    if seq_len < 2:
        raise ScaleError(f"seq_len must be at least 2, got {seq_len}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        use_cache=False,
        attn_implementation=attn,
    )


def build_model(scale: str, vocab_size: int, seq_len: int, eot_id: int, attn: str = "sdpa") -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of the named scale (seed torch before calling for a fixed init)."""
    return GPT2LMHeadModel(gpt2_config(scale, vocab_size, seq_len, eot_id, attn))


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (the tied input/output embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_count(scale: str, vocab_size: int, seq_len: int) -> int:
    """Parameters of a scale without building it: embeddings + 12 d^2 + 13 d per layer + final norm."""
    s = get_scale(scale)
    d = s.n_embd
    return vocab_size * d + seq_len * d + s.n_layer * (12 * d * d + 13 * d) + 2 * d


def flops_per_token(scale: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L d T (the PaLM appendix formula)."""
    s = get_scale(scale)
    n = param_count(scale, vocab_size, seq_len) - seq_len * s.n_embd
    return 6.0 * n + 12.0 * s.n_layer * s.n_embd * seq_len


def scale_table(vocab_size: int, seq_len: int = 1024) -> list[dict]:
    """One row per scale (for ``dograph scales``): shape and parameters at this vocabulary."""
    return [
        {
            "scale": name,
            "layers": s.n_layer,
            "width": s.n_embd,
            "heads": s.n_head,
            "params": param_count(name, vocab_size, seq_len),
            "params_gpt2_vocab": param_count(name, 50257, 1024),
            "note": s.note,
        }
        for name, s in SCALES.items()
    ]
