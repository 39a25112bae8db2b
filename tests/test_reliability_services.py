"""What `dograph run` leaves listening and running (issue 16, probes 69-71 and 87).

One Ctrl-C stops the training in flight at its next step with a checkpoint and exits 130; a kill
of `dograph run` does not orphan its temporary Prefect server; the Dask runner's dashboards listen
on loopback only. Each test starts its own services and stops them.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from _engine_fixture import make_corpus
from _orch_fixture import ROOT, VENV_BIN, service_env

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow


def _listening(proc: "psutil.Process") -> list[str]:
    return [c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]


def test_dask_runner_listens_on_loopback_only():
    pytest.importorskip("prefect_dask")
    from dograph_core.config import load_params
    from flows.pipeline import task_runner

    p = load_params(ROOT / "params.yaml", "nano", ["pipeline.task_runner=dask", "pipeline.max_parallel=2"])
    with task_runner(p) as runner:
        assert runner.client is not None  # the local cluster starts here, as in a pipeline run
        ips = _listening(psutil.Process())
    assert ips and set(ips) == {"127.0.0.1"}, ips  # scheduler and worker dashboards, nothing on 0.0.0.0 or ::


def _start_run(tmp_path: Path, corpus: Path) -> tuple[subprocess.Popen, Path]:
    cmd = [str(VENV_BIN / "dograph"), "run", "--params", str(ROOT / "params.yaml"), "--preset", "nano", "--skip-data",
           "--no-track", "--quiet", "--run-id", "sig", "--set", f"tokenize.out_dir={corpus}",
           "--set", f"pipeline.out_dir={tmp_path / 'runs'}", "--set", "pipeline.methods=[uniform]",
           "--set", "train.steps=5000", "--set", "train.eval_every=0", "--set", "train.threads=1"]
    proc = subprocess.Popen(cmd, env=service_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "sig" / "train" / "uniform__nano__s0" / "metrics.jsonl"
    lines = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    before, deadline = lines(), time.time() + 240
    while lines() < before + 3:  # training (again): steps logged by this process
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    return proc, metrics.parent


def _server(proc: subprocess.Popen) -> "psutil.Process":
    kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
    assert len(kids) == 1, kids
    return kids[0]


def _gone(p: "psutil.Process", within: float) -> bool:
    try:
        p.wait(timeout=within)
    except psutil.TimeoutExpired:
        p.kill()
        return False
    return True


def test_one_ctrl_c_stops_training_with_a_checkpoint_and_a_kill_orphans_nothing(tmp_path):
    corpus = make_corpus(tmp_path / "tok")
    proc, unit = _start_run(tmp_path, corpus)
    server = _server(proc)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert time.time() - t0 < 20, out  # the next step, not the remaining 5000
    assert "stopped on request after step" in out, out
    ckpts = sorted((unit / "checkpoints").glob("step_*.pt"))
    assert ckpts and int(ckpts[-1].stem.split("_")[1]) < 5000 and not (unit / "summary.json").exists()
    assert _gone(server, 10)

    # the same command again (it resumes unless the code changed meanwhile); a SIGKILL takes its server along
    proc, _ = _start_run(tmp_path, corpus)
    server = _server(proc)
    proc.kill()
    proc.wait()
    assert _gone(server, 10), "the temporary Prefect server outlived dograph run"
