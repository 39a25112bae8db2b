"""Small things a newcomer hits: ``--scale`` checked with the other settings, ``evaluate`` on the GPU,
``report --help`` naming what it writes, docs that stand alone, ``--version``, the dask extra."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _orch_fixture import ROOT

PARAMS = str(ROOT / "params.yaml")


@pytest.mark.parametrize("command", ["train", "search"])
def test_an_unknown_scale_is_a_config_error_before_any_data_is_read(command, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)  # no data/tokenized here: the scale must be reported first
    rc = main([command, "--params", PARAMS, "--method", "uniform", "--scale", "nonexistent", "--out", "X"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--scale 'nonexistent'" in err and "'nano'" in err and "Traceback" not in err


def _fake_evaluation(monkeypatch, tmp_path):
    """``evaluate`` with the corpus, the model and the scoring replaced: what matters is the device."""
    import dograph_core.data.corpus as corpus_mod
    import dograph_core.evaluate as evaluate_mod

    seen: dict = {}

    class Model:
        config = type("C", (), {"n_positions": 64})()

        def to(self, device):
            seen["model_on"] = device
            return self

    class Corpus:
        train_domains, heldout_domains = ["a"], []

        def __init__(self, path):
            pass

    def evaluate_final(model, corpus, domains, heldout, seq_len, n_windows, device, *a, **k):
        seen["scored_on"] = device
        return {"val": {"domains": {"a": {"loss": 1.0}}, "heldout": {}, "loss_mean": 1.0, "loss_worst": 1.0,
                        "worst_domain": "a"}}

    monkeypatch.setattr(corpus_mod, "TokenCorpus", Corpus)
    monkeypatch.setattr(evaluate_mod, "load_model", lambda path, corpus: Model())
    monkeypatch.setattr(evaluate_mod, "evaluate_final", evaluate_final)
    return seen, ["--params", PARAMS, "--set", f"tokenize.out_dir={tmp_path}"]


def test_evaluate_runs_on_the_gpu_when_there_is_one(tmp_path, monkeypatch, capsys):
    import torch

    from flows.cli import main

    seen, common = _fake_evaluation(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["evaluate", "some_model", *common]) == 0
    assert seen["model_on"] == torch.device("cuda:0") and seen["scored_on"] == torch.device("cuda:0")
    # the same setting as training: train.device=cpu keeps it on the CPU
    assert main(["evaluate", "some_model", *common, "--set", "train.device=cpu"]) == 0
    assert seen["scored_on"] == torch.device("cpu")


def test_evaluate_stays_on_the_cpu_without_a_gpu(tmp_path, monkeypatch):
    import torch

    from flows.cli import main

    seen, common = _fake_evaluation(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "some_model", *common]) == 0
    assert seen["scored_on"] == torch.device("cpu")


def _finished_run(tmp_path: Path) -> Path:
    """A run directory with one finished training run (the files the report reads) and its corpus table."""
    tok = tmp_path / "tokenized"
    tok.mkdir()
    (tok / "corpus.json").write_text(json.dumps({"train_domains": ["a", "b"], "heldout_domains": ["h"]}))
    run = tmp_path / "runs" / "r1"
    unit = run / "train" / "uniform__nano__s0"
    unit.mkdir(parents=True)
    (unit / "eval.json").write_text(json.dumps({"val": {"domains": {"a": {"loss": 2.0}, "b": {"loss": 3.0}},
                                                        "heldout": {"h": {"loss": 4.0}}}}))
    (unit / "summary.json").write_text(json.dumps({"wall_time_s": 1.0, "steps": 6}))
    (unit / "weights.json").write_text(json.dumps({"domains": ["a", "b"], "weights": [0.5, 0.5]}))
    (unit.with_name(unit.name + ".done.json")).write_text("{}")
    return run


def test_report_writes_every_file_its_help_names(tmp_path, capsys):
    from flows.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    promised = re.findall(r"[\w]+\.(?:md|json)|plots/", sub.choices["report"].description)
    assert {"report.md", "results.json", "metrics.json", "plots/"} <= set(promised)
    run = _finished_run(tmp_path)
    assert main(["report", "--run-dir", str(run), "--params", PARAMS, "--set",
                 f"tokenize.out_dir={tmp_path / 'tokenized'}"]) == 0
    for name in promised:
        assert (run / name).exists(), f"report --help promises {name}, which it did not write"
    assert json.loads((run / "metrics.json").read_text())["uniform"]["nano"]["val_loss_mean"] == 2.5


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_docs_link_only_to_files_in_the_repository():
    bad = []
    for md in _markdown_files():
        text = md.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # an anchor or a URL
                continue
            resolved = (md.parent / path).resolve()
            if path.startswith("/") or not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target}")
        for m in re.finditer(r"\.\./shared|/work/|file://", text):
            bad.append(f"{md.relative_to(ROOT)}: ...{text[max(0, m.start() - 30):m.end() + 30]}...")
    assert bad == []


def test_version(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"dograph \S+\n", capsys.readouterr().out)


def test_the_dask_runner_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    from dograph_core.config import ConfigError, load_params
    from tasks.params import check_params

    p = load_params(PARAMS, "nano", ["pipeline.task_runner=dask"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prefect_dask" else real(n, *a))
    with pytest.raises(ConfigError, match=r"dograph\[dask\]"):
        check_params(p)
