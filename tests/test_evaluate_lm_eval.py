"""`dograph evaluate MODEL --lm-eval TASKS`: lm-evaluation-harness on our final models, offline.

Two local tasks (YAML + JSON-lines data written at test time) run through the real harness on a tiny
GPT-2, and each result is checked against a computation of our own: the multiple-choice accuracy
against the argmax of the choices' summed log-probabilities, and the rolling task's bits per byte
against ``dograph evaluate --text`` on the same documents (two implementations, one number).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _scorer_fixture import make_scorer

pytest.importorskip("lm_eval")

from dograph_core.lmeval import LmEvalError, run_lm_eval  # noqa: E402
from dograph_core.textscore import bits_per_byte, load_scorer  # noqa: E402
from flows.cli import main  # noqa: E402

ITEMS = [
    {"question": "The river runs under the", "choices": ["bridge", "stone", "window"], "label": 0},
    {"question": "A small corpus of", "choices": ["words", "music", "light"], "label": 0},
    {"question": "Over the old", "choices": ["garden", "paper", "letter"], "label": 2},
    {"question": "Under the quiet north", "choices": ["window", "river"], "label": 1},
]
DOCS = [("The river runs under the old stone bridge, over and over again. " * 6).strip(),  # lm-eval strips templates
        ("A small corpus of words for a byte level tokenizer; naïve café. " * 2).strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    words = " ".join(w for it in ITEMS for w in [it["question"], *it["choices"]])
    return make_scorer(tmp_path_factory.mktemp("lm"), [*DOCS, words] * 4, n_positions=64, seed=1)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (d / "local_mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    (d / "local_ppl.yaml").write_text(
        "task: local_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    return d


def _choice_logprob(model, tok, context: str, choice: str) -> float:
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=x[:, :-1]).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_local_tasks_agree_with_our_own_scoring(model_dir, tasks_dir, tmp_path):
    out = tmp_path / "lm_eval.json"
    assert main(["evaluate", str(model_dir), "--lm-eval", "local_mc,local_ppl",
                 "--lm-eval-include", str(tasks_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]

    model, tok = load_scorer(model_dir)
    model.eval()
    hits = [max(range(len(it["choices"])), key=lambda j: _choice_logprob(model, tok, it["question"], it["choices"][j]))
            == it["label"] for it in ITEMS]
    assert res["local_mc"]["acc,none"] == pytest.approx(sum(hits) / len(ITEMS))

    ours = bits_per_byte(model, tok, {str(i): t for i, t in enumerate(DOCS)}, torch.device("cpu"))
    assert max(f["tokens"] for f in ours["files"].values()) > 64  # more than one window per document
    assert res["local_ppl"]["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte_pooled"], rel=1e-4)
    assert math.isfinite(ours["bits_per_byte_pooled"])


def test_unknown_tasks_and_bad_arguments_are_refused(model_dir, tasks_dir, tmp_path, capsys):
    with pytest.raises(LmEvalError, match=r"unknown task\(s\) \['no_such_task'\]"):
        run_lm_eval(model_dir, ["no_such_task"], include=tasks_dir)
    out = tmp_path / "x.json"
    assert main(["evaluate", str(model_dir), "--lm-eval", "no_such_task", "--out", str(out)]) == 1
    assert "no_such_task" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", str(model_dir), "--lm-eval", "local_mc", "--limit", "0"]) == 2
    assert main(["evaluate", str(model_dir), "--lm-eval", "local_mc", "--text", str(tmp_path)]) == 2
    with pytest.raises(FileNotFoundError, match="no model"):
        run_lm_eval(tmp_path, ["local_mc"], include=tasks_dir)
