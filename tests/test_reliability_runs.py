"""Reliability of training runs (issue 16, probes 62, 66, 68, 73, 75-80, 90 and the 0600 model file).

Nothing stale is resumed, nothing is mixed, a corrupt checkpoint is caught, and an output that
cannot be written gives ``error: ... <path>`` before any work. Tiny corpora and configs, built here.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from _engine_fixture import make_corpus, tiny_train_cfg

ROOT = Path(__file__).resolve().parent.parent
PARAMS = str(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "tok")


def _train(corpus: Path, out: Path, **kw):
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.train import train

    cfg = tiny_train_cfg(**{k: kw.pop(k) for k in list(kw) if k in ("steps", "ckpt_every")})
    cfg = cfg.model_copy(update={"lr": kw.pop("lr")}) if "lr" in kw else cfg  # (an inf lr no longer validates)
    return train(cfg, TokenCorpus(corpus), "uniform", {"type": "uniform"}, out, **kw)


def _cli(capsys, corpus: Path, *args: str) -> tuple[int, str]:
    """``dograph ARGS`` in this process on the nano preset over the test corpus: (rc, stderr)."""
    from flows.cli import main

    rc = main([*args, "--params", PARAMS, "--preset", "nano", "--quiet", "--set", f"tokenize.out_dir={corpus}",
               "--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "train.threads=1"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` as a read-only directory: chmod for a user, a read-only tmpfs for root (skipped where neither works)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("root cannot mount a read-only tmpfs here, and chmod does not stop root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# -- 90: a changed key never resumes ------------------------------------------------------------

def test_a_changed_code_version_retrains_from_step_0_and_says_so(tmp_path, corpus, caplog):
    from dograph_core.config import load_params
    from tasks.steps import train_step

    p = load_params(PARAMS, "nano", [f"tokenize.out_dir={corpus}", "train.steps=3", "train.eval_every=0",
                                     "train.threads=1", f"pipeline.out_dir={tmp_path}"])
    data = {"out_dir": str(corpus), "data_version": "d1", "code": "code-1"}
    unit = tmp_path / "run" / "train" / "uniform__nano__s0"
    assert train_step(p, "uniform", "nano", 0, data, tmp_path / "run")["cached"] is False
    assert train_step(p, "uniform", "nano", 0, data, tmp_path / "run")["cached"] is True
    (unit / "mixer" / "stale.txt").parent.mkdir(exist_ok=True)
    (unit / "mixer" / "stale.txt").write_text("from the old code")
    res = train_step(p, "uniform", "nano", 0, {**data, "code": "code-2"}, tmp_path / "run")
    assert res["cached"] is False
    summary = json.loads((unit / "summary.json").read_text())
    assert summary["resumed_from_step"] == 0  # retrained; the old code's final checkpoint was not "resumed"
    assert not (unit / "mixer" / "stale.txt").exists()
    assert "starting again from step 0" in caplog.text and str(unit) in caplog.text


def test_the_unit_key_lives_in_the_checkpoint(tmp_path, corpus):
    from dograph_core.checkpoint import CheckpointError

    _train(corpus, tmp_path / "out", key="key-1")
    with pytest.raises(CheckpointError, match="unit.key: checkpoint has 'key-1', this run has 'key-2'"):
        _train(corpus, tmp_path / "out", key="key-2", resume=True)


# -- 73: one writer per output directory ---------------------------------------------------------

def test_a_second_training_into_the_same_out_is_refused(tmp_path, corpus):
    from dograph_core.io import RunLock, RunLockedError

    out = tmp_path / "out"
    with RunLock(out):  # what a first `dograph train` into it holds
        with pytest.raises(RunLockedError, match=f"output directory {out} is in use by pid {os.getpid()}"):
            _train(corpus, out)
    assert not (out / "checkpoints").exists()
    _train(corpus, out)  # released: now it trains


# -- 62: a flipped bit in a checkpoint ---------------------------------------------------------

def _flip_a_tensor_bit(ckpt: Path) -> None:
    with zipfile.ZipFile(ckpt) as z:
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        record = z.read(big)
    blob = bytearray(ckpt.read_bytes())
    at = blob.find(record) + len(record) // 2
    blob[at] ^= 0x01  # the lowest mantissa bit of one float: nothing else would notice
    ckpt.write_bytes(bytes(blob))


def test_a_corrupt_checkpoint_is_skipped_for_the_one_before_with_a_warning(tmp_path, corpus):
    from dograph_core.checkpoint import CheckpointWarning

    out = tmp_path / "out"
    _train(corpus, out, steps=4, ckpt_every=2)
    bad = out / "checkpoints" / "step_0000004.pt"
    _flip_a_tensor_bit(bad)
    with pytest.warns(CheckpointWarning, match=f"{bad} is corrupt"):
        summary = _train(corpus, out, steps=4, ckpt_every=2, resume=True)
    assert summary["resumed_from_step"] == 2


def test_the_nan_message_does_not_guess_the_cause_or_call_a_checkpoint_good(tmp_path, corpus):
    from dograph_core.train import TrainError

    with pytest.raises(TrainError) as e:
        _train(corpus, tmp_path / "out", steps=4, lr=float("inf"))
    assert "last good" not in str(e.value) and "Lower train.lr" not in str(e.value)
    assert "not diagnosed" in str(e.value)


# -- 66: temporaries of a write that a kill interrupted ----------------------------------------

def test_leftover_checkpoint_temporaries_are_removed_on_resume(tmp_path, corpus):
    out = tmp_path / "out"
    _train(corpus, out, steps=2, ckpt_every=1)
    left = [out / "checkpoints" / ".step_0000003.pt.k2j4x.tmp", out / ".final.abc123.tmp"]
    left[0].mkdir()
    (left[0] / "step_0000003.pt").write_bytes(b"half a checkpoint")
    left[1].mkdir()
    (out / "checkpoints" / ".step_0000004.pt.q9.tmp").write_bytes(b"")
    _train(corpus, out, steps=2, ckpt_every=1, resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert not left[1].exists()


# -- 76-80: outputs that cannot be written -----------------------------------------------------

def test_train_into_a_read_only_out_is_a_clear_error(tmp_path, corpus, capsys):
    with read_only(tmp_path / "ro") as ro:
        rc, err = _cli(capsys, corpus, "train", "--method", "uniform", "--out", str(ro / "run"))
    assert rc == 1 and err.startswith("error: cannot write ") and str(ro) in err


def test_train_into_an_out_that_is_a_file_is_a_clear_error(tmp_path, corpus, capsys):
    (tmp_path / "f").write_text("x")
    rc, err = _cli(capsys, corpus, "train", "--method", "uniform", "--out", str(tmp_path / "f"))
    assert rc == 1 and err == f"error: cannot write {tmp_path / 'f'}: it is a file, not a directory\n"


def test_a_full_disk_names_the_checkpoint_and_enospc(tmp_path, corpus, capsys, monkeypatch):
    import dograph_core.checkpoint as ck

    monkeypatch.setattr(ck, "open", lambda path, mode: open("/dev/full", mode), raising=False)  # ENOSPC on write
    rc, err = _cli(capsys, corpus, "train", "--method", "uniform", "--out", str(tmp_path / "o"),
                   "--set", "train.ckpt_every=1")
    assert rc == 1
    assert err.startswith(f"error: cannot write {tmp_path / 'o' / 'checkpoints' / 'step_0000001.pt'}: ")
    assert "(ENOSPC)" in err and "unexpected pos" not in err
    assert list((tmp_path / "o" / "checkpoints").iterdir()) == []  # no temporary left


def test_run_with_a_read_only_out_dir_fails_before_starting(tmp_path, corpus, capsys):
    with read_only(tmp_path / "ro") as ro:
        rc, err = _cli(capsys, corpus, "run", "--skip-data", "--no-track", "--set", f"pipeline.out_dir={ro / 'runs'}")
    assert rc == 1 and err.startswith(f"error: cannot write {ro / 'runs'}")


def test_evaluate_checks_its_out_before_evaluating(tmp_path, corpus, capsys):
    with read_only(tmp_path / "ro") as ro:
        rc, err = _cli(capsys, corpus, "evaluate", str(tmp_path / "no_model"), "--out", str(ro / "ev.json"))
    assert rc == 1 and err.startswith(f"error: cannot write {ro}")  # not the missing model: --out first


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_metrics_log_that_failed_to_open_closes_quietly(tmp_path):
    from dograph_core.outputs import MetricsLog

    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        MetricsLog(tmp_path / "f" / "metrics.jsonl")
    gc.collect()


# -- 75: the CLI respects the data locks -------------------------------------------------------

def test_tokenize_force_waits_for_no_one_reading_and_train_for_no_one_writing(tmp_path, corpus, capsys):
    from tasks.cache import DataLock

    prepared = tmp_path / "prepared"
    with DataLock(prepared, corpus).acquire(exclusive=False):  # a pipeline reading the corpus
        rc, err = _cli(capsys, corpus, "tokenize", "--force", "--set", f"prepare.out_dir={prepared}")
    assert rc == 1 and f"error: {prepared} is being read by another pipeline run or dograph command" in err
    assert not prepared.exists() and (corpus / "corpus.json").exists()
    with DataLock(corpus).acquire(exclusive=True):  # a pipeline rewriting it
        rc, err = _cli(capsys, corpus, "train", "--method", "uniform", "--out", str(tmp_path / "t"))
    assert rc == 1 and f"error: {corpus} is being written" in err and not (tmp_path / "t").exists()


# -- 68: the hint after Ctrl-C -----------------------------------------------------------------

def test_interrupted_train_says_to_add_resume(tmp_path, monkeypatch, capsys):
    import flows.cli as cli

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train", "--method", "uniform", "--out", str(tmp_path)]) == 130
    assert "run the same command with --resume to resume" in capsys.readouterr().err


# -- the final model is readable by others, like every other output ---------------------------

def test_final_model_files_follow_the_umask_and_print_no_bar(tmp_path, corpus, capfd):
    from transformers.utils import logging as hf_logging

    old = os.umask(0o022)
    try:
        _train(corpus, tmp_path / "out", steps=1)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out" / "final").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}
    # saving one file prints no "Writing model shards" bar (--quiet printed it), and the setting is restored
    assert "Writing model shards" not in "".join(capfd.readouterr())
    assert hf_logging.is_progress_bar_enabled()


def test_writable_dir_names_enospc(tmp_path, monkeypatch):
    import tempfile

    from dograph_core.io import OutputError, writable_dir

    def full(**kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path}: No space left on device \(ENOSPC\)"):
        writable_dir(tmp_path)


def test_the_code_version_follows_the_training_code_not_the_report_or_the_config(tmp_path, monkeypatch):
    import tasks.steps as steps

    core = tmp_path / "dograph_core"
    (core / "mixers").mkdir(parents=True)
    files = ("report.py", "study.py", "config.py", "train.py", "mixers/odm.py", "mixers/config.py")
    for name in files:
        (core / name).write_text("x = 1\n")
    monkeypatch.setattr(steps, "_ROOT", tmp_path)
    version = steps.code_version("dograph_core")
    for name in ("report.py", "study.py", "config.py"):  # read finished runs, or resolve what the key holds
        (core / name).write_text("x = 2\n")
        assert steps.code_version("dograph_core") == version, name
    for name in ("train.py", "mixers/odm.py", "mixers/config.py"):  # a mixer's own defaults are not in the key
        (core / name).write_text("x = 2\n")
        assert steps.code_version("dograph_core") != version, name
        version = steps.code_version("dograph_core")
    # what the code does, not how it is written up: a docstring, a comment or the layout changes nothing
    (core / "train.py").write_text('"""The loop."""\n\n\ndef f(a):\n    """Add one."""\n    return a + 1\n')
    version = steps.code_version("dograph_core")
    (core / "train.py").write_text('"""The training loop, described better."""\n\n\ndef f(a):  # one more\n'
                                   '    """Add one to a."""\n\n    return (a + 1)\n')
    assert steps.code_version("dograph_core") == version
    (core / "train.py").write_text('"""The loop."""\n\n\ndef f(a):\n    """Add one."""\n    return a + 2\n')
    assert steps.code_version("dograph_core") != version
    (core / "train.py").write_text('x = 1\n"a string after the first statement is code"\n')
    version = steps.code_version("dograph_core")
    (core / "train.py").write_text('x = 1\n"another string"\n')
    assert steps.code_version("dograph_core") != version
