"""Bad input to the prepare stage: each case warns or fails by name, and no partial output survives."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dograph_core.config import ConfigError, PrepareConfig, validate
from dograph_core.data.prepare import prepare, read_manifest
from dograph_core.data.text import DataWarning, PrepareError
from tests._prepare_fixture import cfg_for, gen_text, jsonl_file, txt_tree

pytestmark = pytest.mark.filterwarnings("ignore:prepare.total_mb=.*:dograph_core.data.text.DataWarning")

SIZES = {"alpha": 20_000, "beta": 10_000}
ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, **kw):
    return cfg_for(tmp_path, **{"source": "local", "local": {"path": str(tmp_path / "src")}, "total_mb": 1.0, **kw})


def test_empty_domain_is_skipped_by_name(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    (tmp_path / "src" / "hollow").mkdir()
    (tmp_path / "src" / "blank").mkdir()
    (tmp_path / "src" / "blank" / "spaces.txt").write_text("  \n\n\t \n")
    with pytest.warns(DataWarning) as rec:
        m = prepare(_cfg(tmp_path), progress=False)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "'hollow'" in msgs and "'blank'" in msgs and "empty" in msgs
    assert m["train_domains"] == ["alpha", "beta"]
    assert {s.get("domain") for s in m["skipped"]} >= {"hollow", "blank"}
    assert not (Path(m["config"]["out_dir"]) / "train" / "hollow.jsonl").exists()


def test_domain_smaller_than_a_training_sequence(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    (tmp_path / "src" / "tiny").mkdir()
    (tmp_path / "src" / "tiny" / "t.txt").write_text("just a few words\n")
    with pytest.warns(DataWarning, match=r"'tiny'.*only 17 characters.*min_domain_chars=500"):
        m = prepare(_cfg(tmp_path), progress=False)
    assert "tiny" not in m["domains"]


def test_binary_and_non_utf8_files_are_skipped_by_name(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    (tmp_path / "src" / "alpha" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "src" / "beta" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.warns(DataWarning) as rec:
        m = prepare(_cfg(tmp_path), progress=False)
    msgs = [str(w.message) for w in rec]
    assert any("latin1.txt" in x and "not valid UTF-8" in x for x in msgs)
    assert any("image.txt" in x and "binary" in x for x in msgs)
    files = {s.get("file", "") for s in m["skipped"]}
    assert any(f.endswith("latin1.txt") for f in files) and any(f.endswith("image.txt") for f in files)
    assert m["train_domains"] == ["alpha", "beta"]


def test_jsonl_line_without_text_field_names_file_and_line(tmp_path):
    path = jsonl_file(tmp_path / "src" / "d.jsonl", SIZES)
    lines = path.read_text().splitlines()
    lines.insert(2, json.dumps({"body": "no text here", "domain": "alpha"}))
    lines.insert(4, "{not json")
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(DataWarning) as rec:
        m = prepare(_cfg(tmp_path, doc_chars=5000), progress=False)
    msgs = [str(w.message) for w in rec]
    assert any(f"{path}:3" in x and "no text field 'text'" in x for x in msgs)
    assert any(f"{path}:5" in x and "not valid JSON" in x for x in msgs)
    assert m["train_domains"] == ["alpha", "beta"]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_is_streamed_with_any_line_end_and_a_file_not_utf8_is_skipped_whole(tmp_path, gz):
    import gzip

    clean = jsonl_file(tmp_path / "clean" / "src" / "d.jsonl", SIZES)
    lines = clean.read_bytes().splitlines()
    # the same records with a byte-order mark, CRLF and bare CR line ends, and no final line end
    data = b"\xef\xbb\xbf" + b"\r\n".join(lines[: len(lines) // 2]) + b"\r" + b"\r".join(lines[len(lines) // 2:])
    bad = b'{"text": "caf\xe9 ' + b"x" * 6000 + b'", "domain": "alpha"}\n' + lines[0] + b"\n"  # Latin-1
    (tmp_path / "src").mkdir()
    for name, blob in (("d.jsonl", data), ("e.jsonl", bad)):
        path = tmp_path / "src" / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.warns(DataWarning) as rec:
        m = prepare(_cfg(tmp_path, doc_chars=5000), progress=False)
    msgs = [str(w.message) for w in rec]
    utf8 = [x for x in msgs if "not valid UTF-8" in x]
    assert len(utf8) == 1 and "e.jsonl" in utf8[0] and "line 1" in utf8[0]  # the whole file, once
    assert not [x for x in msgs if "d.jsonl" in x]  # BOM and line ends are not errors
    m_clean = prepare(_cfg(tmp_path / "clean", doc_chars=5000), progress=False)
    # every record of d, none of e (not even its good second line)
    assert {d: v["docs"] for d, v in m["domains"].items()} == {d: v["docs"] for d, v in m_clean["domains"].items()}


def test_parquet_without_text_column_is_an_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 900] * 4, "domain": ["a", "b"] * 2}), tmp_path / "d.parquet")
    cfg = cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "d.parquet")})
    with pytest.raises(PrepareError, match=r"d\.parquet: no text column 'text' \(columns: \['body', 'domain'\]\)"):
        prepare(cfg, progress=False)


def test_duplicate_domain_names(tmp_path):
    with pytest.raises(ConfigError, match="duplicate domain names"):
        validate({"prepare": {"domains": ["code", "legal", "code"]}})
    txt_tree(tmp_path / "src", {"Legal": 5000, "legal": 5000, "other": 5000})
    with pytest.raises(PrepareError, match=r"duplicate domain names: 'Legal' and 'legal'"):
        prepare(_cfg(tmp_path), progress=False)
    rows = [{"text": gen_text(k, 900), "domain": d} for k, d in enumerate(["web/en", "web_en", "x"] * 2)]
    (tmp_path / "j.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "j.jsonl")})
    with pytest.raises(PrepareError, match=r"'web/en' and 'web_en' would both be written as web_en\.jsonl"):
        prepare(cfg, progress=False)


def test_bad_selection_and_too_few_domains(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    with pytest.raises(PrepareError, match=r"names \['nope'\].*available: \['alpha', 'beta'\]"):
        prepare(_cfg(tmp_path, domains=["alpha", "nope"]), progress=False)
    with pytest.raises(PrepareError, match="both name"):
        prepare(_cfg(tmp_path, domains=["alpha", "beta"], heldout=["alpha"]), progress=False)
    with pytest.raises(PrepareError, match="a mixture needs at least 2"):
        prepare(_cfg(tmp_path, domains=["alpha"]), progress=False)
    with pytest.warns(DataWarning, match=r"held-out domain\(s\) \['email'\] not found"):
        prepare(_cfg(tmp_path, heldout=["email"]), progress=False)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(cfg_for(tmp_path, source="local", local={"path": str(tmp_path / "missing")}), progress=False)
    with pytest.raises(ConfigError, match="prepare.total_mb"):
        validate({"prepare": {"total_mb": -1}})


_KILLED_RUN = """
import sys, time
from pathlib import Path
import dograph_core.data.prepare as P
from dograph_core.config import PrepareConfig
cfg = PrepareConfig.model_validate_json(sys.argv[1])
real = P._write_jsonl
def slow(path, domain, docs):
    real(path, domain, docs)
    Path(sys.argv[2]).touch()  # one file is half-way through the output: the parent kills us now
    time.sleep(120)
P._write_jsonl = slow
P.prepare(cfg, progress=False)
"""


def _kill_mid_write(cfg: PrepareConfig, marker: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", _KILLED_RUN, cfg.model_dump_json(), str(marker)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), f"the child never reached the write: {proc.communicate()[1][-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_mid_write_leaves_no_partial_output(tmp_path):
    txt_tree(tmp_path / "src", SIZES)
    cfg = _cfg(tmp_path)
    out = Path(cfg.out_dir)
    _kill_mid_write(cfg, tmp_path / "m1")
    assert not out.exists(), "no output directory after a run killed before it finished"

    first = prepare(cfg, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg2 = _cfg(tmp_path, total_mb=0.02)
    _kill_mid_write(cfg2, tmp_path / "m2")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "the previous complete output is intact"
    assert read_manifest(out) == first
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers, "the killed run's temporary directory is beside the output, never inside it"
    prepare(cfg2, progress=False)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "next run cleans up"
    assert read_manifest(out)["config"]["total_mb"] == 0.02
