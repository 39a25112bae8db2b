"""Fetch pinned packages from the registries into a verified local cache.

Three registries, each through its ordinary client:

* Debian: ``apt-get download NAME=VERSION``, then ``dpkg-deb -x`` into ``root/``;
* PyPI: ``python -m pip download --no-deps NAME==VERSION`` (sdist or wheel, as pinned);
* npm: ``npm pack NAME@VERSION``.

Cache layout (under ``cache_dir``)::

    <registry>/<name>-<version>/<downloaded file>
    <registry>/<name>-<version>/verified.json   {"file", "size", "sha256"}
    deb/<name>-<version>/root/                 the extracted Debian package

A download is verified against the pinned sha256 when the catalogue pins one, and
its size and sha256 are recorded after the first fetch and checked on every later
use, so a truncated or swapped file is never read. Every failure raises
:class:`FetchError`, whose message names the package and the exact command that
retries the download by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

Registry = Literal["deb", "pypi", "npm"]

#: which executables each registry needs on PATH
TOOLS: dict[str, tuple[str, ...]] = {"deb": ("apt-get", "dpkg-deb"), "pypi": (), "npm": ("npm",)}


class FetchError(RuntimeError):
    """A package that could not be fetched, verified or extracted.

    ``package`` is the pinned spec (e.g. ``deb:pari-doc=2.15.2-1``), ``command`` the
    shell command that retries the download by hand. ``transient`` is True when trying
    again may succeed (a download that timed out or failed), False when it cannot (a
    missing tool, a file that does not match its pinned hash): retry policies read it.
    """

    def __init__(self, package: str, reason: str, command: str, transient: bool = True):
        self.package = package
        self.reason = reason
        self.command = command
        self.transient = transient
        super().__init__(f"could not fetch {package}: {reason}\n  retry by hand: {command}")


@dataclass(frozen=True)
class Package:
    """One pinned package of a registry."""

    registry: Registry
    name: str
    version: str
    sha256: Optional[str] = None  # pinned hash of the downloaded file; None = recorded on first fetch
    dist: Literal["sdist", "wheel", "any"] = "any"  # PyPI only: which distribution to take

    @property
    def spec(self) -> str:
        sep = {"deb": "=", "pypi": "==", "npm": "@"}[self.registry]
        return f"{self.registry}:{self.name}{sep}{self.version}"

    @property
    def slug(self) -> str:
        return f"{self.name.replace('/', '_').lstrip('@')}-{self.version.replace(':', '%3a')}"

    def command(self, dest: str | Path = ".") -> list[str]:
        """The download command, writing into ``dest`` (used as the working directory)."""
        if self.registry == "deb":
            return ["apt-get", "download", f"{self.name}={self.version}"]
        if self.registry == "npm":
            return ["npm", "pack", f"{self.name}@{self.version}"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{self.name}=={self.version}", "-d", str(dest)]
        if self.dist == "sdist":
            cmd[5:5] = ["--no-binary", self.name]
        elif self.dist == "wheel":
            cmd[5:5] = ["--only-binary", self.name]
        return cmd

    def retry_hint(self) -> str:
        cmd = self.command(".")
        if self.registry == "pypi":
            cmd = ["pip", *cmd[3:]]
        return shlex.join(cmd)


def missing_tools(registry: str) -> list[str]:
    """The executables this machine lacks to fetch from ``registry``."""
    return [t for t in TOOLS.get(registry, ()) if shutil.which(t) is None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(pkg: Package, cwd: Path, timeout: float) -> None:
    cmd = pkg.command(cwd)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PIP_NO_INPUT": "1"})
    except subprocess.TimeoutExpired:
        raise FetchError(pkg.spec, f"download timed out after {timeout:.0f} s", pkg.retry_hint()) from None
    except OSError as e:
        raise FetchError(pkg.spec, f"could not run {cmd[0]}: {e}", pkg.retry_hint()) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-4:])
        hint = ("\n  (if apt-get cannot find the version, run `apt-get update` first; a pinned version that "
                "left the Debian archive needs a newer pin)") if pkg.registry == "deb" else ""
        raise FetchError(pkg.spec, f"`{cmd[0]}` exited with {proc.returncode}: {tail}{hint}", pkg.retry_hint())


def _verify(pkg: Package, path: Path, record: Path) -> None:
    """Check ``path`` against the pinned hash and the record of its first fetch."""
    size, digest = path.stat().st_size, sha256_file(path)
    expected = pkg.sha256
    if record.exists():
        rec = json.loads(record.read_text())
        if rec.get("size") != size or rec.get("sha256") != digest:
            raise FetchError(
                pkg.spec,
                f"cached {path} does not match its record (size {size} vs {rec.get('size')}, "
                f"sha256 {digest[:12]} vs {str(rec.get('sha256'))[:12]}); delete {path.parent} and fetch again",
                pkg.retry_hint(), transient=False,
            )
    if expected and digest != expected:
        raise FetchError(
            pkg.spec, f"sha256 of {path.name} is {digest}, expected the pinned {expected}", pkg.retry_hint(),
            transient=False,
        )
    if not record.exists():
        record.write_text(json.dumps({"file": path.name, "size": size, "sha256": digest}) + "\n")


def fetch(pkg: Package, cache_dir: str | Path, timeout: float = 600.0) -> Path:
    """Return the verified local copy of ``pkg``, downloading it on first use.

    Debian packages return their extracted root directory; PyPI and npm packages
    return the downloaded archive (read in place by the extractors).
    """
    home = Path(cache_dir).resolve() / pkg.registry / pkg.slug
    record = home / "verified.json"
    cached = _cached_file(home, record)
    if cached is None:
        lacking = missing_tools(pkg.registry)
        if lacking:
            raise FetchError(
                pkg.spec,
                f"{' and '.join(lacking)} not found on this machine, so {pkg.registry} packages cannot be fetched",
                pkg.retry_hint(), transient=False,
            )
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=home, prefix=".download.") as tmp:
            _run(pkg, Path(tmp), timeout)
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if len(files) != 1:
                raise FetchError(pkg.spec, f"expected one downloaded file, found {sorted(p.name for p in files)}",
                                 pkg.retry_hint())
            _verify(pkg, files[0], record)  # before it enters the cache: a bad file never does
            cached = home / files[0].name
            os.replace(files[0], cached)
    else:
        _verify(pkg, cached, record)
    if pkg.registry == "deb":
        return _extract_deb(pkg, cached, home)
    return cached


def _cached_file(home: Path, record: Path) -> Optional[Path]:
    if not record.exists():
        return None
    name = json.loads(record.read_text()).get("file")
    path = home / str(name)
    return path if path.is_file() else None


def _extract_deb(pkg: Package, deb: Path, home: Path) -> Path:
    root = home / "root"
    if root.is_dir():
        return root
    if shutil.which("dpkg-deb") is None:
        raise FetchError(pkg.spec, "dpkg-deb not found on this machine, so the .deb cannot be extracted",
                         f"dpkg-deb -x {shlex.quote(str(deb))} {shlex.quote(str(root))}", transient=False)
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=".root."))
    try:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(pkg.spec, f"dpkg-deb -x failed: {proc.stderr.strip()[-300:]}",
                             f"dpkg-deb -x {shlex.quote(str(deb))} {shlex.quote(str(root))}")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
