"""The layer rule, the `dograph` CLI's help and its answers to bad input."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["prepare", "tokenize", "scales", "train", "search", "evaluate", "report", "run"]


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
