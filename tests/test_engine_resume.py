"""A run killed with SIGKILL after a checkpoint and resumed equals an uninterrupted run: losses and data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path


from _engine_fixture import make_corpus

from dograph_core.mixers.base import weights_document, write_weights

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from dograph_core.config import TrainConfig
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.tracking import NullTracker
    from dograph_core.train import train

    corpus_dir, out, kill_at, resume, wfile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]

    class Killer(NullTracker):
        def log_metrics(self, metrics, step=None):
            if kill_at and step == kill_at and "loss" in metrics:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(steps=9, batch_size=8, seq_len=32, warmup_steps=2, eval_every=0, eval_windows=4,
                      ckpt_every=4, threads=1, progress=False, seed=3)
    params = {"path": wfile, "use_schedule": True}  # the weights change at steps 3 and 6
    s = train(cfg, TokenCorpus(corpus_dir), "static", params, out, tracker=Killer(), resume=resume)
    print("FINAL", s["final_loss"])
    """
)


def _run(script: Path, corpus: Path, out: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    wfile = script.parent / "weights.json"
    return subprocess.run([sys.executable, str(script), str(corpus), str(out), str(kill_at), "1" if resume else "0", str(wfile)],
                          env=env, capture_output=True, text=True, timeout=300)


def _steps(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["batch_crc"]) for r in rows if "loss" in r]


def test_sigkill_after_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    domains = ["alpha", "beta", "gamma"]
    history = [(0, [0.2, 0.5, 0.3]), (3, [0.6, 0.2, 0.2]), (6, [0.1, 0.1, 0.8])]
    write_weights(tmp_path / "weights.json", weights_document("test", domains, history[-1][1], history, 9))

    full = _run(script, corpus, tmp_path / "full", 0, False)
    assert full.returncode == 0, full.stderr

    killed = _run(script, corpus, tmp_path / "killed", 6, False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_0000004.pt"]
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = _run(script, corpus, tmp_path / "killed", 0, True)
    assert resumed.returncode == 0, resumed.stderr
    final = lambda p: [line for line in p.stdout.splitlines() if line.startswith("FINAL")]  # noqa: E731
    assert final(resumed) == final(full)
    assert _steps(tmp_path / "killed") == _steps(tmp_path / "full")  # same loss and same batch, every step
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert b["resumed_from_step"] == 4
    assert a["mixture"] == b["mixture"] and a["param_checksum"] == b["param_checksum"]
    assert a["mixture"]["domains"]["gamma"]["target"] > 0.4  # the schedule was followed
