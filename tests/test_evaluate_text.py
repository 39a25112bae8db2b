"""Bits per byte of any model on a directory of text (`dograph evaluate MODEL --text DIR`).

The figures are checked against what they must be by hand: a model whose logits are all zero
predicts every token with probability 1/V, so its bits per byte is ``tokens * log2(V) / bytes``;
and the windowed scoring equals one full-context forward pass when the context covers the file,
whatever the batch (padding must not leak into the sum).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _scorer_fixture import make_scorer

from dograph_core.textscore import TextScoreError, bits_per_byte, load_scorer, read_texts, score_text
from flows.cli import main

TEXT = "The river runs under the old stone bridge. Über die Brücke, naïve café!\n" * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [TEXT, "a small corpus of words for a byte level tokenizer"] * 4
    return make_scorer(tmp_path_factory.mktemp("scorer"), texts, n_positions=128, seed=0)


@pytest.fixture()
def text_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text("naïve café under the bridge", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / ".hidden").write_text("not scored", encoding="utf-8")
    return tmp_path


def test_a_model_with_zero_logits_scores_log2_vocab_bits_per_token(model_dir, text_dir):
    model, tok = load_scorer(model_dir)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied output layer: every logit is 0, every token has p = 1/V
    res = bits_per_byte(model, tok, read_texts(text_dir), torch.device("cpu"), context=8)
    assert sorted(res["files"]) == ["b.txt", "sub/a.txt"] and res["skipped"] == ["empty.txt"]
    V = model.config.vocab_size
    for name, v in res["files"].items():
        n_tokens = len(tok(read_texts(text_dir)[name], add_special_tokens=False)["input_ids"])
        assert v["tokens"] == n_tokens  # every token of the text is predicted, the first one too
        assert v["bits_per_byte"] == pytest.approx(n_tokens * math.log2(V) / v["bytes"], rel=1e-6)
        assert v["bytes"] > len(read_texts(text_dir)[name])  # bytes, not characters (the text has umlauts)
    total = sum(v["bits"] for v in res["files"].values()) / sum(v["bytes"] for v in res["files"].values())
    assert res["bits_per_byte_pooled"] == pytest.approx(total)


def test_windowed_scoring_equals_one_full_forward_pass_whatever_the_batch(model_dir):
    model, tok = load_scorer(model_dir)
    model.eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < 128
    seq = torch.tensor([[tok.eos_token_id, *ids]])
    with torch.no_grad():
        logits = model(input_ids=seq[:, :-1]).logits
    nll = float(F.cross_entropy(logits[0], seq[0, 1:], reduction="sum"))
    expected = nll / math.log(2) / len(TEXT.encode("utf-8"))
    full = score_text(model, tok, TEXT, context=128, device=torch.device("cpu"))
    assert full["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    # windows of 7: each scores its own tokens from the window's tokens before them; the last, shorter
    # one is right-aligned, so its first inputs are context only. By hand, one forward pass per window:
    n, c, by_hand = len(ids), 7, 0.0
    for s in range(0, n, c):
        e = min(s + c, n)
        lo = max(0, e - c)
        with torch.no_grad():
            lg = model(input_ids=seq[:, lo:e]).logits[0]
        by_hand += float(F.cross_entropy(lg[s - lo:], seq[0, s + 1:e + 1], reduction="sum"))
    assert n % c != 0  # the text ends in a partial window
    for batch in (1, 8):  # the windows of one forward pass do not see each other
        w = score_text(model, tok, TEXT, context=c, device=torch.device("cpu"), batch=batch)
        assert w["bits"] == pytest.approx(by_hand / math.log(2), rel=1e-5)
        assert w["tokens"] == full["tokens"] == n


def test_cli_writes_the_scores_and_refuses_bad_text(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "bpb.json"
    assert main(["evaluate", str(model_dir), "--text", str(text_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lossless"] and set(res["files"]) == {"b.txt", "sub/a.txt"}
    assert "pooled" in capsys.readouterr().out
    assert main(["evaluate", str(model_dir), "--text", str(text_dir), "--context", "999"]) == 1
    assert "context must be 1 to 128 tokens" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir), "--text", str(text_dir), "--limit", "3"]) == 2
    assert "--limit: not used with --text" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.bin").write_bytes(b"\xff\xfe\x00binary")
    out2 = tmp_path / "bad.json"
    assert main(["evaluate", str(model_dir), "--text", str(bad), "--out", str(out2)]) == 1
    assert "x.bin: not UTF-8" in capsys.readouterr().err and not out2.exists()
    assert main(["evaluate", str(model_dir), "--text", str(bad), "--glob", "*.txt"]) == 1
    assert "no files match '*.txt'" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir), "--text", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert main(["evaluate", str(model_dir), "--text", str(text_dir), "--context", "0"]) == 2
    assert "--context must be at least 1" in capsys.readouterr().err
    with pytest.raises(TextScoreError, match="every file is empty"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "e.txt").write_text("")
        model, tok = load_scorer(model_dir)
        bits_per_byte(model, tok, read_texts(empty), torch.device("cpu"))
