"""The layer rule, the `dograph` CLI's help and its answers to bad input."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["prepare", "tokenize", "partition", "scales", "train", "search", "evaluate", "report", "run"]


def test_core_never_imports_prefect_mlflow_or_dvc():
    pat = re.compile(r"^\s*(import|from)\s+(prefect|mlflow|dvc|prefect_dask)\b", re.M)
    offenders = [str(f.relative_to(ROOT)) for f in (ROOT / "dograph_core").rglob("*.py") if pat.search(f.read_text())]
    assert offenders == []


def test_core_imports_without_the_orchestration_stack():
    code = ("import sys, dograph_core.config, dograph_core.report, dograph_core.tracking;"
            "bad = [m for m in ('prefect', 'mlflow', 'dvc') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_help_lists_every_command_and_stays_light():
    out = _cli("--help")
    assert out.returncode == 0
    for c in COMMANDS:
        assert c in out.stdout
    # --help must not pay for torch/prefect/mlflow
    code = "import sys; from flows import cli; cli.build_parser(); print(sorted(m for m in ('torch','prefect','mlflow') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_explains_its_options(command):
    out = _cli(command, "--help")
    assert out.returncode == 0
    assert "--params" in out.stdout and "--preset" in out.stdout and "--set KEY=VALUE" in out.stdout
    if command == "train":
        for opt in ("--method", "--scale", "--weights", "--resume", "--out", "--track"):
            assert opt in out.stdout


def test_bad_params_exit_with_a_message_not_a_traceback(tmp_path):
    out = _cli("prepare", "--set", "prepare.total_mb=-1")
    assert out.returncode == 2 and "prepare.total_mb = -1" in out.stderr and "Traceback" not in out.stderr
    out = _cli("run", "--set", "pipeline.methods=[nosuch]", "--no-track")
    assert out.returncode == 2 and "nosuch" in out.stderr and "Traceback" not in out.stderr
    out = _cli("prepare", "--set", "prepare.source=local", "--set", f"prepare.local.path={tmp_path / 'missing'}")
    assert out.returncode == 2 and "no such file or directory" in out.stderr
    out = _cli("report", "--run-dir", str(tmp_path))
    assert out.returncode == 1 and "no finished training runs" in out.stderr


def test_partition_prints_the_quality_skips_what_is_stored_and_names_bad_input(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _engine_fixture import make_corpus

    make_corpus(tmp_path / "tok")
    params = tmp_path / "params.yaml"
    params.write_text(f"tokenize: {{out_dir: {tmp_path / 'tok'}}}\npipeline: {{methods: []}}\n"
                      f"partitions:\n  words: {{kind: text, k: 3, out_dir: {tmp_path / 'parts'}}}\n"
                      f"  tiny: {{kind: text, k: 2, text: {{min_df: 100000}}, out_dir: {tmp_path / 'parts'}}}\n")
    out = _cli("partition", "words", "--params", str(params), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "partition words (text, 3 nodes over 210 training documents)" in out.stdout and "ARI 1.00" in out.stdout
    assert "up to date, skipped" in _cli("partition", "words", "--params", str(params)).stdout
    out = _cli("partition", "tiny", "--params", str(params))
    assert out.returncode == 1 and "partitions.tiny.text" in out.stderr and "Traceback" not in out.stderr
    out = _cli("partition", "nosuch", "--params", str(params))
    assert out.returncode == 2 and "'nosuch'" in out.stderr and "defined: ['tiny', 'words']" in out.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "parts").iterdir()) == ["words"]  # nothing half-written


def test_log_level_shows_dographs_own_messages_only_here_and_in_started_processes(capsys, monkeypatch):
    import logging

    from flows.cli import main
    from tasks.logs import LOG_LEVEL_ENV, LOGGERS, show_logs_from_env

    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
             for n in LOGGERS}
    monkeypatch.setenv(LOG_LEVEL_ENV, "")  # recorded, so the level main() sets is undone after the test

    def reset() -> None:
        for n, (level, handlers, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.setLevel(level), setattr(lg, "propagate", propagate)
            lg.handlers[:] = handlers

    try:
        assert main(["--log-level", "info", "scales"]) == 0
        logging.getLogger("dograph_core.mixers.dograph").info("model-perceived domains in force")
        logging.getLogger("dograph_core.train").debug("below the level")
        logging.getLogger("mlflow.store").info("another library's chatter")
        err = capsys.readouterr().err
        assert err.count("INFO dograph_core.mixers.dograph: model-perceived domains in force") == 1
        assert "below the level" not in err and "chatter" not in err
        # a process the CLI starts (a process-pool worker, a torchrun rank) reads the level it was given
        assert __import__("os").environ[LOG_LEVEL_ENV] == "INFO"
        reset()
        show_logs_from_env()
        show_logs_from_env()  # a second call replaces its handler, it does not print twice
        logging.getLogger("tasks.steps").info("a unit started")
        assert capsys.readouterr().err.count("INFO tasks.steps: a unit started") == 1
    finally:
        reset()
