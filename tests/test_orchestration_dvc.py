"""dvc.yaml: the data stages build on a tiny local corpus, a second `dvc repro` does nothing, and
`dvc exp run -S` runs a variant. Runs in a copy of the project's code (DVC outputs must live inside
the repository, and the test must not write into the real one)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from _orch_fixture import ROOT, VENV_BIN, service_env, write_local_corpus, write_params

pytestmark = pytest.mark.skipif(not (VENV_BIN / "dvc").exists(), reason="dvc is not installed in the venv")


def _sh(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def test_dvc_repro_twice_is_a_no_op_and_exp_run_works(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dograph_core", "tasks", "flows", "configs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    corpus = write_local_corpus(tmp_path / "corpus")
    write_params(repo / "params.yaml", [
        "prepare.source=local", f"prepare.local.path={corpus}", "prepare.heldout=[letters]",
        "prepare.total_mb=0.2", "prepare.heldout_mb=0.03", "prepare.min_ratio=1",
    ])
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = service_env(tmp_path)
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    dvc = str(VENV_BIN / "dvc")
    _sh(["git", "init", "-q"], repo, env)
    _sh([dvc, "init", "-q"], repo, env)
    _sh([dvc, "config", "core.analytics", "false"], repo, env)

    first = _sh([dvc, "repro", "tokenize"], repo, env)
    assert "Running stage 'prepare'" in first and "Running stage 'tokenize'" in first
    meta = json.loads((repo / "data" / "tokenized" / "corpus.json").read_text())
    assert meta["train_domains"] == ["code", "notes", "prose"] and meta["heldout_domains"] == ["letters"]

    second = _sh([dvc, "repro", "tokenize"], repo, env)
    assert "Running stage" not in second and "up to date" in second

    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "data stages"], repo, env)
    exp = _sh([dvc, "exp", "run", "tokenize", "-S", "tokenize.vocab_size=280"], repo, env)
    assert "Running stage 'tokenize'" in exp and "Running stage 'prepare'" not in exp
    assert json.loads((repo / "data" / "tokenized" / "corpus.json").read_text())["vocab_size"] == 280
