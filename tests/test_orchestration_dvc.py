"""dvc.yaml: the stage graph builds on a tiny local corpus, a second `dvc repro` does nothing, and
`dvc exp run -S` re-runs only what a changed parameter touches. Runs in a copy of the project's code
(DVC outputs must live inside the repository, and the test must not write into the real one)."""
from __future__ import annotations

import hashlib
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


def _md5s_in_cache(repo: Path) -> set[str]:
    """The content hashes DVC holds in its cache (``.dvc/cache/files/md5/ab/cdef...``)."""
    root = repo / ".dvc" / "cache"
    return {f.parent.name + f.name for f in root.rglob("*") if f.is_file() and len(f.parent.name) == 2}


def test_dvc_repro_keeps_finished_units_and_reruns_only_what_changed(tmp_path):
    """`dvc repro` builds everything on a tiny local corpus and a second one does nothing. The pipeline
    stage's unit directories persist: `dvc exp run -S` on one method's parameter trains that method
    again and leaves the other's finished unit untouched; trained models stay out of the DVC cache.
    `dvc exp run tokenize -S` re-runs tokenize, not prepare."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dograph_core", "tasks", "flows", "configs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    corpus = write_local_corpus(tmp_path / "corpus")
    write_params(repo / "params.yaml", [
        "prepare.source=local", f"prepare.local.path={corpus}", "prepare.heldout=[letters]",
        "prepare.total_mb=0.2", "prepare.heldout_mb=0.03", "prepare.min_ratio=1",
        "pipeline.methods=[uniform,odm]", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = service_env(tmp_path)
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    dvc = str(VENV_BIN / "dvc")
    _sh(["git", "init", "-q"], repo, env)
    _sh([dvc, "init", "-q"], repo, env)
    _sh([dvc, "config", "core.analytics", "false"], repo, env)

    first = _sh([dvc, "repro"], repo, env)
    assert all(f"Running stage '{s}'" in first for s in ("prepare", "tokenize", "pipeline"))
    meta = json.loads((repo / "data" / "tokenized" / "corpus.json").read_text())
    assert meta["train_domains"] == ["code", "notes", "prose"] and meta["heldout_domains"] == ["letters"]
    train = repo / "runs" / "dvc" / "train"
    units = {m: train / f"{m}__nano__s0" for m in ("uniform", "odm")}
    markers = {m: Path(f"{d}.done.json") for m, d in units.items()}
    before = {m: (f.stat().st_mtime_ns, f.read_text()) for m, f in markers.items()}
    summaries = {m: (d / "summary.json").stat().st_mtime_ns for m, d in units.items()}

    second = _sh([dvc, "repro"], repo, env)
    assert "Running stage" not in second

    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "first run"], repo, env)
    exp = _sh([dvc, "exp", "run", "-S", "+methods.odm.alpha=0.5"], repo, env)  # + adds a key
    assert "Running stage 'pipeline'" in exp and "Running stage 'tokenize'" not in exp
    # uniform's finished unit was kept and skipped; odm's key changed, so it trained again
    assert (markers["uniform"].stat().st_mtime_ns, markers["uniform"].read_text()) == before["uniform"]
    assert (units["uniform"] / "summary.json").stat().st_mtime_ns == summaries["uniform"]
    assert markers["odm"].read_text() != before["odm"][1]
    assert (units["odm"] / "summary.json").stat().st_mtime_ns != summaries["odm"]
    # the trained model is not copied into the DVC cache
    model = units["uniform"] / "final" / "model.safetensors"
    assert model.is_file()
    assert hashlib.md5(model.read_bytes()).hexdigest() not in _md5s_in_cache(repo)

    tok = _sh([dvc, "exp", "run", "tokenize", "-S", "tokenize.vocab_size=280"], repo, env)
    assert "Running stage 'tokenize'" in tok and "Running stage 'prepare'" not in tok
    assert json.loads((repo / "data" / "tokenized" / "corpus.json").read_text())["vocab_size"] == 280
