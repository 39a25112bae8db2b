"""Named GPT-2 scales: shapes, parameter counts, and clear errors."""
from __future__ import annotations

import pytest
import torch

from dograph_core.model import SCALES, ScaleError, build_model, count_params, param_count, scale_table


@pytest.mark.parametrize("scale,lo,hi", [("nano", 0.5e6, 1e6), ("micro", 2e6, 4.5e6), ("mini", 10e6, 20e6)])
def test_cpu_scales_have_the_promised_size_at_vocab_4096(scale, lo, hi):
    model = build_model(scale, vocab_size=4096, seq_len=128, eot_id=0)
    n = count_params(model)
    assert lo <= n <= hi
    assert n == param_count(scale, 4096, 128)  # the formula the scale table uses is exact


def test_gpt2_family_counts_at_gpt2_vocabulary():
    expected = {"small": 124e6, "medium": 355e6, "large": 774e6, "xl": 1.558e9}
    for name, n in expected.items():
        assert abs(param_count(name, 50257, 1024) - n) / n < 0.03, name


def test_scale_table_lists_every_scale_with_counts():
    rows = scale_table(4096, 128)
    assert [r["scale"] for r in rows] == list(SCALES)
    assert all(r["params"] > 0 and r["layers"] > 0 for r in rows)
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)


def test_model_is_from_scratch_with_sdpa_and_eot_ids():
    torch.manual_seed(0)
    a = build_model("nano", 300, 16, eot_id=7)
    torch.manual_seed(0)
    b = build_model("nano", 300, 16, eot_id=7)
    assert a.config._attn_implementation == "sdpa"
    assert a.config.bos_token_id == a.config.eos_token_id == 7
    assert a.lm_head.weight is a.transformer.wte.weight  # tied: counted once
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_scale_names_the_known_ones():
    with pytest.raises(ScaleError, match=r"unknown model scale 'tiny'.*nano"):
        build_model("tiny", 300, 16, 0)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ScaleError, match="outside the vocabulary"):
        build_model("nano", 300, 16, eot_id=300)
    with pytest.raises(ScaleError, match="seq_len"):
        build_model("nano", 300, 1, eot_id=0)
